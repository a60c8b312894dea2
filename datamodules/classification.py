"""``ClassificationDataModule``: classification as generation, the response is a label word.

Built-in task ``topics`` (offline, deterministic): one-sentence snippets generated from templates and
per-topic keyword lists, labelled with one of a small set of topic words (default ``sports``,
``food``, ``weather``, ``music``). Train / val / test come from disjoint seeds, exactly sized, and no
sentence is in two splits (drawn test, then val, then train; a repeat is redrawn). ``shots_per_class: k``
keeps only k training examples per class (few-shot mode, balanced, deterministic).

Other sources (a local file or hub id, as in :class:`SFTDataModule`) work too: the label is the
``answer`` field (else the response) and the label set is the sorted set of training labels, unless
``labels`` is given.

Harness metrics (``evaluation_metrics``): ``accuracy`` and ``macro_f1`` (torchmetrics) of the first
word of each completion against the label; completions that are no label word count as wrong
(an extra "other" class that is excluded from the macro average).

Few-shot classification (issue 14)
    Built-in tasks of :mod:`zoo.datamodules.fewshot_tasks` (``sentiment_hard``, ``science_topics``,
    ``sectors``; the last is multi-label). ``sampling`` picks the k-shot training set
    (:func:`sample_few_shot`:
    ``first`` k per class (the old behaviour), ``equal`` k per class at random, ``stratified`` k*C keeping
    the label proportions, ``random`` k*C uniformly); ``val_shots_per_class`` draws the validation set from
    the rest of the training pool (disjoint from train), ``num_unlabeled`` keeps that many further pool texts
    as an ``unlabeled`` split (labels removed; :meth:`ClassificationDataModule.unlabeled_dataloader`).
    Every record has ``text`` (the input alone) and its rendered ``prompt``; :meth:`prompt_for` renders any
    text with the task's pattern (content-free inputs for calibration: :meth:`content_free_prompts`).
    Batches carry ``class_index`` (B,) (-1: a label outside ``labels``, ignored by the classification loss),
    ``text`` and ``prompt_text`` (lists of strings: the input alone and with the task's pattern) and, for
    multi-label data, ``targets`` (B, C) multi-hot; :meth:`pos_weight` gives BCE's per-class
    ``(N - n_c) / n_c`` over the training split.
"""

from __future__ import annotations

import random
import re
from typing import Any, Literal

import torch

from zoo.datamodules import fewshot_tasks
from zoo.datamodules.sft import DataError, SFTDataModule, collate

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


def topic_records(labels: list[str], size: int, seed: int,
                  exclude: set[str] | frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """``size`` (prompt, response=label, answer=label) records with classes cycling in order, no prompt twice
    and none in ``exclude`` (a repeat is redrawn for the same class)."""
    rng = random.Random(seed)
    records, seen = [], set(exclude)
    for i in range(size):
        label = labels[i % len(labels)]
        for _ in range(10_000):
            a, b = rng.sample(TOPIC_WORDS[label], 2)
            text = rng.choice(TEMPLATES).format(a=a, b=b, A=a[0].upper() + a[1:])
            prompt = INSTRUCTION.format(labels=", ".join(labels), text=text)
            if prompt not in seen:
                break
        else:
            raise DataError(f"topics: cannot draw {size} distinct {label!r} sentences; ask for fewer")
        seen.add(prompt)
        records.append({"text": text, "prompt": prompt, "response": label, "answer": label, "label": label})
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
    """Classification as generation: the prompt holds the text, the response is one label word (or, for
    multi-label data, the present labels joined by ", ")."""

    def __init__(self, dataset: str = "topics", labels: list[str] | None = None,
                 shots_per_class: int | None = None,
                 sampling: Literal["first", "equal", "stratified", "random"] = "first",
                 val_shots_per_class: int | None = None, num_unlabeled: int = 0, num_train: int = 400,
                 num_val: int = 32, num_test: int = 64, max_length: int = 128, **kwargs: Any) -> None:
        """
        Args:
            dataset: ``topics``, a few-shot task (``sentiment_hard``, ``science_topics``, ``sectors``), or any
                SFTDataModule source with the label in ``answer``.
            labels: the label words; default for ``topics``: sports, food, weather, music; for the few-shot
                tasks: all of the task's labels.
            shots_per_class: few-shot mode: k training examples per class (None: all).
            sampling: how the k-shot set is drawn: ``first`` k per class in order, ``equal`` k per class at
                random, ``stratified`` k*C with the pool's label proportions, ``random`` k*C uniformly.
            val_shots_per_class: draw the validation set (k per class, same ``sampling``) from the training
                pool left after the k-shot draw instead of the separate val split.
            num_unlabeled: further pool texts kept, without labels, as the ``unlabeled`` split.
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
        elif fewshot_tasks.is_fewshot_task(dataset):
            known = fewshot_tasks.task_labels(dataset)
            labels = list(labels or known)
            unknown = [label for label in labels if label not in known]
            if unknown:
                raise DataError(f"{dataset} has no label(s) {unknown}; choose from {known}")
        if shots_per_class is not None and shots_per_class < 1:
            raise DataError(f"shots_per_class must be >= 1 (got {shots_per_class}); use null for all")
        self.labels = list(labels) if labels else None
        self.multi_label = (fewshot_tasks.is_fewshot_task(dataset)
                            and fewshot_tasks.task_is_multi_label(dataset))

    # ------------------------------------------------------------------ patterns
    def prompt_for(self, text: str) -> str:
        """The task's pattern applied to ``text`` (the prompt before chat rendering)."""
        dataset = self.hparams.dataset
        if dataset == "topics":
            return INSTRUCTION.format(labels=", ".join(self.labels), text=text)
        if fewshot_tasks.is_fewshot_task(dataset):
            words = ", ".join(label_text(label) for label in self.labels)
            return fewshot_tasks.INSTRUCTIONS[dataset].format(labels=words, text=text)
        return text  # external data: the prompt field is the input itself

    def content_free_prompts(self) -> list[str]:
        """Prompts with content-free inputs (Zhao et al. 2021: "N/A", "", "[MASK]") for calibration."""
        return [self.prompt_for(text) for text in CONTENT_FREE]

    def _record(self, source: dict[str, Any]) -> dict[str, Any]:
        text = source["text"]
        if "labels" in source:
            present = [label for label in self.labels if label in source["labels"]]
            response = ", ".join(label_text(label) for label in present) or "none"
            return {"text": text, "prompt": self.prompt_for(text), "response": response, "answer": response,
                    "label": present[0] if present else "", "labels": present}
        return {"text": text, "prompt": self.prompt_for(text), "response": label_text(source["label"]),
                "answer": label_text(source["label"]), "label": source["label"]}

    def load_records(self) -> dict[str, list[dict[str, Any]]]:
        hp = self.hparams
        sizes = {"train": hp.num_train, "val": hp.num_val, "test": hp.num_test}
        if hp.dataset == "topics":
            records, taken = {}, set()  # test, then val, then train: each exactly sized, none shared
            for split in ("test", "val", "train"):
                if sizes[split] > 0:
                    records[split] = topic_records(self.labels, sizes[split],
                                                   hp.seed * 1000 + SPLIT_SEED_OFFSET[split], taken)
                    taken |= {r["prompt"] for r in records[split]}
            records.setdefault("train", [])
        elif fewshot_tasks.is_fewshot_task(hp.dataset):
            raw = fewshot_tasks.fewshot_splits(hp.dataset, sizes, seed=hp.seed)
            wanted = set(self.labels)
            records = {}
            for split, rows in raw.items():
                if not self.multi_label:
                    rows = [r for r in rows if r["label"] in wanted]
                records[split] = [self._record(r) for r in rows]
        else:
            records = super().load_records()
            for rows in records.values():
                for r in rows:
                    r["label"] = str(r.get("answer") or r["response"]).strip().lower()
                    r.setdefault("text", r["prompt"])
            if self.labels is None:
                self.labels = sorted({r["label"] for r in records["train"]})
        return self._few_shot_splits(records)

    def _few_shot_splits(self, records: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        hp = self.hparams
        pool = records.get("train", [])
        key = "labels" if self.multi_label else "label"
        if hp.shots_per_class is not None:
            chosen = sample_few_shot(pool, hp.shots_per_class, hp.sampling, seed=hp.seed, key=key)
            taken = {id(r) for r in chosen}
            pool = [r for r in pool if id(r) not in taken]
            records["train"] = chosen
        if hp.val_shots_per_class is not None:
            records["val"] = sample_few_shot(pool, hp.val_shots_per_class, hp.sampling, seed=hp.seed + 1,
                                             key=key)
            taken = {id(r) for r in records["val"]}
            pool = [r for r in pool if id(r) not in taken]
        if hp.num_unlabeled > 0:
            if hp.shots_per_class is None:
                raise DataError("num_unlabeled needs shots_per_class (the unlabeled texts are the training "
                                "pool left after the k-shot draw)")
            records["unlabeled"] = [{"text": r["text"], "prompt": r["prompt"], "response": "", "answer": "",
                                     "label": ""} for r in pool[: hp.num_unlabeled]]
        return records

    # ------------------------------------------------------------------ batches
    def encode_split(self, records: list[dict[str, Any]], split: str):
        dataset = super().encode_split(records, split)
        index = {label: i for i, label in enumerate(self.labels or [])}
        for row in dataset.rows:
            record = records[row["index"]]
            row["class_index"] = index.get(record["label"], -1)
            row["text"], row["prompt_text"] = record.get("text", record["prompt"]), record["prompt"]
            if self.multi_label:
                row["targets"] = [float(label in record.get("labels", [])) for label in self.labels]
        return dataset

    def collate_function(self):
        return collate_classification

    def unlabeled_dataloader(self):
        """The ``unlabeled`` split (``num_unlabeled`` texts, no labels: ``class_index`` -1), in order."""
        self.setup("fit")
        return self._loader("unlabeled", shuffle=False)

    def pos_weight(self) -> list[float]:
        """Per-class BCE ``pos_weight`` = (N - n_c) / n_c over the training split (1.0 where n_c is 0)."""
        self.setup("fit")
        train = self.records["train"]
        weights = []
        for label in self.labels:
            positives = sum(label in (r.get("labels") or [r["label"]]) for r in train)
            weights.append((len(train) - positives) / positives if positives else 1.0)
        return weights

    # ------------------------------------------------------------------ harness hooks
    def predicted_labels(self, completion: str) -> list[str]:
        """The labels a completion names: multi-label: every label word it contains; else the label whose
        word starts it (the first word for ``topics`` and external data)."""
        text = completion.strip().lower()
        if self.multi_label:
            return [label for label in self.labels if label_text(label) in text]
        if fewshot_tasks.is_fewshot_task(self.hparams.dataset):
            hits = [label for label in self.labels if text.startswith(label_text(label))]
            return [max(hits, key=len)] if hits else []
        return [first_word(completion)]

    def score_completion(self, record: dict[str, Any], completion: str) -> dict[str, float]:
        if self.multi_label:
            predicted = sorted(self.predicted_labels(completion))
            return {"exact_match": float(predicted == sorted(record["labels"]))}
        predicted = self.predicted_labels(completion)
        return {"accuracy": float(bool(predicted) and predicted[0] == record["label"])}

    def evaluation_metrics(self, records: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
        labels = self.labels or sorted({r["label"] for r in records})
        if self.multi_label:
            predicted = [self.predicted_labels(c) for c in completions]
            return multilabel_metrics(predicted, [r["labels"] for r in records], labels)
        predicted = [(self.predicted_labels(c) or [""])[0] for c in completions]
        return classification_metrics(predicted, [r["label"] for r in records], labels)


CONTENT_FREE = ["N/A", "", "[MASK]"]


def label_text(label: str) -> str:
    """A label's surface word(s): underscores become spaces (``particle_physics`` -> ``particle physics``)."""
    return label.replace("_", " ")


def collate_classification(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """:func:`zoo.datamodules.sft.collate` plus ``class_index`` (B,), the raw ``text`` and the pattern-applied
    ``prompt_text`` (lists of B strings) and, for multi-label rows, ``targets`` (B, C)."""
    batch = collate(rows, pad_id)
    batch["class_index"] = torch.tensor([r.get("class_index", -1) for r in rows], dtype=torch.long)
    batch["text"] = [r.get("text", "") for r in rows]
    batch["prompt_text"] = [r.get("prompt_text", "") for r in rows]
    if rows and "targets" in rows[0]:
        batch["targets"] = torch.tensor([r["targets"] for r in rows], dtype=torch.float32)
    return batch


def multilabel_metrics(predicted: list[list[str]], targets: list[list[str]],
                       labels: list[str]) -> dict[str, float]:
    """Micro- and macro-F1 and per-class F1 (``f1/<label>``) of label sets, with torchmetrics."""
    from torchmetrics.functional.classification import multilabel_f1_score

    if not targets:
        return {"micro_f1": 0.0, "macro_f1": 0.0}
    preds = torch.tensor([[int(label in p) for label in labels] for p in predicted])
    target = torch.tensor([[int(label in t) for label in labels] for t in targets])
    n = len(labels)
    out = {"micro_f1": float(multilabel_f1_score(preds, target, num_labels=n, average="micro")),
           "macro_f1": float(multilabel_f1_score(preds, target, num_labels=n, average="macro"))}
    per_class = multilabel_f1_score(preds, target, num_labels=n, average="none")
    out.update({f"f1/{label}": float(v) for label, v in zip(labels, per_class)})
    return out


def sample_few_shot(records: list[dict[str, Any]], k: int,
                    mode: Literal["first", "equal", "stratified", "random"] = "equal", seed: int = 0,
                    key: str = "label") -> list[dict[str, Any]]:
    """A k-shot subset of ``records``, in the original order.

    ``first``: the first k of every class; ``equal``: k of every class at random (an error names a class with
    fewer than k); ``stratified``: k*C records, each class's share proportional to its share of ``records``
    (largest remainders); ``random``: k*C records uniformly. C is the number of classes present. For
    multi-label records (``key="labels"``) a record counts for its first label."""
    def label_of(record: dict[str, Any]) -> str:
        value = record[key]
        return value[0] if isinstance(value, list) and value else str(value)

    if mode == "first":
        return few_shot(records, k, label_of)
    rng = random.Random(f"fewshot:{seed}:{mode}:{k}")
    by_class: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_class.setdefault(label_of(record), []).append(i)
    total = k * len(by_class)
    if mode == "equal":
        short = {c: len(ix) for c, ix in by_class.items() if len(ix) < k}
        if short:
            raise DataError(f"equal sampling needs {k} examples of every class; too few of {short}: lower "
                            "shots_per_class or raise num_train")
        chosen = [i for c in sorted(by_class) for i in rng.sample(by_class[c], k)]
    elif mode == "stratified":
        shares = {c: total * len(ix) / len(records) for c, ix in by_class.items()}
        counts = {c: min(int(s), len(by_class[c])) for c, s in shares.items()}
        for c in sorted(shares, key=lambda c: shares[c] - int(shares[c]), reverse=True):
            if sum(counts.values()) >= total:
                break
            if counts[c] < len(by_class[c]):
                counts[c] += 1
        chosen = [i for c in sorted(by_class) for i in rng.sample(by_class[c], counts[c])]
    elif mode == "random":
        chosen = rng.sample(range(len(records)), min(total, len(records)))
    else:
        raise DataError(f"unknown sampling {mode!r}; use first, equal, stratified or random")
    return [records[i] for i in sorted(chosen)]


def few_shot(records: list[dict[str, Any]], k: int, label_of=None) -> list[dict[str, Any]]:
    """The first ``k`` records of every class, in the original order."""
    label_of = label_of or (lambda record: record["label"])
    counts: dict[str, int] = {}
    kept = []
    for record in records:
        label = label_of(record)
        if counts.get(label, 0) < k:
            counts[label] = counts.get(label, 0) + 1
            kept.append(record)
    return kept
