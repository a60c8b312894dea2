"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning, and composable sparse parameter differences.

Paper: Composable Sparse Fine-Tuning for Cross-Lingual Transfer (2022). Spec: papers/26-lt-sft.md.

Implements: phase 1 dense fine-tuning for ``dense_steps`` optimizer steps (optional L1 pull to the
start, ``lambda * sum|p - p0| / N``, added as its exact gradient before each optimizer step);
GLOBAL top-K selection of the largest ``|theta - theta0|`` by index (exactly K entries, ties broken
deterministically by flat position, never more than K); reset of ALL parameters to theta0; phase 2
with a new optimizer (empty state: no Adam moments carried, spec step 4 / check 4), gradients masked
to the ticket and masked-out entries held at theta0 after every step (so AdamW weight decay cannot
move them); at the end the sparse difference is written as a :class:`SparseDelta` (``sparse_delta.pt``
in the run dir) that can be saved, loaded, applied / reverted, and composed with ``+`` (e.g. task
delta + language/format delta).
Differs from the official code: selection is per-tensor top-k candidates then a global top-k (no
Python list of all deltas); phase lengths are in optimizer steps (``dense_steps``; phase 2 runs to
``max_steps``) rather than epochs; the two phases share ONE learning-rate schedule over ``max_steps``
(phase 2 continues the position where phase 1 stopped: one warm-up, one decay; the official code
restarts a schedule sized to each phase); norms are frozen by name pattern (``freeze_patterns``) in
both phases, like the repo's language SFTs; there is no separate task head in a causal LM.
Not implemented: ``n_iter > 1`` selection rounds; reading the hub's ``composable-sft`` file format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from zoo.modules.sparse.param_mask import ParameterMaskCallback, Selection, rebuild_optimizer
from zoo.registry import register


# ---------------------------------------------------------------------------- pure functions
def top_k_mask(deltas: dict[str, Tensor], k: int) -> dict[str, Tensor]:
    """Bool masks selecting exactly ``min(k, total)`` entries with the largest ``|delta|`` over all tensors.

    Ties are broken by a fixed order (tensor name order, then flat position): the result is
    deterministic and never holds more than ``k`` entries. ``deltas``: name -> tensor of any shape."""
    names = sorted(deltas)
    total = sum(deltas[n].numel() for n in names)
    k = max(0, min(int(k), total))
    if k == 0:
        return {n: torch.zeros_like(deltas[n], dtype=torch.bool) for n in names}
    values, owners, positions = [], [], []
    for i, name in enumerate(names):  # per-tensor candidates keep memory at O(k * #tensors)
        flat = deltas[name].detach().abs().flatten().float()
        kk = min(k, flat.numel())
        # stable sort: among equal values the lower flat index comes first
        order = torch.sort(flat, descending=True, stable=True).indices[:kk]
        values.append(flat[order])
        positions.append(order)
        owners.append(torch.full((kk,), i, dtype=torch.long, device=flat.device))
    values, owners, positions = torch.cat(values), torch.cat(owners), torch.cat(positions)
    # candidates are concatenated in (name, position) order, so a stable sort keeps that tie order
    chosen = torch.sort(values, descending=True, stable=True).indices[:k]
    masks = {n: torch.zeros(deltas[n].numel(), dtype=torch.bool) for n in names}
    for owner, position in zip(owners[chosen].tolist(), positions[chosen].tolist()):
        masks[names[owner]][position] = True
    return {n: masks[n].view(deltas[n].shape).to(deltas[n].device) for n in names}


def l1_to_init(params: dict[str, Tensor], init: dict[str, Tensor], strength: float, total: int) -> Tensor:
    """``strength * sum_p |p - p0|_1 / total`` (the paper's L1 pull toward the start; ``total`` = N)."""
    return strength * sum((params[n] - init[n]).abs().sum() for n in params) / total


def l1_to_init_grad(param: Tensor, init: Tensor, strength: float, total: int) -> Tensor:
    """Gradient of :func:`l1_to_init` w.r.t. one tensor: ``strength * sign(p - p0) / total``."""
    return strength * torch.sign(param.detach() - init.to(param.device)) / total


class SparseDelta:
    """A sparse parameter difference: per tensor name, flat indices and values (plus the tensor shape).

    ``apply(model)`` adds it in place, ``revert(model)`` subtracts it (or restores the exact values
    ``apply`` returned), ``a + b`` composes (values at shared indices are summed), ``save``/``load``
    use ``torch.save``. Names are those of the model it is applied to (``model.named_parameters()``)."""

    def __init__(self, entries: dict[str, tuple[Tensor, Tensor, tuple[int, ...]]] | None = None) -> None:
        self.entries = dict(entries or {})

    @classmethod
    def from_difference(cls, tuned: dict[str, Tensor], base: dict[str, Tensor],
                        masks: dict[str, Tensor] | None = None, min_abs: float = 0.0) -> SparseDelta:
        """``tuned - base`` restricted to ``masks`` (all entries if None), dropping ``|d| <= min_abs``."""
        entries = {}
        for name, value in tuned.items():
            diff = (value.detach() - base[name].detach()).flatten()
            keep = diff.abs() > min_abs
            if masks is not None:
                keep &= masks[name].flatten().to(keep.device) if name in masks else torch.zeros_like(keep)
            index = keep.nonzero().flatten()
            if index.numel():
                entries[name] = (index.cpu(), diff[index].cpu(), tuple(value.shape))
        return cls(entries)

    @property
    def num_entries(self) -> int:
        return sum(index.numel() for index, _, _ in self.entries.values())

    def dense(self, name: str) -> Tensor:
        index, values, shape = self.entries[name]
        out = torch.zeros(int(torch.tensor(shape).prod()), dtype=values.dtype)
        out[index] = values
        return out.view(shape)

    @torch.no_grad()
    def apply(self, model: nn.Module, scale: float = 1.0) -> dict[str, Tensor]:
        """Add ``scale * delta`` in place; returns the original values at the touched entries (for revert)."""
        params = dict(model.named_parameters())
        saved = {}
        for name, (index, values, _shape) in self.entries.items():
            flat = params[name].data.view(-1)
            idx = index.to(flat.device)
            saved[name] = flat[idx].clone()
            flat.index_add_(0, idx, (scale * values).to(flat.device, flat.dtype))
        return saved

    @torch.no_grad()
    def revert(self, model: nn.Module, saved: dict[str, Tensor] | None = None) -> None:
        """Undo :meth:`apply`: restore ``saved`` exactly when given, else subtract the delta."""
        if saved is None:
            self.apply(model, scale=-1.0)
            return
        params = dict(model.named_parameters())
        for name, (index, _, _) in self.entries.items():
            flat = params[name].data.view(-1)
            flat[index.to(flat.device)] = saved[name]

    def __add__(self, other: SparseDelta) -> SparseDelta:
        entries = {}
        for name in sorted(set(self.entries) | set(other.entries)):
            parts = [d.entries[name] for d in (self, other) if name in d.entries]
            if len(parts) == 1:
                entries[name] = parts[0]
                continue
            (ia, va, shape), (ib, vb, _) = parts
            index, inverse = torch.unique(torch.cat([ia, ib]), return_inverse=True)
            values = torch.zeros(index.numel(), dtype=va.dtype).index_add_(0, inverse, torch.cat([va, vb]))
            entries[name] = (index, values, shape)
        return SparseDelta(entries)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"format": "zoo.sparse_delta/1", "entries": self.entries}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SparseDelta:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        return cls({k: (i, v, tuple(s)) for k, (i, v, s) in blob["entries"].items()})


# ---------------------------------------------------------------------------- the callback
class LotteryTicketSFT(ParameterMaskCallback):
    """Two-phase LT-SFT: dense fine-tune, keep the top-K moved entries, reset, retrain under that mask."""

    def __init__(self, dense_steps: int = 100, num_entries: int | None = None, proportion: float = 0.01,
                 l1_strength: float = 0.0, freeze_patterns: list[str] | None = None,
                 delta_path: str | None = "sparse_delta.pt") -> None:
        """
        Args:
            dense_steps: optimizer steps of phase 1 (dense); phase 2 runs for the rest of ``max_steps``.
            num_entries: K, entries allowed to differ from the start (overrides ``proportion``).
            proportion: K as a fraction of the maskable entries (repo default 0.01).
            l1_strength: lambda of the L1 pull to the start, normalised by the parameter count (0 = off).
            freeze_patterns: name substrings frozen in both phases (repo: layer norms).
            delta_path: where the final SparseDelta is written (relative to the run dir); None = not written.
        """
        super().__init__()
        self.dense_steps, self.num_entries, self.proportion = dense_steps, num_entries, proportion
        self.l1_strength = l1_strength
        self.freeze_patterns = list(freeze_patterns if freeze_patterns is not None else ["norm"])
        self.delta_path = delta_path
        self.theta0: dict[str, Tensor] = {}
        self.delta: SparseDelta | None = None

    def initial_selection(self, module: L.LightningModule) -> Selection:
        params = dict(module.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad
                     and not any(pattern in n for pattern in self.freeze_patterns)}
        self.stage = 0
        self.theta0 = {n: params[n].detach().clone() for n in sorted(trainable)}
        return Selection(trainable=trainable)

    def budget(self) -> int:
        total = sum(t.numel() for t in self.theta0.values())
        return int(self.num_entries) if self.num_entries is not None else int(round(self.proportion * total))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.stage == 0 and trainer.global_step >= self.dense_steps:
            self.start_sparse_phase(trainer, pl_module)

    @torch.no_grad()
    def start_sparse_phase(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        deltas = {n: params[n].detach() - self.theta0[n].to(params[n].device) for n in self.theta0}
        masks = top_k_mask(deltas, self.budget())
        for name, value in self.theta0.items():  # reset ALL trained parameters to theta0
            params[name].copy_(value.to(params[name].device))
        self.stage = 1
        self.apply_selection(pl_module, Selection(trainable=set(self.theta0), masks=masks))
        # fresh optimizer (no moments carried: spec step 4); the schedule continues (one curve over max_steps)
        rebuild_optimizer(trainer, carry_state=False, carry_schedule=True)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        if self.l1_strength:
            total = sum(p.numel() for p in pl_module.parameters())
            for name, p in pl_module.named_parameters():
                if name in self.theta0 and p.grad is not None:
                    p.grad.add_(l1_to_init_grad(p, self.theta0[name], self.l1_strength, total))
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stage == 0:
            print("[zoo] LT-SFT: fit ended before the sparse phase (max_steps <= dense_steps); no delta")
            return
        params = dict(pl_module.named_parameters())
        self.delta = SparseDelta.from_difference({n: params[n] for n in self.theta0}, self.theta0, self.masks)
        if self.delta_path and trainer.is_global_zero:
            path = self.delta.save(Path(trainer.default_root_dir) / self.delta_path)
            print(f"[zoo] LT-SFT: {self.delta.num_entries} nonzero differences (K={self.budget()}) -> {path}")

    def held_tensors(self) -> list[dict[str, Tensor]]:
        return [*super().held_tensors(), self.theta0]

    def extra_state(self) -> dict[str, Any]:
        # theta0 is needed to select (phase 1) and is the anchor of the masked entries (phase 2, in anchors)
        return {"theta0": {k: v.cpu() for k, v in self.theta0.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.theta0 = dict(state.get("theta0", {}))


register(
    name="lt_sft",
    kind="callback",
    paper="Composable Sparse Fine-Tuning for Cross-Lingual Transfer (2022)",
    spec="26",
    config="configs/lt_sft.yaml",
    target="zoo.modules.sparse.lt_sft:LotteryTicketSFT",
    scope="single selection round (n_iter=1); MLM language SFTs and hub SFT-file reader left out",
)
