"""``PackedSFTDataModule``: long-context training rows packed from concatenated rendered examples.

Long-context fine-tuning methods (LeMo, papers/01-lemo.md) train on sequences of 2k-64k tokens; the
zoo's built-in tasks are short, so this module renders every example exactly like
:class:`~zoo.datamodules.SFTDataModule` (chat template, EOS) and concatenates them, in order, into rows of
exactly ``sequence_length`` tokens (choose a multiple of LeMo's block size, 64). Attention runs across
example boundaries inside a row, as in standard packed long-context LM training (no document masking).

Supervision (``loss_on``): ``all`` (default) supervises every token, the paper's long-context language
modelling setting (RedPajama / PG19 perplexity); ``response`` keeps the SFT labels (prompts masked).
When a split holds fewer tokens than requested (``num_sequences``, or one row), its examples are cycled
(``fill: repeat``, counted in ``stats``) so tiny smoke data still yields a row; ``fill: drop`` refuses.
Validation and test rows are packed from their own held-out examples only. The harness hooks
(``eval_records`` etc.) still see the unpacked records.
"""

from __future__ import annotations

from typing import Any, Literal

from zoo.datamodules.sft import DataError, EncodedDataset, SFTDataModule
from zoo.kernels.selected_ce import IGNORE_INDEX


def pack_rows(rows: list[dict[str, list[int]]], sequence_length: int, num_sequences: int | None = None,
              loss_on: Literal["all", "response"] = "all",
              repeat: bool = True) -> tuple[list[dict[str, Any]], int]:
    """Concatenate encoded rows into ``sequence_length``-token rows; returns (packed rows, examples reused).

    Each output row has input_ids, labels, segments (lists of ``sequence_length`` ints) and index."""
    total = sum(len(r["input_ids"]) for r in rows)
    wanted = num_sequences if num_sequences is not None else max(total // sequence_length, 1 if repeat else 0)
    if wanted * sequence_length > total and not repeat:
        raise DataError(f"{total} tokens cannot fill {wanted} rows of {sequence_length}; lower "
                        "sequence_length or num_sequences, add examples, or set fill: repeat")
    if not rows or wanted <= 0:
        raise DataError(f"no packed rows of {sequence_length} tokens from {total} tokens")
    packed: list[dict[str, Any]] = []
    buffer: dict[str, list[int]] = {"input_ids": [], "labels": [], "segments": []}
    used = 0
    while len(packed) < wanted:
        row = rows[used % len(rows)]
        used += 1
        buffer["input_ids"] += row["input_ids"]
        buffer["labels"] += row["input_ids"] if loss_on == "all" else row["labels"]
        buffer["segments"] += row["segments"]
        while len(buffer["input_ids"]) >= sequence_length and len(packed) < wanted:
            out = {key: value[:sequence_length] for key, value in buffer.items()}
            out["index"] = len(packed)
            packed.append(out)
            buffer = {key: value[sequence_length:] for key, value in buffer.items()}
    return packed, max(0, used - len(rows))


class PackedSFTDataModule(SFTDataModule):
    """Built-in / local / hub SFT data rendered as usual, then packed into fixed-length long rows."""

    def __init__(
        self,
        sequence_length: int = 2048,
        num_sequences: int | None = None,
        num_eval_sequences: int | None = None,
        loss_on: Literal["all", "response"] = "all",
        fill: Literal["repeat", "drop"] = "repeat",
        **kwargs: Any,
    ) -> None:
        """
        Args:
            sequence_length: tokens per packed row (2k-8k for long-context runs; a multiple of 64 for LeMo).
            num_sequences: training rows (default: as many as the training tokens fill).
            num_eval_sequences: validation / test rows (default: as many as their tokens fill, at least one).
            loss_on: ``all`` tokens (long-context language modelling) or only ``response`` tokens.
            fill: ``repeat`` (cycle a split's examples when it is too short) or ``drop`` (error instead).
            **kwargs: the SFTDataModule arguments (dataset, tokenizer, num_train, max_length, batch_size,
                ...).
        """
        super().__init__(**kwargs)
        self.sequence_length, self.num_sequences = sequence_length, num_sequences
        self.num_eval_sequences, self.loss_on, self.fill = num_eval_sequences, loss_on, fill

    def encode_split(self, records: list[dict[str, Any]], split: str) -> EncodedDataset:
        rows = super().encode_split(records, split).rows
        count = self.num_sequences if split == "train" else self.num_eval_sequences
        packed, reused = pack_rows(rows, self.sequence_length, count, self.loss_on, self.fill == "repeat")
        self.stats[f"{split}_packed_rows"], self.stats[f"{split}_reused_examples"] = len(packed), reused
        if reused:
            print(f"[zoo] data/{split}: cycled {reused} examples to fill {len(packed)} x "
                  f"{self.sequence_length} tokens")
        return EncodedDataset(packed)


__all__ = ["IGNORE_INDEX", "PackedSFTDataModule", "pack_rows"]
