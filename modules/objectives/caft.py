"""CAFT: concept-aware fine-tuning with multi-token-prediction auxiliary heads during SFT only.

Paper: Improving large language models with concept-aware fine-tuning (2025, arXiv 2506.07833).
Spec: papers/05-caft.md. Official code: michaelchen-lab/caft-llm.

Implements
    * :class:`AuxiliaryHeads`: n-1 heads, each one decoder block copied from the backbone's
      second-to-last layer plus a copy of its final norm, run with the model's own causal mask and
      rotary position embeddings (the spec's missing-mask pitfall) and tuple/tensor layer outputs both
      handled; they share the backbone's LM head. Head k (k = 1..n-1) at position t predicts token t+1+k.
    * the loss ``L = CE_1 + alpha * gamma(step) * sum_k decay^k * CE_{k+1}`` (:func:`multi_token_ce` computes
      CE_{k+1} on labels shifted by 1+k, honouring token-selector weights), with the gamma schedules of
      the repo (:func:`aux_weight_schedule`: rsine (default), constant, linear, sine);
    * head pre-training on the user's own SFT data: ``head_pretrain_steps`` head-only steps at fit start
      (the repo's ``heads_pretraining`` stage A'), or ``stage="heads"`` for a whole fit that trains only the
      heads (stage A); ``heads_path`` loads saved heads (``caft_heads.pt``, written next to every export);
    * heads frozen in stage B unless ``finetune_heads``; they are not part of :meth:`exportable_model`, so the
      export is the plain HF causal LM (plus the separate ``caft_heads.pt`` file, and the heads in
      ``zoo_state.safetensors``, from which ``zoo.load`` rebuilds the whole CAFTModule);
    * any ``adapter`` from YAML (LoRA, prompt tuning, ...) wraps the trunk: the heads are copied from the
      plain backbone before it attaches, and read the trunk's states at the real positions only (an
      adapter's virtual tokens are dropped by its ``hidden_states``).

Differs from the official code: heads read the backbone's FINAL normalised hidden state in both head
pre-training and fine-tuning (the repo pre-trains on the penultimate state and fine-tunes on the final
one; the spec says pick one consistently; the final state needs no extra forward); the lm_head is not
frozen separately (tied embeddings in SmolLM2 would freeze the input embeddings too).
Not implemented: the authors' generic head pre-training corpus (not available offline: stage A runs on
any zoo data set instead), loading the authors' released Llama-3.1-8B heads, the residual-linear head
variant, early stopping on the main-head loss.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import backbone
from zoo.errors import ConfigError, TrainingError
from zoo.kernels.selected_ce import selected_linear_cross_entropy
from zoo.modules.base import CausalLMModule, StepOutputs, reduce_loss
from zoo.registry import register

Schedule = Literal["rsine", "constant", "linear", "sine"]
HEADS_FILE = "caft_heads.pt"


def aux_weight_schedule(step: int, total: int, kind: Schedule = "rsine") -> float:
    """gamma(t) in [0, 1]: rsine = sin((T - t)/T * pi/2) (1 -> 0), sine = sin(t/T * pi/2), linear = t/T, constant = 1."""
    progress = min(max(step / max(total, 1), 0.0), 1.0)
    if kind == "rsine":
        return math.sin((1.0 - progress) * math.pi / 2)
    if kind == "sine":
        return math.sin(progress * math.pi / 2)
    if kind == "linear":
        return progress
    if kind == "constant":
        return 1.0
    raise ValueError(f"unknown CAFT schedule {kind!r}; use rsine, constant, linear or sine")


def multi_token_ce(head_hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, weights: Tensor,
                   offset: int) -> Tensor:
    """Weighted CE of a head whose position t predicts token t + ``offset`` (offset 1 = the main head).

    Shapes: ``head_hidden`` (B, T, H), ``weight`` (V, H), ``labels`` / ``weights`` (B, T) target-aligned.
    Returns (B, T) target-aligned ``weights[b, j] * CE(head(h[b, j - offset]), labels[b, j])`` (0 for j < offset).
    """
    batch, length = labels.shape
    if length <= offset:
        return head_hidden.new_zeros(labels.shape, dtype=torch.float32) + 0.0 * head_hidden.sum()
    pred, targets, w = head_hidden[:, : length - offset], labels[:, offset:], weights[:, offset:]
    flat = selected_linear_cross_entropy(pred.reshape(-1, pred.shape[-1]), weight, targets.reshape(-1),
                                         w.reshape(-1), bias=bias)
    return F.pad(flat.view(batch, length - offset), (offset, 0))


class AuxiliaryHeads(nn.Module):
    """n-1 decoder blocks (+ final norm) on the trunk's hidden states; head k predicts token t+1+k."""

    def __init__(self, model: nn.Module, num_heads: int, source_layer: int = -2) -> None:
        super().__init__()
        layers = backbone.decoder_layers(model)
        source = layers[source_layer] if len(layers) >= abs(source_layer) else layers[-1]
        body = backbone.decoder(model)
        norm = getattr(body, "norm", None) or getattr(body, "ln_f", None) or nn.Identity()
        self.blocks = nn.ModuleList(copy.deepcopy(source) for _ in range(num_heads))
        self.norms = nn.ModuleList(copy.deepcopy(norm) for _ in range(num_heads))
        self._body = [body]  # not a submodule: its rotary embedding and config are read, never trained
        self.config = backbone.base_model(model).config

    def forward(self, hidden: Tensor, attention_mask: Tensor | None = None) -> list[Tensor]:
        """(B, T, H) trunk hidden states -> one (B, T, H) normed hidden state per head (causal)."""
        from transformers.masking_utils import create_causal_mask

        body = self._body[0]
        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        mask = create_causal_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                                  cache=None, position_ids=position_ids)
        rotary = getattr(body, "rotary_emb", None)
        extra = {"position_embeddings": rotary(hidden, position_ids=position_ids)} if rotary is not None else {}
        outputs = []
        for block, norm in zip(self.blocks, self.norms):
            out = block(hidden, attention_mask=mask, position_ids=position_ids, **extra)
            out = out[0] if isinstance(out, tuple) else out  # older layers return tuples, newer a tensor
            outputs.append(norm(out))
        return outputs


class CAFTModule(CausalLMModule):
    """SFT plus decaying multi-token-prediction auxiliary losses from frozen, pre-trained heads."""

    def __init__(
        self,
        num_predict: int = 5,
        heads_coefficient: float = 0.01,
        decay: float = 0.8,
        schedule: Schedule = "rsine",
        finetune_heads: bool = False,
        stage: Literal["finetune", "heads"] = "finetune",
        heads_path: str | None = None,
        head_pretrain_steps: int = 0,
        head_pretrain_lr: float = 1e-4,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_predict: n, tokens predicted per position (n - 1 auxiliary heads; paper 5).
            heads_coefficient: alpha, global weight of the auxiliary losses (paper 0.01).
            decay: beta, head k's loss weight is beta^k (paper 0.8).
            schedule: gamma(t) over training: rsine (paper default, 1 -> 0), constant, linear, sine.
            finetune_heads: train the heads in stage B too (paper: frozen).
            stage: ``finetune`` (stage B: trunk + aux loss) or ``heads`` (stage A: trunk frozen, heads only).
            heads_path: a ``caft_heads.pt`` (or a folder holding one) from an earlier run to start from.
            head_pretrain_steps: head-only steps on the training data at fit start (stage A'; 0 = none).
            head_pretrain_lr: learning rate of head pre-training (paper 1e-4).
            **kwargs: the CausalLMModule arguments (model, lr, ...).
        """
        if num_predict < 2:
            raise ConfigError("CAFT needs num_predict >= 2 (at least one auxiliary head)")
        self._num_heads = num_predict - 1
        super().__init__(**kwargs)  # builds the heads in configure_backbone, before the adapter attaches
        if heads_path:
            path = Path(heads_path)
            self.heads.load_state_dict(torch.load(path / HEADS_FILE if path.is_dir() else path, map_location="cpu"))
        self.heads.requires_grad_(finetune_heads or stage == "heads")
        if stage == "heads":
            self.model.requires_grad_(False)
            self.adapter.requires_grad_(False)  # the adapter's own tensors (soft prompts, ...) are trunk too
        self._heads_ready = heads_path is not None or head_pretrain_steps == 0

    def configure_backbone(self, model: nn.Module) -> nn.Module:
        """Copy the heads from the plain backbone, before the adapter attaches: an adapter that wraps layers in
        place (LoRA, parallel adapters) must not end up inside the heads."""
        model = super().configure_backbone(model)
        self.heads = AuxiliaryHeads(model, self._num_heads)
        return model

    # ------------------------------------------------------------------ losses
    def auxiliary_losses(self, batch: dict[str, Tensor], hidden: Tensor, weights: Tensor) -> list[Tensor]:
        """[CE_2, ..., CE_n]: each head's weighted token-mean CE on labels shifted by 1 + k.

        ``hidden`` (B, T, H) are the trunk's states at the batch's REAL positions (``forward_hidden``: an adapter's
        virtual tokens are already dropped), so the heads see the real sequence with its own attention mask."""
        if hidden.shape[:2] != batch["labels"].shape:
            raise TrainingError(f"CAFT heads need hidden states at the real positions {tuple(batch['labels'].shape)}, "
                                f"got {tuple(hidden.shape[:2])}: the adapter's hidden_states must drop virtual tokens")
        head_weight, head_bias = self.lm_head_weight()
        losses = []
        for k, head_hidden in enumerate(self.heads(hidden, batch.get("attention_mask")), start=1):
            per_token = multi_token_ce(head_hidden, head_weight, head_bias, batch["labels"], weights, offset=1 + k)
            shifted = torch.zeros_like(weights)
            shifted[:, 1 + k:] = weights[:, 1 + k:]
            losses.append(reduce_loss(per_token, shifted, "token_mean"))
        return losses

    def head_loss(self, batch: dict[str, Tensor], hidden: Tensor, weights: Tensor) -> Tensor:
        """sum_k decay^k CE_{k+1}: the head pre-training objective and the aux term of stage B."""
        losses = self.auxiliary_losses(batch, hidden, weights)
        if self._trainer is not None:
            for k, value in enumerate(losses, start=1):
                self.log(f"train/aux_ce_{k + 1}", value.detach())
        return sum(self.hparams.decay**k * value for k, value in enumerate(losses, start=1))

    def aux_coefficient(self) -> float:
        """alpha * gamma(global_step / total steps)."""
        total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        return self.hparams.heads_coefficient * aux_weight_schedule(int(self.global_step), total,
                                                                    self.hparams.schedule)

    def compute_loss(self, batch: dict[str, Tensor], outputs: StepOutputs, weights: Tensor) -> Tensor:
        if self.hparams.stage == "heads":
            return self.head_loss(batch, outputs.hidden.detach(), weights)
        main = super().compute_loss(batch, outputs, weights)
        coefficient = self.aux_coefficient()
        if self._trainer is not None:
            self.log("train/aux_coefficient", coefficient)
        if coefficient == 0.0:
            return main
        return main + coefficient * self.head_loss(batch, outputs.hidden, weights)

    # ------------------------------------------------------------------ head pre-training (stage A')
    def pretrain_heads(self, loader, steps: int, lr: float | None = None) -> list[float]:
        """Train only the heads for ``steps`` batches of ``loader`` (trunk in no-grad); returns the losses."""
        from zoo.modules.base import fit_autocast, target_mask

        trainable = [p for p in self.heads.parameters()]
        flags = [p.requires_grad for p in trainable]
        for p in trainable:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(trainable, lr=lr or self.hparams.head_pretrain_lr)
        history: list[float] = []
        try:
            while len(history) < steps:
                for batch in loader:
                    batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                    with fit_autocast(self._trainer):
                        with torch.no_grad():
                            hidden = self.forward_hidden(batch)
                        weights = target_mask(batch["labels"]).float()
                        losses = self.auxiliary_losses(batch, hidden, weights)
                        loss = sum(self.hparams.decay**k * v for k, v in enumerate(losses, start=1))
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    history.append(float(loss.detach()))
                    if len(history) >= steps:
                        break
        finally:
            for p, flag in zip(trainable, flags):
                p.requires_grad_(flag)
                p.grad = None
        return history

    def on_fit_start(self) -> None:
        if self._heads_ready or self.hparams.stage == "heads":
            return
        if self.trainer.datamodule is None:
            raise ConfigError("CAFT head pre-training reads trainer.datamodule: fit with a datamodule, or pass "
                              "heads_path / head_pretrain_steps: 0")
        steps = 1 if self.trainer.fast_dev_run else self.hparams.head_pretrain_steps
        losses = self.pretrain_heads(self.trainer.datamodule.train_dataloader(), steps)
        print(f"[zoo] CAFT head pre-training: {steps} steps, head loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        self._heads_ready = True

    # ------------------------------------------------------------------ checkpoint + export
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        heads = {k: v for k, v in checkpoint.get("state_dict", {}).items() if k.startswith("heads.")}
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"].update(heads)  # pre-trained (frozen) heads are not in the backbone
        checkpoint["caft_heads_ready"] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._heads_ready = self._heads_ready or bool(checkpoint.get("caft_heads_ready"))

    def exportable_model(self) -> nn.Module:
        """The plain backbone: the auxiliary heads are training-only and never exported into the model."""
        return self.model

    def export_extra_state(self, weights: str) -> dict[str, Tensor]:
        """The base's trained extras plus the heads (frozen or not), so ``zoo.load`` rebuilds them as trained."""
        state = super().export_extra_state(weights)
        state.update({f"heads.{k}": v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()})
        return state

    def export_init_args(self, merged: bool = False) -> dict[str, Any]:
        """A reload takes its heads from ``zoo_state``: no head pre-training, no ``heads_path`` to find."""
        args = super().export_init_args(merged)
        args.update(heads_path=None, head_pretrain_steps=0)
        return args

    def export(self, directory: str | Path) -> Path:
        directory = super().export(directory)
        if self._trainer is None or self.trainer.is_global_zero:
            torch.save(self.heads.state_dict(), directory / HEADS_FILE)
        return directory


register(
    name="caft",
    kind="module",
    paper="Improving large language models with concept-aware fine-tuning (2025)",
    spec="05",
    config="configs/caft.yaml",
    target="zoo.modules.objectives.caft:CAFTModule",
    scope="heads pre-trained on zoo data (not the authors' corpus / released heads); no residual-linear heads; "
          "contract-exempt: trainable: the auxiliary heads pre-train at fit start (the paper's first stage) and are "
          "frozen for the fine-tune, so they change without being reported trainable",
)
