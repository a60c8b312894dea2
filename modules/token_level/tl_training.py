"""TL-Training (faithful core): error-turn filtering and prioritised key tokens for tool-use SFT.

Paper: TL-Training: A Task-Feature-Based Framework for Training Large Language Models in Tool Use
(2024, arXiv 2412.15495; EMNLP 2025). Spec: papers/11-tl-training.md. Official code: Junjie-Ye/TL-Training.

Implements
    * MAE, the data filter (:class:`TLErrorTurnFilter`, used by :class:`zoo.datamodules.tool_use.
      ToolUseDataModule` through its ``filter_error_turns`` option): every dialogue becomes one sample
      per assistant turn (earlier turns are prompt), and a turn whose following tool output matches an
      error signature (lower-cased, non-alphanumerics stripped on both sides, substring match) is
      dropped; the final turn is kept. It is a data-side filter rather than a callback that zero-weights
      rows, because a dropped turn must also not become context padding of a wasted row, and the
      harness then counts the filtered data set exactly;
    * PKT, the key-token weighting (:class:`TLKeyTokenWeightCallback`, a TokenSelector): key tokens are
      (a) the first token of the called tool's name and (b) for every other tool offered in the prompt,
      the token where the gold name first diverges from it (longest common prefix; a zero prefix
      collapses to (a); a gold name that is a prefix of the other diverges at the token after it). With
      ``N_key`` key and ``N_other`` other target tokens of an example, key tokens
      get ``min(N_other / N_key, max_weight)`` when ``N_key < N_other`` (else 1), all others 1, and the
      loss is ``sum w CE / sum w`` (set the module's ``reduction: weight_mean``, as the config does).
      The datamodule marks the positions (batch key ``key_tokens``: 1 tool-name key, 2 first token of
      an argument key); argument keys keep weight 1 as in the released code unless
      ``include_argument_keys=True`` (an extension, off by default);
    * IRM's reward table (:func:`tool_call_reward`) exactly as the spec lists it, for harness scoring or
      offline best-of-n; the parser reads our JSON calls and the paper's ``name(key='value')`` form.

Differs from the official code
    * calls are JSON objects ``{"name": ..., "arguments": {...}}`` (the zoo's tool-use task), so (a) is
      the first token of the name value, not the first token of the reply (``{``): in the paper's
      ``name(args)`` format the two coincide;
    * positions come from character offsets of explicit spans (any tokenizer, any batch size, every
      assistant turn), not CodeLlama SentencePiece string matching; the divergence token is the token
      holding the first differing character;
    * the reward parser also accepts double-quoted and bare (number, true/false) values; values compare
      as parsed Python values.

Layout: the data-side pieces (MAE filter, key positions, call parser, IRM reward) live in
:mod:`zoo.datamodules.tool_calls`, which the data module uses without importing this method; they are
re-exported here. This file holds the PKT weighting callback.

Not implemented: the PPO stage of IRM (actor/critic/reference models, KL penalty, generation); the
zoo has no PPO module, so only its reward function is provided. ToolAlpaca/RoTBench/BFCL/ToolEyes
benchmarks need external data.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from zoo.datamodules.tool_calls import (
    ERROR_SIGNATURES,
    KEY_ARGUMENT,
    KEY_NONE,
    KEY_TOOL_NAME,
    TOOL_OUTPUT_ROLES,
    TLErrorTurnFilter,
    common_prefix,
    key_char_offsets,
    normalise_for_match,
    parse_call,
    token_at_char,
    tool_call_reward,
)
from zoo.modules.base import StepOutputs, target_mask
from zoo.registry import register

__all__ = [  # the data-side pieces live in zoo.datamodules.tool_calls; re-exported for one import
    "ERROR_SIGNATURES", "KEY_ARGUMENT", "KEY_NONE", "KEY_TOOL_NAME", "TOOL_OUTPUT_ROLES", "TLErrorTurnFilter",
    "TLKeyTokenWeightCallback", "common_prefix", "key_char_offsets", "key_token_weights",
    "normalise_for_match", "parse_call", "token_at_char", "tool_call_reward",
]


def key_token_weights(key_mask: Tensor, target: Tensor, max_weight: float) -> Tensor:
    """(B, T) weights: ``min(N_other / N_key, max_weight)`` on key targets when ``N_key < N_other``, else 1.

    ``key_mask`` and ``target`` are (B, T) bool; counts are per example over target tokens.
    """
    key = key_mask & target
    n_key = key.sum(1, keepdim=True).double()
    n_other = (target & ~key).sum(1, keepdim=True).double()
    factor = torch.where(n_key < n_other, (n_other / n_key.clamp_min(1)).clamp(max=max_weight),
                         torch.ones_like(n_key))
    return torch.where(key, factor, torch.ones_like(factor)).float()


class TLKeyTokenWeightCallback(Callback):
    """TL-Training PKT: up-weight the tool-name key tokens of each target call."""

    def __init__(self, max_weight: float = 9.0, include_argument_keys: bool = False) -> None:
        """
        Args:
            max_weight: cap w_max on the key-token weight (paper/repo 9).
            include_argument_keys: also weight the first token of each argument key (extension; the
                released code locates them but keeps weight 1).
        """
        super().__init__()
        if max_weight < 1:
            raise ValueError(f"max_weight must be >= 1, got {max_weight}")
        self.max_weight, self.include_argument_keys = max_weight, include_argument_keys
        self._warned = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        reduction = getattr(pl_module.hparams, "reduction", None)
        if reduction != "weight_mean":
            rank_zero_warn(f"TL-Training's PKT loss is sum(w * CE) / sum(w): set the module's reduction to "
                           f"weight_mean (it is {reduction!r})")

    def select(self, module: L.LightningModule, batch: dict[str, Tensor], outputs: StepOutputs) -> Tensor:
        """TokenSelector hook: (B, T) key-token weights (1 where a batch has no ``key_tokens``)."""
        target = target_mask(batch["labels"])
        codes = batch.get("key_tokens")
        if codes is None:
            if not self._warned:
                rank_zero_warn("TLKeyTokenWeightCallback: batches have no 'key_tokens' (use "
                               "ToolUseDataModule); training without key-token weights")
                self._warned = True
            return torch.ones_like(target, dtype=torch.float32)
        key = codes == KEY_TOOL_NAME
        if self.include_argument_keys:
            key = key | (codes == KEY_ARGUMENT)
        return key_token_weights(key, target, self.max_weight)


register(
    name="tl_training",
    kind="callback",
    paper="TL-Training: A Task-Feature-Based Framework for Training Large Language Models in Tool Use (2024)",
    spec="11",
    config="configs/tl_training.yaml",
    target="zoo.modules.token_level.tl_training:TLKeyTokenWeightCallback",
    scope="MAE filter + PKT weighting + IRM reward function; the PPO stage of IRM is not implemented",
)
