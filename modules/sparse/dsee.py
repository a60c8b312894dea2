"""DSEE: low-rank + fixed-support sparse weight updates, then update-guided magnitude pruning.

Paper: DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language Models (2021).
Spec: papers/38-dsee.md.

Implements: :func:`sparse_support`, the GreBsmo-style low-rank + sparse decomposition of each
pretrained target matrix (rank grows by ``rank_step`` per outer round, two inner U/V/S updates with
hard thresholding) whose top-N ``|S|`` entries give the support Ω; :class:`DSEEDelta`, the update
``ΔW = (α/r)(B A + S ⊙ M_Ω)`` (A ~ N(0, 0.02), B = 0, S = 0, so the model starts exactly at the
backbone; S is stored as N values on the fixed index set Ω, so entries outside Ω cannot change and the
trainable count is exactly ``r(d_in + d_out) + N`` per matrix); :class:`DSEE`, the adapter that freezes
the backbone, holds one delta per target Linear (q and v of every attention layer) and adds it to the
Linear's output by a forward hook; and :class:`DSEEPruning`, the stage-2 unstructured pruning: at
``prune_step`` the q/v weights are pruned globally by the update magnitude ``|ΔW|`` (mode ABS; WABS
uses ``|W + ΔW|``) at ratio ``p_qv`` and the other linear layers of the blocks by ``|W|`` at ratio
``p``, exactly (by index, ±0 entries); ``W ← W ⊙ M`` on the frozen weights, which then stay zero; A, B,
S keep training.

Export: a plain HF model with ``W ⊙ M + ΔW`` merged into each target's weight (the spec's inference
form), which ``transformers`` loads and which computes what the live module computes. The merge costs
the q/v sparsity: ΔW = (α/r)BA + ... is dense, so (once B has trained) practically every pruned q/v
entry becomes non-zero in the merged weight (SmolLM2, 6 steps, pruned at step 3: 100.0% of 2,657,916,
q/v sparsity 20% -> 0%); the other block linears carry no update and keep their pruned zeros.
:meth:`DSEE.export_state_dict` logs the figure ("DSEE merge: X% of the N pruned entries ... become
non-zero") and keeps it in :attr:`DSEE.merge_report`. (Keeping the q/v saving would need ΔW kept
factorised or masked, which changes the function; the export keeps the function.)
Differs: the decomposition's hard threshold is relative (``threshold_scale`` × std(W); the repo's
absolute 0.01 assumes BERT-scale weights); the support is computed with a seeded generator, so every
DDP rank computes the same Ω without a broadcast; a causal LM has no task head.
Not implemented: stage 2b structured (attention-head) pruning; real sparse kernels (FLOPs savings
are modelled by the sparsity, not measured).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from zoo import backbone
from zoo.errors import ConfigError
from zoo.modules.adapters.base import Adapter
from zoo.registry import register


# ---------------------------------------------------------------------------- pure functions
@torch.no_grad()
def sparse_support(weight: Tensor, num_sparse: int, outer_rounds: int = 100, rank_step: int = 5,
                   threshold: float | None = None, generator: torch.Generator | None = None,
                   return_history: bool = False) -> Tensor | tuple[Tensor, list[float]]:
    """Flat indices (N,) of the support Ω of a (d_out, d_in) matrix (GreBsmo-style W ≈ U V + S).

    ``threshold`` zeroes ``|S|`` entries below it (default 0.25·std(W)). With ``return_history`` also
    returns the low-rank fit error ‖W − U V‖_F after each outer round (rank 1, 6, 11, ...). (The full
    residual ‖W − U V − S‖ is not monotone under hard thresholding: as U V improves, more entries of
    W − U V fall below the threshold and move from S into the residual.)"""
    w = weight.detach().float().cpu()
    d_out, d_in = w.shape
    thr = 0.25 * float(w.std()) if threshold is None else threshold
    v = torch.randn(1, d_in, generator=generator)
    s = torch.zeros_like(w)
    history = []
    for _ in range(outer_rounds):
        s = torch.zeros_like(w)
        for _ in range(2):
            u = torch.linalg.qr((w - s) @ v.T).Q
            v = u.T @ (w - s)
            s = w - u @ v
            s = torch.where(s.abs() < thr, torch.zeros_like(s), s)
        residual = w - u @ v - s
        history.append(float((w - u @ v).norm()))
        if v.shape[0] + rank_step > min(d_out, d_in):
            break
        v = torch.cat([v, torch.linalg.qr(residual).R[:rank_step]])
    order = torch.sort(s.abs().flatten(), descending=True, stable=True).indices[:num_sparse]
    index = order.sort().values
    return (index, history) if return_history else index


def global_prune_masks(scores: dict[str, Tensor], ratio: float) -> dict[str, Tensor]:
    """Bool keep-masks pruning exactly ``round(ratio * total)`` lowest-score entries over all tensors."""
    names = sorted(scores)
    flat = torch.cat([scores[n].detach().float().flatten().cpu() for n in names])
    prune = int(round(ratio * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool)
    keep[torch.sort(flat, stable=True).indices[:prune]] = False
    out, start = {}, 0
    for n in names:
        size = scores[n].numel()
        out[n] = keep[start:start + size].view(scores[n].shape).to(scores[n].device)
        start += size
    return out


def merge_sparsity(weights: list[Tensor], merged: list[Tensor]) -> tuple[int, int]:
    """(pruned, revived): zero entries of the (pruned) ``weights`` and how many of them are non-zero in
    ``merged`` (``W ⊙ M + ΔW``), summed over the tensors."""
    pruned = revived = 0
    for w, m in zip(weights, merged):
        zero = w == 0
        pruned += int(zero.sum())
        revived += int((zero & (m != 0)).sum())
    return pruned, revived


# ---------------------------------------------------------------------------- the update layer
class DSEEDelta(nn.Module):
    """ΔW = (α/r)(B A + S ⊙ M_Ω) for one frozen Linear; ``forward(x)`` is ``x ΔWᵀ``."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, support: Tensor) -> None:
        super().__init__()
        self.d_in, self.d_out, self.scaling = d_in, d_out, alpha / rank
        self.lora_A = nn.Parameter(torch.randn(rank, d_in) * 0.02)
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        self.sparse_values = nn.Parameter(torch.zeros(support.numel()))
        self.register_buffer("support", support.long())

    def sparse_dense(self) -> Tensor:
        """S ⊙ M_Ω as a dense (d_out, d_in) matrix (zero outside Ω by construction)."""
        flat = torch.zeros(self.d_out * self.d_in, dtype=self.sparse_values.dtype, device=self.sparse_values.device)
        return flat.index_put((self.support,), self.sparse_values).view(self.d_out, self.d_in)

    def delta_weight(self) -> Tensor:
        return self.scaling * (self.lora_B @ self.lora_A + self.sparse_dense())

    def forward(self, x: Tensor) -> Tensor:
        low_rank = (x @ self.lora_A.T) @ self.lora_B.T
        return self.scaling * (low_rank + x @ self.sparse_dense().T)


class _DeltaHook:
    """Forward hook of one target Linear: adds the adapter's delta ``key`` while the adapter is enabled.
    A callable object rather than a closure, so a deep copy of the module follows the copied adapter."""

    def __init__(self, adapter: DSEE, key: str) -> None:
        self.adapter, self.key = adapter, key

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not self.adapter.enabled:
            return output
        return output + self.adapter.deltas[self.key](args[0])


def delta_key(name: str) -> str:
    """ModuleDict key of the target Linear ``name`` (dots are not allowed in module names)."""
    return name.replace(".", "-")


class DSEE(Adapter):
    """Frozen backbone; each target Linear (q and v of every attention layer) gets ΔW = (α/r)(BA + S⊙M_Ω)."""

    def __init__(self, rank: int = 16, alpha: float = 32.0, num_sparse: int = 16, targets: list[str] | None = None,
                 outer_rounds: int = 100, threshold_scale: float = 0.25, support_seed: int = 0) -> None:
        """
        Args:
            rank: r, rank of the low-rank update (repo scripts: 16).
            alpha: α; the update is scaled by α/r (low-rank and sparse parts alike).
            num_sparse: N, sparse entries per matrix (repo scripts: 16).
            targets: names of the Linears in each decoder layer that get an update (paper: q and v).
            outer_rounds: R_out, outer rounds of the decomposition (repo: 100; rank grows 5 per round).
            threshold_scale: hard threshold of the decomposition as a multiple of std(W) (repo: absolute 0.01).
            support_seed: seed of the decomposition's random start (same Ω on every rank).
        """
        super().__init__()
        if rank < 1 or num_sparse < 0 or outer_rounds < 1:
            raise ConfigError(f"DSEE needs rank >= 1, num_sparse >= 0 and outer_rounds >= 1 (got rank={rank}, "
                              f"num_sparse={num_sparse}, outer_rounds={outer_rounds})")
        self.rank, self.alpha, self.num_sparse = rank, alpha, num_sparse
        self.targets = list(targets or ["q_proj", "v_proj"])
        self.outer_rounds, self.threshold_scale, self.support_seed = outer_rounds, threshold_scale, support_seed
        self.deltas = nn.ModuleDict()
        self.enabled = True
        self.merge_report: dict[str, float] = {}

    def attach(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        model.requires_grad_(False)
        generator = torch.Generator().manual_seed(self.support_seed)
        layers = backbone.decoder_layers(model)
        prefix = next(name for name, module in model.named_modules() if module is layers)
        for index, layer in enumerate(layers):
            for name, linear in layer.named_modules():
                if not (isinstance(linear, nn.Linear) and name.split(".")[-1] in self.targets):
                    continue
                w = linear.weight
                if self.num_sparse > w.numel():
                    raise ConfigError(f"DSEE num_sparse={self.num_sparse} exceeds the {w.numel()} entries of "
                                      f"{name}; lower num_sparse")
                support = sparse_support(w, self.num_sparse, self.outer_rounds,
                                         threshold=self.threshold_scale * float(w.float().std()), generator=generator)
                key = delta_key(f"{prefix}.{index}.{name}")
                delta = DSEEDelta(w.shape[1], w.shape[0], self.rank, self.alpha, support)
                self.deltas[key] = delta.to(device=w.device, dtype=w.dtype)
                linear.register_forward_hook(_DeltaHook(self, key))
        if not self.deltas:
            raise ConfigError(f"DSEE targets {self.targets} match no Linear in the decoder layers; use the "
                              "layers' own names (e.g. q_proj, v_proj)")
        self.bind(model, tokenizer)
        return model

    def target_modules(self) -> list[tuple[str, nn.Linear, DSEEDelta]]:
        """(qualified name in the backbone, frozen Linear, its delta) for every target."""
        out = []
        for key, delta in self.deltas.items():
            name = key.replace("-", ".")
            out.append((name, self.model.get_submodule(name), delta))
        return out

    def disabled(self) -> AbstractContextManager[None]:
        return self.switched_off()

    @torch.no_grad()
    def export_state_dict(self) -> dict[str, Tensor]:
        """The backbone's HF state dict with ``W ⊙ M + ΔW`` merged into each target's weight (no extra keys);
        logs how many pruned (zero) target entries the dense ΔW makes non-zero (``merge_report``)."""
        state = dict(self.model.state_dict())
        weights, merged = [], []
        for name, linear, delta in self.target_modules():
            key = f"{name}.weight"
            if key not in state:
                raise RuntimeError(f"DSEE export: {key} is not in the backbone's state dict")
            w = linear.weight.detach()
            new = (w + delta.delta_weight().to(w.dtype)).contiguous()
            weights.append(w)
            merged.append(new)
            state[key] = new
        pruned, revived = merge_sparsity(weights, merged)
        total = sum(w.numel() for w in weights)
        report = {"pruned": pruned, "revived": revived, "entries": total,
                  "revived_fraction": revived / pruned if pruned else 0.0}
        repeated, self.merge_report = report == self.merge_report, report  # one export asks twice: log once
        if pruned and not repeated:
            rank_zero_info(f"DSEE merge: {100 * revived / pruned:.1f}% of the {pruned} pruned entries of the target "
                           f"weights become non-zero (the merged ΔW is dense); target sparsity "
                           f"{100 * pruned / total:.1f}% -> {100 * (pruned - revived) / total:.1f}%; the other "
                           "linears keep their pruned zeros")
        return state


# ---------------------------------------------------------------------------- stage 2: pruning
def dsee_adapter(module: nn.Module) -> DSEE:
    """The module's DSEE adapter, or a one-line :class:`ConfigError`."""
    adapter = getattr(module, "adapter", None)
    if not isinstance(adapter, DSEE):
        raise ConfigError("DSEEPruning needs the DSEE adapter: set model.init_args.adapter.class_path: "
                          "zoo.modules.sparse.dsee.DSEE")
    return adapter


class DSEEPruning(L.Callback):
    """Stage 2a: at ``prune_step``, update-guided global pruning of q/v and magnitude pruning of the rest."""

    def __init__(self, prune_step: int = 100, ratio_qv: float = 0.2, ratio_other: float = 0.2,
                 mode: Literal["ABS", "WABS"] = "ABS") -> None:
        """
        Args:
            prune_step: optimizer step at which the pretrained weights are pruned (end of stage 1).
            ratio_qv: p_qv, global pruning ratio over the q/v weights, scored by the update (repo RTE: 0.2).
            ratio_other: p, global magnitude pruning ratio over the other linear layers of the blocks.
            mode: ``ABS`` scores q/v by |ΔW| (the paper's update-guided masks); ``WABS`` by |W + ΔW|.
        """
        self.prune_step, self.ratio_qv, self.ratio_other, self.mode = prune_step, ratio_qv, ratio_other, mode
        self.keep: dict[str, Tensor] = {}
        self._module: nn.Module | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dsee_adapter(pl_module)
        self._module = pl_module

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.keep and trainer.global_step >= self.prune_step:
            self.prune(pl_module)

    @torch.no_grad()
    def prune(self, module: nn.Module) -> None:
        deltas = {id(linear): delta for _, linear, delta in dsee_adapter(module).target_modules()}
        blocks = backbone.decoder_layers(module.model)
        block_linears = {f"{i}.{n}": m for i, layer in enumerate(blocks)
                         for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        qv = {n: m for n, m in block_linears.items() if id(m) in deltas}
        other = {n: m for n, m in block_linears.items() if n not in qv}
        scores = {}
        for n, m in qv.items():
            delta = deltas[id(m)].delta_weight()
            scores[n] = delta.abs() if self.mode == "ABS" else (m.weight + delta).abs()
        self.keep = global_prune_masks(scores, self.ratio_qv) if qv else {}
        if other:
            self.keep.update(global_prune_masks({n: m.weight.abs() for n, m in other.items()}, self.ratio_other))
        self._apply(module)

    @torch.no_grad()
    def _apply(self, module: nn.Module) -> None:
        blocks = backbone.decoder_layers(module.model)
        for name, keep in self.keep.items():
            index, path = name.split(".", 1)
            linear = blocks[int(index)].get_submodule(path)
            if linear.weight.requires_grad:
                raise RuntimeError(f"DSEE pruning expects frozen backbone weights; {name} trains")
            linear.weight.mul_(keep.to(linear.weight.device, linear.weight.dtype))

    def sparsity(self) -> float:
        """Fraction of pruned entries over the pruned tensors."""
        total = sum(k.numel() for k in self.keep.values())
        return 1.0 - sum(int(k.sum()) for k in self.keep.values()) / max(1, total)

    def state_dict(self) -> dict[str, Any]:
        return {"keep": {k: v.cpu() for k, v in self.keep.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # frozen pruned weights are not in a trainable-only checkpoint: re-apply the masks
        self.keep = dict(state.get("keep", {}))
        if self.keep and self._module is not None:
            self._apply(self._module)


register(
    name="dsee",
    kind="adapter",
    paper="DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language Models (2021)",
    spec="38",
    config="configs/dsee.yaml",
    target="zoo.modules.sparse.dsee:DSEE",
    scope="low-rank + sparse update and unstructured update-guided pruning (DSEEPruning); head pruning left out; "
          "the merged export is dense in q/v (pruned q/v entries become non-zero)",
)
