"""peft adapters (LoRA, IA3, peft's prompt and prefix tuning) as a zoo :class:`Adapter`.

``Peft(config={...})`` takes any dict ``peft.get_peft_config`` takes (``peft_type`` plus that method's
fields; ``task_type`` defaults to ``CAUSAL_LM``); ``LoRA`` and ``IA3`` are the typed shorthands. The
export is peft's adapter folder (``adapter_config.json`` + weights), loadable with
``peft.AutoPeftModelForCausalLM``; peft's prompt-learning types decode through the zoo's one decoder with
their virtual tokens (prompt tuning) or prefix cache (prefix tuning) in front.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from zoo.decoding import Prefill, position_ids_from_mask
from zoo.errors import ConfigError, check_range
from zoo.modules.adapters.base import Adapter

DEFAULT_LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
                "target_modules": "all-linear"}


def build_peft_config(config: dict[str, Any]) -> Any:
    """A peft config object from a YAML dict; a bad dict is a one-line :class:`ConfigError`."""
    from peft import get_peft_config

    config = {"task_type": "CAUSAL_LM", **config}
    if "peft_type" not in config:
        raise ConfigError("peft_config needs a peft_type (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING, ...)")
    config["peft_type"] = str(config["peft_type"]).upper()
    if config["peft_type"] == "LORA":
        check_range("LoRA r", config.get("r", 8), 1, hint="the rank of the update: e.g. 8 or 16")
        check_range("LoRA lora_dropout", config.get("lora_dropout", 0.0), 0.0, 1.0, high_open=True)
    try:
        return get_peft_config(config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid peft_config {config}: {err}") from err


class Peft(Adapter):
    """Any peft adapter; the backbone is frozen by peft, the adapter's tensors train."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        """
        Args:
            config: a peft config as a dict, e.g. ``{peft_type: LORA, r: 16, lora_alpha: 32, target_modules:
                all-linear}``. Default: LoRA r=16 on all linear layers.
        """
        super().__init__()
        self.peft_dict = dict(config or DEFAULT_LORA)
        build_peft_config(self.peft_dict)  # fail at construction, with the config's own message

    def attach(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        from peft import get_peft_model

        wrapped = get_peft_model(model, build_peft_config(self.peft_dict))
        self.bind(wrapped, tokenizer)
        return wrapped

    def _prompt_learning(self) -> Any | None:
        config = self.model.active_peft_config
        return config if getattr(config, "is_prompt_learning", False) else None

    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Prefill:
        config = self._prompt_learning()
        if config is None:
            return super().prefill(input_ids, attention_mask)
        batch = input_ids.shape[0]
        embeds = self.model.get_input_embeddings()(input_ids)
        m = config.num_virtual_tokens
        ones = attention_mask.new_ones(batch, m)
        if str(config.peft_type).endswith("PREFIX_TUNING"):
            cache = self.model.get_prompt(batch)
            full = torch.cat([ones, attention_mask], 1)
            positions = position_ids_from_mask(full)[:, m:]
            return Prefill(embeds, full, positions, cache)
        prompt = self.model.get_prompt(batch).to(embeds.dtype)
        full = torch.cat([ones, attention_mask], 1)
        return Prefill(torch.cat([prompt, embeds], 1), full, position_ids_from_mask(full), None)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        with self.model.disable_adapter():
            yield

    @property
    def exports_backbone(self) -> bool:
        return False


class LoRA(Peft):
    """LoRA through peft: ``W + (alpha / r) B A`` on the target linear layers."""

    def __init__(self, r: int = 16, lora_alpha: float = 32, lora_dropout: float = 0.0,
                 target_modules: str | list[str] = "all-linear") -> None:
        """
        Args:
            r: rank of the update.
            lora_alpha: scaling numerator (update scaled by lora_alpha / r).
            lora_dropout: dropout on the LoRA input.
            target_modules: module names to adapt, or ``all-linear``.
        """
        super().__init__({"peft_type": "LORA", "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
                          "target_modules": target_modules})


class IA3(Peft):
    """IA3 through peft: learned rescaling vectors on keys, values and the FFN."""

    def __init__(self, target_modules: list[str] | None = None,
                 feedforward_modules: list[str] | None = None) -> None:
        """
        Args:
            target_modules: modules whose activations are rescaled (default peft's per-architecture choice).
            feedforward_modules: the subset of ``target_modules`` that are feed-forward layers.
        """
        config: dict[str, Any] = {"peft_type": "IA3"}
        if target_modules is not None:
            config["target_modules"] = target_modules
        if feedforward_modules is not None:
            config["feedforward_modules"] = feedforward_modules
        super().__init__(config)
