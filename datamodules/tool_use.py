"""``ToolUseDataModule``: a built-in, deterministic tool-use SFT task (JSON function calls).

Every record offers a few tool schemas in the user message (the gold tool plus similarly named
ones, e.g. ``get_weather`` / ``get_forecast`` / ``get_time``), then a request; the target is one JSON
call ``{"name": ..., "arguments": {...}}``. A fraction of the TRAINING dialogues (``error_rate``)
first show a wrong call (misspelled tool, unknown or missing argument), the tool's error message,
and then the corrected call: the TL-Training MAE filter (``filter_error_turns``) drops the wrong
turns, keeping the corrected one with the full history as context. Validation and test records are
clean single-turn requests, so the harness prompt is exactly the training context.

Batches carry the usual SFT keys plus ``key_tokens`` (B, T): 1 on TL-Training's tool-name key
tokens, 2 on the first token of each argument key, 0 elsewhere (see
:mod:`zoo.modules.token_level.tl_training`). Metrics: ``tool_name_match``, ``arguments_match`` (parsed
JSON equality), ``exact_match`` (both) and the IRM ``reward``.

``dataset`` other than ``tool_use`` falls back to :class:`SFTDataModule` sources (``key_tokens`` all 0).
"""

from __future__ import annotations

import json
import random
from typing import Any

import torch

from zoo.datamodules.sft import (
    SEGMENT_ANSWER,
    SEGMENT_PROMPT,
    DataError,
    EncodedDataset,
    SFTDataModule,
    collate,
    fit_length,
)
from zoo.datamodules.tool_calls import (
    KEY_ARGUMENT,
    KEY_TOOL_NAME,
    TLErrorTurnFilter,
    key_char_offsets,
    parse_call,
    token_at_char,
    tool_call_reward,
)
from zoo.kernels.selected_ce import IGNORE_INDEX

TASK_NAME = "tool_use"
_CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Quito", "Rome", "Seoul", "Berlin", "Nairobi",
           "Austin"]
_TOPICS = ["solar panels", "chess openings", "jazz history", "volcanoes", "bread recipes", "electric cars",
           "honey bees", "marathon training", "the moon landing", "coral reefs"]
_CURRENCIES = ["USD", "EUR", "JPY", "GBP", "INR", "BRL"]
_UNITS = [("km", "miles"), ("kg", "pounds"), ("liters", "gallons"), ("meters", "feet")]
_PEOPLE = ["ana@example.com", "li@example.com", "sam@example.com", "noor@example.com"]
_SUBJECTS = ["lunch", "the report", "tickets", "the budget", "holiday plans"]
_LABELS = ["gym", "meeting", "medicine", "call mom", "wake up"]

#: name -> (parameter schema shown in the prompt, argument sampler, request templates)
TOOLS: dict[str, tuple[dict[str, str], Any, tuple[str, ...]]] = {
    "get_weather": ({"city": "string", "unit": "celsius|fahrenheit"},
                    lambda r: {"city": r.choice(_CITIES), "unit": r.choice(["celsius", "fahrenheit"])},
                    ("What's the weather in {city} in {unit}?",
                     "Current weather for {city}, please, in {unit}.")),
    "get_forecast": ({"city": "string", "days": "integer"},
                     lambda r: {"city": r.choice(_CITIES), "days": r.randint(2, 7)},
                     ("Give me the {days}-day forecast for {city}.",
                      "Forecast for {city} over the next {days} days?")),
    "get_time": ({"city": "string"}, lambda r: {"city": r.choice(_CITIES)},
                 ("What time is it in {city}?", "Tell me the local time in {city}.")),
    "get_timezone": ({"city": "string"}, lambda r: {"city": r.choice(_CITIES)},
                     ("Which timezone is {city} in?", "What is the time zone of {city}?")),
    "search_web": ({"query": "string"}, lambda r: {"query": r.choice(_TOPICS)},
                   ("Search the web for {query}.", "Look up {query} online.")),
    "search_news": ({"query": "string", "days": "integer"},
                    lambda r: {"query": r.choice(_TOPICS), "days": r.randint(1, 14)},
                    ("Find news about {query} from the last {days} days.",
                     "Any news on {query} in the past {days} days?")),
    "search_images": ({"query": "string"}, lambda r: {"query": r.choice(_TOPICS)},
                      ("Find pictures of {query}.", "Show me images of {query}.")),
    "convert_currency": ({"amount": "number", "source": "string", "target": "string"},
                         lambda r: dict(zip(("amount", "source", "target"),
                                            (r.randint(5, 500), *r.sample(_CURRENCIES, 2)))),
                         ("Convert {amount} {source} to {target}.",
                          "How much is {amount} {source} in {target}?")),
    "convert_units": ({"value": "number", "from_unit": "string", "to_unit": "string"},
                      lambda r: dict(zip(("value", "from_unit", "to_unit"),
                                         (r.randint(1, 100), *r.choice(_UNITS)))),
                      ("How many {to_unit} is {value} {from_unit}?",
                       "Convert {value} {from_unit} into {to_unit}.")),
    "set_alarm": ({"time": "HH:MM", "label": "string"},
                  lambda r: {"time": f"{r.randint(5, 11):02d}:{r.choice([0, 15, 30, 45]):02d}",
                             "label": r.choice(_LABELS)},
                  ("Set an alarm at {time} called {label}.", "Wake me at {time}, label it {label}.")),
    "set_timer": ({"minutes": "integer"}, lambda r: {"minutes": r.randint(1, 90)},
                  ("Start a {minutes} minute timer.", "Set a timer for {minutes} minutes.")),
    "send_email": ({"to": "string", "subject": "string"},
                   lambda r: {"to": r.choice(_PEOPLE), "subject": r.choice(_SUBJECTS)},
                   ("Email {to} with the subject {subject}.", "Send an email to {to} about {subject}.")),
}


def render_call(name: str, arguments: dict[str, Any]) -> str:
    """The target text: ``{"name": ..., "arguments": {...}}`` (json.dumps, key order kept)."""
    return json.dumps({"name": name, "arguments": arguments})


def _family(name: str) -> str:
    return name.split("_")[0]


def _offered_tools(rng: random.Random, gold: str, num_tools: int) -> list[str]:
    similar = [n for n in TOOLS if n != gold and _family(n) == _family(gold)]
    others = [n for n in TOOLS if n != gold and _family(n) != _family(gold)]
    rng.shuffle(similar)
    rng.shuffle(others)
    offered = [gold] + (similar + others)[: num_tools - 1]
    rng.shuffle(offered)
    return offered


def _user_message(offered: list[str], request: str) -> str:
    lines = ["Tools:"] + [json.dumps({"name": n, "parameters": TOOLS[n][0]}) for n in offered]
    lines += ['Reply with one JSON call {"name": ..., "arguments": {...}}.', f"Request: {request}"]
    return "\n".join(lines)


def _wrong_call(rng: random.Random, name: str, arguments: dict[str, Any]) -> tuple[str, str]:
    """A wrong call and the tool's error message (each message matches an MAE error signature)."""
    kind = rng.choice(["name", "keyword", "missing"] if len(arguments) > 1 else ["name", "keyword"])
    if kind == "name":
        wrong = name.replace("_", "", 1)
        return render_call(wrong, arguments), f"NameError: name '{wrong}' is not defined"
    if kind == "keyword":
        key = rng.choice(list(arguments))
        bad = {("place" if k == key else k): v for k, v in arguments.items()}
        return render_call(name, bad), f"TypeError: {name}() got an unexpected keyword argument 'place'"
    key = list(arguments)[-1]
    partial = {k: v for k, v in arguments.items() if k != key}
    return render_call(name, partial), f"TypeError: {name}() missing 1 required positional argument: '{key}'"


def generate_tool_records(size: int, seed: int, num_tools: int = 4, error_rate: float = 0.0,
                          exclude: set[str] | frozenset[str] | None = None) -> list[dict]:
    """``size`` deterministic tool-use records; a fraction ``error_rate`` are error-then-correction
    dialogues. ``exclude``: prompts to skip (with it, no prompt repeats either; a skipped draw is replaced by
    the next one)."""
    rng = random.Random(seed)
    names = list(TOOLS)
    records: list[dict] = []
    seen = None if exclude is None else set(exclude)
    draws = 0
    while len(records) < size:
        draws += 1
        if draws > 100 * size + 1000:
            raise DataError(f"tool use: cannot draw {size} distinct requests; ask for fewer")
        gold = rng.choice(names)
        schema, sampler, templates = TOOLS[gold]
        arguments = sampler(rng)
        request = rng.choice(templates).format(**arguments)
        offered = _offered_tools(rng, gold, num_tools)
        prompt = _user_message(offered, request)
        response = render_call(gold, arguments)
        messages = [{"role": "user", "content": prompt}]
        if rng.random() < error_rate:
            wrong, error = _wrong_call(rng, gold, arguments)
            messages += [{"role": "assistant", "content": wrong}, {"role": "tool", "content": error}]
        messages.append({"role": "assistant", "content": response})
        if seen is not None:
            if prompt in seen:
                continue
            seen.add(prompt)
        records.append({"prompt": prompt, "response": response, "answer": response, "source": TASK_NAME,
                        "call": {"name": gold, "arguments": arguments},
                        "tools": {n: list(TOOLS[n][0]) for n in offered}, "messages": messages})
    return records


def encode_turn(tokenizer, context: list[dict[str, str]], target: str, tools: dict[str, Any] | None,
                system_prompt: str | None = None) -> dict[str, list[int]]:
    """Chat-rendered context + target + EOS with labels, segments and ``key_tokens`` codes."""
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + list(context)
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt_ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    reply = tokenizer(target, add_special_tokens=False, return_offsets_mapping=True)
    offsets = list(reply["offset_mapping"])
    codes = [0] * len(offsets)
    parsed = parse_call(target)
    if parsed is not None and tools is not None:
        name, arguments = parsed
        name_start = target.find(json.dumps(name)) + 1
        for char in key_char_offsets(name, [n for n in tools if n != name], name_start):
            index = token_at_char(offsets, char)
            if index is not None:
                codes[index] = KEY_TOOL_NAME
        args_start = target.find('"arguments"')
        for key in arguments:
            at = target.find(json.dumps(key), args_start)
            index = token_at_char(offsets, at + 1) if at >= 0 else None
            if index is not None and codes[index] == 0:
                codes[index] = KEY_ARGUMENT
    response_ids = list(reply["input_ids"]) + [tokenizer.eos_token_id]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "segments": [SEGMENT_PROMPT] * len(prompt_ids) + [SEGMENT_ANSWER] * len(response_ids),
        "key_tokens": [0] * len(prompt_ids) + codes + [0],
    }


def collate_tool_use(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """:func:`zoo.datamodules.sft.collate` plus the right-padded ``key_tokens`` codes."""
    batch = collate(rows, pad_id)
    width = batch["input_ids"].shape[1]
    batch["key_tokens"] = torch.tensor([r.get("key_tokens", [0] * len(r["input_ids"])) + [0] * (width - len(
        r["input_ids"])) for r in rows], dtype=torch.long)
    return batch


class ToolUseDataModule(SFTDataModule):
    """Tool-use SFT: JSON function calls against schemas in the prompt, with TL-Training's MAE filter."""

    def __init__(self, dataset: str = TASK_NAME, num_tools: int = 4, error_rate: float = 0.2,
                 filter_error_turns: bool = True, **kwargs: Any) -> None:
        """
        Args:
            dataset: ``tool_use`` (the built-in task) or any SFTDataModule source (then no key tokens).
            num_tools: tools offered in each prompt (the gold one plus similarly named ones first).
            error_rate: fraction of training dialogues with a wrong call, its error output, and the
                correction.
            filter_error_turns: TL-Training MAE: drop assistant turns whose tool output is an error.
            **kwargs: every SFTDataModule option (tokenizer, num_train, max_length, batch_size, ...).
        """
        kwargs.setdefault("max_length", 512)
        super().__init__(dataset=dataset, **kwargs)
        self.save_hyperparameters()
        self.turn_filter = TLErrorTurnFilter(enabled=filter_error_turns)

    def load_records(self) -> dict[str, list[dict[str, Any]]]:
        hp = self.hparams
        if hp.dataset != TASK_NAME:
            return super().load_records()
        sizes = {"train": hp.num_train, "val": hp.num_val, "test": hp.num_test}
        records, taken = {}, set()  # test, then val, then train: each exactly sized, none shared
        for split in ("test", "val", "train"):
            if sizes[split] > 0:
                offset = list(sizes).index(split)  # the split's seed: seed * 1000 + 0 / 1 / 2
                records[split] = generate_tool_records(sizes[split], hp.seed * 1000 + offset, hp.num_tools,
                                                       hp.error_rate if split == "train" else 0.0, taken)
                taken |= {r["prompt"] for r in records[split]}
        return records

    def encode_split(self, records: list[dict[str, Any]], split: str) -> EncodedDataset:
        if not records or "messages" not in records[0]:
            return super().encode_split(records, split)
        rows, truncated, dropped, filtered = [], 0, 0, 0
        limit = self.hparams.max_length
        for record in records:
            turns = self.turn_filter(record["messages"])
            filtered += sum(m["role"] == "assistant" for m in record["messages"]) - len(turns)
            for context, target in turns:
                encoded = encode_turn(self.tokenizer, context, target, record["tools"],
                                      self.hparams.system_prompt)
                row = fit_length(encoded, limit, self.hparams.overlong)
                if row is None:
                    dropped += 1
                    continue
                truncated += row is not encoded
                row["index"] = len(rows)
                rows.append(row)
        self.stats.update({f"{split}_truncated": truncated, f"{split}_dropped": dropped,
                           f"{split}_error_turns_filtered": filtered})
        if truncated or dropped or filtered:
            print(f"[zoo] data/{split}: {filtered} error turns filtered, {truncated} rows truncated, "
                  f"{dropped} dropped (max_length={limit})")
        if not rows:
            raise DataError(f"no {split} rows left after encoding ({dropped} over max_length={limit}); "
                            "raise max_length")
        return EncodedDataset(rows)

    def collate_function(self):
        return collate_tool_use

    # ------------------------------------------------------------------ harness hooks
    def score_completion(self, record: dict[str, Any], completion: str) -> dict[str, float]:
        """Tool-name match, argument match (parsed JSON equality), both, and the TL-Training IRM reward."""
        if "call" not in record:
            return super().score_completion(record, completion)
        parsed = parse_call(completion)
        gold = record["call"]
        name_ok = parsed is not None and parsed[0] == gold["name"]
        args_ok = parsed is not None and parsed[1] == gold["arguments"]
        return {"exact_match": float(name_ok and args_ok), "tool_name_match": float(name_ok),
                "arguments_match": float(args_ok),
                "reward": tool_call_reward(completion, gold, record["tools"])}
