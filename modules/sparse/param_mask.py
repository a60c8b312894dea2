"""Parameter selection: the shared mechanism behind HFT, LT-SFT, GreenTrainer, stability recipes,
personalisation.

Design (one Callback base class, no change to ``CausalLMModule``):

* **Whole-tensor freezing** goes through ``requires_grad``. ``CausalLMModule.trainable_parameters()``
  returns exactly the tensors with ``requires_grad=True``, so the optimizer (built from it), the
  trainable-only checkpoint and the harness's "trainable params" column always agree. A frozen
  tensor is *not in the optimizer*, so AdamW weight decay and stale moments cannot move it: it
  stays bitwise unchanged (zeroing its gradient would not be enough).
* **Elementwise masks** (LT-SFT, DSEE-style supports): ``masks[name]`` is a bool tensor (True =
  entry may change) and ``anchors[name]`` holds the values the masked-out entries must keep. The
  gradient is multiplied by the mask in ``on_before_optimizer_step`` (before gradient clipping,
  once per optimizer step, also under gradient accumulation) and, after every step, masked-out
  entries are copied back from the anchor, which undoes AdamW's decoupled weight decay on them.
* **Stages**: ``self.stage`` counts re-partitions. A subclass calls :meth:`apply_selection` with the
  new trainable set / masks and then :func:`rebuild_optimizer`, which re-runs
  ``trainer.strategy.setup_optimizers(trainer)`` (so ``configure_optimizers`` sees the new
  ``trainable_parameters()``), optionally carries the Adam state of tensors that stay trainable and
  the scheduler position.
* **Resume**: ``state_dict()`` holds the stage, the frozen names, masks, anchors, and the values of
  tensors that trained in an earlier stage but are frozen now (the module's trainable-only
  checkpoint would otherwise drop them). Lightning calls ``load_state_dict`` after ``setup`` and
  before the optimizer is built, so the restored selection is in force when the optimizer and its
  saved state are loaded. (Lightning's ``BaseFinetuning`` re-creates param groups after the
  optimizer state is restored and breaks there: Lightning issues #6891, #8502; this does not build
  on it.)

Composition: layer-wise LR decay and other optimizer shapers compose (``on_optimizer_rebuilt``);
two callbacks that both set ``requires_grad`` do not intersect their selections (the later one
wins), so use one freezing policy per run. Under DDP the selection in ``setup`` happens before the
model is wrapped; a callback that changes ``requires_grad`` mid-run (HFT ``reselect="epoch"``,
GreenTrainer) needs ``strategy: ddp_find_unused_parameters_true``. Every rank must compute the same
selection (seeded draws, or from the weights DDP keeps identical; a choice made from the rank's own
batch is broadcast from rank 0). DDP's all-reduce only covers the tensors that required grad when it
wrapped the model, so a tensor unfrozen later has its gradient averaged here, in
``on_before_optimizer_step``. Elementwise masks assume plain (unsharded) tensors: LT-SFT's phase 2
is not supported under FSDP2.

Subclasses implement :meth:`initial_selection` (called in ``setup``) and, for multi-stage methods,
change the selection from a training hook. The callback never defines ``select`` (that name is the
token-selector protocol of ``CausalLMModule``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from zoo import backbone
from zoo.errors import ConfigError


@dataclass
class Selection:
    """What trains: ``trainable`` tensor names (None = leave ``requires_grad`` as is) and elementwise
    masks."""

    trainable: set[str] | None = None
    masks: dict[str, Tensor] = field(default_factory=dict)


def named_trainable_candidates(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter of ``module`` by name (shared/tied tensors once, as ``named_parameters`` gives
    them)."""
    return dict(module.named_parameters())


def rebuild_optimizer(trainer: L.Trainer, carry_state: bool = True, carry_schedule: bool = True) -> None:
    """Re-create optimizer + scheduler from the module's current ``trainable_parameters()``.

    Args:
        trainer: a Trainer whose strategy already set up optimizers once.
        carry_state: copy per-tensor optimizer state (Adam moments, step) for tensors still trained.
        carry_schedule: keep the scheduler position (else the schedule and warm-up restart).

    Callbacks that shape the optimizer (layer-wise LR decay) define ``on_optimizer_rebuilt(trainer,
    module)``; it is called on every callback right after the new optimizer exists, so parameter
    selection composes with them.

    The schedule position (``last_epoch``, ``_step_count``) is carried, never the old scheduler's whole
    state: its ``base_lrs`` belong to the old parameter groups, whose number and order change with the
    selection (and with layer-wise LR decay). The new scheduler keeps the base lrs of the new groups and
    each group's lr is recomputed at the carried position (closed-form schedulers: the module's
    ``LambdaLR``, ``StepLR``, ...). A path-dependent scheduler (e.g. ``ReduceLROnPlateau``) gets its old
    state back only over the same number of groups; otherwise this raises a ConfigError.
    """
    old_optimizers = list(trainer.optimizers)
    old_schedules = [(config.scheduler.last_epoch, getattr(config.scheduler, "_step_count", None),
                      config.scheduler.state_dict()) for config in trainer.lr_scheduler_configs]
    trainer.strategy.setup_optimizers(trainer)
    for callback in trainer.callbacks:  # e.g. layer-wise LR decay re-splits the new optimizer's groups
        hook = getattr(callback, "on_optimizer_rebuilt", None)
        if callable(hook):
            hook(trainer, trainer.lightning_module)
    if carry_state:
        for old, new in zip(old_optimizers, trainer.optimizers):
            for group in new.param_groups:
                for p in group["params"]:
                    if p in old.state:
                        new.state[p] = old.state[p]
    if carry_schedule:
        for (last_epoch, step_count, state), config in zip(old_schedules, trainer.lr_scheduler_configs):
            scheduler = config.scheduler
            if has_closed_form(scheduler):
                move_schedule(scheduler, last_epoch, step_count)
            elif len(state.get("base_lrs", ())) == len(scheduler.optimizer.param_groups):
                scheduler.load_state_dict(state)
            else:
                raise ConfigError(f"cannot carry a {type(scheduler).__name__}'s state across an optimizer "
                                  "rebuild that changes the number of parameter groups: use the module's "
                                  "scheduler (a LambdaLR) or a closed-form one")


def has_closed_form(scheduler: Any) -> bool:
    """Whether a scheduler's lr is a function of its position alone (``LambdaLR``, ``StepLR``, ...)."""
    return (isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
            or hasattr(scheduler, "_get_closed_form_lr"))


def move_schedule(scheduler: Any, last_epoch: int, step_count: int | None = None) -> None:
    """Put a freshly built scheduler at position ``last_epoch`` and set its groups' lrs for that position.

    Closed-form schedulers only (:func:`has_closed_form`): a chained scheduler's lr depends on the path
    it took, which a new set of groups does not have."""
    if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        def closed_form() -> list[float]:
            return [base * fn(scheduler.last_epoch)
                    for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)]
    elif hasattr(scheduler, "_get_closed_form_lr"):
        closed_form = scheduler._get_closed_form_lr
    else:
        raise ConfigError(f"cannot carry the position of a {type(scheduler).__name__} across an optimizer "
                          "rebuild: use a LambdaLR (the module's schedulers) or carry_schedule=False")
    scheduler.last_epoch = last_epoch
    if step_count is not None:
        scheduler._step_count = step_count
    lrs = closed_form()
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


class ParameterMaskCallback(L.Callback):
    """Base callback: freeze whole tensors or mask entries, by stage, with checkpointed state."""

    def __init__(self) -> None:
        self.stage = 0
        self.frozen: set[str] = set()
        self.masks: dict[str, Tensor] = {}
        self.anchors: dict[str, Tensor] = {}
        self.ever_trained: set[str] = set()
        self._module: nn.Module | None = None
        self._ddp_synced: set[int] | None = None  # ids of the tensors DDP's all-reduce covers (None: not DDP)

    # ------------------------------------------------------------------ for subclasses
    def initial_selection(self, module: L.LightningModule) -> Selection:
        """The selection in force at the start of fit (stage 0). Default: change nothing."""
        return Selection()

    def extra_state(self) -> dict[str, Any]:
        """Subclass state to checkpoint next to the selection."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""

    # ------------------------------------------------------------------ the mechanism
    def apply_selection(self, module: nn.Module, selection: Selection) -> None:
        """Set ``requires_grad`` from ``selection.trainable`` and install elementwise masks (anchors =
        now)."""
        params = named_trainable_candidates(module)
        if selection.trainable is not None:
            unknown = set(selection.trainable) - set(params)
            if unknown:
                raise KeyError(f"{type(self).__name__}: unknown parameter names {sorted(unknown)[:5]}")
            for name, p in params.items():
                p.requires_grad_(name in selection.trainable)
        self.frozen = {name for name, p in params.items() if not p.requires_grad}
        self.masks = {name: mask.to(params[name].device, torch.bool)
                      for name, mask in selection.masks.items()}
        self.anchors = {name: params[name].detach().clone() for name in self.masks}
        self.ever_trained |= {name for name, p in params.items() if p.requires_grad}

    def trainable_names(self, module: nn.Module) -> set[str]:
        return {name for name, p in named_trainable_candidates(module).items() if p.requires_grad}

    def mask_gradients(self, module: nn.Module) -> None:
        params = named_trainable_candidates(module)
        for name, mask in self.masks.items():
            grad = params[name].grad
            if grad is not None:
                grad.mul_(mask.to(grad.dtype))

    @torch.no_grad()
    def average_unsynced_gradients(self, trainer: L.Trainer, module: nn.Module) -> None:
        """Under DDP, average over ranks the gradients of trainable tensors outside DDP's all-reduce.

        Those are the tensors a later stage unfroze. Without this each rank would step them with its
        own local gradient and the ranks' weights would drift apart (seen with HFT ``reselect="epoch"``
        on 2 processes). One coalesced all-reduce; a tensor without a gradient on a rank counts as zero
        there (as in DDP), and stays ``None`` if no rank has one. Relies on every rank holding the same
        selection, so the collective matches on all ranks."""
        if self._ddp_synced is None:
            return
        params = [p for p in named_trainable_candidates(module).values()
                  if p.requires_grad and id(p) not in self._ddp_synced]
        if not params:
            return
        pieces = [torch.zeros(p.numel(), device=p.device) if p.grad is None
                  else p.grad.detach().flatten().float() for p in params]
        present = torch.tensor([float(p.grad is not None) for p in params], device=pieces[0].device)
        flat = trainer.strategy.reduce(torch.cat([*pieces, present]), reduce_op="mean")
        start = 0
        for p, has_grad in zip(params, flat[-len(params):].tolist()):
            piece = flat[start:start + p.numel()].view_as(p)
            start += p.numel()
            if p.grad is not None:
                p.grad.copy_(piece)
            elif has_grad > 0:
                p.grad = piece.to(p.dtype).clone()

    @torch.no_grad()
    def restore_masked_entries(self, module: nn.Module) -> None:
        params = named_trainable_candidates(module)
        for name, mask in self.masks.items():
            p = params[name]
            p.copy_(torch.where(mask, p, self.anchors[name].to(p.dtype)))

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._module = pl_module
        if stage == "fit":
            self.apply_selection(pl_module, self.initial_selection(pl_module))

    def held_tensors(self) -> list[dict[str, Tensor]]:
        """The per-parameter tensors this callback holds (subclasses add theirs), kept on the parameter's
        device and dtype by :meth:`follow`."""
        return [self.masks, self.anchors]

    @torch.no_grad()
    def follow(self, module: nn.Module) -> None:
        """Move what the callback holds to where Lightning put (and cast) the module: GPU, bf16, float64."""
        params = dict(module.named_parameters())
        for store in self.held_tensors():
            for name, value in store.items():
                if name in params:
                    dtype = params[name].dtype if value.is_floating_point() else value.dtype
                    store[name] = value.to(params[name].device, dtype)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.follow(pl_module)
        # DDP wrapped the model after ``setup`` (and after a resume restored the selection) and chose its
        # all-reduce set then: the tensors requiring grad at that moment, i.e. those now.
        ddp = isinstance(trainer.strategy.model, torch.nn.parallel.DistributedDataParallel)
        self._ddp_synced = {id(p) for p in pl_module.parameters() if p.requires_grad} if ddp else None

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        self.average_unsynced_gradients(trainer, pl_module)
        self.mask_gradients(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.masks:
            self.restore_masked_entries(pl_module)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"stage": self.stage, "frozen": sorted(self.frozen),
                                 "ever_trained": sorted(self.ever_trained),
                                 "masks": {k: v.cpu() for k, v in self.masks.items()},
                                 "anchors": {k: v.cpu() for k, v in self.anchors.items()},
                                 "frozen_values": {}, "extra": self.extra_state()}
        if self._module is not None:
            params = named_trainable_candidates(self._module)
            # Tensors frozen now that trained before differ from the backbone: keep them.
            state["frozen_values"] = {n: params[n].detach().cpu().clone()
                                      for n in self.frozen & self.ever_trained}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stage = int(state["stage"])
        self.ever_trained = set(state.get("ever_trained", []))
        self.load_extra_state(state.get("extra", {}))
        if self._module is None:
            raise RuntimeError(f"{type(self).__name__}.load_state_dict before setup: resume through "
                               "Trainer.fit")
        params = named_trainable_candidates(self._module)
        with torch.no_grad():
            for name, value in state.get("frozen_values", {}).items():
                params[name].copy_(value.to(params[name].device, params[name].dtype))
        frozen = set(state["frozen"])
        for name, p in params.items():
            p.requires_grad_(name not in frozen)
        self.frozen = frozen
        self.masks = {k: v.to(params[k].device) for k, v in state["masks"].items()}
        self.anchors = {k: v.to(params[k].device, params[k].dtype) for k, v in state["anchors"].items()}


def names_under(module: nn.Module, prefix_modules: Iterable[nn.Module], root: nn.Module) -> set[str]:
    """Names (as ``root.named_parameters`` spells them) of the parameters inside ``prefix_modules``."""
    wanted = {id(p) for m in prefix_modules for p in m.parameters()}
    return {name for name, p in root.named_parameters() if id(p) in wanted}


def layer_parameter_names(module: nn.Module) -> list[set[str]]:
    """Per decoder block, the parameter names (module-rooted) it owns."""
    return [names_under(module, [layer], module) for layer in backbone.decoder_layers(module.model)]


def embedding_names(module: nn.Module) -> set[str]:
    """Input embedding and output head parameter names (one name when tied)."""
    base = backbone.base_model(module.model)
    parts = [base.get_input_embeddings()]
    head = base.get_output_embeddings()
    if head is not None:
        parts.append(head)
    return names_under(module, parts, module)


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)
