"""``zoo analyze checklist``: its arguments, and the run that prints the table and builds the record and
figure."""

from __future__ import annotations

import argparse

from zoo.harness.checklist.axes import SUITES
from zoo.harness.checklist.contamination import contamination, datamodule_from_config, eval_texts, train_texts
from zoo.harness.checklist.report import run_suite, summarize

HELP = "Alignment checklist: per-axis suite with mean ± CI and paired deltas, contamination check (spec 19)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--models", nargs="+", required=True, help="runs / exports / aliases; the first is the base"
    )
    parser.add_argument("--suite", choices=sorted(SUITES), default="default")
    parser.add_argument("--limit", type=int, default=32, help="items per task")
    parser.add_argument(
        "--train-config",
        nargs="*",
        default=[],
        dest="train_configs",
        help="method configs whose data's train split is checked for contamination",
    )
    parser.add_argument(
        "--num-train",
        type=int,
        default=None,
        dest="num_train",
        help="override num_train of the training data (a quicker check)",
    )
    parser.add_argument("--ngram", type=int, default=13)
    parser.add_argument("--model", default=None, help="backbone for exports that do not carry one")
    parser.add_argument("--device", default="cpu")


def run(args: argparse.Namespace):
    from zoo.harness.analyze.common import Report, format_table, load_module, new_figure

    models = {
        ("base" if i == 0 else spec): load_module(spec, model=args.model, device=args.device)
        for i, spec in enumerate(args.models)
    }
    result = run_suite(models, SUITES[args.suite](), args.limit)
    rows = summarize(result, base="base" if len(models) > 1 else None)
    overrides = {"num_train": args.num_train} if args.num_train else {}
    train = {cfg: train_texts(datamodule_from_config(cfg, overrides)) for cfg in args.train_configs}
    hygiene = contamination(train, eval_texts(result["items"]), args.ngram)
    headers = ["model", "axis", "task", "metric", "mean", "95% CI", "n", "Δ vs base", "Δ 95% CI"]
    table = format_table(
        headers,
        [
            [
                r["model"],
                r["axis"],
                r["task"],
                r["metric"],
                "n/a" if r["mean"] is None else r["mean"],
                "" if r["low"] is None else f"[{r['low']:.3f}, {r['high']:.3f}]",
                r["n"],
                r.get("delta_delta", ""),
                f"[{r['delta_low']:.3f}, {r['delta_high']:.3f}]" if "delta_low" in r else "",
            ]
            for r in rows
        ],
    )
    if hygiene:
        table += f"\n\ncontamination (word {args.ngram}-grams):\n" + format_table(
            ["train", "eval", "items", "flagged", "rate"],
            [[h["train"], h["eval"], h["items"], h["flagged"], h["rate"]] for h in hygiene],
        )
    fig, (ax,) = new_figure(width=7)
    axis_rows = [r for r in rows if r["task"] == "(axis)"]
    names = list(models)
    axes = sorted({r["axis"] for r in axis_rows})
    for offset, name in enumerate(names):
        values = [
            next((r["mean"] for r in axis_rows if r["model"] == name and r["axis"] == a), 0.0) for a in axes
        ]
        ax.bar(
            [i + offset / (len(names) + 1) for i in range(len(axes))],
            values,
            width=1 / (len(names) + 1),
            label=name,
        )
    ax.set_xticks(range(len(axes)), axes, rotation=20)
    ax.set_ylabel("headline score (mean over items)")
    ax.legend(fontsize=7)
    items = {task: [i.prompt for i in values] for task, values in result["items"].items()}
    return Report(
        table=table,
        record={
            "rows": rows,
            "contamination": hygiene,
            "models": args.models,
            "limit": args.limit,
            "items": items,
            "scores": result["scores"],  # model -> task -> metric -> per-item values (paired re-analysis)
        },
        figure=fig,
    )
