"""Bench driver: the options, one training run per config x seed through the LightningCLI path, the sweep.

Each run is built by :func:`zoo.harness.runner.lightning_main` with its run directory passed explicitly
(``OUT/runs/<method>-s<seed>-steps<N>``), trained with :class:`~zoo.harness.bench.memory.StepTimer` and the
memory probes, then evaluated; :func:`main` runs the sweep, going on past a failing run, and writes the
report.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from zoo.errors import UsageError, did_you_mean
from zoo.harness.bench.evaluation import base_module, evaluate, evaluate_base, evaluate_checkpoint
from zoo.harness.bench.extra_evals import add_arguments as add_eval_task_arguments
from zoo.harness.bench.extra_evals import check_arguments as check_eval_task_arguments
from zoo.harness.bench.extra_evals import (
    contamination_figures,
    eval_sets,
    eval_task_hash,
    evaluate_eval_tasks,
    tokenizer_of,
)
from zoo.harness.bench.items import items_name
from zoo.harness.bench.lr_grid import add_arguments as add_lr_grid_arguments
from zoo.harness.bench.lr_grid import check_arguments as check_lr_grid_arguments
from zoo.harness.bench.lr_grid import grid_for, train_grid_and_evaluate
from zoo.harness.bench.memory import StepTimer, peak_rss_mb, reset_peak_rss
from zoo.harness.bench.records import (
    BenchError,
    append_result,
    backbone_of,
    budget,
    config_hash,
    count_parameters,
    data_block,
    digest,
    environment,
    format_metrics,
    load_results,
    log,
    method_name,
    record_key,
)
from zoo.harness.bench.report import markdown, write_report
from zoo.harness.bench.rerun import add_arguments, resolved_config
from zoo.harness.bench.rerun import main as rerun_main
from zoo.harness.run_state import Interrupted, install_signal_handlers, restore_signal_handlers

DESCRIPTION = "``zoo bench``: train configs on one budget, evaluate them and the untuned base model, report."


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Bench options, and the LightningCLI overrides given after ``--``."""
    argv = list(argv)
    overrides: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1:]
    parser = _Parser(
        prog="zoo bench", description=DESCRIPTION,
        epilog="Arguments after `--` go to LightningCLI for every config, e.g. "
               "`-- --data.init_args.num_test 16 --model.init_args.lr 1e-4` "
               "(with --ckpt only --data... ones apply).")
    parser.add_argument("configs", nargs="*", help="method configs (YAML) to train and evaluate")
    parser.add_argument("--ckpt", action="append", default=[],
                        help="evaluate a run directory or an HF export folder instead of training "
                             "(repeatable)")
    parser.add_argument("--max_steps", type=int, default=None,
                        help="training steps per run (default: the config's)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--limit", type=int, default=None,
                        help="test records to generate for (default: all; 0: no generation, NLL only)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="generation budget per record")
    parser.add_argument("--batch_size", type=int, default=16, help="generation batch size")
    parser.add_argument("--out", default="runs/bench", help="output folder")
    parser.add_argument("--model", default=None,
                        help="override every config's backbone (model.init_args.model)")
    parser.add_argument("--data-config", dest="data_config", default=None,
                        help="YAML layered on every config: a file with a top-level data: block, "
                             "or a data block")
    parser.add_argument("--no-base", dest="base", action="store_false",
                        help="skip the untuned base-model row")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep Lightning checkpoints of bench runs (default: only the HF export is "
                             "written)")
    parser.add_argument("--force", action="store_true",
                        help="with --ckpt: evaluate a run whose run.json says it did not finish")
    add_arguments(parser)  # --reference, --rerun, --method (zoo.harness.bench.rerun)
    add_lr_grid_arguments(parser)  # --lr-grid, --lr-grid-file (zoo.harness.bench.lr_grid)
    add_eval_task_arguments(parser)  # --eval-task (zoo.harness.bench.extra_evals)
    args = parser.parse_args(argv)
    check_lr_grid_arguments(args)
    check_eval_task_arguments(args)
    try:
        args.seed_list = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError as err:
        raise BenchError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from err
    if not args.seed_list:
        raise BenchError(f"--seeds {args.seeds!r} names no seed; give e.g. --seeds 0 or --seeds 0,1,2")
    for name, low in (("limit", 0), ("max_steps", 1), ("max_new_tokens", 1), ("batch_size", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise BenchError(f"--{name} must be >= {low}, got {value}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {args.out} is a file; name a folder for the results")
    if not args.configs and not args.ckpt and not args.rerun:
        raise BenchError("give at least one config (zoo bench configs/sft.yaml ...) or --ckpt RUN_DIR")
    return args, overrides



class _Parser(argparse.ArgumentParser):
    """A wrong bench option is one :class:`~zoo.errors.UsageError` line (exit 2), not the usage text."""

    def error(self, message: str):
        marker = "unrecognized arguments: "
        unknown = message.split(marker, 1)[1].split()[0] if marker in message else ""
        hint = did_you_mean(unknown.split("=")[0], self._option_string_actions) if unknown else ""
        raise UsageError(f"zoo bench: {message}{hint}; `zoo bench --help` lists the options")


def cli_args(config: Path, seed: int, args: argparse.Namespace, overrides: list[str]) -> list[str]:
    argv = ["--config", str(config)]
    if args.data_config:
        import yaml

        block = yaml.safe_load(Path(args.data_config).read_text()) or {}
        top_level = {"data", "model", "trainer", "seed_everything"}
        layered = isinstance(block, dict) and bool(top_level & set(block))
        argv += ["--config" if layered else "--data", str(args.data_config)]
    if args.model:
        argv += ["--model.init_args.model", args.model]
    if args.max_steps is not None:
        argv += ["--trainer.max_steps", str(args.max_steps)]
    argv += ["--seed_everything", str(seed)]
    return argv + list(overrides)



def build_cli(argv: list[str], run_dir: str | Path | None = None):
    """The LightningCLI objects (trainer, model, datamodule) for ``argv``, nothing run; ``run_dir``: where
    the run writes (its ``trainer.default_root_dir`` unless ``argv`` sets one)."""
    from zoo.harness.runner import lightning_main

    program_argv = sys.argv
    sys.argv = sys.argv[:1]  # LightningCLI warns when both sys.argv and args hold arguments
    try:
        return lightning_main(argv, run=False, run_dir=run_dir)
    except SystemExit as err:  # --help / --print_config in the overrides
        raise BenchError(f"the config could not be parsed (arguments: {' '.join(argv)})") from err
    finally:
        sys.argv = program_argv



def drop_checkpointing(trainer) -> None:
    """Bench runs keep the HF export only: remove checkpoint-writing callbacks."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer.callbacks[:] = [cb for cb in trainer.callbacks
                            if not isinstance(cb, ModelCheckpoint) and type(cb).__name__ != "FinalCheckpoint"]



def fit_measured(cli, args: argparse.Namespace, label: str) -> tuple[StepTimer, float, float | None]:
    """Fit ``cli``'s module on its data with the bench's measurements: step timer, wall seconds and the
    run's own peak memory (RSS reset before; CUDA peak in MiB where there is a GPU)."""
    trainer = cli.trainer
    if not args.keep_checkpoints:
        drop_checkpointing(trainer)
    timer = StepTimer()
    trainer.callbacks.append(timer)
    log(f"{label}: training {trainer.max_steps} steps ...")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    started = time.perf_counter()
    trainer.fit(cli.model, datamodule=cli.datamodule)
    wall = time.perf_counter() - started
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return timer, wall, peak_cuda


def train_and_evaluate(config: Path, seed: int, args: argparse.Namespace, overrides: list[str], out: Path,
                       done: set, results: Path, position: str, extra: dict | None = None) -> None:
    method = method_name(config)
    record = {"method": method, "kind": "train", "config": str(config),
              "config_hash": config_hash(config, args, overrides), "seed": seed,
              "budget": budget(args, args.max_steps if args.max_steps is not None else "config")}
    if record_key(record) in done:
        log(f"{position} {method} seed {seed}: already in {results.name}, skipped")
        return
    steps = args.max_steps if args.max_steps is not None else "config"
    run_dir = out / "runs" / f"{method}-s{seed}-steps{steps}"
    if run_dir.exists():  # an interrupted run of this record: start it again
        shutil.rmtree(run_dir)
    argv = cli_args(config, seed, args, overrides)
    cli = build_cli(argv, run_dir=run_dir)
    # reproducible records (zoo.harness.bench.rerun): what --rerun rebuilds the run from
    record.update(resolved_config=resolved_config(cli), cli_args=argv, overrides=list(overrides),
                  **(extra or {}))
    if args.base:
        evaluate_base(cli, args, out, config, done, results)
        evaluate_base_on_eval_tasks(cli, args, out, config, done, results)
    trainer, module = cli.trainer, cli.model
    timer, wall, peak_cuda = fit_measured(cli, args, f"{position} {method} seed {seed}")
    log(f"{position} {method} seed {seed}: trained in {wall:.1f} s, evaluating ...")
    result = evaluate(module, cli.datamodule, args, run_dir / "completions.jsonl",
                      out / "items" / items_name(record))
    trainable, total = count_parameters(module)
    sets = eval_sets(args, tokenizer_of(cli.datamodule, backbone_of(module)))
    record.update(backbone=backbone_of(module), module=type(module).__name__,
                  dataset=data_block(cli).get("init_args", {}).get("dataset"), run_dir=str(run_dir), **result,
                  train_wall_s=wall, **timer.summary(), peak_rss_mb=peak_rss_mb(), peak_cuda_mb=peak_cuda,
                  trainable_params=trainable, total_params=total,
                  steps=int(trainer.global_step), **environment(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    # issue 16: n-gram overlap of this row's training data with its test split and every --eval-task
    record["contamination"] = contamination_figures(cli.datamodule, sets, f"{method} seed {seed}")
    evaluate_eval_tasks(module, record, sets, args, out, done, results, run_dir)  # --eval-task records
    append_result(results, record)
    done.add(record_key(record))
    log(f"{position} {method} seed {seed}: {format_metrics(record)}")
    del cli, module, trainer
    gc.collect()



def evaluate_base_on_eval_tasks(cli, args: argparse.Namespace, out: Path, config: Path, done: set,
                                results: Path) -> None:
    """The untuned backbone on every ``--eval-task`` (once per backbone, data and budget, as the base row)."""
    if not getattr(args, "eval_task_specs", None):
        return
    name = backbone_of(cli.model)
    row = {"method": "base", "kind": "base", "config": str(config), "seed": None, "budget": budget(args, 0),
           "config_hash": digest(name, data_block(cli)), "backbone": name, "steps": 0}
    sets = eval_sets(args, tokenizer_of(cli.datamodule, name))
    wanted = [task for task, data in sets.items()
              if record_key({**row, "config_hash": eval_task_hash(row, task, data)}) not in done]
    if not wanted:
        return
    module = base_module(name, cli.datamodule)
    evaluate_eval_tasks(module, row, {task: sets[task] for task in wanted}, args, out, done, results,
                        out / "runs" / f"base-{row['config_hash']}")
    del module
    gc.collect()



def check_reference(reference: str | None, configs: list[Path], base: bool, results: Path) -> None:
    """Fail before any training when no row of this bench can be ``--reference``: not a config's method,
    not the base row, not a record already in ``results``."""
    if reference is None:
        return
    names = {method_name(c) for c in configs} | {r["method"] for r in load_results(results)}
    if base:
        names.add("base")
    if reference not in names:
        raise BenchError(f"--reference {reference}: no row of this bench will have that name (rows: "
                         f"{', '.join(sorted(names))}); pick one, add its config, or drop --reference")


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    environment()  # the commit of the code this process imports, read now, before any run
    if args.rerun:  # rebuild rows from their stored resolved configs (zoo.harness.bench.rerun)
        return rerun_main(args)
    configs = [Path(c) for c in args.configs]
    missing = [str(c) for c in configs if not c.is_file()]
    if missing:
        raise BenchError(f"config file(s) not found: {', '.join(missing)}")
    if args.data_config and not Path(args.data_config).is_file():
        raise BenchError(f"--data-config file not found: {args.data_config}")
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BenchError(f"--out {args.out}: cannot create the folder ({err.strerror})") from err
    results = out / "results.jsonl"
    done = {record_key(r) for r in load_results(results, repair=True)}
    if not args.ckpt:  # checkpoint rows are named when they run
        check_reference(args.reference, configs, args.base, results)
    jobs = [(config, seed) for config in configs for seed in args.seed_list]
    failed: list[str] = []
    previous = install_signal_handlers(graceful=False)
    try:
        for path in args.ckpt:
            evaluate_checkpoint(path, args, overrides, out, done, results)
        for number, (config, seed) in enumerate(jobs, start=1):
            try:
                rates = grid_for(config, args)
                if rates:  # fair learning rates: train the grid, evaluate the val-NLL-best rate on test
                    train_grid_and_evaluate(config, seed, rates, args, overrides, out, done, results,
                                            f"{number}/{len(jobs)}")
                else:
                    train_and_evaluate(config, seed, args, overrides, out, done, results,
                                       f"{number}/{len(jobs)}")
            except Exception as err:  # one broken run must not cost the rest of a sweep
                if len(jobs) == 1 or isinstance(err, Interrupted):
                    raise
                log(f"{number}/{len(jobs)} {config} seed {seed}: FAILED ({type(err).__name__}: {err}); "
                    "going on with the next run")
                failed.append(f"{config} (seed {seed})")
                gc.collect()
    except Interrupted as err:  # finished records are in results.jsonl already: report them, exit non-zero
        kept = len(load_results(results))
        if kept:
            write_report(results, out, args.reference)
        log(f"interrupted by {signal.Signals(err.signum).name}: {kept} finished records kept in {results}; "
            "rerun the same command to continue (finished records are skipped)")
        return err.exit_code
    finally:
        restore_signal_handlers(previous)
    rows = write_report(results, out, args.reference)
    log(f"{len(rows)} rows -> {out / 'results.md'}, {out / 'results.png'}, {results}")
    if rows:
        print(markdown(rows))
    if failed:
        raise BenchError(f"{len(failed)} of {len(jobs)} runs failed: {', '.join(failed)}; "
                         f"the others are in {results}")
    return 0
