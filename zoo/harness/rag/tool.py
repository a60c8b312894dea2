"""``zoo analyze rag``: base and tuned models (or the fine-tune-size study) inside one frozen RAG pipeline.

    python -m zoo analyze rag --models tiny-llama runs/sft/<stamp> --limit 50      # first = base
    python -m zoo analyze rag --study configs/sft.yaml --sizes 200 500 1000 --model smollm2-135m
"""

from __future__ import annotations

import argparse
from typing import Any

from zoo.errors import ConfigError
from zoo.harness.analyze.common import Report, format_table, load_module, new_figure

HELP = "RAG evaluation: base vs tuned inside one frozen pipeline, paired CIs; --study: n-size sweep (spec 29)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=None,
                        help="runs / exports / aliases to compare; the first is the base")
    parser.add_argument("--study", default=None,
                        help="a method config: fine-tune it on n QA pairs per --sizes")
    parser.add_argument("--sizes", nargs="+", type=int, default=[200, 500, 1000])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max_steps", type=int, default=None)
    parser.add_argument("--ft_with_context", action="store_true")
    parser.add_argument("--model", default=None, help="backbone for --study (or exports without one)")
    parser.add_argument("--retriever", choices=["bm25", "dense"], default="bm25")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="first N test questions")
    parser.add_argument("--max_new_tokens", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cpu")


def report(rows: list[dict[str, Any]], hit: float, settings: dict[str, Any],
           runs: dict[str, list[dict[str, Any]]]) -> Report:
    headers = ["model", "metric", "mean", "95% CI", "Δ vs base", "Δ 95% CI", "W/L/T", "sign p"]
    table_rows = []
    for r in rows:
        delta = "delta_delta" in r
        table_rows.append([r["model"], r["metric"], r["mean"], f"[{r['low']:.3f}, {r['high']:.3f}]",
                           r["delta_delta"] if delta else "", f"[{r['delta_low']:.3f}, {r['delta_high']:.3f}]"
                           if delta else "", f"{r['delta_wins']}/{r['delta_losses']}/{r['delta_ties']}"
                           if delta else "", r["delta_sign_p"] if delta else ""])
    lengths = {name: sum(x["answer_tokens"] for x in recs) / max(len(recs), 1) for name, recs in runs.items()}
    table = (format_table(headers, table_rows)
             + f"\nretrieval hit rate (gold passage in top {settings['k']}): {hit:.3f}; "
             + "mean answer length (words): " + ", ".join(f"{k} {v:.1f}" for k, v in lengths.items()))
    fig, (ax,) = new_figure()
    models = list(runs)
    for metric in sorted({r["metric"] for r in rows}):
        means = [next(r["mean"] for r in rows if r["model"] == m and r["metric"] == metric) for m in models]
        ax.plot(range(len(models)), means, marker="o", label=metric)
    ax.set_xticks(range(len(models)), models, rotation=20)
    ax.set_ylabel("score (items' mean)")
    ax.legend(fontsize=7)
    return Report(table=table, record={"rows": rows, "hit_rate": hit, "settings": settings,
                                       "answer_tokens": lengths, "items": runs}, figure=fig)


def run(args: argparse.Namespace) -> Report:
    if (args.models is None) == (args.study is None):
        raise ConfigError("zoo analyze rag: give either --models BASE TUNED... or --study CONFIG")
    if args.study is not None:
        from zoo.harness.rag.study import run_study

        result = run_study(args.study, tuple(args.sizes), out=f"{args.out}/rag_study", model=args.model,
                           epochs=args.epochs, max_steps=args.max_steps, limit=args.limit,
                           ft_with_context=args.ft_with_context, retriever=args.retriever, k=args.k,
                           max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        return report(result["rows"], result["hit_rate"], result["settings"], result["runs"])
    from zoo.harness.rag.corpus import build_country_corpus
    from zoo.harness.rag.pipeline import RAGTask, compare, hit_rate

    if len(args.models) < 2:
        raise ConfigError("zoo analyze rag --models needs the base and at least one tuned model")
    corpus = build_country_corpus()
    task = RAGTask(corpus, retriever=args.retriever, k=args.k, max_new_tokens=args.max_new_tokens)
    items = task.prepare(corpus.test[:args.limit] if args.limit else None)
    runs = {}
    for position, spec in enumerate(args.models):
        module = load_module(spec, model=args.model, device=args.device)
        runs["base" if position == 0 else spec] = task.run(module, items, args.batch_size)
        del module
    settings = {"models": args.models, "retriever": task.retriever_name, "k": args.k,
                "max_new_tokens": args.max_new_tokens, "test_items": len(items), "corpus": corpus.meta}
    return report(compare(runs), hit_rate(items), settings, runs)
