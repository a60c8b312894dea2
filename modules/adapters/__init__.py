"""Backbone adapters: how a model is wrapped, a component any objective takes from YAML (``adapter:``)."""

from zoo.modules.adapters.base import Adapter
from zoo.modules.adapters.peft import IA3, LoRA, Peft

__all__ = ["IA3", "Adapter", "LoRA", "Peft"]
