"""Bench report: mean +- std over seeds per (method, backbone, budget), ``results.md`` and ``results.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from zoo.harness.bench.records import load_results


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))



def lr_at_edge(record: dict[str, Any]) -> bool:
    """Whether a grid record's chosen rate is the smallest or largest rate its grid trained."""
    grid = sorted(float(rate) for rate in (record.get("lr_grid") or {}))
    chosen = record.get("lr_chosen")
    return len(grid) > 1 and chosen is not None and float(chosen) in (grid[0], grid[-1])


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, backbone, budget): mean and std of each metric over seeds; base rows first."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        key = (record["method"], record.get("backbone"), json.dumps(record.get("budget"), sort_keys=True))
        groups.setdefault(key, []).append(record)
    rows = []
    for (method, backbone_name, _), group in groups.items():
        row = {"method": method, "backbone": backbone_name, "seeds": len(group),
               "steps": group[0].get("steps"), "main_metric": group[0].get("main_metric"),
               "budget": group[0].get("budget")}
        chosen = sorted({r["lr_chosen"] for r in group if r.get("lr_chosen") is not None})
        if chosen:  # --lr-grid (zoo.harness.bench.lr_grid): the validation-chosen rate(s) of the seeds
            row["lr"] = chosen
            row["lr_edge"] = any(lr_at_edge(r) for r in group)
        numeric: dict[str, list[float]] = {}
        for record in group:
            values = dict(record.get("metrics", {}))
            for key in ("train_wall_s", "tokens_per_s", "peak_rss_mb", "trainable_params"):
                values[key] = record.get(key)
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    numeric.setdefault(key, []).append(float(value))
        row["stats"] = {key: mean_std(vals) for key, vals in numeric.items()}
        rows.append(row)
    rows.sort(key=lambda r: r["method"] != "base")
    return rows



def _cell(row: dict[str, Any], key: str | None, digits: int = 3) -> str:
    if key is None or key not in row["stats"]:
        return "-"
    mean, std = row["stats"][key]
    if row["seeds"] > 1:
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"



EXTRA_COLUMNS = ("reward_accuracy", "reward_margin", "logp_accuracy", "logp_margin")



def backbone_label(backbone: Any) -> str:
    """A registry name as it is; a local folder (a run's export) as its last two parts, since the rest names
    a machine's layout, not the model (the records keep the full path)."""
    text = str(backbone)
    parts = Path(text).parts
    return text if "/" not in text or len(parts) <= 2 else "…/" + "/".join(parts[-2:])


def short_commit(commit: str) -> str:
    """The hash cut to 12 characters, its ``+dirty`` / ``+mixed`` marks kept."""
    head, plus, marks = commit.partition("+")
    return head[:12] + plus + marks


def markdown(rows: list[dict[str, Any]]) -> str:
    mains = sorted({r["main_metric"] for r in rows if r["main_metric"]})
    extras = [key for key in EXTRA_COLUMNS if key not in mains and any(key in r["stats"] for r in rows)]
    mains = mains + extras
    with_lr = any(r.get("lr") for r in rows)  # --lr-grid: the chosen learning rate per row
    header = ["method", "backbone", "steps", "seeds", *(["lr"] if with_lr else []), *mains, "nll", "ppl",
              "train s", "tokens/s", "peak RSS MB", "trainable params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # paired comparisons to the reference row (zoo.harness.bench.stats, --reference)
    reference = next((r["reference"] for r in rows if r.get("reference")), None)
    compared = reference is not None and any(r.get("compare") for r in rows)
    if compared:
        from zoo.harness.bench.stats import comparison_cells, comparison_header

        first = next((r["main_metric"] for r in rows if r["main_metric"]), None)
        header += comparison_header(first, reference)
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        trainable = r["stats"].get("trainable_params")
        steps = "-" if r["steps"] is None else str(r["steps"])
        edge = " *(edge)*" if r.get("lr_edge") else ""
        lr = [(", ".join(f"{v:g}" for v in r.get("lr") or []) or "-") + edge] if with_lr else []
        cells = [f"`{r['method']}`", backbone_label(r["backbone"]), steps, str(r["seeds"]), *lr,
                 *[_cell(r, m) for m in mains], _cell(r, "nll"), _cell(r, "ppl", 2),
                 _cell(r, "train_wall_s", 1), _cell(r, "tokens_per_s", 0), _cell(r, "peak_rss_mb", 0),
                 f"{int(trainable[0]):,}" if trainable else "-"]
        if compared:
            cells += comparison_cells(r, first)
        lines.append("| " + " | ".join(cells) + " |")
    if any(r.get("lr_edge") for r in rows):
        lines += ["", "lr *(edge)*: the validation-chosen rate is the smallest or largest its grid trained, "
                  "so the optimum may lie outside it (`zoo bench --lr-grid-grow N` searches past the edge)."]
    commits = sorted({c for r in rows for c in r.get("commits", [])})
    if len(commits) > 1:  # a table should come from one commit (issue 13): say when it does not
        shown = ", ".join(short_commit(c) for c in commits)
        lines += ["", f"Rows come from {len(commits)} commits ({shown}): "
                  "regenerate them at one commit (zoo bench --rerun rebuilds a row from its record)."]
    if compared:
        lines += ["", f"Δ: paired difference to `{reference}` (row - reference) over the items both scored "
                  "(n = items × seeds), 95 % percentile bootstrap interval resampling seeds, then items; "
                  "*inconclusive*: the interval contains 0 (for 0/1 scores, or p >= 0.05). p: exact "
                  "two-sided sign test on the items' seed-mean differences (McNemar's exact test for one "
                  "seed). Per-item records: `items/`."]
    return "\n".join(lines) + "\n"



def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["method"] if sum(x["method"] == r["method"] for x in rows) == 1 else
              f"{r['method']}\n{backbone_label(r['backbone'])}/{r['steps']}" for r in rows]
    main = next((r["main_metric"] for r in rows if r["main_metric"]), None)
    panels = [(main, main or "main metric"), ("nll", "held-out response NLL (lower is better)")]
    figure, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.4 * len(rows) + 3), 3.8))
    for axis, (key, title) in zip(axes, panels):
        stats = [r["stats"].get(key, (float("nan"), 0.0)) if key else (float("nan"), 0.0) for r in rows]
        colors = ["0.6" if r["method"] == "base" else "C0" for r in rows]
        bars = axis.bar(range(len(rows)), [s[0] for s in stats], color=colors)
        axis.bar_label(bars, labels=[f"{s[0]:.3g}" for s in stats], fontsize=8, label_type="center")
        # 95 % intervals (zoo.harness.bench.stats.row_interval) with n; no bar where nothing estimates one
        for x, (r, s) in enumerate(zip(rows, stats)):
            interval = (r.get("ci") or {}).get(key) if key else None
            if interval is None or not math.isfinite(s[0]):
                continue
            low, high, items, seeds = interval
            axis.errorbar([x], [s[0]], yerr=[[max(s[0] - low, 0.0)], [max(high - s[0], 0.0)]], fmt="none",
                          ecolor="black", capsize=4)
            axis.annotate(f"n={items}×{seeds}" if items else f"n={seeds} seeds", (x, high), fontsize=7,
                          ha="center", xytext=(0, 3), textcoords="offset points")
        finite = [s[0] for s in stats if math.isfinite(s[0])]
        if key == main and finite and all(0.0 <= v <= 1.0 for v in finite):
            axis.set_ylim(0.0, 1.05)  # a fraction (exact match, accuracy): show it on its full scale
        axis.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("zoo bench: mean, 95 % CI (bootstrap over seeds, then items; n = items × seeds)",
                    fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)



def write_report(results: Path, out: Path, reference: str | None = None) -> list[dict[str, Any]]:
    """``results.md`` and ``results.png`` from ``results.jsonl``; ``reference``: the row the others are
    compared to (default ``sft`` when present, else ``base``; :mod:`zoo.harness.bench.stats`)."""
    from zoo.harness.bench.extra_evals import contamination_note
    from zoo.harness.bench.records import BenchError
    from zoo.harness.bench.stats import attach_comparisons

    everything = [r for r in load_results(results) if r.get("kind") != "grid"]  # grid: its choice only
    records = [r for r in everything if r.get("kind") != "eval_task"]  # --eval-task rows: their own tables
    rows = summarize(records)
    if reference and rows and reference not in {r["method"] for r in rows}:
        raise BenchError(f"--reference {reference}: no such row in {results} (rows: "
                         f"{', '.join(sorted({r['method'] for r in rows}))}); pick one of them")
    used = attach_comparisons(rows, records, out, reference) if rows else None
    for row in rows:
        row["reference"] = used
    if rows:
        text = markdown(rows) + contamination_note(records)
        for task in sorted({r["eval_task"] for r in everything if r.get("kind") == "eval_task"}):
            task_records = [r for r in everything if r.get("eval_task") == task]
            task_rows = summarize(task_records)
            task_used = attach_comparisons(task_rows, task_records, out, used if used in {
                r["method"] for r in task_rows} else None)
            for row in task_rows:
                row["reference"] = task_used
            text += f"\n## --eval-task `{task}`: every row on {task}'s test items\n\n" + markdown(task_rows)
        (out / "results.md").write_text(text)
        plot(rows, out / "results.png")
    return rows
