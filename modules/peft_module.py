"""``PeftModule``: SFT through any `peft <https://github.com/huggingface/peft>`_ config, the shorthand for
``CausalLMModule(adapter=Peft(config))``.

LoRA, IA3, prompt tuning, prefix tuning, ... : ``peft_config`` is the dict ``peft.get_peft_config``
takes (``peft_type`` plus that method's fields); ``task_type`` defaults to ``CAUSAL_LM``. The
export is the adapter (``adapter_config.json`` + weights) with the tokenizer, loadable with
``peft.AutoPeftModelForCausalLM``. Any other objective takes the same adapter from YAML
(``adapter: {class_path: zoo.modules.adapters.LoRA, init_args: {r: 8}}``).
"""

from __future__ import annotations

from typing import Any

from zoo.modules.adapters.peft import Peft
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
        kwargs.pop("adapter", None)  # the adapter is peft_config's (a reload passes both)
        super().__init__(adapter=Peft(peft_config), **kwargs)


register(
    name="lora",
    kind="module",
    paper="LoRA: Low-Rank Adaptation of Large Language Models (2021), via peft (baseline)",
    spec="",
    config="configs/lora.yaml",
    target="zoo.modules.peft_module:PeftModule",
)
