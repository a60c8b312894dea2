"""ProMoT: two-stage fine-tuning, soft prompt first, then the model with the learned prompt attached.

Paper: Preserving In-Context Learning ability in Large Language Model Fine-tuning (2022; ICLR 2024 as
"Two-stage LLM Fine-tuning with Less Specialization and More Generalization"). Spec: papers/28-promot.md.
Official code: none released.

Implements: ``ProMoTModule``, an objective over a soft-prompt adapter (default ``PromptTuning`` with
100 tokens; any :class:`SoftPromptAdapter` from YAML), with ``stage`` 1 (the adapter trains, backbone
frozen, ``prompt_lr``) and 2 (all backbone weights train at ``model_lr``, the prompt frozen but still
attached); ``ProMoTStageSwitch`` runs stage 1 for ``stage1_steps`` steps, restores the stage-1 prompt with
the best ``val/loss`` (target-task dev score), switches stages and rebuilds the optimizer, so the
stage-2 optimizer holds no prompt and no moments. The two stages share ONE learning-rate schedule over
``max_steps``: stage 2 continues the schedule position where stage 1 stopped, at its own peak rate
(``lr(step) = peak_stage * factor(step)``, ``factor`` the module's warm-up + schedule). Warm-up does not
restart at the switch: the spec names no warm-up in either stage (constant Adafactor rates, T5X), so the
zoo's optional warm-up is one warm-up at the start of the run. Every export (and checkpoint) holds the
learned prompt in both stages (``zoo_state`` and ``prompt.pt``), with the stage the run ended in. Inference
on the fine-tuned task keeps the prompt; other formats run without it (``module.adapter.disabled()``).
Diagnostics: ``format_specialization`` (share of outputs that are a fine-tune label word) and
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
from zoo.errors import ConfigError
from zoo.modules.adapters.base import Adapter
from zoo.modules.base import CausalLMModule
from zoo.modules.prompting.prompt_tuning import PromptTuning
from zoo.modules.prompting.soft_prompt import SoftPromptAdapter
from zoo.modules.sparse.param_mask import rebuild_optimizer
from zoo.registry import register


class ProMoTModule(CausalLMModule):
    """Two-stage ProMoT: stage 1 trains the soft prompt, stage 2 the backbone with the prompt frozen."""

    def __init__(self, stage: int = 1, prompt_lr: float = 0.2, model_lr: float = 1e-3,
                 adapter: Adapter | None = None, **kwargs: Any) -> None:
        """
        Args:
            stage: the stage to start in (1: prompt tuning, 2: model tuning with the prompt attached).
            prompt_lr: stage-1 peak learning rate (paper 0.2 with Adafactor).
            model_lr: stage-2 peak learning rate (paper 1e-3 with Adafactor).
            adapter: the soft prompt (a soft-prompt adapter, e.g. ``zoo.modules.adapters.PromptTuning``);
                default ``PromptTuning(num_virtual_tokens=100)`` (paper p=100; 50 for PaLM-8B).
            **kwargs: the CausalLMModule arguments (model, warmup_steps, scheduler, ...); ``lr`` is unused
                (per-stage rates above).
        """
        if stage not in (1, 2):
            raise ConfigError(f"ProMoT stage must be 1 or 2, got {stage}")
        if adapter is None:
            adapter = PromptTuning(num_virtual_tokens=100)
        elif not isinstance(adapter, SoftPromptAdapter):
            raise ConfigError(f"ProMoT needs a soft-prompt adapter (PromptTuning, PrefixTuning, DePT, ...), got "
                              f"{type(adapter).__name__}; set model.init_args.adapter to one")
        self.prompt_lr, self.model_lr = prompt_lr, model_lr
        super().__init__(adapter=adapter, **kwargs)
        self.set_stage(stage)

    def set_stage(self, stage: int) -> None:
        """Stage 1: only the prompt trains; stage 2: only the backbone trains (prompt kept, frozen)."""
        if stage not in (1, 2):
            raise ConfigError(f"ProMoT stage must be 1 or 2, got {stage}")
        self.stage = stage
        self.model.requires_grad_(stage == 2)
        self.adapter.requires_grad_(stage == 1)

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ConfigError(f"ProMoT stage {self.stage} has no trainable parameters")
        if self.stage == 1:
            lr = self.prompt_lr
            groups = self.adapter.parameter_groups(lr) or [{"params": list(params.values())}]
            groups = [{"weight_decay": 0.0, **group} for group in groups]  # no decay on prompts unless asked
        else:
            lr = self.model_lr
            groups = [{"params": [p for p in params.values() if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
                      {"params": [p for p in params.values() if p.ndim < 2], "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=tuple(self.hparams.betas))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self._scheduler(optimizer), "interval": "step"}}

    # ------------------------------------------------------------------ checkpoint + export
    def prompt_state(self) -> dict[str, Tensor]:
        """Every tensor of the soft prompt, keyed as in this module's state dict (``adapter.*``)."""
        return {f"adapter.{name}": value.detach() for name, value in self.adapter.state_dict().items()}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Trainable tensors plus the (stage-2 frozen) prompt, and the stage."""
        super().on_save_checkpoint(checkpoint)
        if isinstance(checkpoint.get("state_dict"), dict):
            checkpoint["state_dict"].update({k: v.clone() for k, v in self.prompt_state().items()})
        checkpoint["promot_stage"] = self.stage

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.set_stage(checkpoint.get("promot_stage", self.stage))

    def export_extra_state(self, weights: str) -> dict[str, Tensor]:
        """The trained tensors plus the prompt in both stages (in stage 2 it is frozen, not trainable)."""
        extra = super().export_extra_state(weights)
        extra.update({k: v.cpu().contiguous() for k, v in self.prompt_state().items()})
        return extra

    def export_init_args(self, merged: bool = False) -> dict[str, Any]:
        """The constructor arguments, with the stage the run ended in and the adapter it trained."""
        args = super().export_init_args(merged)
        args["stage"] = self.stage
        args["adapter"] = self.adapter.config()
        return args


class ProMoTStageSwitch(Callback):
    """Run stage 1 for ``stage1_steps`` steps, keep the best prompt, switch to stage 2, rebuild the optimizer.

    The rebuilt optimizer is fresh (no moments carried: the paper's separate optimizers) and the
    learning-rate schedule continues at the global step (one curve over ``max_steps``, no second warm-up).
    """

    def __init__(self, stage1_steps: int = 5000, keep_best: bool = True) -> None:
        """
        Args:
            stage1_steps: N1, optimizer steps of prompt tuning before the switch (paper 5000).
            keep_best: restore the stage-1 prompt with the lowest val/loss before stage 2 (paper: best dev).
        """
        self.stage1_steps, self.keep_best = stage1_steps, keep_best
        self.best_loss: float | None = None
        self.best_prompt: dict[str, Tensor] | None = None
        self.switched_at: int | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not isinstance(pl_module, ProMoTModule):
            raise ConfigError(f"ProMoTStageSwitch needs a ProMoTModule, got {type(pl_module).__name__}")
        switches = pl_module.stage == 1 and (trainer.max_steps < 0 or trainer.max_steps > self.stage1_steps)
        if stage == "fit" and trainer.world_size > 1 and switches:
            raise ConfigError(
                "ProMoT's in-run stage switch changes which tensors train, which DDP cannot follow (it syncs "
                "the tensors that trained when it wrapped the model); on several devices run the stages as two "
                "fits: stage 1, then model.init_args.stage: 2 with the adapter's init_prompt set to the stage-1 "
                "export's prompt.pt")

    def on_validation_end(self, trainer, pl_module: ProMoTModule) -> None:
        loss = trainer.callback_metrics.get("val/loss")
        if pl_module.stage == 1 and loss is not None and (self.best_loss is None or float(loss) < self.best_loss):
            self.best_loss = float(loss)
            self.best_prompt = {k: v.detach().clone() for k, v in pl_module.adapter.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module: ProMoTModule, batch: Any, batch_idx: int) -> None:
        if pl_module.stage == 1 and trainer.global_step >= self.stage1_steps:
            if self.keep_best and self.best_prompt is not None:
                pl_module.adapter.load_state_dict(self.best_prompt)
            pl_module.set_stage(2)
            rebuild_optimizer(trainer, carry_state=False, carry_schedule=True)
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


def _gradients(module: CausalLMModule, batch: dict[str, Tensor], params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    outputs = module(batch)
    weights = (batch["labels"] != -100).float()
    weights[:, 0] = 0
    loss = module.compute_loss(batch, outputs, weights)
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(params.items(), grads)}


def format_gradient_alignment(module: CausalLMModule, batch: dict[str, Tensor],
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
