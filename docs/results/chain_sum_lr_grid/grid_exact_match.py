"""Exact match of every grid point of a method, on the validation split (all 32 problems) and on the test
problems (the first 64): what the rate choice would have been had it been made on validation exact match
(``zoo bench --lr-grid-select exact_match``) instead of validation response NLL, and what that rate scores on
test. A diagnostic beside the table, not a row of it: the test column of the rates the grid did not choose is
read after the fact.

    python docs/results/chain_sum_lr_grid/grid_exact_match.py METHOD [--out FILE.json]
    python docs/results/chain_sum_lr_grid/grid_exact_match.py --table   # grid_exact_match/*.json as markdown

Reads the grid records of METHOD from ``parts/*/results.jsonl`` (this folder); each record's ``run_dir`` must
still hold its export (the machine that ran the grid). Uses this checkout's decoder and scoring, the same
``evaluation.generation_metrics`` the bench uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

from zoo.harness.bench.evaluation import build_datamodule, generation_metrics
from zoo.harness.load import load_run

HERE = Path(__file__).resolve().parent


def grid_records(method: str) -> list[dict]:
    records = []
    for results in sorted(HERE.glob("parts/*/results.jsonl")):
        for line in results.read_text().splitlines():
            record = json.loads(line) if line.strip() else {}
            if record.get("kind") == "grid" and record.get("method") == method and record.get("seed") == 0:
                records.append(record)
    return sorted(records, key=lambda r: r["lr"])


ORDER = ("sft", "lora", "masked_thought", "sstoken", "qtuning", "otr", "caft")


def table(folder: Path = HERE / "grid_exact_match") -> str:
    """Every method's rates, figures and which criterion picks each (NLL: lowest validation NLL; exact match:
    highest validation exact match, ties by NLL, then the smaller rate, as ``--lr-grid-select``)."""
    lines = ["| method | lr | val NLL | val exact match (32) | test exact match (64, seed 0) | picked by |",
             "|---|---|---|---|---|---|"]
    for method in ORDER:
        path = folder / f"{method}.json"
        if not path.is_file():
            continue
        rows = json.loads(path.read_text())["rows"]
        by_nll = min(rows, key=lambda r: (r["val_nll"], r["lr"]))
        by_match = min(rows, key=lambda r: (-r["val_exact_match"], r["val_nll"], r["lr"]))
        for row in rows:
            picks = (("NLL", by_nll), ("exact match", by_match))
            picked = ", ".join(name for name, pick in picks if pick is row)
            lines.append(f"| {method} | {row['lr']:g} | {row['val_nll']:.4f} | "
                         f"{row['val_exact_match']:.3f} | {row['test_exact_match']:.3f} | {picked} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv == ["--table"]:
        print(table())
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("--out", default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    options = argparse.Namespace(batch_size=16, max_new_tokens=256, data_config=None)
    rows = []
    for record in grid_records(args.method):
        module = load_run(record["run_dir"])
        datamodule, _ = build_datamodule(options, yaml.safe_load(record["resolved_config"]),
                                         str(record["backbone"]), [])
        val, _ = generation_metrics(module, datamodule, datamodule.eval_records("val"), options)
        test, _ = generation_metrics(module, datamodule, datamodule.eval_records("test")[:64], options)
        rows.append({"lr": record["lr"], "val_nll": record["val_nll"], "val_exact_match": val["exact_match"],
                     "test_exact_match": test["exact_match"]})
        print(f"lr {record['lr']:g}: val NLL {record['val_nll']:.4f}, val exact match "
              f"{val['exact_match']:.3f}, test exact match {test['exact_match']:.3f}", flush=True)
        del module
    print("\n| lr | val NLL | val exact match (32) | test exact match (64) |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['lr']:g} | {row['val_nll']:.4f} | {row['val_exact_match']:.3f} | "
              f"{row['test_exact_match']:.3f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"method": args.method, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
