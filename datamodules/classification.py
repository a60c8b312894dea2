"""``ClassificationDataModule``: classification as generation, the response is a label word.

Built-in task ``topics`` (offline, deterministic): one-sentence snippets generated from templates and
per-topic keyword lists, labelled with one of a small set of topic words (default ``sports``,
``food``, ``weather``, ``music``). Train / val / test come from disjoint seeds and every held-out
sentence is removed from train. ``shots_per_class: k`` keeps only k training examples per class
(few-shot mode, balanced, deterministic).

Other sources (a local file or hub id, as in :class:`SFTDataModule`) work too: the label is the
``answer`` field (else the response) and the label set is the sorted set of training labels, unless
``labels`` is given.

Harness metrics (``evaluation_metrics``): ``accuracy`` and ``macro_f1`` (torchmetrics) of the first
word of each completion against the label; completions that are no label word count as wrong
(an extra "other" class that is excluded from the macro average).
"""

from __future__ import annotations

import random
import re
from typing import Any

import torch

from zoo.datamodules.sft import DataError, SFTDataModule

TOPIC_WORDS: dict[str, list[str]] = {
    "sports": ["the striker", "a goalkeeper", "the referee", "the marathon", "a tennis match", "the league",
               "the coach", "a penalty kick", "the final whistle", "the relay team"],
    "food": ["the soup", "a fresh baguette", "the chef", "a bowl of noodles", "the spicy curry",
             "the dessert",
             "a ripe mango", "the bakery", "the grilled fish", "a cheese platter"],
    "weather": ["the thunderstorm", "a cold front", "the morning fog", "heavy rain", "the heatwave",
                "a gusty wind", "the forecast", "light snow", "the humidity", "a clear sky"],
    "music": ["the orchestra", "a jazz trio", "the guitarist", "the new album", "a catchy chorus",
              "the drummer", "the concert hall", "a violin solo", "the choir", "the playlist"],
    "science": ["the telescope", "a chemistry lab", "the experiment", "a new vaccine", "the microscope",
                "the physicist", "a fossil record", "the particle detector", "the hypothesis", "a comet"],
}
TEMPLATES = [
    "Everyone was talking about {a} after {b} yesterday.",
    "I read a short report on {a} and {b}.",
    "{A} surprised us, and so did {b}.",
    "The article compared {a} with {b}.",
    "Last weekend {a} was the highlight, followed by {b}.",
    "Nobody expected {a} to matter as much as {b}.",
]
SPLIT_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}
INSTRUCTION = "Classify the topic of the text as one of: {labels}. Answer with one word.\nText: {text}"


def topic_records(labels: list[str], size: int, seed: int) -> list[dict[str, Any]]:
    """``size`` (prompt, response=label, answer=label) records with classes cycling in order."""
    rng = random.Random(seed)
    records = []
    for i in range(size):
        label = labels[i % len(labels)]
        a, b = rng.sample(TOPIC_WORDS[label], 2)
        text = rng.choice(TEMPLATES).format(a=a, b=b, A=a[0].upper() + a[1:])
        prompt = INSTRUCTION.format(labels=", ".join(labels), text=text)
        records.append({"prompt": prompt, "response": label, "answer": label, "label": label})
    return records


def first_word(completion: str) -> str:
    """The completion's first word, lower-cased, without punctuation."""
    match = re.search(r"[A-Za-z]+", completion)
    return match.group(0).lower() if match else ""


def classification_metrics(predictions: list[str], targets: list[str], labels: list[str]) -> dict[str, float]:
    """Accuracy and macro-F1 (over ``labels``) with torchmetrics; unknown predictions are always wrong."""
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    if not targets:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    index = {label: i for i, label in enumerate(labels)}
    other = len(labels)
    preds = torch.tensor([index.get(p, other) for p in predictions])
    target = torch.tensor([index[t] for t in targets])
    accuracy = multiclass_accuracy(preds, target, num_classes=other + 1, average="micro")
    per_class = multiclass_f1_score(preds, target, num_classes=other + 1, average="none")
    return {"accuracy": float(accuracy), "macro_f1": float(per_class[:other].mean())}


class ClassificationDataModule(SFTDataModule):
    """Classification as generation: the prompt holds the text, the response is one label word."""

    def __init__(self, dataset: str = "topics", labels: list[str] | None = None,
                 shots_per_class: int | None = None, num_train: int = 400, num_val: int = 32,
                 num_test: int = 64, max_length: int = 128, **kwargs: Any) -> None:
        """
        Args:
            dataset: ``topics`` (built-in, offline) or any SFTDataModule source with the label in ``answer``.
            labels: the label words; default for ``topics``: sports, food, weather, music.
            shots_per_class: few-shot mode: keep only k training examples per class (None: all).
            num_train: training examples generated (before few-shot selection).
            num_val: validation examples.
            num_test: test examples for the harness.
            max_length: longest rendered row, in tokens.
            **kwargs: the other SFTDataModule arguments (tokenizer, batch_size, seed, ...).
        """
        super().__init__(dataset=dataset, num_train=num_train, num_val=num_val, num_test=num_test,
                         max_length=max_length, **kwargs)
        if dataset == "topics":
            labels = list(labels or ["sports", "food", "weather", "music"])
            unknown = [label for label in labels if label not in TOPIC_WORDS]
            if unknown:
                raise DataError(f"topics has no label(s) {unknown}; choose from {sorted(TOPIC_WORDS)}")
        self.labels = list(labels) if labels else None

    def load_records(self) -> dict[str, list[dict[str, Any]]]:
        hp = self.hparams
        if hp.dataset == "topics":
            sizes = {"train": hp.num_train, "val": hp.num_val, "test": hp.num_test}
            records = {split: topic_records(self.labels, size, hp.seed * 1000 + SPLIT_SEED_OFFSET[split])
                       for split, size in sizes.items() if size > 0}
            held_out = {r["prompt"] for split in ("val", "test") for r in records.get(split, [])}
            records["train"] = [r for r in records.get("train", []) if r["prompt"] not in held_out]
        else:
            records = super().load_records()
            for rows in records.values():
                for r in rows:
                    r["label"] = str(r.get("answer") or r["response"]).strip().lower()
            if self.labels is None:
                self.labels = sorted({r["label"] for r in records["train"]})
        if hp.shots_per_class is not None:
            records["train"] = few_shot(records["train"], hp.shots_per_class)
        return records

    def score_completion(self, record: dict[str, Any], completion: str) -> dict[str, float]:
        return {"accuracy": float(first_word(completion) == record["label"])}

    def evaluation_metrics(self, records: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
        return classification_metrics([first_word(c) for c in completions], [r["label"] for r in records],
                                      self.labels or sorted({r["label"] for r in records}))


def few_shot(records: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """The first ``k`` records of every class, in the original order."""
    counts: dict[str, int] = {}
    kept = []
    for record in records:
        if counts.get(record["label"], 0) < k:
            counts[record["label"]] = counts.get(record["label"], 0) + 1
            kept.append(record)
    return kept
