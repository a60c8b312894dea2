"""``SFTDataModule``: instruction -> response data, rendered with the chat template, prompt masked.

Sources (``dataset``)
    * a built-in task name (:mod:`zoo.tasks`): ``gsm_symbolic`` (default), ``chain_sum``, or any
      reasoning-gym generator; train / val / test are disjoint by construction (``holdout``);
    * a local file: ``.json`` (a list of objects), ``.jsonl``, ``.parquet`` or ``.csv``;
    * a hub data set id (``openai/gsm8k``; ``hub_config`` for its config name), loaded with
      ``datasets.load_dataset`` (honours ``HF_DATASETS_OFFLINE``).
    ``fields`` maps the zoo's ``prompt`` / ``response`` (/ ``answer``) to the source's columns, e.g.
    ``{prompt: question, response: answer}`` for GSM8K.

Every batch holds ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt and padding) and
``segments`` (``SEGMENT_PAD`` / ``SEGMENT_PROMPT`` / ``SEGMENT_REASONING`` / ``SEGMENT_ANSWER``),
right-padded to the longest row of the batch. The answer segment is the final ``#### ...`` line
(else the last line of a multi-line response, else the whole response) plus EOS.
"""

from __future__ import annotations

import csv
import functools
import inspect
import io
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from zoo import backbone, tasks
from zoo.chat import render_prompt_ids  # noqa: F401  (re-exported: data and decoding render alike)
from zoo.errors import ZooError, check_range, did_you_mean
from zoo.kernels.selected_ce import IGNORE_INDEX
from zoo.seeding import run_seed

SEGMENT_PAD, SEGMENT_PROMPT, SEGMENT_REASONING, SEGMENT_ANSWER = 0, 1, 2, 3
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


class DataError(ZooError, ValueError):
    """A data source or row is unusable; the message names the file, the row and the fix."""


# ---------------------------------------------------------------------------- rendering
def answer_start(response: str) -> int:
    """Character offset where the final-answer segment of ``response`` starts."""
    marker = response.rfind("####")
    if marker >= 0:
        return marker
    newline = response.rstrip().rfind("\n")
    return newline + 1 if newline >= 0 else 0


def encode_example(tokenizer, prompt: str, response: str, system_prompt: str | None = None) -> dict[str, list[int]]:
    """Prompt ids + response ids + EOS, with labels (prompt masked) and segment ids."""
    prompt_ids = render_prompt_ids(tokenizer, prompt, system_prompt)
    encoded = tokenizer(response, add_special_tokens=False, return_offsets_mapping=True)
    split_at = answer_start(response)
    response_ids = list(encoded["input_ids"]) + [tokenizer.eos_token_id]
    response_segments = [SEGMENT_ANSWER if end > split_at else SEGMENT_REASONING
                         for _, end in encoded["offset_mapping"]] + [SEGMENT_ANSWER]
    return {
        "input_ids": prompt_ids + response_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + response_ids,
        "segments": [SEGMENT_PROMPT] * len(prompt_ids) + response_segments,
    }


def fit_length(row: dict[str, list[int]], limit: int, overlong: str) -> dict[str, list[int]] | None:
    """``row`` if it fits in ``limit`` tokens, else its response tail cut (``truncate``) or None (``drop``).

    A row whose prompt alone leaves no room for a response token is always dropped."""
    if len(row["input_ids"]) <= limit:
        return row
    prompt_len = row["labels"].count(IGNORE_INDEX)
    if overlong == "drop" or prompt_len >= limit - 1:
        return None
    return {key: value[:limit] for key, value in row.items()}


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row of the batch."""
    width = max(len(r["input_ids"]) for r in rows)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([r[key] + [value] * (width - len(r[key])) for r in rows], dtype=torch.long)

    batch = {
        "input_ids": pad("input_ids", pad_id),
        "labels": pad("labels", IGNORE_INDEX),
        "segments": pad("segments", SEGMENT_PAD),
        "attention_mask": torch.tensor([[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"]))
                                        for r in rows], dtype=torch.long),
        "index": torch.tensor([r["index"] for r in rows], dtype=torch.long),
    }
    return batch


class EpochShuffleSampler(RandomSampler):
    """A shuffle that depends only on (seed, epoch), so a run resumed at an epoch boundary sees the same order.

    Lightning calls ``set_epoch`` before every epoch (also after a resume). Under DDP Lightning swaps it for a
    ``DistributedSampler(shuffle=True)``, which is seeded per epoch the same way.
    """

    def __init__(self, data_source: Dataset, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> EpochShuffleIterator:
        return EpochShuffleIterator(self, self.epoch)


class EpochShuffleIterator:
    """One epoch of an :class:`EpochShuffleSampler`, with its position as state (torchdata's ``Stateful``):
    a resumed ``StatefulDataLoader`` restores the epoch's order and skips what was already served.

    The order is drawn at the first ``next``, not at construction: a resumed loader may build its iterator
    before Lightning sets the new epoch. A restored position inside an epoch keeps that epoch; one saved at an
    epoch's end starts the sampler's current epoch from its beginning."""

    def __init__(self, sampler: EpochShuffleSampler, epoch: int) -> None:
        self.sampler = sampler
        self.epoch, self.yielded, self.order = epoch, 0, None
        self.restored = False

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.yielded, self.order = int(state["epoch"]), int(state["yielded"]), None
        self.restored = True

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def __iter__(self) -> EpochShuffleIterator:
        return self

    def __next__(self) -> int:
        if self.order is None:
            size = len(self.sampler.data_source)
            if not self.restored or self.yielded >= size:
                self.epoch, self.yielded = self.sampler.epoch, 0
            generator = torch.Generator().manual_seed(self.sampler.seed * 1_000_003 + self.epoch)
            self.order = torch.randperm(size, generator=generator).tolist()
        if self.yielded >= len(self.order):
            raise StopIteration
        self.yielded += 1
        return self.order[self.yielded - 1]


def resumable_loader(training: bool) -> type[DataLoader]:
    """The loader class: torchdata's ``StatefulDataLoader`` for training (Lightning saves its position in
    checkpoints, so a run resumed inside an epoch continues at the same batch instead of replaying the
    epoch), a plain ``DataLoader`` for evaluation."""
    if not training:
        return DataLoader
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader


class EncodedDataset(Dataset):
    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


# ---------------------------------------------------------------------------- sources
def read_local(path: Path) -> list[dict[str, Any]]:
    """Rows of a local JSON / JSONL / Parquet / CSV file."""
    if not path.exists():
        siblings = ([str(p) for p in path.parent.iterdir() if p.is_file() and p.suffix.lower() in LOCAL_SUFFIXES]
                    if path.parent.is_dir() else [])
        raise DataError(f"data file {str(path)!r} does not exist{did_you_mean(str(path), siblings)}; check "
                        "`data.init_args.dataset`")
    if path.is_dir():
        raise DataError(f"{path} is a folder; name a .jsonl/.json/.parquet/.csv file in it")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataError(f"{path}: line {number} is not UTF-8 (byte {err.start}: {raw[err.start:][:4]!r}); "
                                    "re-save the file as UTF-8") from err
                if not line.strip():
                    continue
                try:
                    rows.append(_object_row(json.loads(line), path, "line", number))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}: line {number} is not valid JSON ({err.msg}); fix or delete that line"
                                    ) from err
        return rows
    if suffix in (".json", ".csv"):
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as err:
            line = path.read_bytes()[: err.start].count(b"\n") + 1
            raise DataError(f"{path}: line {line} is not UTF-8; re-save the file as UTF-8") from err
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from err
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        return [_object_row(row, path, "row", number) for number, row in enumerate(data, start=1)]
    if suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text, newline="")))
    if suffix == ".parquet":
        import datasets

        return list(datasets.Dataset.from_parquet(str(path)))
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}")


def _object_row(row: Any, path: Path, unit: str, number: int) -> dict[str, Any]:
    """``row`` if it is a JSON object, else a :class:`DataError` naming the file and the row."""
    if not isinstance(row, dict):
        raise DataError(f"{path}: {unit} {number} is a JSON {type(row).__name__}, not an object; write each row "
                        "as {\"prompt\": ..., \"response\": ...}")
    return row


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` (one slash, no file suffix, not a local path): only these fall back to the hub."""
    return (name.count("/") == 1 and not name.startswith((".", "/", "~"))
            and Path(name).suffix.lower() not in LOCAL_SUFFIXES)


def read_hub(dataset_id: str, split: str, config: str | None) -> list[dict[str, Any]]:
    """Rows of a hub data set split (or a local data-set folder ``load_dataset`` understands)."""
    import datasets

    try:
        return list(datasets.load_dataset(dataset_id, config, split=split))
    except Exception as err:  # datasets raises many types for "not found / offline"
        raise DataError(
            f"cannot load data set {dataset_id!r} split {split!r}: {type(err).__name__}: {err}. Offline "
            "(HF_DATASETS_OFFLINE=1) only cached data sets load; otherwise pass a local .jsonl/.json/.parquet/.csv"
        ) from err


class SFTDataModule(L.LightningDataModule):
    """Instruction -> response SFT data with the prompt masked out of the loss."""

    def __init__(
        self,
        dataset: str = "gsm_symbolic",
        tokenizer: str = backbone.SMOLLM2,
        fields: dict[str, str] | None = None,
        hub_config: str | None = None,
        splits: dict[str, str] | None = None,
        num_train: int = 2000,
        num_val: int = 64,
        num_test: int = 64,
        max_length: int = 512,
        overlong: Literal["truncate", "drop"] = "truncate",
        on_malformed: Literal["error", "skip"] = "error",
        system_prompt: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_seed: int | None = None,
        holdout: Literal["item", "template"] = "item",
    ) -> None:
        """
        Args:
            dataset: a built-in task (``gsm_symbolic``, ``chain_sum``, any reasoning-gym name), a local
                .json/.jsonl/.parquet/.csv file, or a hub data set id.
            tokenizer: the backbone whose tokenizer renders the data (linked to ``model.init_args.model``).
            fields: source columns for ``prompt``, ``response`` and optionally ``answer``.
            hub_config: config name of a hub data set (GSM8K: ``main``).
            splits: split names for train / val / test in a hub data set or ``{train: file, ...}`` for local
                files; without a val/test source, they are carved from the end of train.
            num_train: built-in tasks: problems generated for training (none shared with val / test).
            num_val: held-out rows for validation loss.
            num_test: held-out rows for the harness.
            max_length: longest rendered row, in tokens.
            overlong: ``truncate`` the response tail, or ``drop`` the row (both are counted and printed).
            on_malformed: ``error`` on a missing/empty field (names file and row), or ``skip`` and count it.
            system_prompt: optional system message in the chat template.
            batch_size: training micro-batch size.
            eval_batch_size: validation / test batch size.
            num_workers: DataLoader workers.
            seed: seed of the built-in generators (fixes the data, and so the held-out split).
            shuffle_seed: seed of the training order; None = the run's global seed (``seed_everything``),
                so repeated seeds of a bench vary the order while the data stays fixed.
            holdout: built-in tasks: ``item`` (held-out problems are new items) or ``template``
                (``gsm_symbolic``: test / val problems come from templates never trained on).
        """
        super().__init__()
        for name, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                 ("max_length", max_length, 1), ("num_val", num_val, 0), ("num_test", num_test, 0),
                                 ("num_workers", num_workers, 0)):
            check_range(f"data.init_args.{name}", value, low, hint=f"use an integer >= {low}")
        given = dict(locals())
        self.save_hyperparameters()
        for name in SFT_ARGUMENTS:  # LightningCLI records a subclass's own arguments only: keep the rest
            self.hparams.setdefault(name, given[name])
        self.fields = {"prompt": "prompt", "response": "response", "answer": "answer", **(fields or {})}
        self.tokenizer = backbone.load_tokenizer(tokenizer)
        self.records: dict[str, list[dict[str, Any]]] = {}
        self.encoded: dict[str, EncodedDataset] = {}
        self.stats: dict[str, int] = {}

    # ------------------------------------------------------------------ loading
    def load_records(self) -> dict[str, list[dict[str, Any]]]:
        """Raw records per split: ``{"train": [...], "val": [...], "test": [...]}``."""
        hp = self.hparams
        sizes = {"train": hp.num_train, "val": hp.num_val, "test": hp.num_test}
        if tasks.is_builtin_task(hp.dataset):
            return {split: self.task_records(records, split)
                    for split, records in tasks.task_splits(hp.dataset, sizes, seed=hp.seed,
                                                            holdout=hp.get("holdout", "item")).items()}
        sources = dict(hp.splits or {})
        local = Path(hp.dataset).expanduser()
        if local.suffix.lower() in LOCAL_SUFFIXES or local.is_file():  # a folder goes to load_dataset
            sources.setdefault("train", str(local))
            raw = {split: read_local(Path(src).expanduser()) for split, src in sources.items()}
            origin = {split: src for split, src in sources.items()}
        elif not looks_like_hub_id(hp.dataset) and not local.is_dir():
            raise DataError(f"no built-in task, data file or folder named {hp.dataset!r}"
                            f"{did_you_mean(hp.dataset, tasks.task_names())}; give a task (chain_sum, "
                            "gsm_symbolic, ...), a .jsonl/.json/.parquet/.csv file or a hub id org/name")
        else:
            sources.setdefault("train", "train")
            raw = {split: read_hub(hp.dataset, src, hp.hub_config) for split, src in sources.items()}
            origin = {split: f"{hp.dataset}[{src}]" for split, src in sources.items()}
        records = {split: self.map_rows(rows, origin[split]) for split, rows in raw.items()}
        train = records["train"]
        if not train:
            raise DataError(f"{origin['train']}: no rows; the training data is empty")
        for split in ("test", "val"):  # carve missing held-out splits from the end of train
            if split not in records and sizes[split] > 0:
                if len(train) <= sizes[split]:
                    raise DataError(f"{origin['train']}: {len(train)} rows cannot also provide {sizes[split]} "
                                    f"{split} rows; lower num_{split} or give splits.{split}")
                records[split], train = train[-sizes[split]:], train[: -sizes[split]]
        records["train"] = train[: hp.num_train] if hp.num_train > 0 else train
        for split in ("val", "test"):
            if split in records:
                records[split] = records[split][: sizes[split]]
        return records

    def task_records(self, records: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
        """Hook: a built-in task's records of ``split`` as this data module's rows (SFT: as they are)."""
        return records

    def map_rows(self, rows: Iterable[dict[str, Any]], origin: str) -> list[dict[str, Any]]:
        """Hook: raw file / hub rows as this data module's records (through ``fields``)."""
        return self._map_fields(rows, origin)

    def _map_fields(self, rows: Iterable[dict[str, Any]], origin: str) -> list[dict[str, Any]]:
        out, skipped = [], 0
        for number, row in enumerate(rows, start=1):
            prompt, response = (_text(row.get(self.fields[name])) for name in ("prompt", "response"))
            problem = next((name for name, value in (("prompt", prompt), ("response", response))
                            if not isinstance(value, str) or not value.strip()), None)
            if problem is not None:
                if self.hparams.on_malformed == "skip":
                    skipped += 1
                    continue
                column = self.fields[problem]
                raise DataError(f"{origin}: row {number}: field {column!r} ({problem}) is missing or empty; fix the "
                                f"row, map the right column with `fields: {{{problem}: ...}}`, or set on_malformed: skip")
            # GSM8K shape: the response column holds the worked answer; extract `#### N` from it
            answer = row.get(self.fields["answer"]) if self.fields["answer"] != self.fields["response"] else None
            out.append({"prompt": prompt, "response": response,
                        "answer": str(answer) if answer is not None else extract_final_answer(response)})
        if skipped:
            self.stats[f"skipped_malformed:{origin}"] = skipped
        return out

    # ------------------------------------------------------------------ encoding
    def encode_split(self, records: list[dict[str, Any]], split: str) -> EncodedDataset:
        rows, truncated, dropped = [], 0, 0
        limit = self.hparams.max_length
        for index, record in enumerate(records):
            encoded = encode_example(self.tokenizer, record["prompt"], record["response"], self.hparams.system_prompt)
            row = fit_length(encoded, limit, self.hparams.overlong)
            if row is None:
                dropped += 1
                continue
            truncated += row is not encoded
            row["index"] = index
            rows.append(row)
        self.stats[f"{split}_truncated"], self.stats[f"{split}_dropped"] = truncated, dropped
        if truncated or dropped:
            print(f"[zoo] data/{split}: {truncated} rows truncated, {dropped} dropped (max_length={limit})")
        if not rows:
            raise DataError(f"no {split} rows left after encoding ({dropped} over max_length={limit}); "
                            "raise max_length or check the source")
        return EncodedDataset(rows)

    def setup(self, stage: str | None = None) -> None:
        if not self.records:
            self.records = self.load_records()
            self.encoded = {split: self.encode_split(recs, split) for split, recs in self.records.items() if recs}

    # ------------------------------------------------------------------ loaders
    def shuffle_seed(self) -> int:
        """The training-order seed: ``shuffle_seed``, else the global seed Lightning set, else ``seed``."""
        return run_seed(self.hparams.get("shuffle_seed"), self.hparams.seed)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.encoded:
            raise DataError(f"the data source has no {split} split")
        return resumable_loader(shuffle)(
            self.encoded[split],
            batch_size=self.hparams.batch_size if split == "train" else self.hparams.eval_batch_size,
            sampler=EpochShuffleSampler(self.encoded[split], self.shuffle_seed()) if shuffle else None,
            num_workers=self.hparams.num_workers,
            collate_fn=functools.partial(self.collate_function(), pad_id=self.tokenizer.pad_token_id),
        )

    def collate_function(self):
        """``collate(rows, pad_id) -> batch`` for this data (subclasses with extra fields override it)."""
        return collate

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    # ------------------------------------------------------------------ harness hooks
    def eval_records(self, split: str = "test") -> list[dict[str, Any]]:
        """Held-out raw records (prompt, response, answer, ...) that the harness generates for."""
        self.setup("test")
        if split not in self.records:
            raise DataError(f"the data source has no {split} split")
        return self.records[split]

    def score_completion(self, record: dict[str, Any], completion: str) -> dict[str, float]:
        """Per-record metrics of a generated completion. Default: final-answer exact match."""
        return {"exact_match": tasks.score_answer(record, extract_final_answer(completion))}

    def evaluation_metrics(self, records: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
        """Aggregate metrics over a split (default: the mean of :meth:`score_completion`).

        Subclasses override this for corpus-level metrics (macro-F1, ...)."""
        scores = [self.score_completion(r, c) for r, c in zip(records, completions)]
        return {key: sum(s[key] for s in scores) / max(1, len(scores)) for key in (scores[0] if scores else {})}

    def predict_dataloader(self) -> DataLoader:
        records = self.records.get("test", [])
        return DataLoader(records, batch_size=self.hparams.eval_batch_size,
                          collate_fn=lambda rows: {"prompt_text": [r["prompt"] for r in rows]})


def _text(value: Any) -> Any:
    """A number in a prompt or response column is its text (``42`` -> ``"42"``); anything else unchanged."""
    return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def extract_final_answer(text: str) -> str:
    """The answer after the last ``####``, else the last number in ``text``, else the stripped text."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else ""
    numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return numbers[-1].replace(",", "") if numbers else text.strip()


SFT_ARGUMENTS = tuple(name for name in inspect.signature(SFTDataModule.__init__).parameters if name != "self")
