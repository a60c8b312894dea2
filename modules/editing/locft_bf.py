"""LocFT-BF: edit facts by plain mini-batch, epoch-based fine-tuning of one localised weight matrix.

Paper: Fine-tuning Done Right in Model Editing (2025). Spec: papers/14-locft-bf.md. Code: ICT-STAR/LocFT.

Implements: one trainable tensor, named exactly (``param``) or by decoder layer + matrix (default the MLP
down-projection of the layer at 70% depth: Llama-3-8B's 22 of 32); every other tensor frozen. Loss per
mini-batch = the mean over requests of each request's mean target-token NLL (``reduction="sequence_mean"``),
targets end in EOS. Breadth-first (the paper's): epochs over all edits in shuffled mini-batches; a batch whose
loss is below ``tau_step`` takes no step; training stops after an epoch whose mean loss is below ``tau_stop``.
Plain Adam, no weight decay, constant lr, no clipping. Depth-first (the foil, FT-M style): each request alone,
up to ``depth_steps`` steps until its loss is below ``tau_step``, never revisited.
Editing protocols (:func:`run_protocol`): single (each edit on the unedited model, then restored), batch (all
edits at once) and sequential (groups of ``group_size`` edited one after another, evaluated at the end).

Why a ``CausalLMModule`` subclass and not a callback: the method owns the optimizer (plain Adam, no schedule),
the update rule (skip below ``tau_step``, an inner loop in depth-first mode) and the stopping rule, i.e. the
training loop itself; a callback would have to override all three from outside. Manual optimisation keeps both
loops in ``training_step`` and in :meth:`LocFTBFEditor.edit` (the same step, without a Trainer).

Differs from the official code: chat-rendered prompts (an instruct backbone; no leading-space rule needed);
generation through the zoo decoder instead of vLLM. Not implemented: the general-capability suite (the harness
runs lm-eval tasks separately).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zoo import backbone
from zoo.datamodules.editing import edit_metrics, locality_prompts
from zoo.datamodules.sft import collate, encode_example
from zoo.errors import ConfigError
from zoo.modules.base import CausalLMModule
from zoo.registry import register_method


def localized_parameter_name(model: nn.Module, param: str | None, layer: int | None, matrix: str) -> str:
    """The exact name of the one tensor to train: ``param`` itself, or ``<layers>.<layer>.<matrix>``
    (``layer`` None = 70% depth; negative counts from the end). Exact dotted names only (no substring test,
    so layer 2 never matches layers 20-29)."""
    names = dict(model.named_parameters())
    if param is None:
        layers = backbone.decoder_layers(model)
        prefix = next(name for name, module in model.named_modules() if module is layers)
        count = len(layers)
        index = int(0.7 * count) if layer is None else (layer + count if layer < 0 else layer)
        if not 0 <= index < count:
            raise ConfigError(f"layer {layer} is outside the backbone's {count} decoder layers; "
                              f"use 0..{count - 1}")
        param = f"{prefix}.{index}.{matrix}"
    if param not in names:
        near = [n for n in names if n.endswith(param.rsplit(".", 2)[-2] + "." + param.rsplit(".", 1)[-1])][:4]
        raise ConfigError(f"no parameter named {param!r} in the backbone; e.g. {near or list(names)[:4]}")
    return param


@register_method(name="locft_bf", paper="Fine-tuning Done Right in Model Editing (2025)", spec="14",
                 scope="breadth-first + depth-first foil, single/batch/sequential protocols, EM metrics and "
                       "n-gram fluency; no general-capability suite; pycountry relations instead of ZsRE/"
                       "CounterFact (those load from local JSON)")
class LocFTBFEditor(CausalLMModule):
    """Edit facts by fine-tuning one localised weight matrix (LocFT-BF), or depth-first (the foil)."""

    def __init__(self, param: str | None = None, layer: int | None = None,
                 matrix: str = "mlp.down_proj.weight",
                 mode: Literal["breadth_first", "depth_first"] = "breadth_first", tau_step: float = 1e-2,
                 tau_stop: float = 1e-2, depth_steps: int = 25, evaluate_edits: bool = True,
                 lr: float = 5e-4, reduction: str = "sequence_mean", **kwargs: Any) -> None:
        """
        Args:
            param: exact name of the trained tensor (e.g. ``model.layers.21.mlp.down_proj.weight``); overrides
                ``layer``/``matrix``.
            layer: decoder layer of the edit (None = 70% depth; negative from the end; paper: 22 of 32).
            matrix: the tensor inside that layer (paper: ``mlp.down_proj.weight``).
            mode: ``breadth_first`` (LocFT-BF) or ``depth_first`` (the paper's foil).
            tau_step: no update for a batch (breadth-first) or request (depth-first) whose loss is below this.
            tau_stop: stop after an epoch whose mean batch loss is below this (breadth-first).
            depth_steps: depth-first: steps at most per request (FT-M style).
            evaluate_edits: at the end of fit on an :class:`~zoo.datamodules.editing.EditingDataModule`, write
                efficacy / generalisation / locality / fluency to ``<run>/edit_metrics.json``.
            lr: Adam learning rate (paper 5e-4 for down_proj).
            reduction: loss reduction (paper: per-request mean, then mean over the batch).
            **kwargs: :class:`~zoo.modules.CausalLMModule`'s (model, dtype, adapter, ...).
        """
        super().__init__(lr=lr, reduction=reduction, **kwargs)
        self.automatic_optimization = False
        self._epoch_losses: list[Tensor] = []
        self._locality_before: list[str] | None = None

    def configure_backbone(self, model: nn.Module) -> nn.Module:
        hp = self.hparams
        self.edit_param_name = localized_parameter_name(model, hp.param, hp.layer, hp.matrix)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name == self.edit_param_name)
        return model

    def configure_optimizers(self):
        params = list(self.trainable_parameters().values())
        return torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=0.0)

    # ------------------------------------------------------------------ the update
    def edit_loss(self, batch: dict[str, Tensor]) -> Tensor:
        outputs = self(batch)
        return self.compute_loss(batch, outputs, self.token_weights(batch, outputs))

    def edit_step(self, batch: dict[str, Tensor], optimizer: torch.optim.Optimizer, backward=None) -> Tensor:
        """One breadth-first update (skipped below ``tau_step``) or one depth-first request loop per row.
        Returns the batch loss before the update."""
        backward = backward or (lambda loss: loss.backward())
        if self.hparams.mode == "breadth_first":
            loss = self.edit_loss(batch)
            if loss.detach() >= self.hparams.tau_step:
                optimizer.zero_grad()
                backward(loss)
                optimizer.step()
            return loss.detach()
        losses = []
        for i in range(batch["input_ids"].shape[0]):
            row = {k: v[i:i + 1] for k, v in batch.items() if isinstance(v, Tensor)}
            for step in range(self.hparams.depth_steps):
                loss = self.edit_loss(row)
                if step == 0:
                    losses.append(loss.detach())
                if loss.detach() < self.hparams.tau_step:
                    break
                optimizer.zero_grad()
                backward(loss)
                optimizer.step()
        return torch.stack(losses).mean()

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.edit_step(batch, self.optimizers(), self.manual_backward)
        self._epoch_losses.append(loss)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_start(self) -> None:
        self._epoch_losses = []

    def on_train_epoch_end(self) -> None:
        if self._epoch_losses and self.hparams.mode == "breadth_first":
            if float(torch.stack(self._epoch_losses).mean()) < self.hparams.tau_stop:
                self.trainer.should_stop = True

    # ------------------------------------------------------------------ without a Trainer
    def edit(self, records: list[dict], epochs: int = 25, batch_size: int = 100, seed: int = 0) -> int:
        """Edit ``records`` (prompt, target_new) in place with a fresh Adam; returns the epochs run."""
        rows = [encode_example(self.tokenizer, r["prompt"], r["target_new"]) for r in records]
        for i, row in enumerate(rows):
            row["index"] = i
        optimizer = self.configure_optimizers()
        device = next(self.parameters()).device
        rng = random.Random(seed)
        was_training = self.training
        self.train()
        try:
            for epoch in range(1, epochs + 1):
                order = list(range(len(rows)))
                rng.shuffle(order)
                losses = []
                for start in range(0, len(order), batch_size):
                    chunk = [rows[i] for i in order[start:start + batch_size]]
                    batch = collate(chunk, self.tokenizer.pad_token_id)
                    losses.append(self.edit_step({k: v.to(device) for k, v in batch.items()}, optimizer))
                mean = float(torch.stack(losses).mean())
                if self.hparams.mode == "depth_first" or mean < self.hparams.tau_stop:
                    return epoch  # depth-first never revisits a request
            return epochs
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ metrics at the end of fit
    def _edit_records(self) -> list[dict] | None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if not self.hparams.evaluate_edits or not hasattr(datamodule, "edit_records"):
            return None
        return datamodule.edit_records

    def on_train_start(self) -> None:
        if self.trainer.world_size > 1:  # each rank would decide from its own loss whether to step
            raise ConfigError("LocFT-BF decides per edit, from that rank's loss, whether to take a step "
                              "and when to stop, so ranks would disagree and DDP's all-reduce would hang; "
                              "run it on one device (trainer.devices: 1)")
        records = self._edit_records()
        if records:
            self._locality_before = self.generate_text(locality_prompts(records), max_new_tokens=16)

    def on_train_end(self) -> None:
        records = self._edit_records()
        if not records or not self.trainer.is_global_zero:
            return
        metrics = edit_metrics(self, records, self._locality_before)
        path = Path(self.trainer.default_root_dir) / "edit_metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2) + "\n")
        print(f"[zoo] editing ({len(records)} edits): {metrics} -> {path}")


def run_protocol(editor: LocFTBFEditor, records: list[dict],
                 protocol: Literal["single", "batch", "sequential"], group_size: int = 10, epochs: int = 25,
                 batch_size: int = 100) -> dict[str, float]:
    """Edit ``records`` under a protocol and return :func:`~zoo.datamodules.editing.edit_metrics` over them.

    ``single``: each edit alone on the unedited model (the matrix restored after each; metrics averaged);
    ``batch``: all edits in one breadth-first run; ``sequential``: groups of ``group_size`` edited one after
    another without restoring, metrics over all edits at the end. The edited matrix is restored on return."""
    param = dict(editor.named_parameters())[f"model.{editor.edit_param_name}"]
    original = param.detach().clone()
    before = editor.generate_text(locality_prompts(records), max_new_tokens=16)
    try:
        if protocol == "single":
            totals: dict[str, float] = {}
            offset = 0
            for record in records:
                count = len(record.get("locality", []))
                editor.edit([record], epochs, batch_size)
                for key, value in edit_metrics(editor, [record], before[offset:offset + count]).items():
                    totals[key] = totals.get(key, 0.0) + value / len(records)
                offset += count
                with torch.no_grad():
                    param.copy_(original)
            return totals
        groups = [records] if protocol == "batch" else [records[i:i + group_size]
                                                         for i in range(0, len(records), group_size)]
        if protocol not in ("batch", "sequential"):
            raise ConfigError(f"unknown editing protocol {protocol!r}; use single, batch or sequential")
        for group in groups:
            editor.edit(group, epochs, batch_size)
        return edit_metrics(editor, records, before)
    finally:
        with torch.no_grad():
            param.copy_(original)
