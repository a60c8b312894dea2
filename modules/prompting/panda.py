"""PANDA: prompt transfer meets knowledge distillation, with the KD weight set by prompt transferability.

Paper: PANDA: Prompt Transfer Meets Knowledge Distillation for Efficient Model Adaptation (2022; IEEE
TKDE 2024). Spec: papers/37-panda.md. Official code: WHU-ZQH/PANDA.

Pipeline (three runs of prompt tuning on the same frozen backbone):
  1. source prompt P_s: a ``PromptTuning`` adapter on a source task (its export writes ``prompt.pt``);
  2. teacher (vanilla prompt transfer, PoT): ``PromptTuning(init_prompt=<source prompt.pt>)`` tuned on
     the target task;
  3. student: the objective ``PANDAModule(teacher_prompt=<teacher prompt.pt>, source_prompt=<source
     prompt.pt>)`` over a fresh soft-prompt adapter of the same kind (default ``PromptTuning(20,
     prompt_init=random)``), trained with ``CE + kd_weight * kd_scale * MSE(z_student, z_teacher)`` over
     the supervised positions' full-vocabulary logits; the teacher is the frozen backbone with the
     adapter's tensors swapped for the teacher prompt (``functional_call``; buffers, never updated,
     evaluated in eval mode under ``no_grad``).
Prompt files are keyed like the adapter's own state (``soft_prompt.weight``; ``prefix.keys`` /
``prefix.values`` for deep prompts); a Lightning checkpoint (``state_dict`` with ``adapter.*`` keys) works too.
``kd_weight`` (paper beta) is either given or set at fit start from ``prompt_transferability``:
cosine between task embeddings (mean FFN intermediate activations of every layer over a training
batch) obtained with the source and with the teacher prompt, times ``kd_weight_max`` (clamped at 0).
The export is the student alone (teacher and source prompts are training inputs, not part of the model):
``zoo.load`` rebuilds it without them.
Differs from the official code: the teacher runs in eval mode under ``no_grad`` (the repo runs it in
train mode and zeroes its grads); the KD term is a plain mean MSE (the repo additionally divides by
the batch size: ``kd_scale`` 0.1 with beta 0.1 and that extra 1/B is the repo-equivalent setting);
causal-LM verbaliser logits instead of a classification head (so "the head is not copied" is moot);
shallow prompts by default (a ``PrefixTuning`` adapter gives P-tuning v2 style prefixes, the paper's setting).
Not implemented: multi-source early/late fusion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from zoo import backbone
from zoo.errors import ConfigError
from zoo.modules.adapters.base import Adapter
from zoo.modules.base import CausalLMModule, StepOutputs, reduce_loss, target_mask
from zoo.modules.prompting.prompt_tuning import PromptTuning
from zoo.modules.prompting.soft_prompt import SoftPromptAdapter
from zoo.registry import register


def load_prompt(path: str | Path) -> dict[str, Tensor]:
    """Prompt tensors keyed like the adapter's state: a ``prompt.pt`` from an export, or a checkpoint
    (its ``adapter.*`` entries, prefix removed)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompt file {str(path)!r} does not exist; point it at an export's prompt.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if any(k.startswith("adapter.") for k in state):
        state = {k[len("adapter."):]: v for k, v in state.items() if k.startswith("adapter.")}
    return state


def kd_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared error between student and teacher logits (N, V); gradient ``2 (z_s - z_t) / numel``."""
    return F.mse_loss(student, teacher, reduction="mean")


def cosine(a: Tensor, b: Tensor) -> float:
    """Cosine similarity of two flat vectors, in [-1, 1]."""
    return float(F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0).clamp(-1.0, 1.0))


def kd_weight_from_similarity(similarity: float, kd_weight_max: float) -> float:
    """beta = kd_weight_max * max(similarity, 0): a more similar source earns a larger KD weight."""
    return kd_weight_max * max(similarity, 0.0)


def with_prompt(module: CausalLMModule, prompt: dict[str, Tensor], batch: dict[str, Tensor]) -> StepOutputs:
    """The module's forward on ``batch`` with its adapter's tensors replaced by ``prompt`` (adapter-relative
    names); the module's own tensors are untouched."""
    device = next(module.adapter.parameters()).device
    swapped = {f"adapter.{name}": value.to(device) for name, value in prompt.items()}
    return functional_call(module, swapped, (batch,), strict=False)


@torch.no_grad()
def task_embedding(module: CausalLMModule, batch: dict[str, Tensor], prompt: dict[str, Tensor]) -> Tensor:
    """Mean FFN intermediate activation of every layer (concatenated, (L * I,)) under ``prompt``, over real tokens."""
    captured: list[Tensor] = []
    mask = batch["attention_mask"].bool()

    def grab(_module, args):
        captured.append(args[0])

    handles = [layer.mlp.down_proj.register_forward_pre_hook(grab) for layer in backbone.decoder_layers(module.model)]
    try:
        with_prompt(module, prompt, batch)
    finally:
        for handle in handles:
            handle.remove()
    hidden_index = module.adapter.build_inputs(batch)["real_index"]
    pooled = []
    for act in captured:
        real = act.gather(1, hidden_index.unsqueeze(-1).expand(-1, -1, act.shape[-1]))
        pooled.append(real[mask].mean(0))
    return torch.cat(pooled)


def prompt_transferability(module: CausalLMModule, batch: dict[str, Tensor], source: dict[str, Tensor],
                           target: dict[str, Tensor]) -> float:
    """cos(e_S, e_T): task embeddings of the same target-task ``batch`` under the source and target prompts."""
    return cosine(task_embedding(module, batch, source), task_embedding(module, batch, target))


class PANDAModule(CausalLMModule):
    """Prompt tuning with logit distillation from a prompt-transferred teacher, weighted by transferability."""

    def __init__(self, teacher_prompt: str | None = None, source_prompt: str | None = None,
                 kd_weight: float | None = 0.1, kd_weight_max: float = 1.0, kd_scale: float = 0.1,
                 adapter: Adapter | None = None, **kwargs: Any) -> None:
        """
        Args:
            teacher_prompt: ``prompt.pt`` of the PoT teacher (source-initialised, tuned on the target).
            source_prompt: ``prompt.pt`` of the source-task prompt (for the transferability score).
            kd_weight: beta; None = set at fit start from the transferability (needs source and teacher).
            kd_weight_max: beta at similarity 1 when beta is set from the transferability.
            kd_scale: constant factor on the KD term (repo 0.1).
            adapter: the student prompt, a soft-prompt adapter of the teacher's kind; default
                ``PromptTuning(num_virtual_tokens=20, prompt_init=random)`` (paper p=20, random init;
                ``PrefixTuning`` for the paper's deep prompts).
            **kwargs: the CausalLMModule arguments (model, lr, ...).
        """
        if adapter is None:
            adapter = PromptTuning(num_virtual_tokens=20, prompt_init="random")
        elif not isinstance(adapter, SoftPromptAdapter):
            raise ConfigError(f"PANDA needs a soft-prompt adapter (PromptTuning, PrefixTuning, ...), got "
                              f"{type(adapter).__name__}; set model.init_args.adapter to one")
        self.kd_weight, self.kd_weight_max, self.kd_scale = kd_weight, kd_weight_max, kd_scale
        self.transferability: float | None = None
        super().__init__(adapter=adapter, **kwargs)
        self.teacher: dict[str, Tensor] | None = None
        if teacher_prompt is not None:
            self.set_teacher(load_prompt(teacher_prompt))
        self.source = load_prompt(source_prompt) if source_prompt is not None else None

    def set_teacher(self, prompt: dict[str, Tensor]) -> None:
        """Freeze ``prompt`` (keyed like the adapter's parameters) as the teacher, held as (non-persistent) buffers."""
        own = dict(self.adapter.named_parameters())
        missing = set(own) - set(prompt)
        if missing:
            raise ConfigError(f"teacher prompt lacks {sorted(missing)}: it must come from the same prompt type "
                              f"and size as the student's adapter ({type(self.adapter).__name__})")
        self.teacher = {}
        for name in sorted(own):
            if prompt[name].shape != own[name].shape:
                raise ConfigError(f"teacher prompt {name!r} has shape {tuple(prompt[name].shape)}, the student's "
                                  f"{tuple(own[name].shape)}: use the same num_virtual_tokens")
            buffer_name = "teacher_" + name.replace(".", "_")
            self.register_buffer(buffer_name, prompt[name].detach().clone().float(), persistent=False)
            self.teacher[name] = getattr(self, buffer_name)

    def _apply(self, fn, *args, **kwargs):
        """Keep ``self.teacher`` pointing at the buffers after ``.to`` / casts (which replace them)."""
        result = super()._apply(fn, *args, **kwargs)
        if getattr(self, "teacher", None) is not None:
            self.teacher = {name: getattr(self, "teacher_" + name.replace(".", "_")) for name in self.teacher}
        return result

    @torch.no_grad()
    def teacher_hidden(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T, H) hidden states of the frozen backbone under the teacher prompt (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        try:
            return with_prompt(self, self.teacher, batch).hidden
        finally:
            self.train(was_training)

    def on_fit_start(self) -> None:
        if self.kd_weight is None:
            if self.teacher is None or self.source is None:
                raise ConfigError("PANDA: kd_weight=null needs both teacher_prompt and source_prompt")
            batch = next(iter(self.trainer.datamodule.train_dataloader()))
            batch = {k: v.to(self.device) for k, v in batch.items() if isinstance(v, Tensor)}
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

    def export_init_args(self, merged: bool = False) -> dict[str, Any]:
        """The student alone: no teacher or source files (they need not exist where the export is loaded)."""
        args = super().export_init_args(merged)
        args.update(teacher_prompt=None, source_prompt=None, kd_weight=float(self.kd_weight or 0.0),
                    adapter=self.adapter.config())
        return args


register(
    name="panda",
    kind="module",
    paper="PANDA: Prompt Transfer Meets Knowledge Distillation for Efficient Model Adaptation (2022)",
    spec="37",
    config="configs/panda.yaml",
    target="zoo.modules.prompting.panda:PANDAModule",
    scope="verbaliser logits instead of a task head; no multi-source fusion; teacher/source prompts are files",
)
