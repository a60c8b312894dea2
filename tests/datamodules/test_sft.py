"""SFTDataModule: prompt masking, segments, padding, shuffling, splits, sources, overlong and malformed rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from zoo.datamodules import SEGMENT_ANSWER, SEGMENT_PAD, SEGMENT_PROMPT, SEGMENT_REASONING, DataError
from zoo.datamodules.sft import encode_example, read_hub, render_prompt_ids

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "gsm8k_sample.jsonl"
GSM8K_FIELDS = {"prompt": "question", "response": "answer"}


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text().splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def local_data(tiny_data, path, **kwargs):
    defaults = dict(dataset=str(path), fields=GSM8K_FIELDS, num_train=0, num_val=2, num_test=2, max_length=512)
    data = tiny_data(**{**defaults, **kwargs})
    data.setup("fit")
    return data


def all_batches(loader) -> list[dict[str, torch.Tensor]]:
    return list(loader)


def test_labels_mask_exactly_the_rendered_prompt(tiny_data):
    data = tiny_data(max_length=1024)
    data.setup("fit")
    tokenizer = data.tokenizer
    for batch in all_batches(data.train_dataloader()):
        for row in range(batch["input_ids"].shape[0]):
            record = data.records["train"][int(batch["index"][row])]
            prompt = render_prompt_ids(tokenizer, record["prompt"])
            length = int(batch["attention_mask"][row].sum())
            ids, labels = batch["input_ids"][row, :length].tolist(), batch["labels"][row, :length].tolist()
            assert ids[: len(prompt)] == prompt
            assert labels[: len(prompt)] == [-100] * len(prompt)
            assert labels[len(prompt):] == ids[len(prompt):]
            assert ids[-1] == tokenizer.eos_token_id
            assert tokenizer.decode(ids[len(prompt):-1]) == record["response"]
    # The prompt is the user turn plus the assistant header, nothing of the response.
    assert tokenizer.decode(prompt) == f"<|im_start|>user\n{record['prompt']}<|im_end|>\n<|im_start|>assistant\n"


def test_segments_mark_final_answer_line_and_eos(tiny_data):
    data = tiny_data(max_length=1024)
    data.setup("fit")
    tokenizer = data.tokenizer
    batch = next(iter(data.train_dataloader()))
    for row in range(batch["input_ids"].shape[0]):
        record = data.records["train"][int(batch["index"][row])]
        ids, segments = batch["input_ids"][row], batch["segments"][row]
        response = record["response"]
        marker = response.rfind("####")
        assert marker > 0
        answer_text = tokenizer.decode(ids[segments == SEGMENT_ANSWER].tolist())
        reasoning_text = tokenizer.decode(ids[segments == SEGMENT_REASONING].tolist())
        assert answer_text == response[marker:] + tokenizer.eos_token
        assert reasoning_text == response[:marker]
        prompt_len = len(render_prompt_ids(tokenizer, record["prompt"]))
        assert (segments[:prompt_len] == SEGMENT_PROMPT).all()
        assert ((segments == SEGMENT_PAD) == (batch["attention_mask"][row] == 0)).all()


def test_answer_segment_without_marker_is_the_last_line():
    from zoo.backbone import byte_tokenizer

    tokenizer = byte_tokenizer()
    row = encode_example(tokenizer, "q", "step one\nthe answer is 5")
    answer = [i for i, s in zip(row["input_ids"], row["segments"]) if s == SEGMENT_ANSWER]
    assert tokenizer.decode(answer) == "the answer is 5<|im_end|>"


def test_dynamic_padding_to_the_longest_row_of_each_batch(tiny_data):
    data = tiny_data(max_length=1024, batch_size=3)
    data.setup("fit")
    widths = set()
    for batch in all_batches(data.train_dataloader()):
        lengths = [len(data.encoded["train"][int(i)]["input_ids"]) for i in batch["index"]]
        assert batch["input_ids"].shape[1] == max(lengths)
        widths.add(batch["input_ids"].shape[1])
        for row, length in enumerate(lengths):
            assert (batch["attention_mask"][row, :length] == 1).all()
            assert (batch["attention_mask"][row, length:] == 0).all()
            assert (batch["labels"][row, length:] == -100).all()
            assert (batch["input_ids"][row, length:] == data.tokenizer.pad_token_id).all()
    assert len(widths) > 1  # widths follow the batch, not max_length


def train_order(data) -> list[int]:
    return [i for batch in data.train_dataloader() for i in batch["index"].tolist()]


def test_shuffling_is_deterministic_per_seed(tiny_data):
    first, second = tiny_data(max_length=1024, shuffle_seed=0), tiny_data(max_length=1024, shuffle_seed=0)
    other = tiny_data(max_length=1024, shuffle_seed=5)
    for d in (first, second, other):
        d.setup("fit")
    order = train_order(first)
    assert sorted(order) == list(range(len(first.encoded["train"])))
    assert order != sorted(order)  # it does shuffle
    assert train_order(second) == order
    other.encoded = first.encoded  # same rows, different seed
    assert train_order(other) != order


def test_default_shuffle_follows_the_global_seed(tiny_data, monkeypatch):
    """Bench seeds must vary the training order while the data (and the test split) stay fixed."""
    data = tiny_data(max_length=1024)
    data.setup("fit")
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    order0 = train_order(data)
    monkeypatch.setenv("PL_GLOBAL_SEED", "1")
    assert train_order(data) != order0
    assert sorted(train_order(data)) == sorted(order0)


def test_epoch_order_depends_only_on_seed_and_epoch(tiny_data):
    """What makes a resume at an epoch boundary replay the same data: a fresh loader at epoch 1 = epoch 1."""
    first, fresh = tiny_data(max_length=1024), tiny_data(max_length=1024)
    first.setup("fit")
    fresh.setup("fit")
    loader = first.train_dataloader()
    epoch0 = [i for b in loader for i in b["index"].tolist()]
    loader.sampler.set_epoch(1)  # what Lightning does before every epoch
    epoch1 = [i for b in loader for i in b["index"].tolist()]
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)
    resumed = fresh.train_dataloader()
    resumed.sampler.set_epoch(1)
    assert [i for b in resumed for i in b["index"].tolist()] == epoch1


@pytest.mark.parametrize("task", ["gsm_symbolic", "chain_sum"])
def test_builtin_task_splits_are_disjoint(tiny_data, task):
    data = tiny_data(dataset=task, num_train=30, num_val=10, num_test=10, max_length=2048)
    records = data.load_records()
    prompts = {split: {r["prompt"] for r in rows} for split, rows in records.items()}
    assert all(prompts[s] for s in ("train", "val", "test"))
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    assert len(records["test"]) == 10 and 0 < len(records["val"]) <= 10


def to_formats(tmp_path: Path) -> dict[str, Path]:
    import datasets

    rows = fixture_rows()
    paths = {"jsonl": write_jsonl(tmp_path / "g.jsonl", rows), "json": tmp_path / "g.json",
             "csv": tmp_path / "g.csv", "parquet": tmp_path / "g.parquet"}
    paths["json"].write_text(json.dumps(rows))
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["question", "answer"])
        writer.writeheader()
        writer.writerows(rows)
    datasets.Dataset.from_list(rows).to_parquet(str(paths["parquet"]))
    return paths


def test_local_files_in_every_format_load_the_same_rows(tiny_data, tmp_path):
    expected = fixture_rows()
    loaded = {}
    for kind, path in to_formats(tmp_path).items():
        data = local_data(tiny_data, path)
        loaded[kind] = data.records
        got = data.records["train"] + data.records["val"] + data.records["test"]
        assert [(r["prompt"], r["response"]) for r in got] == [(r["question"], r["answer"]) for r in expected], kind
        assert len(data.records["train"]) == 6 and len(data.records["val"]) == 2 and len(data.records["test"]) == 2
        assert [r["answer"] for r in got] == [r["answer"].rsplit("#### ", 1)[1] for r in expected]
    assert all(records == loaded["jsonl"] for records in loaded.values())


def test_local_fixture_trains_through_the_loader(tiny_data):
    data = local_data(tiny_data, FIXTURE, batch_size=2)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "segments", "index"}
    assert (batch["segments"] == SEGMENT_ANSWER).any()


def test_hub_id_goes_through_datasets_load_dataset(tiny_data, monkeypatch):
    """The real ``read_hub`` runs; only the network fetch is replaced by a local JSON load."""
    import datasets

    real_load = datasets.load_dataset
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        assert path == "openai/gsm8k" and name == "main"
        return real_load("json", data_files=str(FIXTURE), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = tiny_data(dataset="openai/gsm8k", hub_config="main", fields=GSM8K_FIELDS, splits={"test": "test"},
                     num_train=0, num_val=3, num_test=4, max_length=512)
    data.setup("fit")
    assert sorted(calls) == [("openai/gsm8k", "main", "test"), ("openai/gsm8k", "main", "train")]
    questions = [r["question"] for r in fixture_rows()]
    assert [r["prompt"] for r in data.records["test"]] == questions[:4]
    assert [r["prompt"] for r in data.records["train"]] == questions[:7]
    assert [r["prompt"] for r in data.records["val"]] == questions[7:]


def test_local_dataset_folder_loads_through_load_dataset(tiny_data, tmp_path):
    folder = tmp_path / "gsm8k_folder"
    folder.mkdir()
    rows = fixture_rows()
    write_jsonl(folder / "train.jsonl", rows[:8])
    write_jsonl(folder / "test.jsonl", rows[8:])
    data = tiny_data(dataset=str(folder), fields=GSM8K_FIELDS, splits={"test": "test"}, num_train=0, num_val=2,
                     num_test=2, max_length=512)
    data.setup("fit")
    assert [r["prompt"] for r in data.records["test"]] == [r["question"] for r in rows[8:]]
    assert len(data.records["train"]) == 6


def test_unknown_hub_dataset_offline_is_a_data_error():
    with pytest.raises(DataError, match="HF_DATASETS_OFFLINE"):
        read_hub("zoo-tests/no-such-dataset", "train", None)


def test_overlong_rows_truncate_or_drop_and_are_counted(tiny_data, tmp_path):
    rows = fixture_rows()
    from zoo.backbone import byte_tokenizer

    tokenizer = byte_tokenizer()
    lengths = [len(encode_example(tokenizer, r["question"], r["answer"])["input_ids"]) for r in rows]
    limit = sorted(lengths)[4] + 1  # 5 rows fit, 5 rows are longer (all prompts fit)
    prompt_lengths = [len(render_prompt_ids(tokenizer, r["question"])) for r in rows]
    assert max(prompt_lengths) < limit - 1
    over = sum(n > limit for n in lengths)
    assert over == 5

    path = write_jsonl(tmp_path / "g.jsonl", rows)
    truncated = local_data(tiny_data, path, num_val=0, num_test=0, max_length=limit, overlong="truncate")
    assert truncated.stats["train_truncated"] == over and truncated.stats["train_dropped"] == 0
    assert len(truncated.encoded["train"]) == 10
    for row, length in zip(truncated.encoded["train"].rows, lengths):
        assert len(row["input_ids"]) == min(length, limit)
        assert len(row["labels"]) == len(row["segments"]) == len(row["input_ids"])

    dropped = local_data(tiny_data, path, num_val=0, num_test=0, max_length=limit, overlong="drop")
    assert dropped.stats["train_dropped"] == over and dropped.stats["train_truncated"] == 0
    assert len(dropped.encoded["train"]) == 10 - over
    assert all(len(r["input_ids"]) <= limit for r in dropped.encoded["train"].rows)


def test_rows_whose_prompt_alone_is_too_long_are_dropped_even_when_truncating(tiny_data, tmp_path):
    rows = fixture_rows()[:3]
    rows[1] = {"question": "x" * 400, "answer": "#### 1"}
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    data = local_data(tiny_data, path, num_val=0, num_test=0, max_length=300, overlong="truncate")
    assert data.stats["train_dropped"] == 1
    assert len(data.encoded["train"]) == 2


def test_malformed_row_names_file_and_row(tiny_data, tmp_path):
    rows = fixture_rows()
    del rows[2]["answer"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad\.jsonl: row 3: field 'answer' \(response\) is missing or empty"):
        local_data(tiny_data, path)


def test_malformed_rows_skipped_and_counted(tiny_data, tmp_path):
    rows = fixture_rows()
    del rows[2]["answer"]
    rows[5]["question"] = None
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    data = local_data(tiny_data, path, on_malformed="skip")
    assert data.stats[f"skipped_malformed:{path}"] == 2
    assert sum(len(v) for v in data.records.values()) == 8


def test_invalid_json_line_names_file_and_line(tiny_data, tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = FIXTURE.read_text().splitlines()
    lines[3] = lines[3][:-5]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: line 4 is not valid JSON"):
        local_data(tiny_data, path)


def test_empty_response_is_a_clear_error(tiny_data, tmp_path):
    rows = fixture_rows()
    rows[6]["answer"] = "   "
    path = write_jsonl(tmp_path / "empty.jsonl", rows)
    with pytest.raises(DataError, match=r"row 7: field 'answer' \(response\) is missing or empty"):
        local_data(tiny_data, path)


def test_missing_file_is_a_clear_error(tiny_data, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        local_data(tiny_data, tmp_path / "nope.jsonl")


def test_too_few_rows_for_held_out_splits(tiny_data):
    with pytest.raises(DataError, match="cannot also provide"):
        local_data(tiny_data, FIXTURE, num_val=5, num_test=5)


def test_a_subclass_built_by_lightning_cli_keeps_the_base_arguments_it_does_not_expose():
    """LightningCLI records only the arguments a config gives a subclass (its own signature); the base's
    ``overlong`` and friends must still be in ``hparams`` (a CodeDataModule bench failed on this)."""
    from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters_context

    from datamodules.code import CodeDataModule
    from datamodules.sft import SFT_ARGUMENTS

    with _given_hyperparameters_context({"num_train": 4, "tokenizer": "tiny-llama"}, "jsonargparse"):
        data = CodeDataModule(num_train=4, num_val=2, num_test=2, tokenizer="tiny-llama")
    assert data.hparams.num_train == 4 and data.hparams.overlong == "truncate"
    assert set(SFT_ARGUMENTS) <= set(data.hparams)
    data.setup("fit")  # encodes with fit_length(..., hparams.overlong)
    assert len(data.encoded["train"]) == 4
