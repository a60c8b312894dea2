"""Lightweight personalisation: train only the embeddings + output layer (L-EO) or only the last block
(L-LDB).

Paper: Exploring and Evaluating Personalized Models for Code Generation (2022). Spec:
    papers/07-personalized-codegen.md.

Implements: the paper's trainable-parameter presets as one parameter-mask callback (applied in
``setup``, so the optimizer, the trainable-only checkpoint and the report see the same set):
``custom`` (all parameters), ``l_eo`` (token embedding matrix + output projection, and an output
bias if the model has one; with tied embeddings that is ONE shared matrix, trained once), ``l_ldb``
(the parameters of the last decoder block ``decoder_layers(model)[-1]``; the final norm is NOT
included unless ``include_final_norm``). Prefix tuning, the paper's fourth strategy, is the peft
passthrough (``configs/peft_prefix.yaml``).
Differs: a causal decoder (SmolLM2) instead of the paper's BART-like encoder-decoder, and the task is
the zoo's default SFT data rather than per-project methods2test.
Not implemented: the per-project DataModule and the cost-vs-gain report (the harness reports
trainable parameters, time and memory per run).
"""

from __future__ import annotations

from typing import Literal

import lightning as L

from zoo import backbone
from zoo.modules.sparse.param_mask import ParameterMaskCallback, Selection, embedding_names, names_under
from zoo.registry import register

Policy = Literal["custom", "l_eo", "l_ldb"]


def policy_parameter_names(module: L.LightningModule, policy: Policy,
                           include_final_norm: bool = False) -> set[str]:
    """Names (``module.named_parameters()``) trainable under a preset."""
    names = {n for n, _ in module.named_parameters()}
    if policy == "custom":
        return names
    if policy == "l_eo":
        return embedding_names(module)
    if policy == "l_ldb":
        chosen = names_under(module, [backbone.decoder_layers(module.model)[-1]], module)
        if include_final_norm:
            body = backbone.decoder(module.model)
            norm = getattr(body, "norm", None) or getattr(body, "ln_f", None)
            if norm is not None:
                chosen |= names_under(module, [norm], module)
        return chosen
    raise ValueError(f"unknown policy {policy!r}; use custom, l_eo or l_ldb")


class FreezePolicyCallback(ParameterMaskCallback):
    """Train only the tensors of a personalisation preset (L-EO, L-LDB or all)."""

    def __init__(self, policy: Policy = "l_eo", include_final_norm: bool = False) -> None:
        """
        Args:
            policy: ``l_eo`` embeddings + output layer, ``l_ldb`` last decoder block, ``custom`` all
                parameters.
            include_final_norm: with ``l_ldb``, also train the final norm after the last block.
        """
        super().__init__()
        self.policy, self.include_final_norm = policy, include_final_norm

    def initial_selection(self, module: L.LightningModule) -> Selection:
        return Selection(trainable=policy_parameter_names(module, self.policy, self.include_final_norm))


register(
    name="personalize_embed_head",
    kind="callback",
    paper="Exploring and Evaluating Personalized Models for Code Generation (2022)",
    spec="07",
    config="configs/personalize_embed_head.yaml",
    target="zoo.modules.sparse.personalization:FreezePolicyCallback",
    scope="L-EO preset; per-project data split and cost report left out",
)
register(
    name="personalize_last_block",
    kind="callback",
    paper="Exploring and Evaluating Personalized Models for Code Generation (2022)",
    spec="07",
    config="configs/personalize_last_block.yaml",
    target="zoo.modules.sparse.personalization:FreezePolicyCallback",
    scope="L-LDB preset; per-project data split and cost report left out",
)
