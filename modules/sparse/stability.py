"""Fine-tuning stabilisers: layer-wise LR decay, freezing lower layers, re-initialising top layers, and a
multi-seed stability report.

Paper: Fine-Tuning Large Neural Language Models for Biomedical Natural Language Processing (2021).
Spec: papers/32-biomed-stability.md.

Implements: one callback with three independent knobs (composable with any module and with the
other parameter-selection callbacks): ``freeze_bottom`` k freezes the embeddings and blocks 1..k
(``requires_grad=False``, left out of the optimizer, so they stay bitwise unchanged);
``reinit_top`` r re-initialises blocks L-r+1..L in ``setup`` (before the optimizer exists) with the
backbone's own rule (Linear weights N(0, ``initializer_range``), biases 0, norm weights 1); and
``layer_lr_decay`` ξ splits the optimizer's groups by depth (embeddings 0, block l at depth l,
final norm + LM head at L+1) with lr ``η·ξ^(L+1-depth)`` (top block η·ξ, head η), keeping each group's
weight decay, then re-creates the step scheduler over the new groups so every group is scaled by
the same factor. ξ = 1, k = 0, r = 0 leaves training bit-identical to the plain module.
:func:`stability_report` summarises results.jsonl records over seeds (mean, std, min, max, failed).
Differs: decoder LLM instead of BERT/ELECTRA: "top" = last decoder blocks and there is no pooler;
tied input/output embeddings are one tensor, put in the EMBEDDING group (depth 0, lowest lr) and
frozen with the embeddings by ``freeze_bottom`` (documented choice, spec "Tied embeddings").
The re-init rule is written here instead of calling HF ``_init_weights``, which transformers 5
skips for tensors already marked initialised by ``from_pretrained``.
Not implemented: the BLURB tasks and classification heads (the zoo trains causal LMs).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

import lightning as L
import torch
from torch import nn

from zoo import backbone
from zoo.modules.sparse.param_mask import ParameterMaskCallback, Selection, layer_parameter_names
from zoo.registry import register_method


def layer_depths(module: nn.Module) -> dict[str, int]:
    """Depth of every parameter name: embeddings 0, decoder block l (1-based) l, everything else L+1."""
    layers = layer_parameter_names(module)
    depths = {name: len(layers) + 1 for name, _ in module.named_parameters()}
    for index, names in enumerate(layers, start=1):
        depths.update(dict.fromkeys(names, index))
    base = backbone.base_model(module.model)
    input_ids = {id(p) for p in base.get_input_embeddings().parameters()}
    for name, p in module.named_parameters():
        if id(p) in input_ids:  # tied LM head shares this tensor: it goes with the embeddings
            depths[name] = 0
    return depths


def llrd_lr(base_lr: float, decay: float, depth: int, num_layers: int) -> float:
    """``η · ξ^(L+1-depth)``: the head (depth L+1) gets η, the top block η·ξ, embeddings η·ξ^(L+1)."""
    return base_lr * decay ** (num_layers + 1 - depth)


@torch.no_grad()
def reinit_module(module: nn.Module, std: float, generator: torch.Generator) -> None:
    """Re-initialise Linear/Embedding weights N(0, std), biases 0, norm weights 1 (in place)."""
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)):
            sub.weight.copy_(torch.randn(sub.weight.shape, generator=generator) * std)
            if getattr(sub, "bias", None) is not None:
                sub.bias.zero_()
        elif "norm" in type(sub).__name__.lower():
            if getattr(sub, "weight", None) is not None:
                sub.weight.fill_(1.0)
            if getattr(sub, "bias", None) is not None:
                sub.bias.zero_()


@register_method(
    name="stability",
    paper="Fine-Tuning Large Neural Language Models for Biomedical Natural Language Processing (2021)",
    spec="32",
    scope="LLRD / freeze / re-init + seed report; BLURB tasks and classifier heads left out",
)
class FinetuneStabilizer(ParameterMaskCallback):
    """Layer-wise LR decay (ξ), frozen bottom blocks (k) and re-initialised top blocks (r)."""

    def __init__(self, layer_lr_decay: float = 1.0, freeze_bottom: int = 0, reinit_top: int = 0,
                 seed: int = 0) -> None:
        """
        Args:
            layer_lr_decay: ξ, per-layer LR multiplier (1 = off; ELECTRA-style values 0.8-0.95).
            freeze_bottom: k, frozen bottom blocks; the embeddings are frozen too when k > 0.
            reinit_top: r, top blocks re-initialised before training.
            seed: RNG seed of the re-initialisation.
        """
        super().__init__()
        if not 0 < layer_lr_decay <= 1:
            raise ValueError("layer_lr_decay must be in (0, 1]")
        self.layer_lr_decay, self.freeze_bottom, self.reinit_top, self.seed = (
            layer_lr_decay, freeze_bottom, reinit_top, seed)

    def initial_selection(self, module: L.LightningModule) -> Selection:
        layers = backbone.decoder_layers(module.model)
        if self.freeze_bottom + self.reinit_top > len(layers) and self.reinit_top:
            raise ValueError(f"freeze_bottom {self.freeze_bottom} + reinit_top {self.reinit_top} > "
                             f"{len(layers)} blocks: re-initialised blocks would be frozen")
        if self.reinit_top:
            config = backbone.base_model(module.model).config
            std = getattr(config, "initializer_range", 0.02)
            generator = torch.Generator().manual_seed(self.seed)
            for layer in list(layers)[len(layers) - self.reinit_top:]:
                reinit_module(layer, std, generator)
        if not self.freeze_bottom:
            return Selection()
        base = backbone.base_model(module.model)
        frozen = {n for n, p in module.named_parameters()
                  if id(p) in {id(q) for q in base.get_input_embeddings().parameters()}}
        for names in layer_parameter_names(module)[: self.freeze_bottom]:
            frozen |= names
        return Selection(trainable={n for n, p in module.named_parameters() if p.requires_grad} - frozen)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.layer_lr_decay != 1.0:
            apply_layer_lr_decay(trainer, pl_module, self.layer_lr_decay)

    def on_optimizer_rebuilt(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Another selection callback rebuilt the optimizer (new stage): split its groups by depth again."""
        self.on_fit_start(trainer, pl_module)


def apply_layer_lr_decay(trainer: L.Trainer, module: nn.Module, decay: float) -> None:
    """Split the optimizer's groups by depth (in place) and re-create the LambdaLR over them."""
    depths = layer_depths(module)
    num_layers = len(backbone.decoder_layers(module.model))
    name_of = {id(p): n for n, p in module.named_parameters()}
    optimizer = trainer.optimizers[0]
    groups = []
    for group in optimizer.param_groups:
        by_depth: dict[int, list] = defaultdict(list)
        for p in group["params"]:
            by_depth[depths[name_of[id(p)]]].append(p)
        base_lr = group.get("initial_lr", group["lr"])
        for depth, params in sorted(by_depth.items()):
            new = {k: v for k, v in group.items() if k not in ("params", "lr", "initial_lr")}
            groups.append({**new, "params": params, "lr": llrd_lr(base_lr, decay, depth, num_layers),
                           "zoo_depth": depth})
    optimizer.param_groups = []
    for group in groups:
        optimizer.add_param_group(group)
    for config in trainer.lr_scheduler_configs:
        old = config.scheduler
        if not isinstance(old, torch.optim.lr_scheduler.LambdaLR) or len(old.lr_lambdas) == 0:
            raise TypeError("layer_lr_decay needs the module's LambdaLR scheduler")
        config.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, old.lr_lambdas[0])


def stability_report(records: list[dict[str, Any]], metric: str, fail_threshold: float,
                     group_by: str = "method", higher_is_better: bool = True) -> dict[str, dict[str, float]]:
    """Seed stability per method over results.jsonl records (``{method, seed, metrics: {...}}``).

    Returns per group: n, mean, std (sample, ddof 1; 0 for one run), min, max and ``failed`` = runs
    whose score is at or below ``fail_threshold`` (at or above it when ``higher_is_better`` is False)."""
    scores: dict[str, list[float]] = defaultdict(list)
    for record in records:
        value = record.get("metrics", {}).get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        scores[str(record.get(group_by))].append(float(value))
    report = {}
    for group, values in sorted(scores.items()):
        failed = sum(v <= fail_threshold if higher_is_better else v >= fail_threshold for v in values)
        report[group] = {"n": len(values), "mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "min": min(values), "max": max(values), "failed": failed}
    return report
