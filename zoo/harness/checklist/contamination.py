"""Data hygiene: word n-gram overlap between training DataModules' train splits and every eval set."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from zoo.errors import ConfigError
from zoo.harness.checklist.base import EvalItem

# words as the judges normalise them (case folded, punctuation dropped), except that an arithmetic operator
# stays on the word it precedes: "1 + 5 =" ("1", "+5") and "1 - 5 =" ("1", "-5") are different problems
_WORD = re.compile(r"(?:[+\-*/×÷^%]\s*)?[^\W_]+")


def words(text: str) -> list[str]:
    return ["".join(word.split()) for word in _WORD.findall(text.lower())]


def normalize(text: str) -> str:
    return " ".join(words(text))


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def template_ngrams(items: list[str], n: int, min_items: int = 3) -> set[tuple[str, ...]]:
    """The eval set's own format: ``n``-grams found in more than half of its items (and in at least
    ``min_items``), e.g. an instruction every prompt starts with. A leaked problem's n-grams are its own, so
    they are never here."""
    counts = Counter(gram for text in items for gram in ngrams(text, n))
    return {gram for gram, count in counts.items() if count >= min_items and count > len(items) / 2}


def content(tokens: list[str], template: set[tuple[str, ...]], n: int) -> tuple[set[tuple[str, ...]], str]:
    """(the ``n``-grams of ``tokens`` that touch no word of a template n-gram, the words outside the template
    joined): what is left of an item once its format is taken away. An n-gram straddling the format and
    the problem would flag two problems that only share their first few words."""
    covered = [False] * len(tokens)
    for i in range(len(tokens) - n + 1):
        if tuple(tokens[i : i + n]) in template:
            covered[i : i + n] = [True] * n
    grams = {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1) if not any(covered[i : i + n])}
    return grams, " ".join(t for t, c in zip(tokens, covered) if not c)


def contamination(
    train: dict[str, list[str]], evals: dict[str, list[str]], n: int = 13
) -> list[dict[str, Any]]:
    """For every (training set, eval set) pair: the eval items sharing a word ``n``-gram with the training
    texts, or, when fewer than ``n`` words remain, whose words equal a training text's (normalised). The
    eval set's shared format (:func:`template_ngrams`, e.g. an instruction in every prompt) is taken out of
    both sides first (:func:`content`): it is not a leaked problem. Texts are normalised like the judges
    (case, punctuation, whitespace), except that an operator stays on its operand (:func:`words`). Returns
    one row per pair with the flagged item indices."""
    rows = []
    for train_name, texts in train.items():
        grams: set[tuple[str, ...]] = set()
        whole = set()
        for text in texts:
            grams |= ngrams(text, n)
            whole.add(normalize(text))
        for eval_name, items in evals.items():
            template = template_ngrams(items, n)
            rests = whole | {content(words(t), template, n)[1] for t in texts} if template else whole
            flagged = []
            for i, text in enumerate(items):
                own, rest = content(words(text), template, n)
                if (own & grams) if own else (rest in rests or normalize(text) in whole):
                    flagged.append(i)
            rows.append(
                {
                    "train": train_name,
                    "eval": eval_name,
                    "n": n,
                    "items": len(items),
                    "flagged": len(flagged),
                    "flagged_items": flagged,
                    "rate": len(flagged) / max(len(items), 1),
                }
            )
    return rows


def train_texts(datamodule) -> list[str]:
    """Prompt and response texts of a DataModule's train split (``load_records()``), fields kept apart."""
    if not hasattr(datamodule, "load_records"):
        raise ConfigError(f"{type(datamodule).__name__} has no load_records(): cannot read its train split")
    texts = []
    for record in datamodule.load_records().get("train", []):
        texts += [str(record[k]) for k in ("prompt", "response") if record.get(k)]
    return texts


def eval_texts(result_items: dict[str, list[EvalItem]]) -> dict[str, list[str]]:
    """The eval sets' prompts (what a contaminated model would have seen), one list per task."""
    return {task: [i.prompt for i in items] for task, items in result_items.items()}


def datamodule_from_config(path: str, overrides: dict[str, Any] | None = None):
    """The data block of a method config (``data:`` inline or a path beside the config), instantiated."""
    import importlib
    from pathlib import Path

    import yaml

    config_path = Path(path)
    config = yaml.safe_load(config_path.read_text()) or {}
    data = config.get("data")
    if isinstance(data, str):
        data = yaml.safe_load((config_path.parent / data).read_text())
    if not isinstance(data, dict) or "class_path" not in data:
        raise ConfigError(f"{path}: no data block with a class_path")
    module_name, _, cls = data["class_path"].rpartition(".")
    data_class = getattr(importlib.import_module(module_name or "zoo.datamodules"), cls)
    return data_class(**{**(data.get("init_args") or {}), **(overrides or {})})
