"""Running a suite over models (per-item scores on shared eval sets) and the report rows: mean ± bootstrap CI
per metric and per axis, paired deltas vs the base when the pairing key matches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from zoo.harness.checklist.axes import NOT_APPLICABLE, check_axes, default_suite
from zoo.harness.checklist.base import ChecklistTask, EvalAxis
from zoo.harness.rag.stats import bootstrap_ci, paired_delta


def run_suite(
    models: dict[str, Any],
    suite: Sequence[ChecklistTask] | None = None,
    limit: int = 32,
    not_applicable: dict[EvalAxis, str] | None = None,
) -> dict[str, Any]:
    """Per-item scores of every model on every task: ``{"items": {task: [prompts]}, "scores":
    {model: {task: {metric: [values]}}}}``; the eval sets are built once, so models see the same items."""
    suite = list(default_suite() if suite is None else suite)
    not_applicable = dict(NOT_APPLICABLE if not_applicable is None else not_applicable)
    check_axes(suite, not_applicable)
    items = {task.name: task.items(limit) for task in suite}
    scores = {
        name: {task.name: task.score(module, items[task.name]) for task in suite}
        for name, module in models.items()
    }
    pairing = {name: pairing_key(module) for name, module in models.items()}
    return {
        "suite": suite,
        "items": items,
        "scores": scores,
        "not_applicable": not_applicable,
        "pairing": pairing,
    }


def pairing_key(module) -> str:
    """What must match for a paired delta: tokenizer (class, vocabulary size, chat template) and the suite's
    fixed decoding (greedy, per-task max_new_tokens, no system prompt)."""
    import hashlib

    tokenizer = getattr(module, "tokenizer", None)
    if tokenizer is None:
        return "unknown"
    template = getattr(tokenizer, "chat_template", None) or ""
    digest = hashlib.sha1(str(template).encode()).hexdigest()[:12]
    return f"{type(tokenizer).__name__}/{len(tokenizer)}/{digest}/greedy"


def summarize(result: dict[str, Any], base: str | None = None, resamples: int = 1000) -> list[dict[str, Any]]:
    """Rows of mean ± bootstrap CI per (model, axis, task, metric) and per (model, axis) over the headline
    metrics' items; with ``base``, paired deltas vs the base on the same items, only for models whose
    :func:`pairing_key` (tokenizer, chat template, decoding) equals the base's (else a "no delta" row)."""
    rows = []
    pairing = result.get("pairing") or {}
    for model, per_task in result["scores"].items():
        if base and model != base and pairing.get(model) != pairing.get(base):
            rows.append(
                {
                    "model": model,
                    "axis": "-",
                    "task": "no delta",
                    "n": 0,
                    "mean": None,
                    "low": None,
                    "high": None,
                    "metric": f"tokenizer/template differ from {base}: "
                    f"{pairing.get(model)} vs {pairing.get(base)}",
                }
            )
            paired_base = None
        else:
            paired_base = base
        axis_values: dict[str, list[float]] = {}
        axis_base: dict[str, list[float]] = {}
        for task in result["suite"]:
            for metric, values in per_task[task.name].items():
                mean, low, high = bootstrap_ci(values, resamples)
                row = {
                    "model": model,
                    "axis": task.axis.value,
                    "task": task.name,
                    "metric": metric,
                    "mean": mean,
                    "low": low,
                    "high": high,
                    "n": len(values),
                }
                base_values = (
                    result["scores"][base][task.name][metric] if paired_base and model != base else None
                )
                if base_values is not None and len(base_values) == len(values) and values:
                    row.update(
                        {
                            f"delta_{k}": v
                            for k, v in paired_delta(values, base_values, resamples).items()
                            if k != "n"
                        }
                    )
                rows.append(row)
                if metric in task.headline:
                    axis_values.setdefault(task.axis.value, []).extend(values)
                    if base_values is not None:
                        axis_base.setdefault(task.axis.value, []).extend(base_values)
        for axis, values in axis_values.items():
            mean, low, high = bootstrap_ci(values, resamples)
            row = {
                "model": model,
                "axis": axis,
                "task": "(axis)",
                "metric": "headline",
                "mean": mean,
                "low": low,
                "high": high,
                "n": len(values),
            }
            if axis in axis_base and len(axis_base[axis]) == len(values):
                row.update(
                    {
                        f"delta_{k}": v
                        for k, v in paired_delta(values, axis_base[axis], resamples).items()
                        if k != "n"
                    }
                )
            rows.append(row)
        for axis, reason in result["not_applicable"].items():
            rows.append(
                {
                    "model": model,
                    "axis": axis.value,
                    "task": "n/a",
                    "metric": reason,
                    "mean": None,
                    "low": None,
                    "high": None,
                    "n": 0,
                }
            )
    return rows
