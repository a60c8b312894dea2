"""``CausalLMModule``: supervised fine-tuning of any causal LM, and the hooks every method plugs into.

Per-token loss, shift convention (target-aligned)
    ``per_token_loss[b, t] = -log p(input_ids[b, t] | input_ids[b, :t])``. Position ``t`` is the
    token being predicted, so selector weights, ``batch["labels"]`` and ``batch["segments"]`` are
    all indexed by the same ``t``; column 0 is never supervised. (The logits that predict token
    ``t`` come from the hidden state at ``t - 1``.)

Token selectors
    Every Trainer callback with a ``select(module, batch, outputs) -> Tensor`` method (the
    :class:`TokenSelector` protocol) is asked for a (B, T) float weight per training step; a mask
    is a weight of 0/1. The module multiplies all weights with the supervision mask
    (``labels != -100``) and reduces. Tokens whose weight is 0 never reach the LM head: the head
    and the cross-entropy run only on the kept rows (:mod:`zoo.kernels.selected_ce`).

Reduction (``reduction``)
    ``"token_mean"`` (default): ``sum(w * loss) / #(w > 0)``, the mean over selected tokens (for
    0/1 masks this is plain SFT's mean over response tokens). ``"weight_mean"``: divide by
    ``sum(w)`` instead. ``"sequence_mean"``: token mean inside each sequence, then mean over
    sequences. ``"sum"``: the plain weighted sum. Under DDP each rank reduces its own micro-batch
    and gradients are averaged, as in any Lightning run.

Auxiliary losses
    Every Trainer callback with an ``auxiliary_loss(module, batch, outputs) -> (name, Tensor)``
    method (the :class:`AuxiliaryLoss` protocol) adds a scalar term to the objective:
    ``loss = compute_loss(...) + sum_i weight_i * term_i``, with ``weight_i`` the callback's
    ``weight`` attribute (λ, default 1). Each raw term is logged as ``train/aux/<name>``. With no
    such callback ``training_step`` returns ``compute_loss`` unchanged (no extra op). Found the
    same way as token selectors, so any objective gets them; subclasses keep overriding only
    ``compute_loss``.

Batch transforms
    Callbacks may rewrite the batch in ``on_train_batch_start`` by assigning into the batch dict
    (e.g. ``batch["input_ids"] = corrupted``). Contract: ``labels`` and ``segments`` stay the
    original ones, so the objective is still measured against the clean targets; put the clean
    ids in ``batch["clean_input_ids"]`` if a later hook needs them.

Objectives
    Subclasses change the objective by overriding :meth:`CausalLMModule.compute_loss`, never
    ``training_step``. Parameter subsets go through :meth:`trainable_parameters`, which the
    optimizer, the checkpoint and the harness report all use.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import backbone, decoding
from zoo.errors import ConfigError, TrainingError, check_range
from zoo.kernels.selected_ce import selected_linear_cross_entropy
from zoo.labels import target_mask  # re-exported: methods import it from here
from zoo.modules.adapters.base import Adapter, outermost_init_args
from zoo.registry import register

Reduction = Literal["token_mean", "weight_mean", "sequence_mean", "sum"]
EXPORT_MANIFEST, EXPORT_STATE = "zoo.json", "zoo_state.safetensors"


@runtime_checkable
class TokenSelector(Protocol):
    """A callback that weights or selects the tokens that train (shape (B, T), target-aligned)."""

    def select(self, module: CausalLMModule, batch: dict[str, Tensor], outputs: StepOutputs) -> Tensor: ...


@runtime_checkable
class AuxiliaryLoss(Protocol):
    """A callback adding ``weight * term`` to the objective; ``name`` keys its log ``train/aux/<name>``.

    The term is a scalar with gradient; ``weight`` (float attribute, default 1) is its λ.
    """

    def auxiliary_loss(self, module: CausalLMModule, batch: dict[str, Tensor],
                       outputs: StepOutputs) -> tuple[str, Tensor]: ...


def fit_autocast(trainer: L.Trainer | None, grad: bool = True) -> contextlib.AbstractContextManager:
    """The fit's precision context for a pass a method runs outside Lightning's step, which would otherwise
    compute in fp32. ``grad=False`` (a no-grad scoring pass, Q-Tuning's): the precision plugin's forward
    context under any precision. ``grad=True`` (a training loop of its own: CAFT's head pre-training, cDPO's
    contrast models): only bf16 autocast under ``bf16-mixed`` (``16-mixed`` would need a GradScaler of its
    own, ``*-true`` precisions cast the weights themselves). Nothing without a trainer."""
    if trainer is not None and (not grad or str(trainer.precision) == "bf16-mixed"):
        return trainer.precision_plugin.forward_context()
    return contextlib.nullcontext()


def shift_for_prediction(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Pair hidden state ``t-1`` with target ``t``: returns (B, T-1, H) hidden and (B, T-1) targets."""
    return hidden[:, :-1], labels[:, 1:]


def reduce_loss(per_token: Tensor, weights: Tensor, reduction: Reduction = "token_mean") -> Tensor:
    """Reduce a weighted per-token loss ``per_token`` (B, T), already multiplied by ``weights``."""
    selected = (weights != 0).float()
    if reduction == "token_mean":
        return per_token.sum() / selected.sum().clamp_min(1.0)
    if reduction == "weight_mean":
        return per_token.sum() / weights.float().sum().clamp_min(1e-8)
    if reduction == "sequence_mean":
        counts = selected.sum(dim=1)
        per_sequence = per_token.sum(dim=1) / counts.clamp_min(1.0)
        return per_sequence[counts > 0].mean() if (counts > 0).any() else per_token.sum() * 0.0
    if reduction == "sum":
        return per_token.sum()
    raise ValueError(f"unknown reduction {reduction!r}; use token_mean, weight_mean, sequence_mean or sum")


def chunked_log_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None, index: tuple[Tensor, Tensor],
                      chunk: int = 1024) -> Iterator[tuple[tuple[Tensor, Tensor], Tensor]]:
    """Yield ``(rows, logp)`` for the positions ``index`` (row and column tensors) of ``hidden`` (B, T, H):
    ``logp`` (n, V) float32 log-softmax of the LM head on those positions, ``chunk`` at a time, so the
    (B, T, V) logits never exist at once. Call it under ``torch.no_grad()`` for statistics."""
    for start in range(0, index[0].numel(), chunk):
        rows = tuple(i[start : start + chunk] for i in index)
        yield rows, F.linear(hidden[rows], weight, bias).float().log_softmax(-1)


@dataclass
class StepOutputs:
    """What one forward pass produced, with lazily computed, detached statistics for selectors.

    ``hidden`` (B, T, H) are the final (normed) hidden states aligned with the input positions.
    ``per_token_loss()`` and ``entropy()`` are target-aligned (B, T), detached, zero where
    ``labels == -100``; they cost one extra no-grad pass through the LM head on supervised tokens,
    computed once and cached.
    """

    module: CausalLMModule
    hidden: Tensor
    labels: Tensor
    _cache: dict[str, Tensor] = field(default_factory=dict)

    def _stats(self) -> None:
        if "loss" in self._cache:
            return
        mask = target_mask(self.labels)
        loss = torch.zeros(self.labels.shape, dtype=torch.float32, device=self.hidden.device)
        entropy = torch.zeros_like(loss)
        with torch.no_grad():
            pred_hidden, targets = shift_for_prediction(self.hidden, self.labels)
            index = mask[:, 1:].nonzero(as_tuple=True)
            weight, bias = self.module.lm_head_weight()
            for rows, logp in chunked_log_probs(pred_hidden, weight, bias, index):
                rows_t = (rows[0], rows[1] + 1)
                loss[rows_t] = -logp.gather(-1, targets[rows].unsqueeze(-1)).squeeze(-1)
                entropy[rows_t] = -(logp.exp() * logp).sum(-1)
        self._cache.update(loss=loss, entropy=entropy)

    def per_token_loss(self) -> Tensor:
        self._stats()
        return self._cache["loss"]

    def entropy(self) -> Tensor:
        self._stats()
        return self._cache["entropy"]

    def logits(self) -> Tensor:
        """Full (B, T, V) logits with gradient, position t predicting token t+1 (HF convention)."""
        if "logits" not in self._cache:
            weight, bias = self.module.lm_head_weight()
            self._cache["logits"] = F.linear(self.hidden, weight, bias)
        return self._cache["logits"]


class DeferredStepOutputs(StepOutputs):
    """:class:`StepOutputs` whose forward runs when ``hidden`` is first read, under the grad mode of the step
    that made it: for losses that may never need the whole sequence's hidden states (label scores over
    cached prompts, :class:`~zoo.modules.classification.ClassificationModule`)."""

    def __init__(self, module: CausalLMModule, batch: dict[str, Tensor]) -> None:
        self._batch, self._grad_enabled, self._hidden = batch, torch.is_grad_enabled(), None
        super().__init__(module=module, hidden=None, labels=batch["labels"])

    @property
    def hidden(self) -> Tensor:
        if self._hidden is None:
            with torch.set_grad_enabled(self._grad_enabled):
                self._hidden = self.module.forward_hidden(self._batch)
        return self._hidden

    @hidden.setter
    def hidden(self, value: Tensor | None) -> None:
        self._hidden = value

    @property
    def computed(self) -> bool:
        """Whether the forward has run."""
        return self._hidden is not None


class CausalLMModule(L.LightningModule):
    """Supervised fine-tuning (SFT) of a causal LM, with token-selector and objective hooks."""

    def __init__(
        self,
        model: str = backbone.SMOLLM2,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        scheduler: Literal["constant", "cosine", "linear"] = "cosine",
        reduction: Reduction = "token_mean",
        dtype: str = "float32",
        gradient_checkpointing: bool = False,
        export: bool = True,
        checkpoint_trainable_only: bool = True,
        adapter: Adapter | None = None,
    ) -> None:
        """
        Args:
            model: backbone: ``smollm2-135m`` (embedded default), ``tiny-llama``, a local HF folder or a hub
                id.
            lr: peak learning rate (AdamW).
            weight_decay: AdamW weight decay, applied to matrices only (not norms or biases).
            betas: AdamW betas.
            warmup_steps: linear warm-up steps before the schedule.
            scheduler: learning-rate schedule after warm-up.
            reduction: how the weighted per-token loss is reduced (see the module docstring).
            dtype: parameter dtype of the backbone (float32, bfloat16, float16).
            gradient_checkpointing: recompute decoder activations in backward to save memory.
            export: write an HF-format export (model or adapter, tokenizer, chat template) at the end of fit.
            checkpoint_trainable_only: Lightning checkpoints hold only trainable tensors (frozen ones are
                restored from the backbone on load).
            adapter: how the backbone is wrapped (LoRA, prompt tuning, DePT, a parallel adapter, ...): a
                :class:`zoo.modules.adapters.Adapter` from YAML (``class_path`` / ``init_args``); default
                none.
        """
        check_range("model.init_args.lr", lr, 0.0, low_open=True, hint="a positive learning rate, e.g. 1e-4")
        check_range("model.init_args.warmup_steps", warmup_steps, 0, hint="0 turns warm-up off")
        super().__init__()
        self._given_args = outermost_init_args(self)
        self.save_hyperparameters(ignore=["adapter"])
        self.hparams["adapter"] = adapter.config() if adapter is not None else None  # plain data, YAML shape
        self.adapter = adapter if adapter is not None else Adapter()
        loaded, self.tokenizer = backbone.load(model, dtype=dtype)
        loaded.train()  # from_pretrained returns eval mode; Lightning keeps the modes it finds
        self.model = self.adapter.attach(self.configure_backbone(loaded), self.tokenizer)
        if gradient_checkpointing:
            backbone.base_model(self.model).gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        self._step_started: float | None = None
        self._tokens_per_s: float | None = None

    # ------------------------------------------------------------------ hooks for subclasses
    def configure_backbone(self, model: nn.Module) -> nn.Module:
        """Wrap or freeze the freshly loaded backbone (peft, soft prompts, masks). Default: train all."""
        return model

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters that train: used by the optimizer, the checkpoint and the bench report."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def compute_loss(self, batch: dict[str, Tensor], outputs: StepOutputs, weights: Tensor) -> Tensor:
        """The objective. Default: weighted token cross-entropy over tokens with weight != 0."""
        per_token = self.weighted_token_loss(outputs, weights)
        return reduce_loss(per_token, weights, self.hparams.reduction)

    # ------------------------------------------------------------------ shared pieces
    def lm_head_weight(self) -> tuple[Tensor, Tensor | None]:
        head = self.model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        if hasattr(weight, "full_tensor"):  # FSDP2 DTensor: all-gather, differentiably
            weight = weight.full_tensor()
            bias = bias.full_tensor() if bias is not None else None
        return weight, bias

    def weighted_token_loss(self, outputs: StepOutputs, weights: Tensor) -> Tensor:
        """(B, T) target-aligned ``weights * CE``; rows with weight 0 skip the LM head entirely."""
        pred_hidden, targets = shift_for_prediction(outputs.hidden, outputs.labels)
        head_weight, head_bias = self.lm_head_weight()
        flat = selected_linear_cross_entropy(
            pred_hidden.reshape(-1, pred_hidden.shape[-1]),
            head_weight,
            targets.reshape(-1),
            weights[:, 1:].reshape(-1),
            bias=head_bias,
        )
        return F.pad(flat.view(targets.shape), (1, 0))

    def forward_hidden(self, batch: dict[str, Tensor]) -> Tensor:
        """Final hidden states (B, T, H) at the batch's real positions, through the adapter (no LM head)."""
        return self.adapter.hidden_states(batch)

    def forward(self, batch: dict[str, Tensor]) -> StepOutputs:
        return StepOutputs(module=self, hidden=self.forward_hidden(batch), labels=batch["labels"])

    def token_weights(self, batch: dict[str, Tensor], outputs: StepOutputs) -> Tensor:
        """Supervision mask times the product of every active TokenSelector's weights."""
        weights = target_mask(batch["labels"]).float()
        trainer = self._trainer
        for callback in trainer.callbacks if trainer is not None else []:
            if isinstance(callback, TokenSelector):
                selected = callback.select(self, batch, outputs)
                if selected.shape != weights.shape:
                    raise ValueError(f"{type(callback).__name__}.select returned shape "
                                     f"{tuple(selected.shape)}, expected {tuple(weights.shape)} "
                                     "(batch, tokens)")
                weights = weights * selected.to(weights.dtype)
        return weights

    def auxiliary_terms(self, batch: dict[str, Tensor],
                        outputs: StepOutputs) -> list[tuple[str, float, Tensor]]:
        """``(name, weight, term)`` of every active :class:`AuxiliaryLoss` callback (empty when none)."""
        terms: list[tuple[str, float, Tensor]] = []
        trainer = self._trainer
        for callback in trainer.callbacks if trainer is not None else []:
            if isinstance(callback, AuxiliaryLoss):
                name, term = callback.auxiliary_loss(self, batch, outputs)
                if term.dim() != 0:
                    raise ValueError(f"{type(callback).__name__}.auxiliary_loss returned shape "
                                     f"{tuple(term.shape)}, expected a scalar")
                if any(name == other for other, _, _ in terms):
                    name = f"{name}_{len(terms)}"
                terms.append((name, float(getattr(callback, "weight", 1.0)), term))
        return terms

    def add_auxiliary_module(self, name: str, module: nn.Module) -> None:
        """Attach a trainable module owned by an auxiliary loss (e.g. a projector): it trains, checkpoints,
        moves and casts with this module but is left out of :meth:`export` (discarded at inference)."""
        self.add_module(name, module)
        self._auxiliary_modules = {*getattr(self, "_auxiliary_modules", ()), name}

    # ------------------------------------------------------------------ Lightning
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        outputs = self(batch)
        weights = self.token_weights(batch, outputs)
        loss = self.compute_loss(batch, outputs, weights)
        aux = self.auxiliary_terms(batch, outputs)
        for _, weight, term in aux:
            loss = loss + weight * term.to(loss.dtype)
        if not torch.isfinite(loss):
            raise TrainingError(
                f"non-finite training loss ({loss.item()}) at step {self.global_step}: lower the learning "
                "rate, use float32, or check the batch for empty responses"
            )
        supervised = target_mask(batch["labels"]).sum().clamp_min(1)
        lr = self.trainer.optimizers[0].param_groups[0]["lr"] if self.trainer.optimizers else 0.0
        metrics = {"train/loss": loss.detach(), "train/kept_fraction": (weights != 0).sum() / supervised,
                   "train/lr": lr}
        metrics.update({f"train/aux/{name}": term.detach() for name, _, term in aux})
        if self._tokens_per_s is not None:  # throughput of the previous step (forward + backward + update)
            metrics["train/tokens_per_s"] = self._tokens_per_s
        self.log_dict(metrics, prog_bar=True)  # one call: each costs a sync of Lightning's result collection
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._step_started is not None:
            elapsed = time.perf_counter() - self._step_started
            self._tokens_per_s = float(batch["attention_mask"].sum()) / max(elapsed, 1e-9)
        self._step_started = None

    def evaluation_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        """Held-out response NLL (token mean), logged as ``{stage}/loss``; ``stage`` is val or test."""
        outputs = self(batch)
        weights = target_mask(batch["labels"]).float()
        per_token = self.weighted_token_loss(outputs, weights)
        count = weights.sum()
        loss = per_token.sum() / count.clamp_min(1.0)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=int(count.item()), sync_dist=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.evaluation_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self.evaluation_step(batch, "test")

    def _log_perplexity(self, stage: str) -> None:
        loss = self.trainer.callback_metrics.get(f"{stage}/loss")
        if loss is not None:
            self.log(f"{stage}/ppl", math.exp(min(float(loss), 50.0)), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_perplexity("val")

    def on_test_epoch_end(self) -> None:
        self._log_perplexity("test")

    def generate_text(self, prompts: list[str], max_new_tokens: int = 256, system_prompt: str | None = None,
                      batch_size: int = 16, **sampling: Any) -> list[str]:
        """Completions of chat-rendered ``prompts`` through the one decoder (:func:`zoo.decoding.generate`),
        with the adapter's decoding hooks; ``sampling``: ``do_sample``, ``temperature``, ``top_p``, ``stop``,
        ...
        Runs in eval mode (no dropout; modules may branch on ``training``) and restores the mode after."""
        was_training = self.training
        self.eval()
        try:
            return decoding.generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     system_prompt=system_prompt, batch_size=batch_size, hooks=self.adapter,
                                     **sampling)
        finally:
            self.train(was_training)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> list[str]:
        prompts = batch.get("prompt_text")
        if prompts is None:
            raise ConfigError("predict needs batches with 'prompt_text' (use a DataModule's "
                              "predict_dataloader)")
        return self.generate_text(prompts)

    def configure_optimizers(self):
        params = self.trainable_parameters()
        if not params:
            raise ConfigError(f"{type(self).__name__} has no trainable parameters: check the freezing "
                              "options")
        groups = self.adapter.parameter_groups(self.hparams.lr)
        if groups is None:
            decay = [p for p in params.values() if p.ndim >= 2]
            no_decay = [p for p in params.values() if p.ndim < 2]
            groups = [{"params": decay, "weight_decay": self.hparams.weight_decay},
                      {"params": no_decay, "weight_decay": 0.0}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.hparams.lr,
                                      betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self._scheduler(optimizer), "interval": "step"}}

    def _scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        warmup, kind = self.hparams.warmup_steps, self.hparams.scheduler
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if kind == "cosine":
                return 0.5 * (1.0 + math.cos(math.pi * progress))
            if kind == "linear":
                return 1.0 - progress
            return 1.0

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy``: FSDP2-shard each decoder layer, then the whole model.

        Tensors outside ``self.model`` (the adapter's, an objective's heads) stay replicated on every rank;
        their gradients are averaged across ranks after each backward (:meth:`on_after_backward`), as DDP
        would. Adapters with their own forward (soft prompts, prefixes) call parts of the backbone outside its
        root forward, where FSDP2 has not gathered the root's parameters: they are refused with DDP named."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if type(strategy).__name__ != "ModelParallelStrategy":
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):  # configure_model may be called more than once
            return
        if type(self.adapter).hidden_states is not Adapter.hidden_states:
            raise ConfigError(f"{type(self.adapter).__name__} runs its own forward through the backbone, "
                              "which FSDP2 (ModelParallelStrategy) does not support here: use "
                              "configs/strategies/ddp.yaml")
        mesh = strategy.device_mesh["data_parallel"]
        for layer in backbone.decoder_layers(self.model):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self._replicated = [p for n, p in self.named_parameters() if not n.startswith("model.")]

    def on_after_backward(self) -> None:
        """Average the gradients of replicated (unsharded) tensors across ranks under FSDP2."""
        replicated = [p for p in getattr(self, "_replicated", []) if p.grad is not None]
        if not replicated or not torch.distributed.is_initialized():
            return
        world = torch.distributed.get_world_size()
        for param in replicated:
            torch.distributed.all_reduce(param.grad)
            param.grad.div_(world)

    # ------------------------------------------------------------------ checkpoint + export
    def trainable_count(self) -> int:
        """The trainable-parameter figure every report uses: the adapter's paper-convention count where it
        defines one (e.g. prefixes without their re-parameterisation MLP), else ``trainable_parameters()``."""
        paper = self.adapter.trainable_count()
        return paper if paper is not None else sum(p.numel() for p in self.trainable_parameters().values())

    def trainable_state_names(self) -> set[str]:
        """State-dict keys of the trainable tensors (by tensor, not by name: tied aliases included)."""
        trainable_ids = {id(p) for p in self.trainable_parameters().values()}
        return {n for n, p in self.named_parameters(remove_duplicate=False) if id(p) in trainable_ids}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict")
        sharded = any(hasattr(p, "full_tensor") for p in self.parameters())  # FSDP2 loads need every key
        if self.hparams.checkpoint_trainable_only and isinstance(state, dict) and not sharded:
            trainable = self.trainable_state_names()
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}
            checkpoint["zoo_trainable_only"] = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if checkpoint.get("zoo_trainable_only"):
            full = {k: v for k, v in self.state_dict().items()}
            full.update(checkpoint["state_dict"])
            checkpoint["state_dict"] = full

    def export_dir(self) -> Path:
        return Path(self.trainer.default_root_dir) / "export"

    def on_fit_end(self) -> None:
        if self.hparams.export:
            self.export(self.export_dir())

    def export(self, directory: str | Path) -> Path:
        """Write the run's model so that it reloads: ``zoo.harness.load.load_run(directory)``.

        The folder holds the tokenizer and chat template and, where the backbone trained, an HF model
        (``transformers`` loads it; adapter updates merged when the adapter can merge) or a peft adapter
        (``peft`` loads it); ``zoo.json`` (the module class and its arguments) and ``zoo_state.safetensors``
        (trained tensors the HF files do not carry: soft prompts, parallel adapters, ...) rebuild the module.
        """
        import json

        from safetensors.torch import save_file

        directory = Path(directory)
        merged = self.adapter.export_state_dict()
        weights = self.export_weights_kind(merged is not None)
        state_dict = merged if merged is not None else self._full_state_dict_for_export()
        extra = self.export_extra_state(weights)
        if self._trainer is None or self.trainer.is_global_zero:
            directory.mkdir(parents=True, exist_ok=True)
            if weights in ("full", "merged", "peft"):
                self.exportable_model().save_pretrained(directory, state_dict=state_dict)
            self.tokenizer.save_pretrained(directory)
            self.adapter.export_extras(directory)
            if extra:
                save_file(extra, str(directory / EXPORT_STATE))
            manifest = {"format": 1, "class_path": f"{type(self).__module__}.{type(self).__qualname__}",
                        "init_args": self.export_init_args(merged=merged is not None), "weights": weights,
                        "state": EXPORT_STATE if extra else None, "trainable_params": self.trainable_count()}
            (directory / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, default=list) + "\n")
        if self._trainer is not None:
            self.trainer.strategy.barrier("zoo-export")
        return directory

    def export_weights_kind(self, merged: bool) -> Literal["full", "merged", "peft", "none"]:
        """``full``: an HF model with the trained backbone; ``merged``: the same with the adapter's update
        merged in (DSEE); ``peft``: a peft adapter; ``none``: the backbone did not train (soft prompts,
        parallel adapters): a reload starts from the original backbone."""
        if merged:
            return "merged"
        if not any(p.requires_grad for p in self.model.parameters()):
            return "none"
        return "peft" if hasattr(self.model, "peft_config") else "full"

    def export_extra_state(self, weights: str) -> dict[str, Tensor]:
        """Trained tensors (and persistent buffers outside the backbone) that the HF files do not carry."""
        trainable = self.trainable_state_names()
        covered = "model." if weights in ("full", "peft") else None  # the HF model or peft's adapter files
        if weights == "merged":
            return {}  # the adapter's update is inside the HF weights
        state = self.state_dict()
        keep = {k for k in trainable if not (covered and k.startswith(covered))}
        keep |= {k for k, _ in self.named_buffers() if not k.startswith("model.") and k in state}
        auxiliary = tuple(f"{name}." for name in getattr(self, "_auxiliary_modules", ()))
        keep = {k for k in keep if not k.startswith(auxiliary)} if auxiliary else keep
        return {k: state[k].detach().cpu().contiguous() for k in sorted(keep) if k in state}

    def export_init_args(self, merged: bool = False) -> dict[str, Any]:
        """The constructor arguments that rebuild this module from its export (``zoo.json``)."""
        args = dict(self._given_args)
        if isinstance(args.get("adapter"), Adapter):
            args["adapter"] = args["adapter"].config()
        args["export"] = False
        if merged:
            args["adapter"] = None
        return args

    def exportable_model(self) -> nn.Module:
        """The model written by :meth:`export` (subclasses drop auxiliary heads here)."""
        return self.model

    def _full_state_dict_for_export(self) -> dict[str, Tensor] | None:
        """None (the model's own state) unless parameters are sharded, then a gathered full state."""
        if not any(hasattr(p, "full_tensor") for p in self.model.parameters()):
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)


register(
    name="sft",
    kind="module",
    paper="Supervised fine-tuning, all parameters (baseline)",
    spec="",
    config="configs/sft.yaml",
    target="zoo.modules.base:CausalLMModule",
)
