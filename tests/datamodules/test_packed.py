"""PackedSFTDataModule: fixed-length rows that are an exact re-cut of the rendered example stream."""

from __future__ import annotations

import pytest

from zoo.datamodules.packed import PackedSFTDataModule, pack_rows
from zoo.datamodules.sft import DataError


def rows(lengths):
    out, start = [], 0
    for n in lengths:
        ids = list(range(start, start + n))
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:], "segments": [1] * 2 + [2] * (n - 2)})
        start += n
    return out


def test_packed_rows_are_consecutive_slices_of_the_concatenated_stream():
    packed, reused = pack_rows(rows([5, 7, 9, 4]), 8)
    assert reused == 0 and len(packed) == 25 // 8
    assert [r["input_ids"] for r in packed] == [list(range(i * 8, i * 8 + 8)) for i in range(3)]
    assert all(r["labels"] == r["input_ids"] for r in packed)  # loss_on="all"
    assert [r["index"] for r in packed] == [0, 1, 2]


def test_response_mode_keeps_prompt_masks_at_their_stream_positions():
    packed, _ = pack_rows(rows([5, 7]), 6, loss_on="response")
    assert packed[0]["labels"] == [-100, -100, 2, 3, 4, -100]
    assert packed[0]["segments"] == [1, 1, 2, 2, 2, 1]


def test_short_split_is_cycled_or_refused():
    packed, reused = pack_rows(rows([3, 3]), 8, num_sequences=2)
    assert len(packed) == 2 and reused == 4 and packed[1]["input_ids"][:2] == [2, 3]
    with pytest.raises(DataError):
        pack_rows(rows([3, 3]), 8, repeat=False)


def test_datamodule_batches_have_the_packed_length():
    data = PackedSFTDataModule(sequence_length=256, dataset="chain_sum", tokenizer="tiny-llama", num_train=16,
                               num_val=4, num_test=4, max_length=96, batch_size=2, eval_batch_size=1)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[1] == 256 and batch["attention_mask"].all()
    assert (batch["labels"] == batch["input_ids"]).all()
    assert data.stats["train_packed_rows"] == len(data.encoded["train"])
    assert len(data.eval_records("test")) == 4  # the harness still sees unpacked problems
