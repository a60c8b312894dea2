"""PreferenceDataModule: built-in pairs, batch layout, local files, load_dataset path, metrics."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from zoo import tasks
from zoo.datamodules.preference import PreferenceDataModule, perturb_solution, preference_metrics, split_pairs
from zoo.datamodules.sft import DataError, encode_example, extract_final_answer
from zoo.kernels.selected_ce import IGNORE_INDEX

NUMBER = re.compile(r"-?\d+")


def _data(**kw):
    defaults = dict(tokenizer="tiny-llama", num_train=12, num_val=2, num_test=4, max_length=256, batch_size=3,
                    eval_batch_size=4)
    return PreferenceDataModule(**{**defaults, **kw})


@pytest.fixture(scope="module")
def builtin():
    data = _data()
    data.setup("fit")
    return data


def test_builtin_pairs_chosen_correct_rejected_wrong_and_deterministic(builtin):
    again = _data()
    again.setup("fit")
    rejected = [r["rejected"] for r in builtin.records["train"]]
    assert rejected == [r["rejected"] for r in again.records["train"]]
    for record in builtin.records["train"]:
        assert tasks.score_answer(record, extract_final_answer(record["chosen"])) == 1.0
        assert tasks.score_answer(record, extract_final_answer(record["rejected"])) == 0.0
        chosen, rejected = NUMBER.findall(record["chosen"]), NUMBER.findall(record["rejected"])
        assert len(chosen) == len(rejected)
        assert sum(a != b for a, b in zip(chosen, rejected)) == 2  # one intermediate number + the answer


def test_perturb_moves_intermediate_and_answer_by_the_same_delta():
    wrong = perturb_solution("2 + 3 = 5\n5 + 4 = 9\n#### 9", seed=3)
    numbers = [int(n) for n in NUMBER.findall(wrong)]
    original = [2, 3, 5, 5, 4, 9, 9]
    diffs = [a - b for a, b in zip(numbers, original) if a != b]
    assert len(diffs) == 2 and diffs[0] == diffs[1]
    assert perturb_solution("no final answer", seed=0) is None


def test_batch_is_chosen_rows_then_rejected_rows_with_prompt_masked(builtin):
    batch = next(iter(builtin._loader("train", shuffle=False)))
    assert batch["input_ids"].shape[0] == 6
    assert batch["is_chosen"].tolist() == [True] * 3 + [False] * 3
    index_c, index_r = split_pairs(batch["index"])
    assert torch.equal(index_c, index_r)
    for row, (index, chosen) in enumerate(zip(batch["index"].tolist(), batch["is_chosen"].tolist())):
        record = builtin.records["train"][index]
        expected = encode_example(builtin.tokenizer, record["prompt"],
                                  record["chosen" if chosen else "rejected"])
        n = len(expected["input_ids"])
        assert batch["input_ids"][row, :n].tolist() == expected["input_ids"]
        assert batch["labels"][row, :n].tolist() == expected["labels"]
        assert torch.all(batch["labels"][row, n:] == IGNORE_INDEX) and batch["attention_mask"][row].sum() == n
        prompt_len = expected["labels"].count(IGNORE_INDEX)
        assert prompt_len > 0 and expected["labels"][prompt_len] != IGNORE_INDEX


def test_side_dataloader_gives_sft_batches_of_one_side(builtin):
    batch = next(iter(builtin.side_dataloader("rejected", shuffle=False)))
    record = builtin.records["train"][int(batch["index"][0])]
    expected = encode_example(builtin.tokenizer, record["prompt"], record["rejected"])["input_ids"]
    assert batch["input_ids"][0, : len(expected)].tolist() == expected and "is_chosen" not in batch


def _rows(n):
    return [{"question": f"What is {i} + {i}?", "good": [{"role": "assistant", "content": f"#### {2 * i}"}],
             "bad": f"#### {2 * i + 1}"} for i in range(n)]


def test_local_jsonl_with_field_mapping_and_carved_splits(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(10)))
    data = _data(dataset=str(path), fields={"prompt": "question", "chosen": "good", "rejected": "bad"},
                 num_train=0, num_val=2, num_test=3)
    data.setup("fit")
    assert [len(data.records[s]) for s in ("train", "val", "test")] == [5, 2, 3]
    first = data.records["train"][0]
    assert first["chosen"] == "#### 0" and first["rejected"] == "#### 1" and first["answer"] == "0"
    assert data.score_completion(first, "so #### 0") == {"exact_match": 1.0}


def test_dataset_folder_goes_through_load_dataset(tmp_path):
    folder = tmp_path / "hub_like"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(8)))
    (folder / "test.jsonl").write_text("\n".join(json.dumps(r) for r in _rows(3)))
    data = _data(dataset=str(folder), fields={"prompt": "question", "chosen": "good", "rejected": "bad"},
                 splits={"train": "train", "test": "test"}, num_train=0, num_val=0, num_test=3)
    data.setup("fit")
    assert len(data.records["train"]) == 8 and len(data.records["test"]) == 3
    with pytest.raises(DataError, match="rejected"):
        _data(dataset=str(folder), fields={"prompt": "question", "chosen": "good"}, num_val=0).setup("fit")


def test_preference_metrics_of_an_sft_model_match_naive_log_probs(builtin, tiny_module):
    module = tiny_module()
    metrics = builtin.preference_metrics(module, split="test")
    batch = next(iter(builtin._loader("test", shuffle=False)))
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logp = logits[:, :-1].log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    total = (logp * (labels != IGNORE_INDEX)).sum(1)
    chosen, rejected = split_pairs(total)
    assert metrics["pairs"] == chosen.numel()
    assert metrics["reward_accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))
    assert metrics["reward_margin"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-4)
    assert preference_metrics(module, [batch]) == metrics
    # a module without its own reward: the reward IS the log-prob margin
    assert metrics["logp_accuracy"] == metrics["reward_accuracy"]
    assert metrics["logp_margin"] == metrics["reward_margin"]


def test_preference_nll_is_chosen_only_with_a_rejected_column(builtin, tiny_module):
    module = tiny_module()
    metrics = builtin.preference_metrics(module, split="test")
    sums, counts = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    for batch in builtin._loader("test", shuffle=False):  # naive log-probs from the HF logits, per side
        with torch.no_grad():
            logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        logp = logits[:, :-1].double().log_softmax(-1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
        supervised = (labels != IGNORE_INDEX).double()
        for side, (lp, mask) in enumerate(zip(split_pairs(logp), split_pairs(supervised))):
            sums[side] += -(lp * mask).sum()
            counts[side] += mask.sum()
    chosen_nll, rejected_nll = (sums / counts).tolist()
    assert metrics["nll"] == pytest.approx(chosen_nll, abs=1e-4)
    assert metrics["rejected_nll"] == pytest.approx(rejected_nll, abs=1e-4)
    assert metrics["nll_tokens"] == counts[0].item()
    assert metrics["ppl"] == pytest.approx(math.exp(chosen_nll), rel=1e-4)
    averaged = float(sums.sum() / counts.sum())  # the old value: both sides pooled
    assert abs(metrics["nll"] - averaged) > 1e-3
