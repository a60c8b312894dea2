"""Backbone adapters: how a model is wrapped, a component any objective takes from YAML (``adapter:``)."""

from zoo.modules.adapters.base import Adapter
from zoo.modules.adapters.peft import IA3, LoRA, Peft
from zoo.modules.prompting.apt import APT
from zoo.modules.prompting.iapt import IAPT

__all__ = ["IA3", "Adapter", "LoRA", "Peft"]
__all__ += ["APT", "IAPT"]
