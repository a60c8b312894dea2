"""Per-item records of a bench evaluation: one JSON line per test item in ``OUT/items/<name>.jsonl.gz``.

Each line: ``id`` (the item's position in the data's test split, the batch's ``index``), ``prompt_sha``
(sha256 of the prompt text, 16 hex digits), ``completion`` and the scores of
``datamodule.score_completion`` (only for the first ``--limit`` items, the ones generated for),
``nll_sum`` (summed response NLL of the item, nats) and ``tokens`` (its response tokens). The record names
the file in ``items`` (relative to ``OUT``); :mod:`zoo.harness.bench.stats` pairs two records' items.

:func:`response_nll_items` (defined in :mod:`zoo.harness.generation`, re-exported here) computes the split NLL
and the per-item sums in one pass over the test loader, the pass :func:`zoo.harness.generation.response_nll`
also runs (module ``forward`` +
``weighted_token_loss`` with the plain supervision mask; preference data: the chosen responses).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from zoo.harness.bench.records import digest
from zoo.harness.generation import response_nll_items

__all__ = ["items_name", "prompt_sha", "read_items", "response_nll_items", "write_items"]


def items_name(record: dict[str, Any]) -> str:
    """File name (``<method>-s<seed>-<hash of config hash and budget>.jsonl.gz``) for a record's items; one
    per :func:`~zoo.harness.bench.records.record_key`."""
    method = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(record["method"])).strip("-") or "run"
    key = digest(record["config_hash"], str(record.get("seed")), record.get("budget"))
    return f"{method}-s{record.get('seed')}-{key}.jsonl.gz"


def prompt_sha(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def write_items(path: Path, records: list[dict[str, Any]], completions: list[str],
                scores: list[dict[str, float]], per_item: dict[int, tuple[float, int]]) -> int:
    """Write the items file (gzip JSON lines, sorted by id). ``records``: the whole test split (``records[i]``
    is item ``i``); ``completions`` / ``scores``: those of the first ``len(completions)`` items. Returns the
    number of lines."""
    lines: dict[int, dict[str, Any]] = {i: {"id": i, "prompt_sha": prompt_sha(str(record.get("prompt", "")))}
                                        for i, record in enumerate(records)}
    for i, (completion, score) in enumerate(zip(completions, scores)):
        lines[i].update(completion=completion, scores=score)
    for i, (nll_sum, tokens) in per_item.items():
        lines.setdefault(i, {"id": i}).update(nll_sum=nll_sum, tokens=tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with gzip.open(partial, "wt", encoding="utf-8") as handle:
        for i in sorted(lines):
            handle.write(json.dumps(lines[i], default=str) + "\n")
    partial.replace(path)
    return len(lines)


def read_items(path: Path) -> list[dict[str, Any]]:
    """The lines of an items file (``[]`` when it is missing)."""
    if not Path(path).exists():
        return []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
