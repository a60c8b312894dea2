"""``PeftModule``: any `peft <https://github.com/huggingface/peft>`_ config from YAML on ``CausalLMModule``.

LoRA, IA3, prompt tuning, prefix tuning, ... : ``peft_config`` is the dict ``peft.get_peft_config``
takes (``peft_type`` plus that method's fields); ``task_type`` defaults to ``CAUSAL_LM``. The
export is the adapter (``adapter_config.json`` + weights) with the tokenizer, loadable with
``peft.AutoPeftModelForCausalLM``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from zoo.errors import ConfigError
from zoo.modules.base import CausalLMModule
from zoo.registry import register


class PeftModule(CausalLMModule):
    """SFT through a peft adapter; everything else (selectors, harness, export) as CausalLMModule."""

    def __init__(self, peft_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """
        Args:
            peft_config: a peft config as a dict, e.g. ``{peft_type: LORA, r: 16, lora_alpha: 32,
                target_modules: all-linear}``. Default: LoRA r=16 on all linear layers.
            **kwargs: the CausalLMModule arguments (model, lr, ...).
        """
        self._peft_config = dict(peft_config or {"peft_type": "LORA", "r": 16, "lora_alpha": 32,
                                                 "lora_dropout": 0.0, "target_modules": "all-linear"})
        super().__init__(**kwargs)

    def configure_backbone(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_config, get_peft_model

        config = {"task_type": "CAUSAL_LM", **self._peft_config}
        if "peft_type" not in config:
            raise ConfigError("peft_config needs a peft_type (LORA, IA3, PROMPT_TUNING, PREFIX_TUNING, ...)")
        config["peft_type"] = str(config["peft_type"]).upper()
        try:
            peft_config = get_peft_config(config)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"invalid peft_config {self._peft_config}: {err}") from err
        return get_peft_model(model, peft_config)


register(
    name="lora",
    kind="module",
    paper="LoRA: Low-Rank Adaptation of Large Language Models (2021), via peft (baseline)",
    spec="",
    config="configs/lora.yaml",
    target="zoo.modules.peft_module:PeftModule",
)
