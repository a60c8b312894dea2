"""Mid-run re-selection under 2-process DDP, through the real CLI: every rank trains the same selection, the
run
finishes, the ranks end with identical weights, and what is frozen in the last stage sits bitwise at its
anchor.

The runs carry :class:`SelectionRecorder` (test-only, added by ``class_path``), which writes, per rank,
the selection after every step (``probe/steps.rank<r>.jsonl``) and the weights at fit start, at the start
of the last stage and at the end (``probe/*.rank<r>.pt``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[3]
RECORDER = "tests.modules.sparse.test_reselection_multiproc.SelectionRecorder"


# ---------------------------------------------------------------------------- the recorder (runs inside the
# ranks)
def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha1()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in module.named_parameters()}


class SelectionRecorder(Callback):
    """Per rank: the trainable set / masks after each step and the weights at fit start, last-stage start,
    end."""

    def __init__(self) -> None:
        # weights after the previous step (= when a new stage starts)
        self.previous: dict[str, torch.Tensor] = {}
        self.stage_start: dict[str, torch.Tensor] = {}
        self.key = None

    def _path(self, trainer, name: str) -> Path:
        path = Path(trainer.default_root_dir) / "probe" / f"{name}.rank{trainer.global_rank}"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _selection(trainer, pl_module) -> dict:
        from zoo.modules.sparse.dsee import DSEEPruning
        from zoo.modules.sparse.param_mask import ParameterMaskCallback

        record = {"trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)}
        for cb in trainer.callbacks:
            if isinstance(cb, ParameterMaskCallback):
                record.update(stage=cb.stage, masks=_digest(cb.masks), anchors=_digest(cb.anchors))
            if isinstance(cb, DSEEPruning):
                record.update(keep=_digest(cb.keep))
        return record

    def on_fit_start(self, trainer, pl_module) -> None:
        # after DDP wrapped the model and broadcast rank 0's weights
        self.previous = self.stage_start = _weights(pl_module)
        torch.save(self.previous, self._path(trainer, "initial.pt"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = self._selection(trainer, pl_module)
        key = json.dumps(record, sort_keys=True)
        if key != self.key:  # the selection changed before this step: its stage started from `previous`
            self.key, self.stage_start = key, self.previous
        self.previous = _weights(pl_module)
        record.update(step=trainer.global_step, epoch=trainer.current_epoch, weights=_digest(self.previous))
        with self._path(trainer, "steps.jsonl").open("a") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")

    def on_train_end(self, trainer, pl_module) -> None:
        from zoo.modules.sparse.dsee import DSEEPruning
        from zoo.modules.sparse.param_mask import ParameterMaskCallback

        state = {"final": _weights(pl_module), "stage_start": self.stage_start,
                 "trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)}
        for cb in trainer.callbacks:
            if isinstance(cb, ParameterMaskCallback):
                state.update(masks={k: v.cpu() for k, v in cb.masks.items()},
                             anchors={k: v.cpu() for k, v in cb.anchors.items()})
            if isinstance(cb, DSEEPruning):
                state.update(keep={k: v.cpu() for k, v in cb.keep.items()})
        torch.save(state, self._path(trainer, "state.pt"))


# ---------------------------------------------------------------------------- running and reading
DATA = ["--model.init_args.model", "tiny-llama", "--data.class_path", "zoo.datamodules.SFTDataModule",
        "--data.init_args.dataset", "chain_sum", "--data.init_args.num_train", "11",
        "--data.init_args.num_val", "4", "--data.init_args.num_test", "4",
        "--data.init_args.max_length", "128", "--data.init_args.batch_size", "3"]
TRAINER = ["--trainer.accelerator", "cpu", "--trainer.log_every_n_steps", "1",
           "--trainer.limit_val_batches", "0",
           "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
           f"--trainer.callbacks+={RECORDER}"]


def run_ddp(config: str, tmp_path: Path, *args: str, find_unused: bool = False) -> Path:
    """``python -m zoo fit`` with ``config`` on 2 CPU processes; returns the run directory.

    ``args`` come before the recorder is appended, so ``--trainer.callbacks.init_args.*`` reach the method's
    callback."""
    run = tmp_path / "run"
    strategy = ["--trainer.strategy", "ddp_find_unused_parameters_true"] if find_unused else []
    env = {k: v for k, v in os.environ.items() if k not in ("ZOO_RUN_DIR", "TRITON_INTERPRET")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "zoo", "fit", "--config", str(REPO / config),
               "--config", str(REPO / "configs/strategies/ddp.yaml"), *strategy, *DATA, *args, *TRAINER,
               "--trainer.default_root_dir", str(run)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    return run


def rank_records(run: Path) -> list[list[dict]]:
    out = []
    for rank in (0, 1):
        lines = (run / "probe" / f"steps.jsonl.rank{rank}").read_text().splitlines()
        out.append([json.loads(line) for line in lines])
    return out


def logged_steps(run: Path) -> list[int]:
    with (run / "metrics.csv").open() as handle:
        return sorted({int(row["step"]) for row in csv.DictReader(handle) if row.get("train/loss")})


def check_ranks_agree(run: Path, max_steps: int) -> list[dict]:
    """Every step was logged, and both ranks ran it with the same selection and the same weights.

    Returns rank 0's records."""
    assert logged_steps(run) == list(range(max_steps))
    ranks = rank_records(run)
    assert [r["step"] for r in ranks[0]] == list(range(1, max_steps + 1))
    selection = ("trainable", "stage", "masks", "anchors", "keep")
    for a, b in zip(*ranks, strict=True):
        mine, theirs = ({k: r.get(k) for k in selection} for r in (a, b))
        assert mine == theirs, f"ranks selected differently at step {a['step']}"
        assert a["weights"] == b["weights"], f"rank weights diverged at step {a['step']}"
    return ranks[0]


def load_state(run: Path, rank: int = 0) -> dict:
    return torch.load(run / "probe" / f"state.pt.rank{rank}", weights_only=True)


def exported(run: Path) -> dict[str, torch.Tensor]:
    """The exported HF weights under the LightningModule's names (``model.`` prefix)."""
    return {f"model.{k}": v for k, v in load_file(run / "export" / "model.safetensors").items()}


def stages(records: list[dict]) -> list[list[str]]:
    """The distinct trainable sets in the order they were in force."""
    out = []
    for r in records:
        if not out or out[-1] != r["trainable"]:
            out.append(r["trainable"])
    return out


def assert_frozen_at_anchor(state: dict, export: dict[str, torch.Tensor]) -> list[str]:
    """Tensors frozen at the end equal their value when the last stage began, in the run and in the export."""
    frozen = sorted(set(state["final"]) - set(state["trainable"]))
    assert frozen
    for name in frozen:
        assert torch.equal(state["final"][name], state["stage_start"][name]), f"{name} moved while frozen"
        if name in export:
            assert torch.equal(export[name], state["final"][name]), f"exported {name} is not the frozen value"
    return frozen


def assert_ranks_end_equal(run: Path) -> dict:
    first, second = load_state(run, 0), load_state(run, 1)
    assert first["trainable"] == second["trainable"]
    for name, value in first["final"].items():
        assert torch.equal(value, second["final"][name]), f"{name} differs between ranks at the end"
    return first


# ---------------------------------------------------------------------------- the tests
@pytest.mark.multiproc
def test_hft_epoch_reselection_same_half_on_both_ranks(tmp_path):
    # 11 training rows / 2 ranks / batch 3 = 2 steps per epoch: 5 steps span epochs 0, 1, 2 = HFT stages 0, 1,
    # 2
    run = run_ddp("configs/hft.yaml", tmp_path, "--trainer.max_steps", "5",
                  "--trainer.callbacks.init_args.reselect", "epoch", find_unused=True)
    records = check_ranks_agree(run, 5)
    assert [r["stage"] for r in records] == [0, 0, 1, 1, 2]
    assert len(stages(records)) == 3  # three different halves trained
    state = assert_ranks_end_equal(run)
    assert_frozen_at_anchor(state, exported(run))


@pytest.mark.multiproc
def test_greentrainer_reselection_same_tensors_on_both_ranks(tmp_path):
    # interval 1: a selection on the first batch of every epoch (2 steps each), probed on each rank's own
    # batch.
    # At rho 0.95 the tiny model's choice depends on the batch (different tensors on different batches), so
    # without the broadcast from rank 0 the ranks disagree from step 1.
    run = run_ddp("configs/greentrainer.yaml", tmp_path, "--trainer.max_steps", "5",
                  "--trainer.callbacks.init_args.interval", "1",
                  "--trainer.callbacks.init_args.units", "1000",
                  "--trainer.callbacks.init_args.rho", "0.95", find_unused=True)
    records = check_ranks_agree(run, 5)
    assert [r["stage"] for r in records] == [1, 1, 2, 2, 3]
    assert 0 < len(records[-1]["trainable"]) < len(load_state(run)["final"])
    state = assert_ranks_end_equal(run)
    assert_frozen_at_anchor(state, exported(run))


@pytest.mark.multiproc
def test_lt_sft_mask_from_synchronised_weights_same_on_both_ranks(tmp_path):
    run = run_ddp("configs/lt_sft.yaml", tmp_path, "--trainer.max_steps", "4",
                  "--trainer.callbacks.init_args.dense_steps", "2",
                  "--trainer.callbacks.init_args.proportion", "0.05",
                  # weight decay would move masked-out entries if they were not restored
                  "--model.init_args.weight_decay", "0.1")
    records = check_ranks_agree(run, 4)
    assert [r["stage"] for r in records] == [0, 0, 1, 1]
    assert records[1]["masks"] != records[2]["masks"]  # the ticket was drawn mid-run
    state = assert_ranks_end_equal(run)
    initial = torch.load(run / "probe" / "initial.pt.rank0", weights_only=True)
    export = exported(run)
    assert state["masks"]
    moved = 0
    for name, mask in state["masks"].items():
        anchor, final = state["anchors"][name], state["final"][name]
        assert torch.equal(anchor, initial[name])  # the reset went back to the common start
        assert torch.equal(final[~mask], anchor[~mask]), f"{name}: entries outside the ticket moved"
        if name in export:
            assert torch.equal(export[name][~mask], anchor[~mask])
        moved += int((final != anchor).sum())
    assert moved > 0
    assert_frozen_at_anchor(state, export)  # the norms, frozen in both phases


@pytest.mark.multiproc
def test_dsee_pruning_same_masks_on_both_ranks(tmp_path):
    run = run_ddp("configs/dsee.yaml", tmp_path, "--trainer.max_steps", "4",
                  "--trainer.callbacks.init_args.prune_step", "2",
                  "--model.init_args.adapter.init_args.rank", "4",
                  "--model.init_args.adapter.init_args.num_sparse", "8",
                  "--model.init_args.adapter.init_args.outer_rounds", "2", "--model.init_args.lr", "1.0e-2")
    records = check_ranks_agree(run, 4)
    assert records[1]["keep"] != records[2]["keep"]  # pruned mid-run
    state = assert_ranks_end_equal(run)
    initial = torch.load(run / "probe" / "initial.pt.rank0", weights_only=True)
    export = exported(run)
    assert state["keep"]
    anchors = dict(initial)  # the frozen backbone's anchor: its start, pruned by the masks of step 2
    for key, keep in state["keep"].items():
        index, path = key.split(".", 1)
        name = f"model.model.layers.{index}.{path}.weight"
        assert not keep.all()
        anchors[name] = initial[name] * keep.to(initial[name].dtype)
    frozen = sorted(set(state["final"]) - set(state["trainable"]))
    assert len(frozen) > len(state["keep"])
    for name in frozen:
        assert torch.equal(state["final"][name], anchors[name]), f"{name} is not its (pruned) start"
        merged = name.endswith(("q_proj.weight", "v_proj.weight"))  # the export merges W * M + dW there
        assert torch.equal(export[name], anchors[name]) is not merged, name
    trained = [n for n in state["trainable"] if not torch.equal(state["final"][n], initial[n])]
    assert trained and all(n.startswith("adapter.deltas.") for n in state["trainable"])
