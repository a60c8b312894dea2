"""Compact table of a merged few-shot bench folder: the main metric and macro-F1 (mean ± std over seeds) and
the paired difference of the main metric to each reference [95% CI] (:mod:`zoo.harness.bench.stats`).

    python docs/results/fewshot/table.py docs/results/fewshot/sentiment_hard-k4 pet_lora icl
"""

import sys
from pathlib import Path

from zoo.harness.bench.records import load_results
from zoo.harness.bench.report import summarize
from zoo.harness.bench.stats import attach_comparisons


def cell(row: dict, key: str) -> str:
    if key not in row["stats"]:
        return "-"
    mean, std = row["stats"][key]
    return f"{mean:.3f}" + (f" ± {std:.3f}" if row["seeds"] > 1 else "")


def table(out: Path, references: list[str]) -> str:
    records = [r for r in load_results(out / "results.jsonl") if r.get("kind") not in ("grid", "eval_task")]
    rows = summarize(records)
    metric = next(r["main_metric"] for r in rows if r["main_metric"])
    columns = {}
    for reference in references:
        if reference in {r["method"] for r in rows}:
            compared = summarize(records)
            attach_comparisons(compared, records, out, reference)
            columns[reference] = {r["method"]: (r.get("compare") or {}).get(metric) for r in compared}
    head = ["method", "seeds", "trainable", "train s", metric, "macro_f1",
            *[f"Δ {metric} vs {ref} [95% CI]" for ref in columns]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        stats = row["stats"]
        trainable = int(stats.get("trainable_params", (0, 0))[0])
        cells = [f"`{row['method']}`", str(row["seeds"]), f"{trainable:,}",
                 f"{stats.get('train_wall_s', (0, 0))[0]:.0f}", cell(row, metric), cell(row, "macro_f1")]
        for reference in columns:
            entry = columns[reference].get(row["method"])
            if not entry:
                cells.append("-")
                continue
            tag = " *inconclusive*" if entry["inconclusive"] else ""
            cells.append(f"{entry['diff']:+.3f} [{entry['low']:+.3f}, {entry['high']:+.3f}] "
                         f"(n={entry['items']}×{entry['seeds']}){tag}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1]), sys.argv[2:]))
