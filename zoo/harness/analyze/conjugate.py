"""``zoo analyze conjugate``: conjugate prompting (spec 17), a task under prompt transforms, base vs tuned.

    zoo analyze conjugate --tuned runs/lora/20261201-120000                       # ICL-vs-IF probe
    zoo analyze conjugate --tuned RUN --base tiny-llama --data-config configs/data/chain_sum.yaml \\
        --transforms identity,leetspeak,piglatin,translate:fr.tsv --limit 32 --max-new-tokens 64

For every transform ``t`` (:mod:`zoo.datamodules.transforms`) and both models, the task's prompts are
rewritten by ``t.apply``, completed by the harness generation (:func:`zoo.harness.generation.
generate_for_module`: each module's own decoding and the data's system prompt), mapped back with
``t.map_answer`` and scored by the data module's ``evaluation_metrics`` (its first metric is the one
compared). ``drop_t = score(base, t) - score(tuned, t)``; conjugate prompting recovers the capability when
``drop_t < drop_identity``. When the data module scores items one by one (``score_completion``), the
record also holds the per-item scores, the paired bootstrap CI of ``drop_t`` (same items, base - tuned) and
of the recovery ``drop_identity - drop_t`` (same items under both transforms). Without ``--data-config``
the task is the repo's ICL-vs-instruction-following probe (capitalise/repeat demos, then a question:
correct = the output starts with the in-context answer; 10 new tokens, greedy). With ``--data-config``
the data block of that config (or of the run) is built as ``zoo bench --ckpt`` does.
"""

from __future__ import annotations

import argparse
from typing import Any

from zoo.datamodules.transforms import ICLvsIFData, make_transform
from zoo.errors import ConfigError
from zoo.harness.analyze.common import Report, add_model_arguments, format_table, load_pair, new_figure
from zoo.harness.generation import generate_for_module
from zoo.harness.rag.stats import paired_delta

HELP = "Conjugate prompting: a task under prompt transforms, base vs tuned score and gap (spec 17)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--transforms", default="identity,leetspeak,piglatin",
                        help="comma list of identity, leetspeak, piglatin, translate:FILE, label-scale:GAMMA")
    parser.add_argument("--data-config", default=None,
                        help="a config (or data block) whose data module supplies the task and its scoring; "
                             "default: the built-in ICL-vs-IF probe")
    parser.add_argument("--limit", type=int, default=32, help="test records per transform (default 32)")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)


def task_data(args: argparse.Namespace, tokenizer: str) -> Any:
    if args.data_config is None:
        return ICLvsIFData(num_test=max(1, args.limit))
    from zoo.harness.bench.evaluation import build_datamodule

    return build_datamodule(argparse.Namespace(data_config=args.data_config), None, tokenizer, [])[0]


def score(module: Any, data: Any, records: list[dict[str, Any]], transform: Any,
          args: argparse.Namespace) -> tuple[str, float, list[str], list[float] | None]:
    """(metric name, value, mapped completions, per-item scores or None) of ``module`` on ``records`` under
    ``transform``; per-item scores come from ``data.score_completion`` when their mean is the metric."""
    prompts = [transform.apply(r["prompt"]) for r in records]
    completions = generate_for_module(module, prompts, max_new_tokens=args.max_new_tokens,
                                      system_prompt=data.hparams.get("system_prompt"),
                                      batch_size=args.batch_size)
    mapped = [transform.map_answer(c) for c in completions]
    metrics = data.evaluation_metrics(records, mapped)
    name = next(iter(metrics))
    per_item = None
    if callable(getattr(data, "score_completion", None)):
        per_item = [float(data.score_completion(r, c).get(name, float("nan")))
                    for r, c in zip(records, mapped)]
        if not per_item or abs(sum(per_item) / len(per_item) - float(metrics[name])) > 1e-9:
            per_item = None  # a corpus-level metric: no per-item pairing
    return name, float(metrics[name]), mapped, per_item


def drop_interval(base_items: list[float] | None, tuned_items: list[float] | None) -> dict[str, Any] | None:
    """Paired bootstrap CI of ``drop = base - tuned`` over the same items (None without per-item scores)."""
    if base_items is None or tuned_items is None:
        return None
    delta = paired_delta(base_items, tuned_items)
    return {"drop": delta["delta"], "low": delta["low"], "high": delta["high"], "n": delta["n"],
            "base_better": delta["wins"], "tuned_better": delta["losses"], "sign_p": delta["sign_p"]}


def run(args: argparse.Namespace) -> Report:
    transforms = [make_transform(spec.strip()) for spec in args.transforms.split(",") if spec.strip()]
    if not transforms:
        raise ConfigError("--transforms is empty; e.g. --transforms identity,leetspeak,piglatin")
    pair = load_pair(args)
    data = task_data(args, str(pair.module.hparams.model))
    records = data.eval_records("test")[: args.limit]
    if not records:
        raise ConfigError("the task has no test records; raise --limit or check the data config")
    rows, results = [], []
    metric = ""
    for transform in transforms:
        with pair.base() as module:
            metric, base_score, base_out, base_items = score(module, data, records, transform, args)
        with pair.tuned() as module:
            metric, tuned_score, tuned_out, tuned_items = score(module, data, records, transform, args)
        drop = base_score - tuned_score
        examples = [{"prompt": transform.apply(r["prompt"]), "base": b, "tuned": t}
                    for r, b, t in list(zip(records, base_out, tuned_out))[:3]]
        interval = drop_interval(base_items, tuned_items)
        results.append({"transform": transform.name, "metric": metric, "base": base_score,
                        "tuned": tuned_score, "drop": drop, "drop_ci": interval, "base_items": base_items,
                        "tuned_items": tuned_items, "examples": examples})
        rows.append([transform.name, base_score, tuned_score, drop,
                     "-" if interval is None else f"[{interval['low']:.3f}, {interval['high']:.3f}]"])
    reference = next((r for r in results if r["transform"] == "identity"), None)
    for result, row in zip(results, rows):
        result["recovers"] = None if reference is None else result["drop"] < reference["drop"]
        result["recovery_ci"] = None  # drop_identity - drop_t per item, paired over the same records
        if reference is not None and result is not reference and result["drop_ci"] and reference["drop_ci"]:
            own = [b - t for b, t in zip(result["base_items"], result["tuned_items"])]
            ref = [b - t for b, t in zip(reference["base_items"], reference["tuned_items"])]
            delta = paired_delta(ref, own)
            result["recovery_ci"] = {"recovery": delta["delta"], "low": delta["low"], "high": delta["high"]}
        row.append("-" if result["recovers"] is None or result is reference
                   else ("yes" if result["recovers"] else "no"))
        row.append("-" if result["recovery_ci"] is None
                   else f"[{result['recovery_ci']['low']:.3f}, {result['recovery_ci']['high']:.3f}]")
    table = format_table(["transform", f"base {metric}", f"tuned {metric}", "drop", "drop 95% CI",
                          "drop < identity", "recovery 95% CI"], rows)

    fig, (ax,) = new_figure(1, width=6)
    xs = list(range(len(results)))
    ax.bar([x - 0.2 for x in xs], [r["base"] for r in results], width=0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [r["tuned"] for r in results], width=0.4, label="tuned")
    ax.set_xticks(xs, [r["transform"] for r in results])
    ax.set(ylabel=metric, title="conjugate prompting: score per transform")
    ax.legend()
    record = {"base": pair.names[0], "tuned": pair.names[1], "shared_backbone": pair.shared,
              "task": "icl_vs_if" if args.data_config is None else args.data_config,
              "records": len(records), "max_new_tokens": args.max_new_tokens, "metric": metric,
              "transforms": results}
    return Report(table, record, fig)
