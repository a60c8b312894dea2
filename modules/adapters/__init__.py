"""Backbone adapters: how a model is wrapped, a component any objective takes from YAML (``adapter:``)."""

from zoo.modules.adapters.base import Adapter
from zoo.modules.adapters.peft import IA3, LoRA, Peft
from zoo.modules.prompting.apt import APT
from zoo.modules.prompting.dept import DePT
from zoo.modules.prompting.ept import EPT
from zoo.modules.prompting.iapt import IAPT
from zoo.modules.prompting.prompt_tuning import PrefixTuning, PromptTuning
from zoo.modules.prompting.soft_prompt import SoftPromptAdapter
from zoo.modules.sparse.dsee import DSEE
from zoo.modules.sparse.unified_adapters import MAM, ParallelAdapters, UnifiedAdapter

__all__ = ["IA3", "Adapter", "LoRA", "Peft"]
__all__ += ["DePT", "EPT", "PrefixTuning", "PromptTuning", "SoftPromptAdapter"]
__all__ += ["DSEE", "MAM", "ParallelAdapters", "UnifiedAdapter"]
__all__ += ["APT", "IAPT"]
