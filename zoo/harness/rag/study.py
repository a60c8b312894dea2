"""The fine-tune-size study of spec 29: fine-tune one config on n QA pairs of the pool for every n, then run
the base and every checkpoint through one frozen :class:`RAGTask` and report paired deltas vs the base.

Fine-tuning data: the first n pool items (a fixed order), ``question -> answer`` written to a JSONL file
(``ft_with_context``: the question inside the same RAG prompt, its retrieved context included), rendered
with the pipeline's system line. The training
budget is fixed across n in epochs (``epochs``; or ``max_steps`` when given), with the config's own lr.
The base is the first config's module before it trains (for adapters: the identity initialisation).
Resumable: each finished size leaves ``runs/n<N>/rag_items.json`` (base and tuned records), which a rerun
with the same ``out`` reads back instead of training again.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

from zoo.errors import ConfigError
from zoo.harness.rag.corpus import Corpus, build_country_corpus
from zoo.harness.rag.pipeline import RAGTask, compare, hit_rate


def write_ft_data(task: RAGTask, corpus: Corpus, n: int, path: Path, with_context: bool) -> Path:
    if n > len(corpus.pool):
        raise ConfigError(f"n={n} exceeds the fine-tuning pool ({len(corpus.pool)} QA pairs)")
    items = corpus.pool[:n]
    prompts = ([p["prompt"] for p in task.prepare(items)] if with_context else [i.question for i in items])
    with path.open("w", encoding="utf-8") as handle:
        for item, prompt in zip(items, prompts):
            handle.write(json.dumps({"question": prompt, "answer": item.answer}) + "\n")
    return path


def run_study(config: str | Path, sizes: tuple[int, ...] = (200, 500, 1000),
              out: str | Path = "runs/rag_study", model: str | None = None, epochs: int = 1,
              max_steps: int | None = None, limit: int | None = None,
              ft_with_context: bool = False, retriever: str = "bm25", k: int = 3, max_new_tokens: int = 24,
              batch_size: int = 16, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """Train ``config`` once per n in ``sizes`` and evaluate base + checkpoints in one pipeline. Returns
    ``{"rows": compare(...), "runs": per-model records, "hit_rate": ..., "settings": ...}``."""
    from zoo.harness.bench.driver import build_cli, drop_checkpointing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = build_country_corpus()
    task = RAGTask(corpus, retriever=retriever, k=k, max_new_tokens=max_new_tokens)
    items = task.prepare(corpus.test[:limit] if limit else None)
    runs: dict[str, list[dict[str, Any]]] = {}
    for n in sizes:
        done = out / "runs" / f"n{n}" / "rag_items.json"
        if done.is_file():  # resumable: a finished size is read back, not retrained
            cached = json.loads(done.read_text(encoding="utf-8"))
            runs.setdefault("base", cached["base"])
            runs[f"n={n}"] = cached["tuned"]
            continue
        data = write_ft_data(task, corpus, n, out / f"ft_{n}.jsonl", ft_with_context)
        argv = ["--config", str(config), "--data.class_path", "zoo.datamodules.SFTDataModule",
                "--data.init_args.dataset", str(data),
                "--data.init_args.fields", '{"prompt": "question", "response": "answer"}',
                "--data.init_args.num_train", str(n), "--data.init_args.num_val", "0",
                "--data.init_args.num_test", "0", "--trainer.limit_val_batches", "0",
                "--trainer.num_sanity_val_steps", "0", "--trainer.max_epochs", str(epochs),
                "--trainer.max_steps", str(max_steps if max_steps is not None else -1)]
        if task.system_prompt:  # the fine-tuning rows carry the evaluation's system line
            argv += ["--data.init_args.system_prompt", task.system_prompt]
        if model is not None:
            argv += ["--model.init_args.model", model]
        cli = build_cli(argv + list(overrides), run_dir=out / "runs" / f"n{n}")
        drop_checkpointing(cli.trainer)
        if "base" not in runs:
            runs["base"] = task.run(cli.model, items, batch_size)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        runs[f"n={n}"] = task.run(cli.model, items, batch_size)
        done.write_text(json.dumps({"base": runs["base"], "tuned": runs[f"n={n}"]}) + "\n", encoding="utf-8")
        del cli
        gc.collect()
    rows = compare(runs)
    settings = {"config": str(config), "sizes": list(sizes), "epochs": epochs, "max_steps": max_steps,
                "ft_with_context": ft_with_context, "retriever": task.retriever_name, "k": k,
                "max_new_tokens": max_new_tokens, "test_items": len(items), "corpus": corpus.meta}
    result = {"rows": rows, "runs": runs, "hit_rate": hit_rate(items), "settings": settings}
    (out / "rag_study.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
