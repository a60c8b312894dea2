"""Per-item records of a bench evaluation: one JSON line per test item in ``OUT/items/<name>.jsonl.gz``.

Each line: ``id`` (the item's position in the data's test split, the batch's ``index``), ``prompt_sha``
(sha256 of the prompt text, 16 hex digits), ``completion`` and the scores of
``datamodule.score_completion`` (only for the first ``--limit`` items, the ones generated for),
``nll_sum`` (summed response NLL of the item, nats) and ``tokens`` (its response tokens). The record names
the file in ``items`` (relative to ``OUT``); :mod:`zoo.harness.bench.stats` pairs two records' items.

:func:`response_nll_items` computes the split NLL and the per-item sums in one pass over the test loader,
the same computation as :func:`zoo.harness.generation.response_nll` (module ``forward`` +
``weighted_token_loss`` with the plain supervision mask; preference data: the chosen responses).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zoo.harness.bench.records import digest

__all__ = ["items_name", "prompt_sha", "read_items", "response_nll_items", "write_items"]


def items_name(record: dict[str, Any]) -> str:
    """File name (``<method>-s<seed>-<hash of config hash and budget>.jsonl.gz``) for a record's items; one
    per :func:`~zoo.harness.bench.records.record_key`."""
    method = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(record["method"])).strip("-") or "run"
    key = digest(record["config_hash"], str(record.get("seed")), record.get("budget"))
    return f"{method}-s{record.get('seed')}-{key}.jsonl.gz"


def prompt_sha(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def response_nll_items(module, datamodule, split: str = "test") -> dict[str, Any]:
    """Held-out response NLL of ``split`` and its per-item parts, in one pass.

    Returns ``{"nll": token mean, "ppl": exp(nll), "tokens": int, "per_item": {id: (nll_sum, tokens)}}``;
    ``id`` is the batch's ``index`` (the record's position in the split) when the batch carries one, else the
    row's position in the (unshuffled) loader. Rows sharing an id (the two sides of a preference pair) are
    summed; ``nll`` equals the sum of the per-item sums over the sum of their tokens.
    """
    from zoo.modules.base import target_mask

    datamodule.setup("test")
    loader = getattr(datamodule, f"{split}_dataloader")()
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    per_item: dict[int, list[float]] = {}
    position = 0
    try:
        for batch in loader:
            batch = _to_device(batch, device)
            outputs = module(batch)
            weights = target_mask(batch["labels"]).float()
            if "is_chosen" in batch:  # preference pairs: the response NLL is the chosen responses'
                weights = weights * batch["is_chosen"].to(weights.dtype)[:, None]
            losses = module.weighted_token_loss(outputs, weights).double().sum(dim=1).tolist()
            counts = weights.sum(dim=1).long().tolist()
            rows = len(losses)
            index = batch.get("index")
            ids = index.tolist() if isinstance(index, Tensor) else list(range(position, position + rows))
            position += rows
            for item, loss, count in zip(ids, losses, counts):
                entry = per_item.setdefault(int(item), [0.0, 0])
                entry[0] += loss
                entry[1] += count
    finally:
        module.train(was_training)
    total = sum(v[0] for v in per_item.values())
    count = sum(int(v[1]) for v in per_item.values())
    nll = total / max(count, 1)
    return {"nll": nll, "ppl": math.exp(min(nll, 50.0)), "tokens": count,
            "per_item": {k: (v[0], int(v[1])) for k, v in sorted(per_item.items())}}


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
