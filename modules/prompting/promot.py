"""ProMoT: two-stage fine-tuning, soft prompt first, then the model with the learned prompt attached.

Paper: Preserving In-Context Learning ability in Large Language Model Fine-tuning (2022; ICLR 2024 as
"Two-stage LLM Fine-tuning with Less Specialization and More Generalization"). Spec: papers/28-promot.md.
Official code: none released.

Implements: ``ProMoTModule`` with ``stage`` 1 (prompt tuning, backbone frozen, ``prompt_lr``) and 2
(all backbone weights train at ``model_lr``, the prompt frozen but still prepended);
``ProMoTStageSwitch`` runs stage 1 for ``stage1_steps`` steps, restores the stage-1 prompt with the
best ``val/loss`` (target-task dev score), switches stages and rebuilds the optimizer
(``trainer.strategy.setup_optimizers``) so the stage-2 optimizer holds no prompt state. Inference on
the fine-tuned task keeps the prompt; other formats run with ``use_prompt=False``. Diagnostics:
``format_specialization`` (share of outputs that are a fine-tune label word) and
``format_gradient_alignment`` (cosine between the gradients of a batch with true and with shuffled
labels, per module group).
Differs from the paper: AdamW instead of Adafactor (separate optimizers per stage, as the paper);
best-checkpoint selection uses validation loss, not a task metric; no dropout/label smoothing.
Not implemented: multi-task ProMoT (one prompt per task), the LoRA stage-1 ablation, the ICL
evaluation suite (the harness's job).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from zoo.datamodules.classification import first_word
from zoo.modules.prompting.soft_prompt import PromptInit, SoftPromptModule
from zoo.registry import register


class ProMoTModule(SoftPromptModule):
    """Two-stage ProMoT: stage 1 trains the soft prompt, stage 2 the backbone with the prompt frozen."""

    def __init__(self, num_virtual_tokens: int = 100, stage: int = 1, prompt_lr: float = 0.2,
                 model_lr: float = 1e-3, prompt_init: PromptInit = "vocab", init_seed: int = 0,
                 **kwargs: Any) -> None:
        """
        Args:
            num_virtual_tokens: soft prompt length p (paper 100; 50 for PaLM-8B).
            stage: the stage to start in (1: prompt tuning, 2: model tuning with the prompt attached).
            prompt_lr: stage-1 learning rate (paper 0.2 with Adafactor).
            model_lr: stage-2 learning rate (paper 1e-3 with Adafactor).
            prompt_init: ``vocab`` or ``random`` prompt initialisation.
            init_seed: seed of the prompt initialisation.
            **kwargs: the CausalLMModule arguments (model, ...); ``lr`` is unused (per-stage rates above).
        """
        self.prompt_lr, self.model_lr = prompt_lr, model_lr
        super().__init__(num_virtual_tokens=num_virtual_tokens, deep=False, prompt_init=prompt_init,
                         init_seed=init_seed, **kwargs)
        self.set_stage(stage)

    def set_stage(self, stage: int) -> None:
        """Stage 1: only the prompt trains; stage 2: only the backbone trains (prompt kept, frozen)."""
        if stage not in (1, 2):
            raise ValueError(f"ProMoT stage must be 1 or 2, got {stage}")
        self.stage = stage
        self.model.requires_grad_(stage == 2)
        self.soft_prompt.requires_grad_(stage == 1)

    def configure_optimizers(self):
        params = list(self.trainable_parameters().values())
        lr = self.prompt_lr if self.stage == 1 else self.model_lr
        decay = [p for p in params if p.ndim >= 2 and self.stage == 2]
        no_decay = [p for p in params if not (p.ndim >= 2 and self.stage == 2)]
        groups = [{"params": decay, "weight_decay": self.hparams.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(self.hparams.betas))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._scheduler(optimizer), "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Trainable tensors plus the (stage-2 frozen) prompt, and the stage."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"]["soft_prompt.weight"] = self.soft_prompt.weight.detach().clone()
        checkpoint["promot_stage"] = self.stage

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.set_stage(checkpoint.get("promot_stage", self.stage))


class ProMoTStageSwitch(Callback):
    """Run stage 1 for ``stage1_steps`` steps, keep the best prompt, switch to stage 2, rebuild the optimizer."""

    def __init__(self, stage1_steps: int = 5000, keep_best: bool = True) -> None:
        """
        Args:
            stage1_steps: N1, optimizer steps of prompt tuning before the switch (paper 5000).
            keep_best: restore the stage-1 prompt with the lowest val/loss before stage 2 (paper: best dev).
        """
        self.stage1_steps, self.keep_best = stage1_steps, keep_best
        self.best_loss: float | None = None
        self.best_prompt: Tensor | None = None
        self.switched_at: int | None = None

    def on_validation_end(self, trainer, pl_module: ProMoTModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if pl_module.stage == 1 and loss is not None and (self.best_loss is None or float(loss) < self.best_loss):
            self.best_loss = float(loss)
            self.best_prompt = pl_module.soft_prompt.weight.detach().clone()

    def on_train_batch_start(self, trainer, pl_module: ProMoTModule, batch: Any, batch_idx: int) -> None:
        if pl_module.stage == 1 and trainer.global_step >= self.stage1_steps:
            if self.keep_best and self.best_prompt is not None:
                with torch.no_grad():
                    pl_module.soft_prompt.weight.copy_(self.best_prompt)
            pl_module.set_stage(2)
            trainer.strategy.setup_optimizers(trainer)
            self.switched_at = trainer.global_step


# ---------------------------------------------------------------------------- diagnostics
def format_specialization(completions: Iterable[str], label_words: Iterable[str]) -> float:
    """Share of completions whose first word is one of the fine-tune ``label_words`` (0..1)."""
    labels = {w.lower() for w in label_words}
    outputs = list(completions)
    return sum(first_word(c) in labels for c in outputs) / max(1, len(outputs))


def module_group(name: str) -> str:
    """The module group of a parameter name: ``mlp``, ``q``, ``k``, ``v``, ``o`` or ``other``."""
    for key, group in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"), ("mlp", "mlp")):
        if key in name:
            return group
    return "other"


def _gradients(module: SoftPromptModule, batch: dict[str, Tensor], params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    outputs = module(batch)
    weights = (batch["labels"] != -100).float()
    weights[:, 0] = 0
    loss = module.compute_loss(batch, outputs, weights)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)}


def format_gradient_alignment(module: SoftPromptModule, batch: dict[str, Tensor],
                              shuffled_batch: dict[str, Tensor]) -> dict[str, float]:
    """cos(g, g_format) per module group, g from ``batch`` and g_format from the same inputs with shuffled labels.

    Uses the backbone's parameters regardless of ``requires_grad`` (gradients are taken explicitly).
    ``shuffled_batch``: the batch with responses (labels) permuted across examples (see ``shuffle_responses``).
    """
    params = {n: p for n, p in module.model.named_parameters() if p.is_floating_point()}
    flags = {n: p.requires_grad for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    try:
        g, g_format = _gradients(module, batch, params), _gradients(module, shuffled_batch, params)
    finally:
        for n, p in params.items():
            p.requires_grad_(flags[n])
    result: dict[str, float] = {}
    for group in sorted({module_group(n) for n in params}):
        names = [n for n in params if module_group(n) == group]
        a = torch.cat([g[n].flatten() for n in names])
        b = torch.cat([g_format[n].flatten() for n in names])
        result[group] = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
    return result


def shuffle_responses(records: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """Records with their responses (and labels) permuted across examples: the 'format-only' batch."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(records), generator=generator).tolist()
    return [{**r, "response": records[j]["response"], "answer": records[j].get("answer"),
             "label": records[j].get("label")} for r, j in zip(records, order)]


register(
    name="promot",
    kind="module",
    paper="Preserving In-Context Learning ability in Large Language Model Fine-tuning (2022)",
    spec="28",
    config="configs/promot.yaml",
    target="zoo.modules.prompting.promot:ProMoTModule",
    scope="no multi-task ProMoT; best stage-1 prompt chosen by val loss; ICL OOD suite left to the harness",
)
