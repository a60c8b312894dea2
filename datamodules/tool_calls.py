"""Tool calls on the data side: parsing, TL-Training's error-turn filter, key-token positions, IRM reward.

Paper: TL-Training (2024, arXiv 2412.15495), spec papers/11-tl-training.md; the method itself (the PKT
key-token weighting callback) is :mod:`zoo.modules.token_level.tl_training`. What lives here is what a data
module needs without the method: :class:`zoo.datamodules.tool_use.ToolUseDataModule` splits dialogues with
:class:`TLErrorTurnFilter` (MAE), marks key positions with :func:`key_char_offsets` / :func:`token_at_char`
(batch key ``key_tokens``: :data:`KEY_TOOL_NAME`, :data:`KEY_ARGUMENT`) and scores completions with
:func:`parse_call` and :func:`tool_call_reward` (IRM's reward table).
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from typing import Any

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
    """IRM reward of a generated call against ``gold = {"name", "arguments"}``; ``tools``: name -> parameter
    keys."""
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
