"""PANDA: prompt transfer meets knowledge distillation, with the KD weight set by prompt transferability.

Paper: PANDA: Prompt Transfer Meets Knowledge Distillation for Efficient Model Adaptation (2022; IEEE
TKDE 2024). Spec: papers/37-panda.md. Official code: WHU-ZQH/PANDA.

Pipeline (three runs of prompt tuning on the same frozen backbone):
  1. source prompt P_s: ``PromptTuningModule`` on a source task (its ``export`` writes ``prompt.pt``);
  2. teacher (vanilla prompt transfer, PoT): ``PromptTuningModule(init_prompt=<source prompt.pt>)`` tuned
     on the target task;
  3. student: ``PANDAModule(teacher_prompt=<teacher prompt.pt>, source_prompt=<source prompt.pt>)``: a
     fresh prompt trained with ``CE + kd_weight * kd_scale * MSE(z_student, z_teacher)`` over the
     supervised positions' full-vocabulary logits; the teacher is the frozen backbone with the
     teacher prompt (a buffer, never updated, evaluated in eval mode under ``no_grad``).
``kd_weight`` (paper beta) is either given or set at fit start from ``prompt_transferability``:
cosine between task embeddings (mean FFN intermediate activations of every layer over a training
batch) obtained with the source and with the teacher prompt, times ``kd_weight_max`` (clamped at 0).
Differs from the official code: the teacher runs in eval mode under ``no_grad`` (the repo runs it in
train mode and zeroes its grads); the KD term is a plain mean MSE (the repo additionally divides by
the batch size: ``kd_scale`` 0.1 with beta 0.1 and that extra 1/B is the repo-equivalent setting);
causal-LM verbaliser logits instead of a classification head (so "the head is not copied" is moot);
shallow prompts by default (``deep: true`` gives P-tuning v2 style prefixes, the paper's setting).
Not implemented: multi-source early/late fusion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from zoo import backbone
from zoo.modules.base import StepOutputs, reduce_loss, target_mask
from zoo.modules.prompting.soft_prompt import PromptInit, SoftPromptModule
from zoo.registry import register


def load_prompt(path: str | Path) -> dict[str, Tensor]:
    """The prompt tensors written by a prompt module's export (``prompt.pt``) or a checkpoint's state."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


def kd_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error between student and teacher logits (N, V); gradient ``2 (z_s - z_t) / numel``."""
    return F.mse_loss(student, teacher, reduction="mean")


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two flat vectors, in [-1, 1]."""
    return float(F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).clamp(-1.0, 1.0))


def kd_weight_from_similarity(similarity: float, kd_weight_max: float) -> float:
    """beta = kd_weight_max * max(similarity, 0): a more similar source earns a larger KD weight."""
    return kd_weight_max * max(similarity, 0.0)


@torch.no_grad()
def task_embedding(module: SoftPromptModule, batch: dict[str, Tensor], prompt: dict[str, Tensor]) -> Tensor:
    """Mean FFN intermediate activation of every layer (concatenated, (L * I,)) under ``prompt``, over real tokens."""
    captured: list[Tensor] = []
    mask = batch["attention_mask"].bool()

    def grab(_module, args):
        captured.append(args[0])

    handles = [layer.mlp.down_proj.register_forward_pre_hook(grab) for layer in backbone.decoder_layers(module.model)]
    try:
        functional_call(module, prompt, (batch,), strict=False)
    finally:
        for handle in handles:
            handle.remove()
    hidden_index = module.build_inputs(batch)["real_index"]
    pooled = []
    for act in captured:
        real = act.gather(1, hidden_index.unsqueeze(-1).expand(-1, -1, act.shape[-1]))
        pooled.append(real[mask].mean(0))
    return torch.cat(pooled)


def prompt_transferability(module: SoftPromptModule, batch: dict[str, Tensor], source: dict[str, Tensor],
                           target: dict[str, Tensor]) -> float:
    """cos(e_S, e_T): task embeddings of the same target-task ``batch`` under the source and target prompts."""
    return cosine(task_embedding(module, batch, source), task_embedding(module, batch, target))


class PANDAModule(SoftPromptModule):
    """Prompt tuning with logit distillation from a prompt-transferred teacher, weighted by transferability."""

    def __init__(self, num_virtual_tokens: int = 20, deep: bool = False, teacher_prompt: str | None = None,
                 source_prompt: str | None = None, kd_weight: float | None = 0.1, kd_weight_max: float = 1.0,
                 kd_scale: float = 0.1, prompt_init: PromptInit = "random", init_seed: int = 0,
                 **kwargs: Any) -> None:
        """
        Args:
            num_virtual_tokens: prompt length p (paper 20).
            deep: per-layer prefix prompts (P-tuning v2, the paper's setting) instead of input prompts.
            teacher_prompt: ``prompt.pt`` of the PoT teacher (source-initialised, tuned on the target).
            source_prompt: ``prompt.pt`` of the source-task prompt (for the transferability score).
            kd_weight: beta; None = set at fit start from the transferability (needs source and teacher).
            kd_weight_max: beta at similarity 1 when beta is set from the transferability.
            kd_scale: constant factor on the KD term (repo 0.1).
            prompt_init: student prompt init (paper: random).
            init_seed: seed of the student prompt initialisation.
            **kwargs: the CausalLMModule arguments (model, lr, ...).
        """
        self.kd_weight, self.kd_weight_max, self.kd_scale = kd_weight, kd_weight_max, kd_scale
        self.teacher_path, self.source_path = teacher_prompt, source_prompt
        super().__init__(num_virtual_tokens=num_virtual_tokens, deep=deep, prompt_init=prompt_init,
                         init_seed=init_seed, **kwargs)

    def build_prompt(self, model: nn.Module) -> None:
        super().build_prompt(model)
        self.teacher: dict[str, Tensor] | None = None
        if self.teacher_path is not None:
            self.set_teacher(load_prompt(self.teacher_path))
        self.source = load_prompt(self.source_path) if self.source_path is not None else None

    def set_teacher(self, prompt: dict[str, Tensor]) -> None:
        """Freeze ``prompt`` (names as in ``trainable_parameters``) as the teacher, stored as buffers."""
        names = set(self.trainable_parameters())
        missing = names - set(prompt)
        if missing:
            raise ValueError(f"teacher prompt lacks {sorted(missing)}: it must come from the same prompt type")
        self.teacher = {}
        for name in sorted(names):
            buffer_name = "teacher_" + name.replace(".", "_")
            self.register_buffer(buffer_name, prompt[name].detach().clone().float(), persistent=True)
            self.teacher[name] = getattr(self, buffer_name)

    @torch.no_grad()
    def teacher_hidden(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T, H) hidden states of the frozen backbone under the teacher prompt (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        try:
            return functional_call(self, self.teacher, (batch,), strict=False).hidden
        finally:
            self.train(was_training)

    def on_fit_start(self) -> None:
        if self.kd_weight is None:
            if self.teacher is None or self.source is None:
                raise ValueError("PANDA: kd_weight=None needs both teacher_prompt and source_prompt")
            batch = next(iter(self.trainer.datamodule.train_dataloader()))
            batch = {k: v.to(self.device) for k, v in batch.items()}
            self.transferability = prompt_transferability(self, batch, self.source, self.teacher)
            self.kd_weight = kd_weight_from_similarity(self.transferability, self.kd_weight_max)
            print(f"[zoo] PANDA: transferability {self.transferability:.3f} -> kd_weight {self.kd_weight:.3f}")

    def compute_loss(self, batch: dict[str, Tensor], outputs: StepOutputs, weights: Tensor) -> Tensor:
        ce = reduce_loss(self.weighted_token_loss(outputs, weights), weights, self.hparams.reduction)
        beta = self.kd_weight or 0.0
        if beta == 0.0 or self.teacher is None:
            return ce
        rows = (target_mask(batch["labels"]) & (weights != 0))[:, 1:]  # the positions that predict a target
        head_weight, head_bias = self.lm_head_weight()
        student = F.linear(outputs.hidden[:, :-1][rows], head_weight, head_bias)
        teacher = F.linear(self.teacher_hidden(batch)[:, :-1][rows], head_weight, head_bias)
        kd = kd_mse(student, teacher)
        if self._trainer is not None:
            self.log("train/kd", kd)
        return ce + beta * self.kd_scale * kd


register(
    name="panda",
    kind="module",
    paper="PANDA: Prompt Transfer Meets Knowledge Distillation for Efficient Model Adaptation (2022)",
    spec="37",
    config="configs/panda.yaml",
    target="zoo.modules.prompting.panda:PANDAModule",
    scope="verbaliser logits instead of a task head; no multi-source fusion; teacher/source prompts are files",
)
