"""Paired comparisons of `zoo bench` rows over items, for several metrics and references at once.

    python docs/results/translation/pairs.py OUT --pairs cotft:ioft --metrics bleu,chrf [--nll]
OUT is a bench --out folder (results.jsonl, items/); each pair ROW:REF gives ROW minus REF per metric with the
95% percentile bootstrap over items (zoo.harness.bench.stats.compare_rows / paired_difference; sign test for
0/1 scores), and, with --nll, the token-weighted response-NLL difference
(items with the same response tokens).
Prints a markdown table and writes OUT/pairs.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zoo.harness.bench.stats import compare_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--pairs", required=True, help="comma-separated ROW:REF")
    ap.add_argument("--metrics", default="")
    ap.add_argument("--nll", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    metrics = [m for m in args.metrics.split(",") if m]
    rows, lines = [], ["| row - reference | metric | difference [95% CI] | items | p (sign) | verdict |",
                       "|---|---|---|---|---|---|"]
    for pair in args.pairs.split(","):
        row, ref = pair.split(":")
        results: dict[str, dict] = {}
        for metric in metrics or [None]:
            for name, res in compare_rows(out, by_method[row], by_method[ref], metric).items():
                if name == "nll" and not args.nll:
                    continue
                results.setdefault(name, res)
        for name, res in results.items():
            verdict = (f"inconclusive at n={res['items']}" if res["inconclusive"]
                       else ("row higher" if res["diff"] > 0 else "row lower"))
            p = f"{res['p']:.3f}" if "p" in res else "-"
            lines.append(f"| `{row}` - `{ref}` | {name} | {res['diff']:+.3f} [{res['low']:+.3f}, "
                         f"{res['high']:+.3f}] | {res['items']} | {p} | {verdict} |")
            rows.append({"row": row, "reference": ref, "metric": name, **res})
    (out / "pairs.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
