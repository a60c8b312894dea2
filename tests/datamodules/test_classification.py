"""The built-in classification-as-generation task."""

from __future__ import annotations

import pytest

from zoo.datamodules.classification import ClassificationDataModule, classification_metrics, first_word


def make(**kwargs):
    options = dict(tokenizer="tiny-llama", num_train=40, num_val=8, num_test=12, max_length=256)
    return ClassificationDataModule(**{**options, **kwargs})


def test_splits_are_deterministic_disjoint_and_labelled():
    a, b = make(), make()
    a.setup()
    b.setup()
    assert a.records["train"] == b.records["train"]
    held_out = {r["prompt"] for split in ("val", "test") for r in a.records[split]}
    assert not held_out & {r["prompt"] for r in a.records["train"]}
    for rows in a.records.values():
        assert all(r["response"] == r["label"] and r["label"] in a.labels for r in rows)
    assert len({r["prompt"] for r in a.records["test"]}) > 1


def test_response_tokens_are_the_label_word_plus_eos():
    data = make()
    data.setup()
    row = data.encoded["train"][0]
    target = [t for t, label in zip(row["input_ids"], row["labels"]) if label != -100]
    assert data.tokenizer.decode(target) == data.records["train"][0]["label"] + "<|im_end|>"


def test_few_shot_keeps_k_per_class():
    data = make(shots_per_class=3, labels=["sports", "music", "science"])
    data.setup()
    labels = [r["label"] for r in data.records["train"]]
    assert sorted(labels) == sorted(["sports", "music", "science"] * 3)


def test_metrics_hand_values():
    labels = ["a", "b", "c"]
    # a: tp1 fp0 fn1 -> f1 2/3; b: tp1 fp1 fn0 -> 2/3; c: tp0 fp0 fn1 -> 0 ("x" is an unknown word)
    metrics = classification_metrics(["a", "b", "b", "x"], ["a", "a", "b", "c"], labels)
    assert metrics["accuracy"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert first_word("  Sports. and more") == "sports"


def test_evaluation_metrics_uses_first_word_of_completion():
    data = make()
    records = data.eval_records("test")[:4]
    completions = [r["label"].upper() + "!" for r in records[:3]] + ["nothing"]
    assert data.evaluation_metrics(records, completions)["accuracy"] == pytest.approx(0.75)
