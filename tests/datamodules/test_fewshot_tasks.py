"""Built-in few-shot tasks and the few-shot sampling of ClassificationDataModule (issue 14)."""

from __future__ import annotations

from collections import Counter

import pytest

from zoo.datamodules import fewshot_tasks
from zoo.datamodules.classification import ClassificationDataModule, multilabel_metrics, sample_few_shot
from zoo.datamodules.sft import DataError


@pytest.mark.parametrize("name", ["sentiment_hard", "science_topics", "sectors"])
def test_task_splits_are_disjoint_deterministic_and_sized(name):
    sizes = {"train": 300, "val": 40, "test": 80}
    a = fewshot_tasks.fewshot_splits(name, sizes, seed=3)
    assert a == fewshot_tasks.fewshot_splits(name, sizes, seed=3)
    assert a != fewshot_tasks.fewshot_splits(name, sizes, seed=4)
    texts = {split: [r["text"] for r in rows] for split, rows in a.items()}
    for rows in texts.values():
        assert len(rows) == len(set(rows))
    assert {split: len(rows) for split, rows in texts.items()} == sizes
    assert not set(texts["train"]) & (set(texts["val"]) | set(texts["test"]))
    assert not set(texts["val"]) & set(texts["test"])
    labels = fewshot_tasks.task_labels(name)
    seen = Counter(lab for r in a["train"] for lab in (r["labels"] if "labels" in r else [r["label"]]))
    assert set(seen) == set(labels)  # every class occurs


def test_science_topics_has_ten_plus_classes_and_sectors_is_multi_label():
    assert len(fewshot_tasks.task_labels("science_topics")) >= 10
    rows = fewshot_tasks.generate("sectors", 200, 0)
    assert any(len(r["labels"]) > 1 for r in rows) and any(len(r["labels"]) == 1 for r in rows)


def test_sentiment_labels_need_the_sentence_both_classes_share_words():
    rows = fewshot_tasks.generate("sentiment_hard", 400, 0)
    for word in ("dreadful", "wonderful"):
        classes = {r["label"] for r in rows if word in r["text"]}
        assert classes == {"positive", "negative"}, word  # no single word decides the label


def pool(n_per_class: dict[str, int]) -> list[dict]:
    return [{"label": c, "i": i} for c, n in n_per_class.items() for i in range(n)]


def test_equal_sampling_gives_k_per_class_and_errors_when_short():
    records = pool({"a": 10, "b": 6, "c": 8})
    chosen = sample_few_shot(records, 4, "equal", seed=1)
    assert Counter(r["label"] for r in chosen) == {"a": 4, "b": 4, "c": 4}
    assert sample_few_shot(records, 4, "equal", seed=1) == chosen
    with pytest.raises(DataError, match="too few"):
        sample_few_shot(records, 7, "equal")


def test_stratified_sampling_keeps_proportions_by_hand():
    records = pool({"a": 60, "b": 30, "c": 10})  # k=4, C=3 -> 12 drawn: 7.2, 3.6, 1.2 -> 7, 4, 1
    chosen = sample_few_shot(records, 4, "stratified", seed=0)
    assert Counter(r["label"] for r in chosen) == {"a": 7, "b": 4, "c": 1}
    assert len(sample_few_shot(records, 4, "random", seed=0)) == 12


def make(**kwargs):
    options = dict(tokenizer="tiny-llama", num_train=120, num_val=8, num_test=8, max_length=512)
    return ClassificationDataModule(**{**options, **kwargs})


def test_datamodule_k_shot_train_val_unlabeled_are_disjoint():
    data = make(dataset="sentiment_hard", shots_per_class=3, sampling="equal", val_shots_per_class=2,
                num_unlabeled=10)
    data.setup()
    train, val, unlabeled = (data.records[s] for s in ("train", "val", "unlabeled"))
    assert Counter(r["label"] for r in train) == {"positive": 3, "negative": 3}
    assert Counter(r["label"] for r in val) == {"positive": 2, "negative": 2}
    assert len(unlabeled) == 10 and all(r["label"] == "" and r["response"] == "" for r in unlabeled)
    texts = [{r["text"] for r in rows} for rows in (train, val, unlabeled, data.records["test"])]
    assert all(not (texts[i] & texts[j]) for i in range(4) for j in range(i + 1, 4))
    batch = next(iter(data.train_dataloader()))
    assert set(batch["class_index"].tolist()) <= {0, 1}
    assert set(next(iter(data.unlabeled_dataloader()))["class_index"].tolist()) == {-1}


def test_multi_label_targets_pos_weight_and_metrics():
    data = make(dataset="sectors", num_train=60)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    for row, index in zip(batch["targets"].tolist(), batch["index"].tolist()):
        record = data.records["train"][index]
        assert [label for label, v in zip(data.labels, row) if v] == record["labels"]
    train = data.records["train"]
    n_tech = sum("technology" in r["labels"] for r in train)
    assert data.pos_weight()[data.labels.index("technology")] == pytest.approx((len(train) - n_tech) / n_tech)
    # a: tp1 fn1 -> f1 2/3; b: tp1 fp1 -> 2/3; micro: tp2 fp1 fn1 -> 2/3
    metrics = multilabel_metrics([["a", "b"], ["b"]], [["a", "b"], ["a"]], ["a", "b"])
    assert metrics["micro_f1"] == pytest.approx(2 / 3) and metrics["macro_f1"] == pytest.approx(2 / 3)
    assert metrics["f1/a"] == pytest.approx(2 / 3)
    assert data.evaluation_metrics(data.records["test"][:2], ["none", "none"])["micro_f1"] == 0.0


def test_local_file_with_field_mapping_gives_labels_and_k_shots(tmp_path):
    import json

    path = tmp_path / "reviews.jsonl"
    rows = [{"review": f"text number {i}", "stars": "good" if i % 3 else "bad"} for i in range(30)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    data = make(dataset=str(path), fields={"prompt": "review", "response": "stars", "answer": "stars"},
                shots_per_class=2, sampling="equal", num_val=4, num_test=4)
    data.setup()
    assert data.labels == ["bad", "good"]
    assert Counter(r["label"] for r in data.records["train"]) == {"bad": 2, "good": 2}
    batch = next(iter(data.train_dataloader()))
    assert batch["text"][0].startswith("text number") and set(batch["class_index"].tolist()) <= {0, 1}
