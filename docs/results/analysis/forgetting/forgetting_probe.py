"""Forgetting of several tuned models on one off-task set under prompt transforms, the base scored ONCE.

    python docs/results/analysis/forgetting/forgetting_probe.py --out /work/benchruns/analysis/forget \\
        --data-config docs/results/analysis/forgetting/basic_arithmetic.yaml --limit 32 --max-new-tokens 32 \\
        --transforms identity,piglatin SFT=/path/to/sft/export LoRA=/path/to/lora/export

The same computation as ``zoo analyze conjugate --tuned MODEL`` per model (its ``score`` and
``drop_interval``: prompts rewritten by each transform, the harness generation, answers mapped back, the data
module's per-item score), but the base (``smollm2-135m``) is generated once and reused for every tuned model,
which saves a base pass per model on a shared 2-core CPU. Writes ``OUT/base.json`` and
``OUT/<label>/conjugate.json`` in the tool's record format; reruns skip labels already written.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

from zoo.datamodules.transforms import make_transform
from zoo.harness.analyze.common import load_module
from zoo.harness.analyze.conjugate import drop_interval, score, task_data
from zoo.harness.rag.stats import paired_delta


def run_model(module, data, records, transforms, args) -> dict:
    out = {}
    for transform in transforms:
        metric, value, mapped, items = score(module, data, records, transform, args)
        out[transform.name] = {"metric": metric, "score": value, "items": items, "completions": mapped}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="LABEL=run/export path")
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--data-config", default=None)
    parser.add_argument("--transforms", default="identity,piglatin")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    transforms = [make_transform(s.strip()) for s in args.transforms.split(",") if s.strip()]
    base_file = out / "base.json"
    base_module = None
    if base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        started = time.time()
        base_module = load_module(args.base)
        data = task_data(args, str(base_module.hparams.model))
        records = data.eval_records("test")[: args.limit]
        base = {
            "model": args.base,
            "records": [r["prompt"] for r in records],
            "results": run_model(base_module, data, records, transforms, args),
        }
        base_file.write_text(json.dumps(base, indent=2) + "\n")
        print(f"base: {time.time() - started:.0f} s", flush=True)
        del base_module
        gc.collect()
    for spec in args.models:
        label, path = spec.split("=", 1)
        target = out / label / "conjugate.json"
        if target.exists():
            continue
        started = time.time()
        module = load_module(path)
        data = task_data(args, str(module.hparams.model))
        records = data.eval_records("test")[: args.limit]
        if [r["prompt"] for r in records] != base["records"]:
            raise SystemExit(f"{label}: its test records differ from the base's; same --data-config/--limit?")
        tuned = run_model(module, data, records, transforms, args)
        results = []
        for transform in transforms:
            b, t = base["results"][transform.name], tuned[transform.name]
            examples = [
                {"prompt": transform.apply(r["prompt"]), "base": x, "tuned": y}
                for r, x, y in list(zip(records, b["completions"], t["completions"]))[:3]
            ]
            results.append(
                {
                    "transform": transform.name,
                    "metric": t["metric"],
                    "base": b["score"],
                    "tuned": t["score"],
                    "drop": b["score"] - t["score"],
                    "drop_ci": drop_interval(b["items"], t["items"]),
                    "base_items": b["items"],
                    "tuned_items": t["items"],
                    "examples": examples,
                }
            )
        reference = next((r for r in results if r["transform"] == "identity"), None)
        for result in results:
            result["recovers"] = None if reference is None else result["drop"] < reference["drop"]
            result["recovery_ci"] = None
            if reference is not None and result is not reference and result["drop_ci"]:
                own = [b - t for b, t in zip(result["base_items"], result["tuned_items"])]
                ref = [b - t for b, t in zip(reference["base_items"], reference["tuned_items"])]
                delta = paired_delta(ref, own)
                result["recovery_ci"] = {
                    "recovery": delta["delta"],
                    "low": delta["low"],
                    "high": delta["high"],
                }
        record = {
            "tool": "conjugate",
            "base": args.base,
            "tuned": path,
            "shared_backbone": False,
            "task": args.data_config or "icl_vs_if",
            "records": len(records),
            "max_new_tokens": args.max_new_tokens,
            "metric": results[0]["metric"],
            "transforms": results,
        }
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record, indent=2) + "\n")
        print(
            f"{label}: "
            + ", ".join(f"{r['transform']} base {r['base']:.3f} tuned {r['tuned']:.3f}" for r in results)
            + f" ({time.time() - started:.0f} s)",
            flush=True,
        )
        del module
        gc.collect()


if __name__ == "__main__":
    main()
