"""HFT (Half Fine-Tuning): per stage, train a random half of each block's parameter matrices, freeze the rest.

Paper: HFT: Half Fine-Tuning for Large Language Models (2024). Spec: papers/21-hft.md.

Implements: category-level selection per decoder block (attention: ``round(ratio*4)`` of {q,k,v,o};
FFN: ``floor(ratio * L * 3)`` matrices in total, spread so that ``floor(L/2)`` random layers train 2
of {gate, up, down} and the others 1 at ratio 0.5; norms: ``round(ratio*2)`` of the block's 2),
embeddings / LM head / final norm always trainable (``select_embeddings=False``), a fresh seeded draw
per stage (``stage`` argument for a sequence of fits, or per epoch with ``reselect="epoch"``),
frozen tensors left out of the optimizer (so weight decay cannot move them), and the pilot study's
:func:`half_reset` analysis tool. A unit is one sub-module (weight and bias together).
Differs: there is no official code; unit grouping follows the ssu reimplementation. Units are
found by module-name keywords (``attn``/``attention``, ``mlp``/``ffn``/``feed_forward``,
``norm``/``ln``), so other families work if their names follow these conventions.
Not implemented: the behaviour study (TRACE / DPO stages) is user-side.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Literal

import lightning as L
import torch
from torch import nn

from zoo import backbone
from zoo.errors import check_range
from zoo.modules.sparse.param_mask import ParameterMaskCallback, Selection, rebuild_optimizer
from zoo.registry import register_method

CATEGORIES = ("attention", "ffn", "norm")


def _category(path: str) -> str | None:
    leaf = path.lower()
    if "norm" in leaf.split(".")[-1] or leaf.split(".")[-1].startswith("ln"):
        return "norm"
    if "attn" in leaf or "attention" in leaf:
        return "attention"
    if "mlp" in leaf or "ffn" in leaf or "feed_forward" in leaf:
        return "ffn"
    return None


def _hf(model: nn.Module) -> nn.Module:
    """The HF model inside a zoo LightningModule (or the model itself)."""
    return model.model if isinstance(model, L.LightningModule) else model


def block_units(model: nn.Module) -> list[dict[str, list[list[str]]]]:
    """Per decoder block: category -> list of units, each unit the parameter names of one sub-module.

    Names are relative to ``model`` (``model.named_parameters()``)."""
    full = {id(p): name for name, p in model.named_parameters()}
    out = []
    for layer in backbone.decoder_layers(_hf(model)):
        units: dict[str, list[list[str]]] = defaultdict(list)
        for path, sub in layer.named_modules():
            own = [full[id(p)] for p in sub.parameters(recurse=False) if id(p) in full]
            category = _category(path) if own else None
            if category is not None:
                units[category].append(own)
        out.append(dict(units))
    return out


def hft_selection(model: nn.Module, seed: int, stage: int = 0, ratio: float = 0.5,
                  select_embeddings: bool = False) -> set[str]:
    """Names (relative to ``model``) of the tensors that train in ``stage``; everything outside blocks trains.

    With ``select_embeddings`` the input embedding and the LM head (one unit when tied) join the draw."""
    rng = random.Random(f"hft-{seed}-{stage}")
    blocks = block_units(model)
    selected: set[str] = set()
    in_blocks: set[str] = set()
    n_layers = len(blocks)
    ffn_sizes = [len(b.get("ffn", [])) for b in blocks]
    ffn_total = math.floor(ratio * sum(ffn_sizes))
    base = ffn_total // max(1, n_layers)
    extra_layers = set(rng.sample(range(n_layers), ffn_total - base * n_layers)) if n_layers else set()
    for index, units in enumerate(blocks):
        for category, group in units.items():
            in_blocks |= {n for unit in group for n in unit}
            if category == "ffn":
                k = min(len(group), base + (index in extra_layers))
            else:
                k = int(ratio * len(group) + 0.5)
            for unit in rng.sample(group, k):
                selected |= set(unit)
    outside = {name for name, _ in model.named_parameters() if name not in in_blocks}
    if select_embeddings:
        base_model = backbone.base_model(_hf(model))
        emb = [base_model.get_input_embeddings(), base_model.get_output_embeddings()]
        ids = {id(p) for m in emb if m is not None for p in m.parameters()}
        emb_names = {n for n, p in model.named_parameters() if id(p) in ids}
        outside -= emb_names
        if rng.random() < ratio:
            selected |= emb_names
    return selected | outside


def trainable_report(module: nn.Module) -> dict[str, float]:
    """Trainable fraction of the block parameters and of the whole model."""
    blocks = {n for layer_units in block_units(module) for g in layer_units.values() for u in g for n in u}
    params = dict(module.named_parameters())
    block_total = sum(params[n].numel() for n in blocks)
    block_train = sum(params[n].numel() for n in blocks if params[n].requires_grad)
    total = sum(p.numel() for p in params.values())
    train = sum(p.numel() for p in params.values() if p.requires_grad)
    return {"block_fraction": block_train / max(1, block_total), "model_fraction": train / max(1, total)}


@torch.no_grad()
def half_reset(finetuned: nn.Module, base: nn.Module, seed: int, ratio: float = 0.5) -> set[str]:
    """The pilot study: copy the HFT-selected block tensors of ``base`` into ``finetuned`` (in place).

    Returns the names reset; every other tensor keeps its fine-tuned value. Both models must share
    an architecture."""
    names = hft_selection(finetuned, seed=seed, stage=0, ratio=ratio)
    blocks = {n for layer_units in block_units(finetuned) for g in layer_units.values() for u in g for n in u}
    reset = names & blocks
    base_params = dict(base.named_parameters())
    for name, p in finetuned.named_parameters():
        if name in reset:
            p.copy_(base_params[name])
    return reset


@register_method(
    name="hft",
    paper="HFT: Half Fine-Tuning for Large Language Models (2024)",
    spec="21",
    scope="selection + half-reset tool; TRACE/DPO stage sequences are user-side configs",
)
class HalfFineTuningCallback(ParameterMaskCallback):
    """HFT: freeze a seeded random half of each block's matrices per stage (or per epoch)."""

    def __init__(self, ratio: float = 0.5, seed: int = 0, stage: int = 0,
                 reselect: Literal["stage", "epoch"] = "stage", select_embeddings: bool = False) -> None:
        """
        Args:
            ratio: fraction of block units trained (paper p = 0.5).
            seed: RNG seed of the selection; the draw also depends on the stage index.
            stage: index of this training stage in a sequence of fits (SFT -> DPO -> ...): a new draw per
                stage.
            reselect: ``stage`` draws once per fit (the paper); ``epoch`` re-draws at every epoch start.
            select_embeddings: include input embeddings / LM head in the draw (tied ones as one unit).
        """
        super().__init__()
        check_range("HalfFineTuningCallback ratio", ratio, 0.0, 1.0,
                    "the fraction of block units trained (paper 0.5)", low_open=True)
        self.ratio, self.seed, self.first_stage = ratio, seed, stage
        self.reselect, self.select_embeddings = reselect, select_embeddings

    def _selection(self, module: nn.Module, stage: int) -> Selection:
        return Selection(trainable=hft_selection(module, self.seed, stage, self.ratio,
                                                 self.select_embeddings))

    def initial_selection(self, module: L.LightningModule) -> Selection:
        self.stage = self.first_stage
        return self._selection(module, self.stage)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.reselect != "epoch":
            return
        stage = self.first_stage + trainer.current_epoch
        if stage != self.stage:
            self.stage = stage
            self.apply_selection(pl_module, self._selection(pl_module, stage))
            rebuild_optimizer(trainer, carry_state=True, carry_schedule=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = trainable_report(pl_module)
        print(f"[zoo] HFT stage {self.stage}: trains {report['block_fraction']:.1%} of block parameters, "
              f"{report['model_fraction']:.1%} of the model")
