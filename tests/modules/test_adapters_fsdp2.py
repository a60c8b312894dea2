"""Adapters under FSDP2 (ModelParallelStrategy, 2 CPU processes through the CLI): the adapter's replicated
tensors get rank-averaged gradients, so both ranks end with the same adapter; adapters with their own forward
are refused with a one-line error naming DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[2]
RECORDER = "tests.modules.test_adapters_fsdp2.AdapterRecorder"
DATA = ["--model.init_args.model", "tiny-llama", "--data.init_args.dataset", "chain_sum",
        "--data.init_args.num_train", "16", "--data.init_args.num_val", "4", "--data.init_args.num_test", "4",
        "--data.init_args.max_length", "128", "--data.init_args.batch_size", "2"]
TRAINER = ["--trainer.accelerator", "cpu", "--trainer.limit_val_batches", "0",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           "--trainer.max_steps", "3", "--model.init_args.export", "false"]


class AdapterRecorder(Callback):
    """Per rank: the adapter's tensors at fit start and at the end of training (replicated, not sharded)."""

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = {n: p.detach().cpu().clone() for n, p in pl_module.adapter.named_parameters()}

    def on_train_end(self, trainer, pl_module) -> None:
        path = Path(trainer.default_root_dir) / f"adapter.rank{trainer.global_rank}.pt"
        end = {n: p.detach().cpu().clone() for n, p in pl_module.adapter.named_parameters()}
        torch.save({"start": self.start, "end": end}, path)


def run_fsdp2(config: str, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ZOO_RUN_DIR", "TRITON_INTERPRET")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "zoo", "fit", "--config", str(REPO / config), "--config",
               str(REPO / "configs/strategies/fsdp2.yaml"), *DATA, *TRAINER, *extra,
               "--trainer.default_root_dir", str(tmp_path / "run")]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.multiproc
def test_dsee_adapter_tensors_agree_across_ranks_under_fsdp2(tmp_path):
    proc = run_fsdp2("configs/dsee.yaml", tmp_path, f"--trainer.callbacks+={RECORDER}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [torch.load(tmp_path / "run" / f"adapter.rank{r}.pt") for r in (0, 1)]
    rank0, rank1 = ranks[0]["end"], ranks[1]["end"]
    assert rank0 and set(rank0) == set(rank1)
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0), "the ranks' adapters diverged"
    assert any(not torch.equal(ranks[0]["start"][n], rank0[n]) for n in rank0), "the adapter did not train"


@pytest.mark.slow
@pytest.mark.multiproc
def test_soft_prompt_under_fsdp2_is_one_line_naming_ddp(tmp_path):
    proc = run_fsdp2("configs/prompt_tuning.yaml", tmp_path)
    assert proc.returncode != 0
    assert "configs/strategies/ddp.yaml" in proc.stderr
    assert "Traceback" not in proc.stderr.split("zoo: error:")[-1]
