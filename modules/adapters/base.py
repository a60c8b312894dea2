"""``Adapter``: how a backbone is wrapped, as a component any objective takes from YAML.

Adapters and objectives are two axes (DESIGN.md). An objective is a ``CausalLMModule`` subclass that
overrides ``compute_loss`` (SFT, DPO, OTR, CAFT, ...). An adapter changes how the model is wrapped and
owns, for that wrapping:

``attach(model, tokenizer) -> model``   build its parameters for this backbone, freeze what it freezes,
                                        return the model the module will hold (e.g. a ``PeftModel``)
``hidden_states(batch) -> (B, T, H)``   final hidden states at the batch's real positions
``prefill`` / ``step_embeddings``       its decoding hooks (:mod:`zoo.decoding`): virtual tokens, a
                                        cached prefix, an embedding offset
``parameter_groups(lr)``                optimizer groups with their own learning rates, or None
``export_state_dict()``                 the HF state dict to export (merged updates), or None (as is)
``export_extras(directory)``            anything beyond the HF model it needs to be rebuilt
``load_export_extras(directory)``       the inverse, used by :func:`zoo.harness.load.load_run`

Config shape::

    model:
      class_path: zoo.modules.objectives.dpo.DPOModule      # the objective
      init_args:
        model: smollm2-135m
        adapter:
          class_path: zoo.modules.adapters.LoRA               # the wrapping
          init_args: {r: 16}

The adapter is a submodule of the LightningModule (``module.adapter``): its parameters move, cast,
checkpoint and switch train/eval mode with the module. It holds the backbone by plain reference (not
as a submodule), so no parameter is registered twice.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from zoo import backbone
from zoo.decoding import Prefill, position_ids_from_mask


def outermost_init_args(obj: object) -> dict[str, Any]:
    """The arguments of the outermost ``__init__`` running on ``obj`` (keyword form, ``**kwargs`` flattened):
    exactly what the caller passed, not what intermediate classes pass to their parents. Call it from an
    ``__init__``."""
    frame, outer = inspect.currentframe(), None
    while frame is not None:
        if frame.f_code.co_name == "__init__" and frame.f_locals.get("self") is obj:
            outer = frame
        frame = frame.f_back
    if outer is None:
        return {}
    info = inspect.getargvalues(outer)
    args = {name: info.locals[name] for name in info.args[1:]}
    if info.keywords:
        args.update(info.locals[info.keywords])
    return args


def final_hidden_states(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """(B, T, H) final (normed) hidden states of ``model``'s own forward at the batch's real positions,
    captured at the decoder's output; the LM head is skipped (``logits_to_keep`` = no position)."""
    captured: list[Tensor] = []

    def grab(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = backbone.decoder(model).register_forward_hook(grab)
    try:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
              logits_to_keep=batch["input_ids"].new_zeros(0))
    finally:
        handle.remove()
    return captured[-1][:, -batch["input_ids"].shape[1]:]


class Adapter(nn.Module):
    """The identity adapter (plain fine-tuning of whatever the objective trains); the base of all others."""

    def __init__(self) -> None:
        super().__init__()
        self._init_args = outermost_init_args(self)
        self._model_ref: list[nn.Module] = []
        self.tokenizer: Any = None

    # ------------------------------------------------------------------ identity
    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": ...}``: what rebuilds this adapter (YAML shape)."""
        cls = type(self)
        return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(self._init_args)}

    @property
    def model(self) -> nn.Module:
        """The backbone this adapter is attached to (a plain reference, not a registered submodule)."""
        if not self._model_ref:
            raise RuntimeError(f"{type(self).__name__} is not attached to a backbone yet")
        return self._model_ref[0]

    # ------------------------------------------------------------------ construction
    def attach(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        """Build this adapter's parameters for ``model`` and return the model the module will hold."""
        self.bind(model, tokenizer)
        return model

    def bind(self, model: nn.Module, tokenizer: Any) -> None:
        """Remember the backbone (by reference) and tokenizer; subclasses call this from ``attach``."""
        self._model_ref[:] = [model]
        self.tokenizer = tokenizer

    # ------------------------------------------------------------------ forward
    def hidden_states(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T, H) final hidden states at the real positions. Default: the model's own forward."""
        return final_hidden_states(self.model, batch)

    # ------------------------------------------------------------------ decoding hooks (zoo.decoding)
    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Prefill:
        embeds = self.model.get_input_embeddings()(input_ids)
        return Prefill(embeds, attention_mask, position_ids_from_mask(attention_mask), None)

    def step_embeddings(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)

    # ------------------------------------------------------------------ switching off
    @property
    def is_identity(self) -> bool:
        """True for the plain :class:`Adapter` (nothing attached)."""
        return type(self) is Adapter

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the backbone as if this adapter were not attached (e.g. DPO's reference = the frozen base).
        Adapters that cannot be switched off raise :class:`NotImplementedError`."""
        raise NotImplementedError(f"{type(self).__name__} cannot be switched off")
        yield

    @contextmanager
    def switched_off(self) -> Iterator[None]:
        """``disabled()`` for adapters whose hooks check ``self.enabled`` (DSEE, parallel adapters)."""
        previous, self.enabled = getattr(self, "enabled", True), False
        try:
            yield
        finally:
            self.enabled = previous

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self, lr: float) -> list[dict[str, Any]] | None:
        """Optimizer groups with their own settings (``{"params": [...], "lr": ..., "name": ...}``), or None
        for the objective's default grouping of every trainable parameter."""
        return None

    def trainable_count(self) -> int | None:
        """The trainable-parameter figure the method's paper reports, when it differs from the live count
        (e.g. prefixes counted after the re-parameterisation MLP is dropped); None: the live count."""
        return None

    # ------------------------------------------------------------------ export
    def export_state_dict(self) -> dict[str, Tensor] | None:
        """The HF state dict to write (e.g. updates merged into the weights), or None for the model's own."""
        return None

    def export_extras(self, directory: Path) -> None:
        """Write what the HF export lacks for this adapter (e.g. ``adapter.safetensors``)."""

    def load_export_extras(self, directory: Path) -> None:
        """Load what :meth:`export_extras` wrote (the module was rebuilt from its config first)."""

    @property
    def exports_backbone(self) -> bool:
        """Whether the HF export carries trained backbone weights (then a reload starts from the export)."""
        return True
