"""TuCo (spec 10): the exact per-layer split of a fine-tuned model into pre-training and fine-tuning parts.

For a residual decoder ``x_{l+1} = x_l + f(x_l, l)`` (``f`` = the whole block: pre-norms, attention, MLP),
along the FINE-TUNED trajectory ``x_l``::

    PTC_l = f_PT(x_l, l)                 the pre-trained block run on the fine-tuned model's states
    FTC_l = f_FT(x_l, l) - f_PT(x_l, l)  so x_{l+1} = x_l + PTC_l + FTC_l exactly
    TuCo  = |sum_l FTC_l[last]|_1 / (|sum_l PTC_l[last]|_1 + |sum_l FTC_l[last]|_1)   (last prompt token)

Implementation: forward hooks on the fine-tuned decoder layers. Each hook takes the layer's own call
(hidden states, rotary embeddings, mask: identical for both calls) and re-runs it as the pre-trained block:
the base model's layer ``l`` when a separate base is given, or the same layer inside the base context
(``adapter.disabled()`` / peft's ``disable_adapter()``: no second copy of the backbone).

``BlockPair``      the fine-tuned layers and how to run the pre-trained layer ``l`` on the same inputs
``decompose``      per-layer components of one forward (``TuCoResult``: PTC/FTC at every position, x_0)
``tuco``           the ratio per sequence at its last real token
``FTCScaler``      ``x_{l+1} = x_l + PTC_l + alpha * FTC_l`` (alpha = 1: the fine-tuned model, alpha = 0: the
                   pre-trained one when embeddings, final norm and head are shared, e.g. LoRA on the blocks)
``TuCoCallback``   logs the mean TuCo of a fixed probe set during any fit (``tuco/mean``)

Adapters that change only the inputs (soft prompts, prefixes) do not change any block map: their FTC is 0
at every layer by this definition; their effect is in ``x_0``. With full fine-tuning ``x_0`` comes from the
fine-tuned embedding, so alpha = 0 is not exactly the pre-trained model then.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from transformers import Cache, DynamicCache

from zoo import backbone
from zoo.chat import render_prompt_ids
from zoo.errors import ConfigError

__all__ = ["BlockPair", "FTCScaler", "TuCoCallback", "TuCoResult", "decompose", "encode_prompts", "tuco"]


def _hidden_of(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output: Any, hidden: Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _hidden_arg(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


class BlockPair:
    """The fine-tuned decoder layers and the pre-trained block ``l`` evaluated on the same call.

    Args:
        tuned: the fine-tuned HF model (or peft model).
        base: a separate pre-trained HF model of the same architecture, or None to use ``base_context``.
        base_context: a context-manager factory under which ``tuned``'s own layers are the pre-trained
            blocks (``adapter.disabled``, ``peft_model.disable_adapter``).
    """

    def __init__(self, tuned: nn.Module, base: nn.Module | None = None,
                 base_context: Callable[[], contextlib.AbstractContextManager] | None = None) -> None:
        if (base is None) == (base_context is None):
            raise ConfigError("BlockPair needs exactly one of base (a second model) or base_context "
                              "(the tuned model's adapter switched off)")
        self.tuned = tuned
        self.layers = backbone.decoder_layers(tuned)
        self.base_layers = backbone.decoder_layers(base) if base is not None else None
        if self.base_layers is not None and len(self.base_layers) != len(self.layers):
            raise ConfigError(f"base has {len(self.base_layers)} layers, tuned {len(self.layers)}: TuCo "
                              "needs the same architecture")
        self.base_context = base_context
        self._reentrant = False
        self._shadow: tuple[int, Any] | None = None  # (the tuned run's KV cache, the base blocks' own)

    @classmethod
    def for_module(cls, module: Any, base: Any | None = None) -> BlockPair:
        """From zoo modules: ``base`` a second module, or None for ``module``'s adapter switched off."""
        if base is not None:
            return cls(module.model, base=base.model)
        if not module.adapter.is_identity:
            return cls(module.model, base_context=module.adapter.disabled)
        if hasattr(module.model, "disable_adapter"):
            return cls(module.model, base_context=module.model.disable_adapter)
        raise ConfigError("the module has no adapter to switch off: give the pre-trained model as base")

    def base_block(self, index: int, args: tuple, kwargs: dict) -> Tensor:
        """Output hidden states of the pre-trained layer ``index`` on the fine-tuned layer's call. A KV cache
        in the call is swapped for the base blocks' own (their keys/values differ from the tuned ones)."""
        kwargs = {k: self._shadow_cache(v) if isinstance(v, Cache) else v for k, v in kwargs.items()}
        if self.base_layers is not None:
            return _hidden_of(self.base_layers[index](*args, **kwargs))
        self._reentrant = True
        try:
            with self.base_context():
                return _hidden_of(self.layers[index](*args, **kwargs))
        finally:
            self._reentrant = False

    def _shadow_cache(self, cache: Any) -> Any:
        if self._shadow is None or self._shadow[0]() is not cache:
            self._shadow = (weakref.ref(cache), DynamicCache())
        return self._shadow[1]

    @contextlib.contextmanager
    def hooked(self, hook: Callable[[int, tuple, dict, Any], Any]) -> Iterator[None]:
        """Install ``hook(index, args, kwargs, output) -> output | None`` on every fine-tuned layer."""
        handles = []
        for index, layer in enumerate(self.layers):
            def wrapper(_module, args, kwargs, output, index=index):
                if self._reentrant:  # the pre-trained call of the same layer (base_context)
                    return None
                return hook(index, args, kwargs, output)

            handles.append(layer.register_forward_hook(wrapper, with_kwargs=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


@dataclass
class TuCoResult:
    """``x0`` (B, T, H) the first residual state; ``ptc`` / ``ftc`` (L, B, T, H) per layer, float32 or the
    model's dtype if wider."""

    x0: Tensor
    ptc: Tensor
    ftc: Tensor

    def residual(self, layer: int) -> Tensor:
        """``x_layer = x_0 + sum_{j < layer} (PTC_j + FTC_j)``."""
        return self.x0 + (self.ptc[:layer] + self.ftc[:layer]).sum(0)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.no_grad()
def decompose(pair: BlockPair, run: Callable[[], Any]) -> TuCoResult:
    """Run ``run()`` (a forward of the fine-tuned model) and collect PTC/FTC at every layer and position."""
    x0: list[Tensor] = []
    ptc: list[Tensor] = []
    ftc: list[Tensor] = []

    def hook(index, args, kwargs, output):
        x = _hidden_arg(args, kwargs)
        acc = _accumulator_dtype(x.dtype)
        if index == 0:
            x0.append(x.to(acc))
        y_pt = pair.base_block(index, args, kwargs).to(acc)
        y_ft = _hidden_of(output).to(acc)
        ptc.append(y_pt - x.to(acc))
        ftc.append(y_ft - y_pt)
        return None

    with pair.hooked(hook):
        run()
    if not ptc:
        raise ConfigError("the forward ran no decoder layer of the tuned model")
    return TuCoResult(x0[0], torch.stack(ptc), torch.stack(ftc))


def tuco(result: TuCoResult, last: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B,) TuCo at the positions ``last`` (B,), and the (L, B) per-layer L1 norms of PTC and FTC there."""
    rows = torch.arange(last.numel(), device=last.device)
    ptc, ftc = result.ptc[:, rows, last], result.ftc[:, rows, last]  # (L, B, H)
    i_ptc, i_ftc = ptc.sum(0).abs().sum(-1), ftc.sum(0).abs().sum(-1)
    ratio = i_ftc / (i_ptc + i_ftc).clamp_min(torch.finfo(i_ftc.dtype).tiny)
    return ratio, ptc.abs().sum(-1), ftc.abs().sum(-1)


def encode_prompts(tokenizer, prompts: list[str], chat: bool = True,
                   system_prompt: str | None = None) -> dict[str, Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` (all -100) and ``last`` (the index of each
    prompt's last token): chat-rendered like training when ``chat``, else the raw text."""
    if chat:
        ids = [render_prompt_ids(tokenizer, p, system_prompt) for p in prompts]
    else:
        ids = [tokenizer(p, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
               for p in prompts]
    width = max(len(i) for i in ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, seq in enumerate(ids):
        input_ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.full_like(input_ids, -100),
            "last": mask.sum(1) - 1}


@torch.no_grad()
def module_tuco(module: Any, batch: dict[str, Tensor], base: Any | None = None) -> tuple[TuCoResult, Tensor]:
    """TuCo decomposition of a zoo module's forward (through its adapter) on ``batch``
    (:func:`encode_prompts`); returns the result and the last-token positions in its (possibly longer:
    virtual tokens) sequence."""
    device = next(module.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    pair = BlockPair.for_module(module, base)
    was_training = module.training
    module.eval()
    try:
        result = decompose(pair, lambda: module.forward_hidden(batch))
    finally:
        module.train(was_training)
    offset = result.x0.shape[1] - batch["input_ids"].shape[1]  # virtual tokens prepended by the adapter
    return result, batch["last"] + offset


class FTCScaler:
    """The fine-tuned model with its fine-tuning component scaled: ``x_{l+1} = x_l + PTC_l + alpha FTC_l``.

        with FTCScaler(0.5).applied(BlockPair.for_module(module)):
            logits = module.model(input_ids).logits
    """

    def __init__(self, alpha: float) -> None:
        self.alpha = float(alpha)

    @contextlib.contextmanager
    def applied(self, pair: BlockPair) -> Iterator[None]:
        def hook(index, args, kwargs, output):
            y_pt = pair.base_block(index, args, kwargs)
            y_ft = _hidden_of(output)
            return _replace_hidden(output, y_pt + self.alpha * (y_ft - y_pt))

        with pair.hooked(hook):
            yield


class TuCoCallback(L.Callback):
    """Logs the mean TuCo of a fixed probe set (``tuco/mean``, and ``tuco/<i>`` per probe) every
    ``every_n_steps`` optimizer steps and at the end of fit.

    The pre-trained blocks: the module's adapter switched off (LoRA, IA3, peft...); for a module without
    one (full fine-tuning) a frozen copy of the backbone taken when fit starts (twice the memory).

    Args:
        probes: the prompts (chat-rendered like training unless ``chat`` is false).
        every_n_steps: logging period in optimizer steps.
        chat: render the probes with the chat template.
    """

    def __init__(self, probes: list[str] | None = None, every_n_steps: int = 50, chat: bool = True) -> None:
        self.probes = list(probes or ["What is 2 + 3?", "Name a colour of the sky.",
                                      "The history of the city begins in"])
        if not self.probes:
            raise ConfigError("TuCoCallback needs at least one probe prompt")
        self.every_n_steps = max(1, int(every_n_steps))
        self.chat = chat
        self._base: Any = None
        self.history: list[tuple[int, float]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        switchable = not pl_module.adapter.is_identity or hasattr(pl_module.model, "disable_adapter")
        if not switchable:
            self._base = _FrozenCopy(copy.deepcopy(pl_module.model).requires_grad_(False).eval())

    def measure(self, pl_module: Any) -> Tensor:
        batch = encode_prompts(pl_module.tokenizer, self.probes, chat=self.chat)
        result, last = module_tuco(pl_module, batch, self._base)
        return tuco(result, last)[0]

    def _log(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self.history and self.history[-1][0] == trainer.global_step:
            return  # once per optimizer step (gradient accumulation, the end of fit)
        values = self.measure(pl_module)
        self.history.append((trainer.global_step, float(values.mean())))
        metrics = {"tuco/mean": float(values.mean())}
        metrics.update({f"tuco/{i}": float(v) for i, v in enumerate(values)})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        self._log(trainer, pl_module)


class _FrozenCopy:
    """A stand-in 'module' exposing only ``.model`` (the pre-trained backbone snapshot)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
