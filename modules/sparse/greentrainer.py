"""GreenTrainer: choose the tensors to train so that training FLOPs meet a budget with the most loss
reduction.

Paper: Towards Green AI in Fine-tuning Large Language Models via Adaptive Backpropagation (2023).
Spec: papers/30-greentrainer.md.

Implements: :func:`tensor_flops`, a per-tensor backward cost model measured by forward hooks on one
batch (true execution order, tied weights once; Linear ``t_dw = t_dy = BT·out·in``, bias ``t_dw =
BT·out``, norms ``BT·d`` each, embeddings ``t_dw = BT·d``, attention score/value matmuls ``4·B·T²·d``
added to ``t_dy`` of the value projection, the LM head's ``BT·V·d`` on its weight's ``t_dw`` and on
``t_dy`` of the last tensor); :func:`backward_cost` (activation gradients must flow down to the
lowest selected tensor); :func:`rho_to_backward_share` (ρ is the share of full-FT training FLOPs
KEPT); :func:`tensor_importance`, the first-order importance ``I_k = −Σ g_k ⊙ Δw_k`` normalised by
max |I|; :func:`select_tensors`, an exact DP over integer costs (``units`` = 1000 for full FT) that
maximises importance under the budget; and :class:`GreenTrainerCallback`, which re-selects every
``interval`` epochs (from epoch 0) on the first batch of the epoch, sets ``requires_grad`` through
the shared parameter-mask mechanism and rebuilds the optimizer carrying the Adam moments of tensors
that stay selected. :func:`greentrainer_report` gives the predicted FLOPs saving and the measured
CPU backward time per ρ.
Differs from the official code: the importance probe never touches the live optimizer (the repo
steps it twice without restoring Adam state): Δw is one fresh-Adam step computed on the side
(``−lr·g/(|g|+ε)``, Adam's bias-corrected first step), weights are restored bit-exactly; the DP
fixes the deepest selected tensor D and solves a 0/1 knapsack over the tensors between it and the
loss (same optimum as the paper's O(N²·T) DP, with back-pointers); costs come from hooks instead of
hand-written OPT/BLOOM tables.
Measured on SmolLM2 (one batch 2×128): the paper's 1000 units floor ~270 tensors of 1-4 units each
and under-count the cost (predicted saving 18.5% at ρ = 0.7, 44.8% at 0.5); 10000 units give 29.3% /
49.7%, so ``configs/greentrainer.yaml`` uses 10000.
Multi-process: the selection is broadcast from rank 0; because it changes ``requires_grad`` after
DDP wrapped the model, run DDP as ``ddp_find_unused_parameters_true``.
Not implemented: freezing never-fitting tensors during the probe (an optimisation only); energy /
wall-clock claims on GPUs (the report gives modelled FLOPs and CPU backward time).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from zoo import backbone
from zoo.modules.base import target_mask
from zoo.modules.sparse.param_mask import ParameterMaskCallback, Selection, rebuild_optimizer
from zoo.registry import register


# ---------------------------------------------------------------------------- cost model
@dataclass
class FlopsModel:
    """Per-tensor costs in forward execution order (index 0 = first tensor used, e.g. the embedding)."""

    names: list[str]
    t_dw: list[float]
    t_dy: list[float]
    t_fp: float

    @property
    def full_backward(self) -> float:
        return sum(self.t_dw) + sum(self.t_dy)


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return "norm" in type(module).__name__.lower() and isinstance(weight, Tensor) and weight.ndim == 1


@torch.no_grad()
def tensor_flops(module: nn.Module, batch: dict[str, Tensor]) -> FlopsModel:
    """Measure the cost model of ``module`` (a zoo CausalLMModule) on one batch with forward hooks."""
    name_of = {id(p): n for n, p in module.named_parameters()}
    order: list[str] = []
    t_dw: dict[str, float] = {}
    t_dy: dict[str, float] = {}
    t_fp = [0.0]

    def touch(p: Tensor | None, dw: float, dy: float) -> None:
        if p is None or id(p) not in name_of:
            return
        name = name_of[id(p)]
        if name not in t_dw:
            order.append(name)
            t_dw[name], t_dy[name] = 0.0, 0.0
        t_dw[name] += dw
        t_dy[name] += dy

    def hook(sub: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(sub, nn.Linear):
            tokens = x.numel() // x.shape[-1]
            cost = tokens * sub.in_features * sub.out_features
            touch(sub.weight, cost, cost)
            touch(sub.bias, tokens * sub.out_features, 0.0)
            t_fp[0] += cost
        elif isinstance(sub, nn.Embedding):
            touch(sub.weight, x.numel() * sub.embedding_dim, 0.0)
        elif _is_norm(sub):
            tokens_d = x.numel()
            touch(sub.weight, tokens_d, tokens_d)
            touch(getattr(sub, "bias", None), tokens_d, 0.0)
            t_fp[0] += tokens_d

    def attention_hook(sub: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        b, t, d = x.shape
        value = next((m for n, m in sub.named_modules() if n.split(".")[-1] in ("v_proj", "value")), None)
        if value is not None:
            touch(value.weight, 0.0, 4.0 * b * t * t * d)
        t_fp[0] += 2.0 * b * t * t * d

    handles = []
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)) or _is_norm(sub):
            handles.append(sub.register_forward_hook(hook, with_kwargs=True))
    for layer in backbone.decoder_layers(module.model):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        if attn is not None:
            handles.append(attn.register_forward_hook(attention_hook, with_kwargs=True))
    try:
        module.forward_hidden(batch)
    finally:
        for h in handles:
            h.remove()
    head_weight, _ = module.lm_head_weight()
    vocab, dim = head_weight.shape
    supervised = int(target_mask(batch["labels"]).sum())
    head = float(supervised * vocab * dim)
    if id(head_weight) in name_of and name_of[id(head_weight)] not in t_dw:
        touch(head_weight, 0.0, 0.0)
    if id(head_weight) in name_of:
        t_dw[name_of[id(head_weight)]] += head + vocab * dim
    t_dy[order[-1]] += head
    t_fp[0] += head
    return FlopsModel(order, [t_dw[n] for n in order], [t_dy[n] for n in order], t_fp[0])


def backward_cost(mask: list[int] | Tensor, t_dw: list[float], t_dy: list[float]) -> float:
    """``T_bp(m) = Σ_k [M_k·t_dy[k] + m_k·t_dw[k]]`` with ``M_k = max_{j≤k} m_j`` (forward order)."""
    total, reached = 0.0, False
    for m, dw, dy in zip([int(v) for v in mask], t_dw, t_dy):
        reached = reached or bool(m)
        total += (dy if reached else 0.0) + (dw if m else 0.0)
    return total


def rho_to_backward_share(rho: float, t_fp: float, t_full_backward: float) -> float:
    """``ρ_bp = ρ·(1 + t_fp/T_full) − t_fp/T_full``; values ≤ 0 become 0.05 (the repo's floor)."""
    ratio = t_fp / t_full_backward
    share = rho * (1.0 + ratio) - ratio
    return share if share > 0 else 0.05


def quantize_costs(t_dw: list[float], t_dy: list[float], units: int = 1000) -> tuple[list[int], list[int]]:
    """Scale so that Σ(t_dw + t_dy) = ``units`` and floor to integers (tiny tensors become free)."""
    scale = units / max(1e-30, sum(t_dw) + sum(t_dy))
    return [int(math.floor(v * scale)) for v in t_dw], [int(math.floor(v * scale)) for v in t_dy]


def select_tensors(importance: list[float], t_dw: list[int], t_dy: list[int], budget: int) -> list[int]:
    """Mask (forward order) maximising Σ importance subject to ``backward_cost(mask) ≤ budget`` (integer
    costs).

    In reverse order (index 0 next to the loss) a selection whose deepest tensor is D costs
    ``Σ_{r≤D} t_dy[r] + Σ_{selected} t_dw[r]``: fix D, then a 0/1 knapsack over r < D."""
    n = len(importance)
    imp, dw, dy = importance[::-1], t_dw[::-1], t_dy[::-1]
    budget = max(0, int(budget))
    table = [[0.0] * (budget + 1)]  # table[k][t]: best value over items < k with weight <= t
    for k in range(n):
        prev, row = table[-1], table[-1][:]
        for t in range(dw[k], budget + 1):
            candidate = prev[t - dw[k]] + imp[k]
            if candidate > row[t]:
                row[t] = candidate
        table.append(row)
    best_value, best_d, prefix = 0.0, None, 0
    for d in range(n):
        prefix += dy[d]
        room = budget - prefix - dw[d]
        if room < 0:
            continue
        value = imp[d] + table[d][room]
        if value > best_value:
            best_value, best_d = value, d
    chosen = [0] * n
    if best_d is not None:
        chosen[best_d] = 1
        room = budget - sum(dy[: best_d + 1]) - dw[best_d]
        for k in range(best_d, 0, -1):  # back-pointers: item k-1 taken iff the value changed
            if table[k][room] != table[k - 1][room]:
                chosen[k - 1] = 1
                room -= dw[k - 1]
    return chosen[::-1]


# ---------------------------------------------------------------------------- importance probe
def _loss(module: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    outputs = module(batch)
    weights = target_mask(batch["labels"]).float()
    return module.compute_loss(batch, outputs, weights)


def tensor_importance(module: nn.Module, batch: dict[str, Tensor], names: list[str], lr: float,
                      eps: float = 1e-8) -> list[float]:
    """``I_k = −Σ g_k ⊙ Δw_k`` per tensor (in ``names`` order), normalised by max |I|; no side effects.

    Δw is one step of a fresh Adam (``−lr·g0/(|g0|+ε)``) from the current weights on ``batch``; g is the
    gradient at ``w + Δw``; the weights and ``requires_grad`` flags are restored exactly afterwards."""
    params = dict(module.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    chosen = [params[n] for n in names]
    saved = [p.detach().clone() for p in chosen]
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
        grads = torch.autograd.grad(_loss(module, batch), chosen, allow_unused=True)
        steps = [torch.zeros_like(p) if g is None else -lr * g / (g.abs() + eps)
                 for p, g in zip(chosen, grads)]
        with torch.no_grad():
            for p, s in zip(chosen, steps):
                p.add_(s)
        grads = torch.autograd.grad(_loss(module, batch), chosen, allow_unused=True)
        raw = [0.0 if g is None else float(-(g * s).sum()) for g, s in zip(grads, steps)]
    finally:
        with torch.no_grad():
            for p, w in zip(chosen, saved):
                p.copy_(w)
        for n, p in params.items():
            p.requires_grad_(flags[n])
    top = max((abs(v) for v in raw), default=0.0)
    return [v / top if top > 0 else 0.0 for v in raw]


def plan(module: nn.Module, batch: dict[str, Tensor], rho: float, lr: float,
         units: int = 1000) -> dict[str, Any]:
    """Cost model + importance + DP: the tensors to train for share ρ, with the predicted FLOPs."""
    model = tensor_flops(module, batch)
    importance = tensor_importance(module, batch, model.names, lr)
    share = rho_to_backward_share(rho, model.t_fp, model.full_backward)
    dw, dy = quantize_costs(model.t_dw, model.t_dy, units)
    mask = select_tensors(importance, dw, dy, int(share * units))
    selected = backward_cost(mask, model.t_dw, model.t_dy)
    full_train, selected_train = model.t_fp + model.full_backward, model.t_fp + selected
    return {"trainable": {n for n, m in zip(model.names, mask) if m}, "mask": mask, "rho": rho,
            "train_flops": selected_train, "full_train_flops": full_train,
            "predicted_saving": 1.0 - selected_train / full_train,
            "speedup": full_train / max(1e-30, selected_train)}


def measure_backward_time(module: nn.Module, batch: dict[str, Tensor], trainable: set[str] | None,
                          repeats: int = 5) -> float:
    """Median seconds of ``loss.backward()`` with only ``trainable`` tensors requiring grad (None = all)."""
    params = dict(module.named_parameters())
    flags = {n: p.requires_grad for n, p in params.items()}
    times = []
    try:
        for n, p in params.items():
            p.requires_grad_(trainable is None or n in trainable)
        if not any(p.requires_grad for p in params.values()):
            return 0.0  # rho below the forward's share of training FLOPs: nothing trains, no backward runs
        for _ in range(repeats):
            loss = _loss(module, batch)
            start = time.perf_counter()
            loss.backward()
            times.append(time.perf_counter() - start)
            module.zero_grad(set_to_none=True)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return statistics.median(times)


def greentrainer_report(module: nn.Module, batch: dict[str, Tensor],
                        rhos: tuple[float, ...] = (1.0, 0.7, 0.5, 0.3),
                        lr: float = 2e-5, repeats: int = 5, units: int = 1000) -> list[dict[str, float]]:
    """Per ρ: predicted training-FLOPs saving, trainable tensors, measured backward seconds (CPU/GPU as
    given)."""
    rows = []
    for rho in rhos:
        chosen = plan(module, batch, rho, lr, units)
        rows.append({"rho": rho, "predicted_saving": chosen["predicted_saving"],
                     "trainable_tensors": len(chosen["trainable"]),
                     "backward_s": measure_backward_time(module, batch, chosen["trainable"], repeats)})
    return rows


# ---------------------------------------------------------------------------- the callback
class GreenTrainerCallback(ParameterMaskCallback):
    """Every ``interval`` epochs, pick the tensors to train under a FLOPs budget (share ρ of full FT)."""

    def __init__(self, rho: float = 0.7, interval: int = 2, units: int = 1000,
                 probe_lr: float | None = None) -> None:
        """
        Args:
            rho: ρ, share of full fine-tuning's training FLOPs KEPT ("GreenTrainer-0.7"; paper 0.5 / 0.7).
            interval: epochs between re-selections, starting at epoch 0 (paper: 2).
            units: integer cost units of full fine-tuning's backward pass in the DP (paper: 1000).
            probe_lr: step size of the importance probe (default: the module's lr).
        """
        super().__init__()
        self.rho, self.interval, self.units, self.probe_lr = rho, interval, units, probe_lr
        self.selected_epoch = -1
        self.report: dict[str, Any] = {}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        epoch = trainer.current_epoch
        if epoch % self.interval or self.selected_epoch == epoch:
            return
        lr = self.probe_lr or float(getattr(pl_module.hparams, "lr", 2e-5))
        chosen = plan(pl_module, batch, self.rho, lr, self.units)
        # The probe ran on this rank's own batch, so under DDP the ranks can pick different tensors (seen on
        # 2 processes: the selections differ from the first step); DDP would then average gradients of
        # different
        # parameter sets. Every rank trains rank 0's selection.
        chosen = trainer.strategy.broadcast(chosen, src=0)
        self.selected_epoch = epoch
        self.stage += 1
        self.apply_selection(pl_module, Selection(trainable=chosen["trainable"]))
        rebuild_optimizer(trainer, carry_state=True, carry_schedule=True)
        keys = ("rho", "train_flops", "full_train_flops", "predicted_saving", "speedup")
        self.report = {k: chosen[k] for k in keys}
        pl_module.log("greentrainer/predicted_saving", chosen["predicted_saving"])
        print(f"[zoo] GreenTrainer epoch {epoch}: {len(chosen['trainable'])} tensors train, predicted "
              f"training FLOPs saving {chosen['predicted_saving']:.1%} (speed-up {chosen['speedup']:.2f}x)")

    def extra_state(self) -> dict[str, Any]:
        return {"selected_epoch": self.selected_epoch, "report": self.report}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.selected_epoch = int(state.get("selected_epoch", -1))
        self.report = dict(state.get("report", {}))


def main(argv: list[str] | None = None) -> None:
    """Print the predicted FLOPs saving and the measured backward time per ρ on one training batch.

        python -m zoo.modules.sparse.greentrainer --model smollm2-135m --batch-size 2
    """
    import argparse

    from zoo.datamodules import SFTDataModule
    from zoo.modules.base import CausalLMModule

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dataset", default="gsm_symbolic")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--length", type=int, default=384,
                        help="max_length of the batch's rows (longer rows are dropped)")
    parser.add_argument("--rhos", type=float, nargs="+", default=[1.0, 0.7, 0.5, 0.4, 0.3])
    parser.add_argument("--units", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    module = CausalLMModule(model=args.model, export=False)
    data = SFTDataModule(tokenizer=args.model, dataset=args.dataset, num_train=4 * args.batch_size, num_val=0,
                         num_test=0, max_length=args.length, batch_size=args.batch_size)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    rows = greentrainer_report(module, batch, tuple(args.rhos), repeats=args.repeats, units=args.units)
    print(f"GreenTrainer on {args.model}, one {args.dataset} batch {tuple(batch['input_ids'].shape)}, "
          f"{args.units} cost units\n")
    print("| rho | predicted FLOPs saving | trainable tensors | backward s | vs rho 1 |\n"
          "|---|---|---|---|---|")
    full = rows[0]["backward_s"] if rows and rows[0]["rho"] == 1.0 else None
    for row in rows:
        ratio = f"{row['backward_s'] / full:.2f}x" if full else "-"
        print(f"| {row['rho']:.1f} | {row['predicted_saving']:.1%} | {row['trainable_tensors']} | "
              f"{row['backward_s']:.3f} | {ratio} |")


register(
    name="greentrainer",
    kind="callback",
    paper="Towards Green AI in Fine-tuning Large Language Models via Adaptive Backpropagation (2023)",
    spec="30",
    config="configs/greentrainer.yaml",
    target="zoo.modules.sparse.greentrainer:GreenTrainerCallback",
    scope="cost model, side-effect-free probe, DP, callback; FLOPs modelled not measured",
)


if __name__ == "__main__":
    main()
