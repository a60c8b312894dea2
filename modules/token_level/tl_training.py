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
      collapses to (a); a gold name that is a prefix of the other diverges at the token after it). With ``N_key`` key and ``N_other`` other target tokens of an example, key tokens
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

Not implemented: the PPO stage of IRM (actor/critic/reference models, KL penalty, generation); the
zoo has no PPO module, so only its reward function is provided. ToolAlpaca/RoTBench/BFCL/ToolEyes
benchmarks need external data.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from zoo.modules.base import StepOutputs, target_mask
from zoo.registry import register

KEY_NONE, KEY_TOOL_NAME, KEY_ARGUMENT = 0, 1, 2
TOOL_OUTPUT_ROLES = ("tool", "function", "observation", "ipython")

#: Error signatures of the released code (matched after :func:`normalise_for_match`).
ERROR_SIGNATURES: tuple[str, ...] = (
    "is not defined", "positional argument", "unexpected keyword", "invalid api call", "response error",
    "400 client error", "connectionerror", "connection error", "not supported", '"error":',
)


# ---------------------------------------------------------------------------- MAE: error-turn filter
def normalise_for_match(text: str) -> str:
    """Lower-case and strip every non-alphanumeric character (the released code's normalisation)."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


class TLErrorTurnFilter:
    """Split tool-use dialogues into one sample per assistant turn, dropping turns answered by an error."""

    def __init__(self, signatures: Sequence[str] = ERROR_SIGNATURES, enabled: bool = True) -> None:
        """
        Args:
            signatures: error substrings searched in the tool output that follows an assistant turn.
            enabled: False keeps every turn (plain per-turn splitting, the no-MAE ablation).
        """
        self.signatures = tuple(normalise_for_match(s) for s in signatures)
        self.enabled = enabled

    def is_error(self, text: str) -> bool:
        """True if a tool output matches an error signature."""
        normalised = normalise_for_match(text)
        return any(sig and sig in normalised for sig in self.signatures)

    def __call__(self, messages: Sequence[dict[str, str]]) -> list[tuple[list[dict[str, str]], str]]:
        """``(context messages, target assistant text)`` per kept assistant turn, in dialogue order."""
        samples = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            following = messages[i + 1] if i + 1 < len(messages) else None
            if (self.enabled and following is not None and following["role"] in TOOL_OUTPUT_ROLES
                    and self.is_error(following["content"])):
                continue
            samples.append((list(messages[:i]), message["content"]))
        return samples


# ---------------------------------------------------------------------------- PKT: key tokens
def common_prefix(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def key_char_offsets(gold_name: str, other_names: Sequence[str], name_start: int) -> list[int]:
    """Character offsets (in the reply) of the key positions: the name start and each divergence point.

    When the gold name is a prefix of another tool's name (``get`` vs ``get_weather``) the two diverge
    right after the gold name, at the character that ends it in the reply (the closing quote of the
    JSON string; ``(`` in the paper's ``name(args)`` format): that offset is a key position too, as in
    the released code (whose common-prefix length is then the gold name's length)."""
    offsets = {name_start}
    for other in other_names:
        if other != gold_name:
            offsets.add(name_start + common_prefix(gold_name, other))
    return sorted(offsets)


def token_at_char(offsets: Sequence[tuple[int, int]], char: int) -> int | None:
    """Index of the token whose character span holds ``char`` (HF ``offset_mapping``)."""
    for index, (start, end) in enumerate(offsets):
        if start <= char < end:
            return index
    return None


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
                rank_zero_warn("TLKeyTokenWeightCallback: batches have no 'key_tokens' (use ToolUseDataModule); "
                               "training without key-token weights")
                self._warned = True
            return torch.ones_like(target, dtype=torch.float32)
        key = codes == KEY_TOOL_NAME
        if self.include_argument_keys:
            key = key | (codes == KEY_ARGUMENT)
        return key_token_weights(key, target, self.max_weight)


# ---------------------------------------------------------------------------- IRM: reward table
_PY_CALL = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*\((.*)\)\s*$", re.S)
_PY_ARG = re.compile(r"\s*(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^,]+)\s*(?:,|$)")


def parse_call(text: str) -> tuple[str, dict[str, Any]] | None:
    """``(name, arguments)`` of a JSON call ``{"name": ..., "arguments": {...}}`` or ``name(k='v', ...)``."""
    text = text.strip()
    start, end = text.find("{"), text.rfind("}")
    if start >= 0 and end > start:
        try:
            call = json.loads(text[start : end + 1])
        except json.JSONDecodeError:
            call = None
        if isinstance(call, dict) and isinstance(call.get("name"), str):
            arguments = call.get("arguments", {})
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError:
                    return None
            return (call["name"], arguments) if isinstance(arguments, dict) else None
    match = _PY_CALL.match(text)
    if match is None:
        return None
    name, body = match.group(1), match.group(2).strip()
    arguments: dict[str, Any] = {}
    position = 0
    while position < len(body):
        arg = _PY_ARG.match(body, position)
        if arg is None:
            return None
        try:
            arguments[arg.group(1)] = ast.literal_eval(arg.group(2).strip())
        except (ValueError, SyntaxError):
            arguments[arg.group(1)] = arg.group(2).strip()
        position = arg.end()
    return name, arguments


def tool_call_reward(generated: str, gold: dict[str, Any], tools: dict[str, Sequence[str]]) -> float:
    """IRM reward of a generated call against ``gold = {"name", "arguments"}``; ``tools``: name -> parameter keys."""
    parsed = parse_call(generated)
    if parsed is None or parsed[0] not in tools:
        return -2.0
    name, arguments = parsed
    if name != gold["name"]:
        return -1.5
    schema, gold_args = set(tools[name]), gold.get("arguments", {})
    keys = set(arguments)
    hallucinated = bool(keys - schema)
    redundant = bool((keys & schema) - set(gold_args))
    missing = bool(set(gold_args) - keys)
    if hallucinated and redundant and missing:
        return -1.8
    if hallucinated and (redundant or missing):
        return -1.3
    if redundant and missing:
        return -1.0
    if hallucinated:
        return -0.8
    if redundant or missing:
        return -0.5
    if any(arguments[key] != value for key, value in gold_args.items()):
        return -0.25
    return 1.0


register(
    name="tl_training",
    kind="callback",
    paper="TL-Training: A Task-Feature-Based Framework for Training Large Language Models in Tool Use (2024)",
    spec="11",
    config="configs/tl_training.yaml",
    target="zoo.modules.token_level.tl_training:TLKeyTokenWeightCallback",
    scope="MAE filter + PKT weighting + IRM reward function; the PPO stage of IRM is not implemented",
)
