"""Fine-tuning methods: LightningModules, Callbacks and losses, one file per method."""

from zoo.modules.base import CausalLMModule, StepOutputs, TokenSelector
from zoo.modules.peft_module import PeftModule

__all__ = ["CausalLMModule", "PeftModule", "StepOutputs", "TokenSelector"]
