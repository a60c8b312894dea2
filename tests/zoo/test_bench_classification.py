"""``zoo bench`` on few-shot classification (issue 14): label scores, not generation.

The per-item accuracies and the metrics the harness writes must equal what ``score_prompts(...).argmax``
gives on the same test prompts (computed here separately, macro-F1 with scikit-learn), and no generation
happens (``generate_text`` / ``generate_for_module`` patched to raise).
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from sklearn.metrics import f1_score

from zoo.datamodules.classification import ClassificationDataModule
from zoo.harness.bench import evaluation
from zoo.harness.bench.items import read_items
from zoo.modules.base import CausalLMModule
from zoo.modules.classification import ClassificationModule, ICLClassifier


@pytest.fixture
def no_generation(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a classification module was evaluated by generation")

    monkeypatch.setattr(CausalLMModule, "generate_text", refuse)
    monkeypatch.setattr(evaluation, "generate_for_module", refuse)


def args(**overrides) -> argparse.Namespace:
    return argparse.Namespace(limit=None, max_new_tokens=8, batch_size=5, **overrides)


def test_single_label_bench_scores_by_argmax_of_the_label_scores(tmp_path, no_generation):
    data = ClassificationDataModule(dataset="topics", tokenizer="tiny-llama", num_train=16, num_val=4,
                                    num_test=12, max_length=512, shots_per_class=2)
    torch.manual_seed(0)
    module = ICLClassifier(model="tiny-llama", labels=data.labels, export=False, max_demonstrations=4,
                           demonstrations=[{"text": "the soup was hot", "label": "food"},
                                           {"text": "a jazz trio", "label": "music"}])
    items_path = tmp_path / "items" / "i.jsonl.gz"
    result = evaluation.evaluate(module, data, args(), tmp_path / "c.jsonl", items_path)

    records = data.eval_records("test")
    scores = module.score_prompts([r["prompt"] for r in records])  # the reference, computed separately
    predicted = [data.labels[i] for i in scores.argmax(-1).tolist()]
    truth = [r["label"] for r in records]
    accuracy = sum(p == t for p, t in zip(predicted, truth)) / len(truth)
    items = read_items(tmp_path / "items" / "i.jsonl.gz")
    assert len(items) == len(records)
    per_item = [item["scores"]["accuracy"] for item in items]
    assert per_item == [float(p == t) for p, t in zip(predicted, truth)]
    assert math.isclose(sum(per_item) / len(per_item), accuracy)
    assert math.isclose(result["metrics"]["accuracy"], accuracy)
    macro = f1_score(truth, predicted, labels=data.labels, average="macro", zero_division=0)
    assert math.isclose(result["metrics"]["macro_f1"], macro, abs_tol=1e-6)
    lines = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert [line["completion"] for line in lines] == predicted


def test_multi_label_completions_parse_back_to_the_predicted_label_sets(tmp_path, no_generation):
    data = ClassificationDataModule(dataset="sectors", tokenizer="tiny-llama", num_train=64, num_val=4,
                                    num_test=10, max_length=1024)
    torch.manual_seed(0)
    module = ClassificationModule(model="tiny-llama", labels=data.labels, multi_label=True, export=False)
    result = evaluation.evaluate(module, data, args(), None, tmp_path / "items" / "i.jsonl.gz")

    records = data.eval_records("test")
    scores = module.score_prompts([r["prompt"] for r in records], calibrated=False)
    predicted = [sorted(data.labels[c] for c in range(len(data.labels)) if row[c] > math.log(0.5))
                 for row in scores.tolist()]  # p(word) > 0.5
    exact = [float(p == sorted(r["labels"])) for p, r in zip(predicted, records)]
    items = read_items(tmp_path / "items" / "i.jsonl.gz")
    assert [item["scores"]["exact_match"] for item in items] == exact
    assert result["main_metric"] == "exact_match" and math.isclose(result["metrics"]["exact_match"],
                                                                   sum(exact) / len(exact))
    nll_sum, tokens = sum(i["nll_sum"] for i in items), sum(i["tokens"] for i in items)  # label text
    assert math.isclose(result["metrics"]["nll"], nll_sum / tokens, rel_tol=1e-6)
    truth = torch.tensor([[float(label in r["labels"]) for label in data.labels] for r in records])
    hits = torch.tensor([[float(label in p) for label in data.labels] for p in predicted])
    micro = f1_score(truth.numpy(), hits.numpy(), average="micro", zero_division=0)
    assert math.isclose(result["metrics"]["micro_f1"], micro, abs_tol=1e-6)


def test_base_row_on_classification_data_is_a_plain_label_scorer():
    data = ClassificationDataModule(dataset="topics", tokenizer="tiny-llama", num_train=8, num_val=4,
                                    num_test=4, max_length=512)
    module = evaluation.base_module("tiny-llama", data)
    assert type(module) is ClassificationModule and module.verbalizer.labels == data.labels
    assert not module.trainable_parameters() or all(
        not name.startswith("adapter.") for name in module.trainable_parameters())
    assert evaluation.is_classifier(module, data)
    assert not evaluation.is_classifier(CausalLMModule(model="tiny-llama", export=False), data)
