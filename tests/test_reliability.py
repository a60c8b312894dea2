"""Reliability: resume equals an uninterrupted run; 2-process DDP and FSDP2 from YAML through the CLI; a
signal to one DDP rank stops every rank at one step with a checkpoint."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "configs" / "smoke" / "tiny.yaml"


class StopAfterEpoch(Callback):
    """Interrupt the run at the end of epoch ``epoch`` (an epoch boundary, so the data order is
    reproducible)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _trainer(root: Path, max_steps: int, callbacks=(), checkpointing: bool = False) -> L.Trainer:
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                     enable_checkpointing=checkpointing, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                     default_root_dir=root, callbacks=list(callbacks), gradient_clip_val=1.0)


def test_resume_from_checkpoint_equals_uninterrupted_run(tiny_module, tiny_data, tmp_path):
    def data():
        return tiny_data(num_train=16, max_length=256, batch_size=4)

    probe = data()
    probe.setup("fit")
    per_epoch = len(probe.train_dataloader())
    assert per_epoch >= 2
    total = 3 * per_epoch  # three epochs; interrupted after the first

    L.seed_everything(0, verbose=False)
    straight = tiny_module(lr=3e-3, warmup_steps=1)  # cosine schedule over `total` steps
    _trainer(tmp_path / "a", total).fit(straight, datamodule=data())
    assert straight.global_step == total

    # Lightning 2.6 resumes iteration-based (max_steps) runs correctly from a checkpoint written at the
    # train-batch end of an epoch's last batch; the sampler is seeded by (seed, epoch), so the order replays.
    L.seed_everything(0, verbose=False)
    first = tiny_module(lr=3e-3, warmup_steps=1)
    saver = ModelCheckpoint(dirpath=tmp_path / "b", filename="mid", every_n_train_steps=per_epoch,
                            save_top_k=-1)
    trainer = _trainer(tmp_path / "b", total, [StopAfterEpoch(0), saver], checkpointing=True)
    trainer.fit(first, datamodule=data())
    assert first.global_step == per_epoch
    ckpt = tmp_path / "b" / "mid.ckpt"
    assert ckpt.exists()

    # A resumed CLI run re-seeds from the same config (seed_everything: 0); the shuffle follows that seed and
    # the epoch, everything else (weights, optimizer, schedule, step) must come from the checkpoint.
    L.seed_everything(0, verbose=False)
    resumed = tiny_module(lr=3e-3, warmup_steps=1)
    resumed.model.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
    _trainer(tmp_path / "c", total).fit(resumed, datamodule=data(), ckpt_path=ckpt)
    assert resumed.global_step == total

    expected, got = straight.state_dict(), resumed.state_dict()
    mid = first.state_dict()
    assert any(not torch.equal(mid[k], expected[k]) for k in expected)  # the second half did train
    for key in expected:
        assert torch.allclose(got[key], expected[key], atol=1e-6, rtol=0), key


def _cli(args: list[str], cwd: Path, timeout: int = 240, **extra_env: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ZOO_RUN_DIR"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore", **extra_env)
    return subprocess.run([sys.executable, "-m", "zoo", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _logged_steps(run_dir: Path) -> list[int]:
    with (run_dir / "metrics.csv").open() as handle:
        return sorted({int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")})


TINY_ARGS = ["--config", str(TINY), "--trainer.accelerator", "cpu", "--data.init_args.num_train", "16",
             "--data.init_args.num_val", "4", "--data.init_args.num_test", "4",
             "--data.init_args.batch_size", "2",
             "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
             "--trainer.enable_model_summary", "false"]


@pytest.mark.multiproc
def test_ddp_two_processes_from_yaml(tmp_path):
    run = tmp_path / "ddp"
    result = _cli(["fit", *TINY_ARGS, "--config", str(REPO / "configs/strategies/ddp.yaml"),
                   "--trainer.max_steps", "2", "--trainer.default_root_dir", str(run)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "world_size=2" in result.stderr + result.stdout or "MEMBER: 2/2" in result.stderr + result.stdout
    assert (run / "export" / "model.safetensors").exists()
    assert (run / "config.yaml").exists()
    assert _logged_steps(run) == [0, 1]


@pytest.mark.multiproc
def test_fsdp2_two_processes_from_yaml_and_resume(tmp_path):
    strategy = ["--config", str(REPO / "configs/strategies/fsdp2.yaml")]
    first = tmp_path / "fsdp_a"
    result = _cli(["fit", *TINY_ARGS, *strategy, "--trainer.max_steps", "2", "--trainer.default_root_dir",
                   str(first), "--keep_checkpoints"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MEMBER: 2/2" in result.stderr + result.stdout
    ckpt = first / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir(), f"expected a distributed checkpoint folder at {ckpt}"  # sharded, one file per rank
    assert (first / "export" / "model.safetensors").exists()

    second = tmp_path / "fsdp_b"
    result = _cli(["fit", *TINY_ARGS, *strategy, "--trainer.max_steps", "4", "--trainer.default_root_dir",
                   str(second), "--ckpt_path", str(ckpt)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _logged_steps(second) == [2, 3]  # continued from step 2, not from scratch


class SignalRankAt(Callback):
    """SIGTERM to this process at the end of step ``step`` if it is rank ``rank`` (and ZOO_TEST_SIGNAL=1)."""

    def __init__(self, step: int = 2, rank: int = 1) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (trainer.global_step == self.step and trainer.global_rank == self.rank
                and os.environ.get("ZOO_TEST_SIGNAL") == "1"):
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.multiproc
@pytest.mark.parametrize("rank", [1, pytest.param(0, marks=pytest.mark.slow)], ids=["rank1", "rank0"])
def test_ddp_sigterm_to_one_rank_stops_every_rank_at_one_step_with_a_resumable_checkpoint(rank, tmp_path):
    """Only one rank is signalled (rank 0, the launcher, is the slow variant). The ranks agree at the step's
    end, every rank enters the (collective) save, and the fit exits 128 + SIGTERM with ``interrupted.ckpt`` at
    step 2; resumed, it trains steps 2..5. Before, the signalled rank left mid-step and the other failed in
    the next collective (exit 1, no checkpoint)."""
    run = tmp_path / "ddp"
    tests = str(REPO / "tests")
    common = dict(PYTHONPATH=f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = _cli(["fit", *TINY_ARGS, "--config", str(REPO / "configs/strategies/ddp.yaml"),
                   "--trainer.max_steps", "6", "--trainer.default_root_dir", str(run),
                   "--trainer.callbacks+=test_reliability.SignalRankAt",
                   "--trainer.callbacks.init_args.rank", str(rank)], cwd=tmp_path, timeout=300,
                  ZOO_TEST_SIGNAL="1", **common)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    state = json.loads((run / "run.json").read_text())
    assert state["state"] == "interrupted" and state["steps"] == 2, state
    assert (run / "checkpoints" / "interrupted.ckpt").is_file() and not (run / "export").exists()
    assert _logged_steps(run) == [0, 1]
    (command,) = re.findall(r"^python -m zoo (fit --config \S+ --ckpt_path \S+)$", result.stderr, flags=re.M)

    resumed = _cli(shlex.split(command), cwd=tmp_path, timeout=300, **common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["state"] == "finished"
    assert _logged_steps(run) == [2, 3, 4, 5]  # continued from the checkpoint (the log restarts)
