"""LiST: lite prompted self-training (adapter-only teacher/student rounds, meta re-weighted pseudo-labels).

Paper: LiST: Lite Prompted Self-training Makes Parameter-Efficient Few-shot Learners (2021; NAACL Findings
2022). Spec: papers/27-list.md. Official code: microsoft/LiST.

Implements:
``LiSTAdapter`` (an :class:`~zoo.modules.adapters.base.Adapter`): in every decoder layer one adapter right
after the attention output projection (``o_proj``) and one right after the FFN output projection
(``down_proj``), ``A(h) = h + W_up (W_down h)``, no bias, no nonlinearity (the repo's "LiST" choice), both
matrices N(0, 0.02) (``init: normal``; ``zero`` sets W_up = 0 so the model starts at the backbone); the
backbone is frozen. :meth:`LiSTAdapter.reinitialise` re-draws the adapters (a fresh student).
``LiSTModule`` (a :class:`~zoo.modules.classification.ClassificationModule`): the prompt-based classifier
(class logits = next-token logits of the verbalizer words at the answer slot, the causal analogue of the
MLM head) with the labeled CE; in the unlabeled phase the loss is ``sum_i w_i KL(p_i || q_i)`` with ``p`` the
teacher's soft labels and ``q`` the student's, the labeled CE contributing exactly 0.
``SelfTrainingLoop`` (a Callback) drives the rounds: ``teacher_steps`` labeled warm-up steps (stage 0),
then ``sessions`` sessions of ``unlabeled_steps`` (T_u) + ``labeled_steps`` steps; at the start of each
session the teacher becomes a frozen copy of the current adapters, the student is re-initialised and gets
a fresh optimizer (no moments carried). Weights: confidence weighting (``mask = max p > tau``,
``w = mask / (sum mask + 1e-5)``) for the first ``meta_warmup`` fraction of T_u, then meta re-weighting by a
one-step differentiable SGD look-ahead (:func:`meta_weights`; ``torch.func.functional_call`` on the
trainable tensors only, the module in eval mode and attention on the math SDPA kernel, the only one with
second derivatives, during the look-ahead), ``w = relu(-g) / sum relu(-g)`` (the repo adds 1e-6 to the sum).
The teacher's tensors are saved in checkpoints (``list_teacher``).
Differs from the paper: a causal LM's next-token head stands in for RoBERTa's MLM head and stays frozen
(tied to the input embeddings; the paper trains the MLM head's verbalizer rows), so only the adapters train;
the student is the same frozen backbone with fresh adapters (the backbone never trains, so a fresh copy is
identical); the lr schedule is one schedule over the run (the paper restarts a linear one at ``lr_semi`` per
session).
Not implemented: the repo's adversarial / contrastive losses and demonstration condensation (off in the LiST
recipe); ``sampling_steps`` > 1 meta batches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sized
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from zoo import backbone
from zoo.errors import ConfigError
from zoo.modules.adapters.base import Adapter
from zoo.modules.base import StepOutputs
from zoo.modules.classification.module import ClassificationModule
from zoo.modules.sparse.param_mask import rebuild_optimizer
from zoo.registry import register_method
from zoo.seeding import run_seed

AdapterInit = Literal["normal", "zero"]


# ---------------------------------------------------------------------------- pure functions
def confidence_weights(teacher_probs: Tensor, tau: float = 0.0) -> Tensor:
    """(B,) weights from (B, C) teacher probabilities: ``mask = max_c p > tau``,
    ``mask / (sum mask + 1e-5)``."""
    mask = (teacher_probs.max(-1).values > tau).float()
    return mask / (mask.sum() + 1e-5)


def soft_label_kl(student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
    """(B,) per-example ``KL(p || q)`` with p the teacher's (B, C) probabilities and q = softmax(student)."""
    return F.kl_div(student_logits.log_softmax(-1), teacher_probs, reduction="none").sum(-1)


def normalise_meta(grad_eps: Tensor) -> Tensor:
    """(B,) weights ``relu(-g) / sum relu(-g)`` from the look-ahead gradient ``g = dL_meta/d eps``; all 0 when
    every ``g_i >= 0``. (The repo adds 1e-6 to the sum, which makes small look-ahead gradients, i.e. a small
    eta, shrink the weights; here they sum to exactly 1 whatever eta.)"""
    positive = (-grad_eps).clamp_min(0.0)
    total = positive.sum()
    return positive / total if total > 0 else torch.zeros_like(positive)


def meta_weights(params: dict[str, Tensor], unlabeled_loss: Callable[[dict[str, Tensor]], Tensor],
                 meta_loss: Callable[[dict[str, Tensor]], Tensor], lr: float) -> Tensor:
    """(B,) meta re-weighting by a one-step look-ahead (LiST's ``higher`` step, as functional calls).

    ``unlabeled_loss(params) -> (B,)`` per-example losses l_i and ``meta_loss(params) -> ()`` the labeled
    loss,
    both evaluated at the given trainable tensors. With ``eps = 0`` (B,) requiring grad:
    ``theta' = theta - lr * grad_theta sum_i eps_i l_i(theta)``, ``g = dL_meta(theta') / d eps``, returns
    :func:`normalise_meta` (g). Equivalent closed form: ``g_i = -lr <grad L_meta(theta), grad l_i(theta)>``.
    """
    names = list(params)
    theta = {n: p.detach().requires_grad_(True) for n, p in params.items()}
    losses = unlabeled_loss(theta)
    eps = torch.zeros_like(losses, requires_grad=True)
    grads = torch.autograd.grad((eps * losses).sum(), [theta[n] for n in names], create_graph=True,
                                allow_unused=True)
    stepped = {n: theta[n] - lr * g if g is not None else theta[n] for n, g in zip(names, grads)}
    (grad_eps,) = torch.autograd.grad(meta_loss(stepped), eps, allow_unused=True)
    if grad_eps is None:
        grad_eps = torch.zeros_like(eps)
    return normalise_meta(grad_eps.detach())


# ---------------------------------------------------------------------------- the adapter
class LiSTBottleneck(nn.Module):
    """``A(h) = h + W_up (W_down h)``: no bias, no nonlinearity; the residual is added by the hook."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, bias=False)
        self.up = nn.Linear(bottleneck, dim, bias=False)

    def reset(self, init: AdapterInit, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            for linear in (self.down, self.up):
                draw = torch.randn(linear.weight.shape, generator=generator) * 0.02
                linear.weight.copy_(draw.to(linear.weight.dtype))
            if init == "zero":
                self.up.weight.zero_()

    def forward(self, h: Tensor) -> Tensor:
        return self.up(self.down(h))


class _OutputHook:
    """Forward hook on a projection: adds ``adapter(output)`` to its output while the owner is enabled (an
    object, not a closure, so a deep copy follows the copied adapter)."""

    def __init__(self, owner: LiSTAdapter, index: int) -> None:
        self.owner, self.index = owner, index

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        if not self.owner.enabled:
            return output
        return output + self.owner.adapters[self.index](output)


class LiSTAdapter(Adapter):
    """Frozen backbone + LiST adapters after every attention output and FFN output projection."""

    def __init__(self, bottleneck: int = 128, init: AdapterInit = "normal",
                 init_seed: int | None = None) -> None:
        """
        Args:
            bottleneck: m, adapter bottleneck (paper: 128).
            init: ``normal`` (both matrices N(0, 0.02), the paper's) or ``zero`` (W_up = 0: identity at
                start).
            init_seed: seed of the first initialisation (re-initialisations draw from the session seed);
                None: the run's seed.
        """
        super().__init__()
        if bottleneck < 1:
            raise ConfigError(f"LiST bottleneck must be >= 1, got {bottleneck}")
        if init not in ("normal", "zero"):
            raise ConfigError(f"LiST init must be 'normal' or 'zero', got {init!r}")
        self.bottleneck, self.init, self.init_seed = bottleneck, init, run_seed(init_seed)
        self.adapters = nn.ModuleList()
        self.enabled = True

    def attach(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        model.requires_grad_(False)
        reference = next(model.parameters())
        dim = backbone.hidden_size(model)
        for layer in backbone.decoder_layers(model):
            for projection in (layer.self_attn.o_proj, layer.mlp.down_proj):
                index = len(self.adapters)
                bottleneck = LiSTBottleneck(dim, self.bottleneck)
                self.adapters.append(bottleneck.to(reference.device, reference.dtype))
                projection.register_forward_hook(_OutputHook(self, index))
        self.reinitialise(self.init_seed)
        self.bind(model, tokenizer)
        return model

    def reinitialise(self, seed: int) -> None:
        """Re-draw every adapter (the fresh student of a session), seeded."""
        generator = torch.Generator().manual_seed(seed)
        for adapter in self.adapters:
            adapter.reset(self.init, generator)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        previous, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = previous

    @property
    def exports_backbone(self) -> bool:
        return False


# ---------------------------------------------------------------------------- the objective
Phase = Literal["labeled", "unlabeled"]


class _ScoresAt(nn.Module):
    """``forward(batch) -> (B, C)`` label scores of ``owner``: the callable ``functional_call`` swaps tensors
    into (parameter names carry the ``owner.`` prefix)."""

    def __init__(self, owner: LiSTModule) -> None:
        super().__init__()
        self.owner = owner

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.owner.label_scores(batch)


@register_method(
    name="list",
    paper="LiST: Lite Prompted Self-training Makes Parameter-Efficient Few-shot Learners (2021)",
    spec="27",
    scope="adapters after o_proj/down_proj, teacher/student sessions with re-initialised students, "
          "confidence "
          "then meta (one-step look-ahead) weights; causal next-token verbalizer with a frozen LM head; "
          "no adversarial/contrastive extras",
)
class LiSTModule(ClassificationModule):
    """Prompt-based classifier with LiST adapters; labeled CE, or weighted KL to a teacher on unlabeled
    data."""

    def __init__(self, meta_lr: float | None = None, adapter: Adapter | None = None, **kwargs: Any) -> None:
        """
        Args:
            meta_lr: eta of the look-ahead SGD step (None: ``lr``, the repo's; the normalised weights do not
                depend on eta).
            adapter: the LiST adapters (default ``LiSTAdapter(bottleneck=128)``, the paper's m).
            **kwargs: :class:`ClassificationModule` arguments (model, lr, labels, label_words, ...).
        """
        if adapter is None:
            adapter = LiSTAdapter()
        elif not isinstance(adapter, LiSTAdapter):
            raise ConfigError(f"LiSTModule needs a LiSTAdapter, got {type(adapter).__name__}")
        super().__init__(adapter=adapter, **kwargs)
        self.phase: Phase = "labeled"
        self.use_meta = False
        self.tau = 0.0
        self.teacher_state: dict[str, Tensor] | None = None
        self.last_weights: Tensor | None = None

    # ------------------------------------------------------------------ the teacher
    def adapter_state(self) -> dict[str, Tensor]:
        """A detached copy of the trainable tensors (``module``-level names): the teacher's weights."""
        return {name: p.detach().clone() for name, p in self.trainable_parameters().items()}

    def scores_at(self, params: dict[str, Tensor], batch: dict[str, Tensor]) -> Tensor:
        """(B, C) label scores with ``params`` (module-level names) in place of the module's own tensors."""
        return torch.func.functional_call(_ScoresAt(self), {f"owner.{k}": v for k, v in params.items()},
                                          (batch,), strict=False)

    @torch.no_grad()
    def teacher_probs(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, C) the teacher's soft labels (eval mode, no gradient)."""
        if self.teacher_state is None:
            raise ConfigError("LiST's unlabeled phase needs a teacher: add the SelfTrainingLoop callback")
        with self._eval_mode():
            return self.scores_at(self.teacher_state, batch).softmax(-1)

    @contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    # ------------------------------------------------------------------ the objective
    def compute_loss(self, batch: dict[str, Tensor], outputs: StepOutputs, weights: Tensor) -> Tensor:
        if self.phase == "labeled" or "unlabeled" not in batch:
            return super().compute_loss(batch, outputs, weights)
        unlabeled = batch["unlabeled"]
        teacher = self.teacher_probs(unlabeled)
        if self.use_meta:
            params = {n: p for n, p in self.trainable_parameters().items()}
            eta = self.hparams.meta_lr if self.hparams.meta_lr is not None else self.hparams.lr
            # double backward through attention: only the math SDPA kernel has second derivatives
            with self._eval_mode(), sdpa_kernel(SDPBackend.MATH):
                w = meta_weights(params, lambda ps: soft_label_kl(self.scores_at(ps, unlabeled), teacher),
                                 lambda ps: self.classification_loss(self.scores_at(ps, batch), batch), eta)
        else:
            w = confidence_weights(teacher, self.tau)
        self.last_weights = w.detach()
        per_example = soft_label_kl(self.label_scores(unlabeled), teacher)
        return (w.to(per_example.dtype) * per_example).sum()  # sum: w is normalised

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.teacher_state is not None:
            checkpoint["list_teacher"] = {k: v.detach().cpu() for k, v in self.teacher_state.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        teacher = checkpoint.get("list_teacher")
        if teacher is not None:
            own = self.trainable_parameters()
            self.teacher_state = {k: v.to(own[k].device, own[k].dtype)
                                  for k, v in teacher.items() if k in own}


# ---------------------------------------------------------------------------- the self-training loop
class SelfTrainingLoop(Callback):
    """Drives LiST's sessions: teacher warm-up, then per session a frozen teacher, a re-initialised student
    with a fresh optimizer, ``unlabeled_steps`` of weighted KL on unlabeled batches, ``labeled_steps`` of
    CE."""

    def __init__(self, teacher_steps: int = 100, sessions: int = 6, unlabeled_steps: int = 1000,
                 labeled_steps: int = 200, meta_warmup: float = 0.6, tau: float = 0.0,
                 seed: int | None = None) -> None:
        """
        Args:
            teacher_steps: stage 0, labeled steps that train the first teacher.
            sessions: S, self-training sessions (paper 6).
            unlabeled_steps: T_u, unlabeled steps per session (paper 1000).
            labeled_steps: labeled fine-tuning steps after each unlabeled phase (paper: E_ft = 50 epochs).
            meta_warmup: fraction of T_u with confidence weights before meta re-weighting (paper 0.6).
            tau: confidence threshold of the confidence weights (paper 0: uniform).
            seed: students are re-drawn with ``seed + session``; None: the run's seed, so bench seeds vary
                them.
        """
        super().__init__()
        if min(teacher_steps, sessions, unlabeled_steps, labeled_steps) < 0 or not 0 <= meta_warmup <= 1:
            raise ConfigError("SelfTrainingLoop: step counts must be >= 0 and meta_warmup in [0, 1]")
        self.teacher_steps, self.sessions = teacher_steps, sessions
        self.unlabeled_steps, self.labeled_steps = unlabeled_steps, labeled_steps
        self.meta_warmup, self.tau, self.seed = meta_warmup, tau, run_seed(seed)
        self.session = 0  # sessions started so far
        self._unlabeled: Iterator | None = None

    def schedule(self, step: int) -> tuple[int, int, Phase]:
        """(session, offset inside it, phase) of a global step; session 0 = the teacher warm-up / after."""
        if step < self.teacher_steps:
            return 0, step, "labeled"
        period = self.unlabeled_steps + self.labeled_steps
        session, offset = divmod(step - self.teacher_steps, max(period, 1))
        if session >= self.sessions or period == 0:
            return self.sessions, 0, "labeled"
        return session + 1, offset, "unlabeled" if offset < self.unlabeled_steps else "labeled"

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not isinstance(pl_module, LiSTModule):
            raise ConfigError(f"SelfTrainingLoop needs a LiSTModule, got {type(pl_module).__name__}")

    def start_session(self, trainer, module: LiSTModule, session: int) -> None:
        """Teacher <- the current student (frozen copy); student <- fresh adapters; fresh optimizer."""
        module.teacher_state = module.adapter_state()
        module.adapter.reinitialise(self.seed + session)
        rebuild_optimizer(trainer, carry_state=False, carry_schedule=True)
        self.session = session

    def next_unlabeled(self, trainer, device: torch.device) -> dict[str, Tensor]:
        datamodule = trainer.datamodule
        if self._unlabeled is None:
            if not getattr(datamodule, "records", {}).get("unlabeled"):
                raise ConfigError("LiST needs unlabeled data: set data.init_args.num_unlabeled > 0 (and "
                                  "shots_per_class)")
            self._unlabeled = iter(())
        batch = next(self._unlabeled, None)
        if batch is None:
            self._unlabeled = self.rank_share(datamodule.unlabeled_dataloader(), trainer)
            batch = next(self._unlabeled)
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}

    @staticmethod
    def rank_share(batches: Sized, trainer) -> Iterator[dict[str, Any]]:
        """This rank's unlabeled batches: every ``world_size``-th from its rank on, so that under DDP the
        ranks read different texts (as the labeled loader's sampler shares the labeled ones), not each the
        same; all of them when there are fewer batches than ranks."""
        world, rank = trainer.world_size, trainer.global_rank
        return iter(batches) if len(batches) < world else itertools.islice(batches, rank, None, world)

    def on_train_batch_start(self, trainer, pl_module: LiSTModule, batch: Any, batch_idx: int) -> None:
        session, offset, phase = self.schedule(trainer.global_step)
        if phase == "unlabeled" and session > self.session:
            self.start_session(trainer, pl_module, session)
        pl_module.phase = phase
        pl_module.tau = self.tau
        meta_from = math.ceil(self.meta_warmup * self.unlabeled_steps)
        pl_module.use_meta = phase == "unlabeled" and offset >= meta_from
        if phase == "unlabeled":
            batch["unlabeled"] = self.next_unlabeled(trainer, pl_module.device)

    def state_dict(self) -> dict[str, Any]:
        return {"session": self.session}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.session = state.get("session", 0)
