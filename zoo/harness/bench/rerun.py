"""Reproducible bench records: what a record stores to rebuild its run, and ``zoo bench --rerun``.

Each trained record stores ``resolved_config`` (the YAML text of the parsed LightningCLI config: every
default filled in, the seed, the step budget), ``cli_args`` (the argument list the bench gave LightningCLI:
config file, ``--model``, ``--trainer.max_steps``, ``--seed_everything``), ``overrides`` (the user's
arguments after ``--``) and ``git_commit``.

    zoo bench --rerun OUT/results.jsonl --method sft --out OUT2     # rebuild and rerun that row

rebuilds the record's run from its ``resolved_config`` alone (the run directory paths in it are moved to
the new run directory; the file is kept as ``OUT/rerun/s<seed>/<method>.yaml``), trains it with the same
seed and step budget and evaluates it with the record's ``limit`` / ``max_new_tokens``; the new record
(same method name, ``rerun_of`` naming the source) lands in the new ``OUT``'s ``results.jsonl``. The seeds
rerun are ``--seeds`` (default 0), among those the source holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["add_arguments", "jobs", "rerun_config", "resolved_config"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The issue-13 options of ``zoo bench``: ``--reference``, ``--rerun``, ``--method``."""
    parser.add_argument("--reference", default=None,
                        help="row the others are compared to in results.md (paired difference +- 95%% CI "
                             "over items; default: sft when present, else base)")
    parser.add_argument("--rerun", default=None, metavar="RESULTS_JSONL",
                        help="rerun rows of a results.jsonl from their stored resolved configs "
                             "(with --method NAME)")
    parser.add_argument("--method", default=None, help="with --rerun: the row (method name) to rerun")


def resolved_config(cli) -> str:
    """The YAML text of a LightningCLI's parsed config (what the run really used)."""
    return cli.parser.dump(cli.config, skip_none=False)


def _moved(value: Any, old: str, new: str) -> Any:
    if isinstance(value, dict):
        return {k: _moved(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_moved(v, old, new) for v in value]
    if isinstance(value, str) and old and (value == old or value.startswith(old + "/")):
        return new + value[len(old):]
    return value


def rerun_config(record: dict[str, Any], run_dir: Path) -> str:
    """The record's resolved config with its run directory paths (``trainer.default_root_dir``, the
    logger's ``save_dir``) moved to ``run_dir``."""
    import yaml

    config = yaml.safe_load(record["resolved_config"])
    config = _moved(config, str(record.get("run_dir") or ""), str(run_dir))
    return yaml.safe_dump(config, sort_keys=False)


def jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The records of ``--rerun`` to rerun (``--method``; ``--seeds`` when given explicitly), checked."""
    from zoo.harness.bench.records import BenchError, load_results

    path = Path(args.rerun)
    if not path.is_file():
        raise BenchError(f"--rerun {path}: no such file; give a bench's results.jsonl")
    if not args.method:
        raise BenchError("--rerun needs --method NAME (the row to rerun)")
    records = [r for r in load_results(path) if r.get("method") == args.method and r.get("kind") == "train"]
    if not records:
        names = sorted({r.get("method") for r in load_results(path) if r.get("kind") == "train"})
        raise BenchError(f"--rerun: no trained row {args.method!r} in {path} (rows: {', '.join(names)})")
    seeds = sorted({r.get("seed") for r in records}, key=str)
    records = [r for r in records if r.get("seed") in args.seed_list]
    if not records:
        raise BenchError(f"--rerun: {args.method!r} has seeds {seeds} in {path}, not {args.seeds}; "
                         "pass --seeds with one of them")
    stale = [r for r in records if not r.get("resolved_config")]
    if stale:
        raise BenchError(f"--rerun: the {args.method!r} record in {path} stores no resolved_config "
                         "(written before records were reproducible); rerun it from its config file")
    return records


def main(args: argparse.Namespace) -> int:
    """``zoo bench --rerun RESULTS --method NAME``: rerun the record(s) into ``args.out``, then report."""
    from zoo.harness.bench.driver import train_and_evaluate
    from zoo.harness.bench.records import load_results, log, record_key
    from zoo.harness.bench.report import markdown, write_report

    records = jobs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {record_key(r) for r in load_results(results)}
    for number, record in enumerate(records, start=1):
        seed = record["seed"]
        budget = record.get("budget") or {}
        steps = budget.get("max_steps")
        run_args = argparse.Namespace(**{**vars(args), "data_config": None, "model": None, "base": False,
                                         "max_steps": steps if isinstance(steps, int) else None,
                                         "limit": budget.get("limit"),
                                         "max_new_tokens": budget.get("max_new_tokens", args.max_new_tokens)})
        config = out / "rerun" / f"s{seed}" / f"{record['method']}.yaml"
        suffix = steps if isinstance(steps, int) else "config"
        run_dir = out / "runs" / f"{record['method']}-s{seed}-steps{suffix}"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(rerun_config(record, run_dir))
        log(f"rerun {number}/{len(records)}: {record['method']} seed {seed} from {args.rerun} "
            f"(commit {record.get('git_commit')})")
        train_and_evaluate(config, seed, run_args, [], out, done, results, f"rerun {number}/{len(records)}",
                           extra={"rerun_of": f"{args.rerun}:{record['method']}:s{seed}"})
    rows = write_report(results, out, args.reference)
    if rows:
        print(markdown(rows))
    return 0
