"""Vanilla prompt tuning and prefix tuning: the two soft-prompt baselines of the prompting family.

Papers: The Power of Scale for Parameter-Efficient Prompt Tuning (Lester et al., 2021) and
Prefix-Tuning: Optimizing Continuous Prompts for Generation (Li & Liang, 2021), as used as PEFT
baselines in spec 34 (Exploring Parameter-Efficient Fine-Tuning Techniques for Code Generation, 2023).

Implements: ``PromptTuning``: m trainable input embeddings prepended to every sequence of a
frozen LM (trainable count m * H). ``PrefixTuning``: m trainable key/value vectors per layer
placed in the model's cache (trainable count L * 2 * m * kv_heads * head_dim; equals spec 34's
L * 2 * m * d for models without grouped-query attention).
Differs from the papers: prefix tuning drops the re-parameterisation MLP (as peft's default and spec
34's count do); prompt tuning initialises from sampled vocabulary embeddings (``prompt_init: vocab``)
rather than class-label words.
Both are adapters (any objective takes them: ``adapter: {class_path: zoo.modules.adapters.PromptTuning}``).
Not implemented: text initialisation from a task description; T5 encoder-side prompts.
"""

from __future__ import annotations

from zoo.modules.prompting.soft_prompt import PromptInit, SoftPromptAdapter
from zoo.registry import register


class PromptTuning(SoftPromptAdapter):
    """Prompt tuning: a frozen LM with ``num_virtual_tokens`` trainable input embeddings in front."""

    def __init__(self, num_virtual_tokens: int = 20, prompt_init: PromptInit = "vocab", init_seed: int = 0,
                 init_prompt: str | None = None) -> None:
        """
        Args:
            num_virtual_tokens: prompt length m (spec 34: 20).
            prompt_init: ``vocab`` (sampled vocabulary embeddings) or ``random`` (N(0, 0.02)).
            init_seed: seed of the prompt initialisation.
            init_prompt: a ``prompt.pt`` to start from (vanilla prompt transfer, PoT: the PANDA teacher).
        """
        super().__init__(num_virtual_tokens=num_virtual_tokens, deep=False, prompt_init=prompt_init,
                         init_seed=init_seed, init_prompt=init_prompt)


class PrefixTuning(SoftPromptAdapter):
    """Prefix tuning: ``num_virtual_tokens`` trainable key/value vectors in every attention layer."""

    def __init__(self, num_virtual_tokens: int = 10, init_seed: int = 0) -> None:
        """
        Args:
            num_virtual_tokens: prefix length m per layer (spec 34: 10).
            init_seed: seed of the prefix initialisation.
        """
        super().__init__(num_virtual_tokens=num_virtual_tokens, deep=True, init_seed=init_seed)


register(
    name="prompt_tuning",
    kind="adapter",
    paper="The Power of Scale for Parameter-Efficient Prompt Tuning (2021) (baseline)",
    spec="",
    config="configs/prompt_tuning.yaml",
    target="zoo.modules.prompting.prompt_tuning:PromptTuning",
    scope="no text/label-word initialisation",
)
register(
    name="prefix_tuning",
    kind="adapter",
    paper="Prefix-Tuning: Optimizing Continuous Prompts for Generation (2021) (baseline)",
    spec="",
    config="configs/prefix_tuning.yaml",
    target="zoo.modules.prompting.prompt_tuning:PrefixTuning",
    scope="no re-parameterisation MLP (as peft's default)",
)
