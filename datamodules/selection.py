"""Data selection for a pre-fine-tuning stage: the selector interface, two baselines, and the DataModule
that serves a selected subset of a candidate pool as stage 1 before the task's own training data.

Selector interface (:class:`DataSelector`)
    ``set_target(texts)``   the small target sample the selection should serve;
    ``score(pool) -> (N,)`` one score per candidate text, LOWER = chosen first;
    ``select(k) -> (k,)``   indices of the k lowest scores of the last scored pool, ties broken by the text's
                            content hash, so a selection never depends on the pool's order;
    ``choose(pool, target, k) -> texts`` the three above in one call (what the DataModule uses).
    Selectors here: :class:`RandomSelector` (a seeded hash of the text: random, yet order-invariant),
    :class:`TargetOnlySelector` (no pool: the target texts themselves, cycled to the same budget) and
    GOT-D (:class:`zoo.datamodules.got_d.GOTDSelector`).

Two stages in one DataModule (:class:`SelectedSubsetDataModule`)
    It IS the task's :class:`~zoo.datamodules.sft.SFTDataModule` (same arguments, same val/test/harness hooks)
    with a stage-1 prefix: in the first ``stage1_epochs`` epochs the training loader serves the ``budget``
    selected pool texts (shuffled; plain causal-LM rows, every token supervised, no chat template: the paper's
    "pre-fine-tuning on raw text") and then the task's rows (shuffled); later epochs serve the task alone.
    A subclass rather than a wrapper around another DataModule so that the model->tokenizer link, the bench
    and the contract matrix's data overrides reach the task part unchanged.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import RandomSampler

from zoo import tasks
from zoo.datamodules.sft import (
    SEGMENT_REASONING,
    DataError,
    EncodedDataset,
    SFTDataModule,
    read_local,
)
from zoo.errors import ConfigError

#: reasoning-gym generators in the built-in pool, plus the zoo's synthetic code and tool-use tasks.
POOL_SOURCES = ("basic_arithmetic", "chain_sum", "leg_counting", "letter_counting", "word_sorting",
                "number_sorting", "propositional_logic", "family_relationships", "time_intervals",
                "gsm_symbolic", "zoo_code", "zoo_tool_use")


def content_keys(texts: Sequence[str]) -> list[str]:
    return [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]


class DataSelector:
    """Base class of selectors: ``score(pool)`` (lower = better), ``select(k)`` (indices), ``choose``."""

    def __init__(self) -> None:
        self.target: list[str] = []
        self.scores: np.ndarray | None = None
        self._keys: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (checkpoint hyper-parameters) without the per-run state: scores, target, embeddings."""
        transient = {"scores", "_keys", "target", "_embedder"}
        return {k: (None if k in transient else v) for k, v in self.__dict__.items()}

    def set_target(self, texts: Sequence[str]) -> None:
        """The target sample the selection should serve (ignored by target-agnostic selectors)."""
        self.target = list(texts)

    def score(self, pool: Sequence[str]) -> np.ndarray:
        """(N,) scores of the candidate ``pool``; lower is chosen first. Remembered for :meth:`select`."""
        self.scores = np.asarray(self.compute_scores(list(pool)), dtype=np.float64)
        self._keys = content_keys(pool)
        return self.scores

    def compute_scores(self, pool: list[str]) -> np.ndarray:
        raise NotImplementedError

    def select(self, k: int) -> np.ndarray:
        """Indices (into the last scored pool) of the ``k`` lowest scores; ties broken by content hash."""
        if self.scores is None:
            raise ConfigError(f"{type(self).__name__}.select called before score(pool)")
        if not 0 < k <= len(self.scores):
            raise ConfigError(f"selection budget k={k} must be between 1 and the pool size "
                              f"{len(self.scores)}; lower `budget` or raise `pool_size`")
        order = np.lexsort((np.array(self._keys), self.scores))
        return order[:k]

    def choose(self, pool: Sequence[str], target: Sequence[str], k: int) -> list[str]:
        """The ``k`` texts of ``pool`` this selector picks for ``target``."""
        self.set_target(target)
        self.score(pool)
        return [pool[i] for i in self.select(k)]


class RandomSelector(DataSelector):
    """Uniformly random picks: score = a seeded hash of the text (so the pick ignores the pool's order)."""

    def __init__(self, seed: int = 0) -> None:
        """
        Args:
            seed: which random subset.
        """
        super().__init__()
        self.seed = seed

    def compute_scores(self, pool: list[str]) -> np.ndarray:
        digests = [hashlib.sha256(f"{self.seed}\0{t}".encode()).hexdigest() for t in pool]
        return np.array([int(d[:15], 16) for d in digests], dtype=np.float64)


class TargetOnlySelector(DataSelector):
    """The target-only baseline at the same budget: stage 1 trains on the target texts, cycled to ``k``."""

    def compute_scores(self, pool: list[str]) -> np.ndarray:
        return np.full(len(pool), np.inf)  # never picks from the pool

    def choose(self, pool: Sequence[str], target: Sequence[str], k: int) -> list[str]:
        if not target:
            raise ConfigError("the target-only baseline needs a non-empty target set (target_size > 0)")
        self.set_target(target)
        return list(itertools.islice(itertools.cycle(self.target), k))


# ---------------------------------------------------------------------------- texts
def normalize_lengths(texts: Sequence[str], chars: int) -> list[str]:
    """Texts of about ``chars`` characters (spec step 1): longer ones split at whitespace, shorter ones
    joined (blank line between) until they reach ``chars``. Joined in content-hash order, so the result does
    not depend on the input's order; ``chars <= 0`` returns the texts unchanged."""
    if chars <= 0:
        return list(texts)
    pieces: list[str] = []
    for text in texts:
        text = text.strip()
        while len(text) > chars:
            cut = text.rfind(" ", chars // 2, chars)
            cut = chars if cut < 0 else cut
            pieces.append(text[:cut].strip())
            text = text[cut:].strip()
        if text:
            pieces.append(text)
    pieces = [p for _, p in sorted(zip(content_keys(pieces), pieces))]
    out, current = [], ""
    for piece in pieces:
        current = f"{current}\n\n{piece}" if current else piece
        if len(current) >= chars:
            out.append(current)
            current = ""
    if current:
        out.append(current)
    return out


def record_text(record: dict[str, Any]) -> str:
    return f"{record['prompt']}\n{record['response']}"


def builtin_pool(size: int, seed: int = 1000, sources: Sequence[str] = POOL_SOURCES) -> list[str]:
    """``size`` candidate texts (question + worked answer), an equal share from each source, deterministic."""
    from zoo.datamodules.code import synthetic_code_tasks
    from zoo.datamodules.tool_use import generate_tool_records

    share = -(-size // len(sources))
    texts: list[str] = []
    for offset, source in enumerate(sources):
        if source == "zoo_code":
            records = synthetic_code_tasks(min(share, 400), seed=seed)  # the template space is small
        elif source == "zoo_tool_use":
            records = generate_tool_records(share, seed=seed)
        else:
            records = tasks.generate_records(source, share, seed + offset)[0]
        texts += [record_text(r) for r in records]
    return list(dict.fromkeys(texts))[:size]


def read_pool(path: str) -> list[str]:
    """Pool texts from a local ``.txt`` (one text per line), or ``.json``/``.jsonl``/``.csv``/``.parquet``
    rows with a ``text`` field (or ``prompt`` + ``response``)."""
    file = Path(path).expanduser()
    if file.suffix == ".txt":
        return [line for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = read_local(file)
    try:
        return [r["text"] if "text" in r else record_text(r) for r in rows]
    except KeyError as err:
        raise DataError(f"{path}: pool rows need a 'text' field or 'prompt' and 'response'") from err


# ---------------------------------------------------------------------------- two-stage loading
class TwoStageSampler(RandomSampler):
    """Epochs ``< stage1_epochs``: the stage-1 rows (indices ``< stage1``) shuffled, then the task rows
    shuffled; later epochs: the task rows only. The order depends only on (seed, epoch), and the iterator
    carries its position as state (torchdata's ``Stateful``), so a resumed ``StatefulDataLoader`` continues
    at the same batch. Lightning calls ``set_epoch`` before every epoch."""

    def __init__(self, data_source, stage1: int, stage1_epochs: int, seed: int = 0) -> None:
        super().__init__(data_source)
        self.stage1, self.stage1_epochs, self.seed, self.epoch = stage1, stage1_epochs, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        n = len(self.data_source)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        first = torch.randperm(self.stage1, generator=generator).tolist()
        second = (torch.randperm(n - self.stage1, generator=generator) + self.stage1).tolist()
        return (first if epoch < self.stage1_epochs else []) + second

    def __len__(self) -> int:
        total = len(self.data_source)
        return total if self.epoch < self.stage1_epochs else total - self.stage1

    def __iter__(self) -> TwoStageIterator:
        return TwoStageIterator(self)


class TwoStageIterator:
    """One epoch of a :class:`TwoStageSampler`; the order is drawn at the first ``next`` (a resumed loader may
    build its iterator before Lightning sets the epoch)."""

    def __init__(self, sampler: TwoStageSampler) -> None:
        self.sampler, self.epoch, self.yielded = sampler, sampler.epoch, 0
        self.items: list[int] | None = None
        self.restored = False

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.yielded = int(state["epoch"]), int(state["yielded"])
        self.items, self.restored = None, True

    def __iter__(self) -> TwoStageIterator:
        return self

    def __next__(self) -> int:
        if self.items is None:
            if not self.restored or self.yielded >= len(self.sampler.order(self.epoch)):
                self.epoch, self.yielded = self.sampler.epoch, 0
            self.items = self.sampler.order(self.epoch)
        if self.yielded >= len(self.items):
            raise StopIteration
        self.yielded += 1
        return self.items[self.yielded - 1]


class SelectedSubsetDataModule(SFTDataModule):
    """The task's SFT data, preceded in the first epoch(s) by ``budget`` texts a selector picked."""

    def __init__(self, *args: Any, selector: DataSelector | None = None, budget: int = 256,
                 pool: str = "builtin", pool_size: int = 1024, pool_seed: int = 1000, target_size: int = 64,
                 text_chars: int = 512, stage1_epochs: int = 1, **kwargs: Any) -> None:
        """
        Args:
            selector: the data selector (GOT-D, random, target-only); None = no stage 1 (plain task SFT).
            budget: texts served in stage 1 (paper k).
            pool: ``builtin`` (reasoning-gym generators + the zoo's code and tool-use tasks) or a local file
                (.txt lines, or rows with ``text``).
            pool_size: candidate texts taken from the pool (before length normalisation).
            pool_seed: seed of the built-in pool's generators (far from the task's split seeds).
            target_size: target sample = the first ``target_size`` task training rows (prompt + response).
            text_chars: normalised text length in characters for pool and target (paper ~1000; 0 = off).
            stage1_epochs: epochs that start with the stage-1 texts.
            *args, **kwargs: :class:`~zoo.datamodules.sft.SFTDataModule`'s (the task).
        """
        super().__init__(*args, **kwargs)
        self.selector = selector
        self.stage1_rows: list[dict[str, Any]] = []
        self.selected: list[str] = []

    def load_pool(self) -> list[str]:
        hp = self.hparams
        texts = (builtin_pool(hp.pool_size, hp.pool_seed) if hp.pool == "builtin"
                 else read_pool(hp.pool)[: hp.pool_size])
        held_out = {r["prompt"] for split in ("val", "test") for r in self.records.get(split, [])}
        texts = [t for t in texts if not any(t.startswith(p + "\n") for p in held_out)]
        return normalize_lengths(texts, hp.text_chars)

    def target_texts(self) -> list[str]:
        rows = self.records.get("train", [])[: self.hparams.target_size]
        return normalize_lengths([record_text(r) for r in rows], self.hparams.text_chars)

    def encode_text(self, text: str, index: int) -> dict[str, Any]:
        ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = ids[: self.hparams.max_length - 1] + [self.tokenizer.eos_token_id]
        return {"input_ids": ids, "labels": list(ids), "segments": [SEGMENT_REASONING] * len(ids),
                "index": index}

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.selector is None or self.stage1_rows or stage not in (None, "fit"):
            return  # evaluation needs no selection
        self.selected = self.selector.choose(self.load_pool(), self.target_texts(), self.hparams.budget)
        first = len(self.encoded["train"])
        self.stage1_rows = [self.encode_text(t, first + i) for i, t in enumerate(self.selected)]
        self.stats["stage1_rows"] = len(self.stage1_rows)
        print(f"[zoo] stage 1: {len(self.stage1_rows)} texts chosen by {type(self.selector).__name__}, "
              f"then {first} task rows")

    def save_selection(self, path: str | Path) -> None:
        """Write the stage-1 texts as JSON lines (``{"text": ...}``)."""
        with Path(path).open("w", encoding="utf-8") as handle:
            for text in self.selected:
                handle.write(json.dumps({"text": text}) + "\n")

    def train_dataloader(self):
        if not self.stage1_rows:
            return super().train_dataloader()
        import functools

        from zoo.datamodules.sft import resumable_loader

        dataset = EncodedDataset(self.stage1_rows + self.encoded["train"].rows)
        sampler = TwoStageSampler(dataset, len(self.stage1_rows), self.hparams.stage1_epochs,
                                  self.shuffle_seed())
        return resumable_loader(True)(
            dataset, batch_size=self.hparams.batch_size, sampler=sampler,
            num_workers=self.hparams.num_workers,
            collate_fn=functools.partial(self.collate_function(), pad_id=self.tokenizer.pad_token_id))
