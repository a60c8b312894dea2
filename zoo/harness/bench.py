"""``zoo bench``: train configs on one budget, evaluate them and the untuned base model, report.

    zoo bench configs/sft.yaml configs/lora.yaml --max_steps 5 --seeds 0,1 --limit 8 --out runs/bench
    zoo bench --ckpt runs/bench/runs/lora-s0-steps5 --limit 8 --out runs/bench
    zoo bench configs/smoke/tiny.yaml --max_steps 2 -- --data.init_args.num_test 4   # after --: CLI overrides

For each config x seed the config is trained through the same LightningCLI path as ``zoo fit``
(``--trainer.max_steps N --seed_everything S``, run directory ``OUT/runs/<method>-s<seed>-steps<N>``),
then evaluated on its DataModule's test split: greedy generation on the first ``--limit`` records
scored by ``datamodule.evaluation_metrics`` (exact match for the SFT tasks), plus the held-out
response NLL / perplexity over the whole test split. The untuned backbone is evaluated once per
(backbone, data) as the ``base`` row. Outputs in ``OUT``:

``results.jsonl``  one record per method x seed (metrics, train wall time, tokens/s, peak memory,
                   trainable parameters, steps, package versions, git commit). A rerun skips the
                   records already there (key: method, config hash, seed, budget), so a sweep resumes.
``results.md``     mean +- std over seeds, one row per method (and backbone, budget).
``results.png``    the main metric and the NLL per method with std error bars.

Peak memory is the process peak RSS of each run, training and evaluation (Linux: ``VmHWM``, reset before
every run; elsewhere ``getrusage``, monotone across the runs of one bench process) and, on CUDA,
``torch.cuda.max_memory_allocated`` of the training run. Data sets with preference pairs also report
reward / log-prob accuracy and margin on held-out pairs (``preference_metrics``).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback

from zoo.errors import ZooError
from zoo.harness.generation import generate_for_module, response_nll
from zoo.registry import REPO_ROOT


class BenchError(ZooError, ValueError):
    """A bench argument is unusable (missing config, bad checkpoint folder, ...)."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- arguments
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Bench options, and the LightningCLI overrides given after ``--``."""
    argv = list(argv)
    overrides: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, overrides = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(
        prog="zoo bench", description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` go to LightningCLI for every config, e.g. "
               "`-- --data.init_args.num_test 16 --model.init_args.lr 1e-4` (with --ckpt only --data... ones apply).")
    parser.add_argument("configs", nargs="*", help="method configs (YAML) to train and evaluate")
    parser.add_argument("--ckpt", action="append", default=[],
                        help="evaluate a run directory or an HF export folder instead of training (repeatable)")
    parser.add_argument("--max_steps", type=int, default=None, help="training steps per run (default: the config's)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    parser.add_argument("--limit", type=int, default=None, help="test records to generate for (default: all; 0: no generation, NLL only)")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="generation budget per record")
    parser.add_argument("--batch_size", type=int, default=16, help="generation batch size")
    parser.add_argument("--out", default="runs/bench", help="output folder")
    parser.add_argument("--model", default=None, help="override every config's backbone (model.init_args.model)")
    parser.add_argument("--data-config", dest="data_config", default=None,
                        help="YAML layered on every config: a file with a top-level data: block, or a data block")
    parser.add_argument("--no-base", dest="base", action="store_false", help="skip the untuned base-model row")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep Lightning checkpoints of bench runs (default: only the HF export is written)")
    args = parser.parse_args(argv)
    try:
        args.seed_list = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    except ValueError as err:
        raise BenchError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from err
    if not args.configs and not args.ckpt:
        raise BenchError("give at least one config (zoo bench configs/sft.yaml ...) or --ckpt RUN_DIR")
    return args, overrides


# ---------------------------------------------------------------------------- identities
def method_name(config: str | Path) -> str:
    """The registry entry whose config is this file, else the file stem."""
    from zoo import registry

    path = Path(config).resolve()
    for method in registry.methods():
        if method.config_path.resolve() == path:
            return method.name
    return path.stem


def digest(*parts: Any) -> str:
    """Short stable hash of text / JSON-able parts."""
    h = hashlib.sha256()
    for part in parts:
        h.update((part if isinstance(part, str) else json.dumps(part, sort_keys=True, default=str)).encode())
        h.update(b"\0")
    return h.hexdigest()[:12]


def config_hash(config: Path, args: argparse.Namespace, overrides: list[str]) -> str:
    extra = Path(args.data_config).read_text() if args.data_config else ""
    return digest(config.read_text(), extra, args.model or "", overrides)


def budget(args: argparse.Namespace, steps: int | str | None) -> dict[str, Any]:
    return {"max_steps": steps, "limit": args.limit, "max_new_tokens": args.max_new_tokens}


def record_key(record: dict[str, Any]) -> tuple[str, str, str, str]:
    """What makes a record unique: method, config hash, seed and budget."""
    return (record["method"], record["config_hash"], str(record.get("seed")),
            json.dumps(record.get("budget"), sort_keys=True))


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                log(f"{path}:{number}: unreadable line skipped (an interrupted write?)")
    return records


def append_result(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, default=str) + "\n")


def environment() -> dict[str, Any]:
    """Package versions and the git commit (``+dirty`` when tracked files changed)."""
    from importlib import metadata

    versions = {"python": sys.version.split()[0]}
    for package in ("finetune-zoo", "torch", "lightning", "transformers", "peft", "datasets", "reasoning-gym"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    commit = None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += "+dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "git_commit": commit}


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS counter (Linux ``VmHWM`` via ``/proc/self/clear_refs``); False if unsupported.

    The heap is trimmed first (glibc ``malloc_trim``), so memory an earlier run freed but the allocator kept
    does not count as this run's peak (garbage of the earlier run is collected first)."""
    gc.collect()
    trim_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory, MB: since the last :func:`reset_peak_rss` on Linux (``VmHWM``), else since start
    (``ru_maxrss``, KB on Linux, bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# ---------------------------------------------------------------------------- training
class StepTimer(Callback):
    """Training-step wall time and tokens (attention-mask sum), the first step excluded as warm-up."""

    def __init__(self) -> None:
        self.steps: list[tuple[float, int]] = []
        self._start = 0.0
        self._tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.steps.append((time.perf_counter() - self._start, self._tokens))

    def summary(self) -> dict[str, float]:
        timed = self.steps[1:] if len(self.steps) > 1 else self.steps
        seconds = sum(s for s, _ in timed)
        tokens = sum(t for _, t in timed)
        return {"train_step_s": seconds / max(1, len(timed)), "tokens_per_s": tokens / seconds if seconds else None,
                "train_tokens": sum(t for _, t in self.steps)}


def cli_args(config: Path, seed: int, args: argparse.Namespace, overrides: list[str]) -> list[str]:
    argv = ["--config", str(config)]
    if args.data_config:
        import yaml

        block = yaml.safe_load(Path(args.data_config).read_text()) or {}
        layered = isinstance(block, dict) and bool({"data", "model", "trainer", "seed_everything"} & set(block))
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
    except SystemExit as err:  # jsonargparse already printed the precise cause
        raise BenchError(f"the config could not be parsed (arguments: {' '.join(argv)}); see the message above"
                         ) from err
    finally:
        sys.argv = program_argv


def drop_checkpointing(trainer) -> None:
    """Bench runs keep the HF export only: remove checkpoint-writing callbacks."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer.callbacks[:] = [cb for cb in trainer.callbacks
                            if not isinstance(cb, ModelCheckpoint) and type(cb).__name__ != "FinalCheckpoint"]


def backbone_of(module) -> str:
    return str(getattr(module.hparams, "model", None) or module.hparams.get("model", "?"))


def data_block(cli) -> dict[str, Any]:
    """The parsed data block, without jsonargparse's bookkeeping (``__path__``: which file it came from),
    so the same data reached through different config files has one identity."""
    data = cli.config["data"]
    block = data.as_dict() if hasattr(data, "as_dict") else dict(data)
    return {key: value for key, value in block.items() if not (isinstance(key, str) and key.startswith("__"))}


def count_parameters(module) -> tuple[int, int]:
    """(trainable, total) parameters. Trainable: the adapter's paper-convention count where it defines one
    (e.g. prefixes without their re-parameterisation MLP), else ``trainable_parameters()``."""
    adapter = getattr(module, "adapter", None)
    paper_count = adapter.trainable_count() if adapter is not None else None
    chosen = module.trainable_parameters() if hasattr(module, "trainable_parameters") else {
        n: p for n, p in module.named_parameters() if p.requires_grad}
    trainable = paper_count if paper_count is not None else sum(p.numel() for p in chosen.values())
    return trainable, sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------- evaluation
def evaluate(module, datamodule, args: argparse.Namespace, completions_path: Path | None = None) -> dict[str, Any]:
    """Generation metrics on the first ``limit`` test records, plus the test split's response NLL."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    module.to(device)
    started = time.perf_counter()
    records = datamodule.eval_records("test")
    records = records[: args.limit] if args.limit is not None else records
    completions = generate_for_module(module, [r["prompt"] for r in records], max_new_tokens=args.max_new_tokens,
                                      system_prompt=datamodule.hparams.get("system_prompt"),
                                      batch_size=args.batch_size)
    metrics = dict(datamodule.evaluation_metrics(records, completions)) if records else {}
    main_metric = next(iter(metrics), None)
    nll = response_nll(module, datamodule, "test")
    metrics.update(nll=nll["nll"], ppl=nll["ppl"], nll_tokens=nll["tokens"])
    if hasattr(datamodule, "preference_metrics"):  # held-out pairs: reward and log-prob accuracy / margin
        metrics.update(datamodule.preference_metrics(module, split="test"))
    if completions_path is not None:
        completions_path.parent.mkdir(parents=True, exist_ok=True)
        with completions_path.open("w", encoding="utf-8") as handle:
            for record, completion in zip(records, completions):
                score = datamodule.score_completion(record, completion)
                handle.write(json.dumps({"prompt": record["prompt"], "answer": record.get("answer"),
                                         "completion": completion, **score}, default=str) + "\n")
    return {"metrics": metrics, "main_metric": main_metric, "eval_examples": len(records),
            "eval_wall_s": time.perf_counter() - started}


def evaluate_base(cli, args: argparse.Namespace, out: Path, config: Path, done: set, results: Path) -> None:
    """The untuned backbone on this config's data, once per (backbone, data, budget)."""
    from zoo.modules.base import CausalLMModule

    name = backbone_of(cli.model)
    block = data_block(cli)
    record = {"method": "base", "kind": "base", "config": str(config), "config_hash": digest(name, block),
              "seed": None, "budget": budget(args, 0)}
    if record_key(record) in done:
        return
    log(f"base ({name}): evaluating the untuned backbone ...")
    reset_peak_rss()
    module = CausalLMModule(model=name, export=False)
    result = evaluate(module, cli.datamodule, args, out / "runs" / f"base-{record['config_hash']}" / "completions.jsonl")
    _, total = count_parameters(module)
    record.update(backbone=name, dataset=block.get("init_args", {}).get("dataset"), **result,
                  train_wall_s=0.0, tokens_per_s=None, peak_rss_mb=peak_rss_mb(), trainable_params=0,
                  total_params=total, steps=0, **environment(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    append_result(results, record)
    done.add(record_key(record))
    log(f"base ({name}): {format_metrics(record)}")
    del module
    gc.collect()


def train_and_evaluate(config: Path, seed: int, args: argparse.Namespace, overrides: list[str], out: Path,
                       done: set, results: Path, position: str) -> None:
    method = method_name(config)
    record = {"method": method, "kind": "train", "config": str(config),
              "config_hash": config_hash(config, args, overrides), "seed": seed,
              "budget": budget(args, args.max_steps if args.max_steps is not None else "config")}
    if record_key(record) in done:
        log(f"{position} {method} seed {seed}: already in {results.name}, skipped")
        return
    run_dir = out / "runs" / f"{method}-s{seed}-steps{args.max_steps if args.max_steps is not None else 'config'}"
    if run_dir.exists():  # an interrupted run of this record: start it again
        shutil.rmtree(run_dir)
    cli = build_cli(cli_args(config, seed, args, overrides), run_dir=run_dir)
    if args.base:
        evaluate_base(cli, args, out, config, done, results)
    trainer, module = cli.trainer, cli.model
    if not args.keep_checkpoints:
        drop_checkpointing(trainer)
    timer = StepTimer()
    trainer.callbacks.append(timer)
    log(f"{position} {method} seed {seed}: training {trainer.max_steps} steps ...")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    started = time.perf_counter()
    trainer.fit(module, datamodule=cli.datamodule)
    wall = time.perf_counter() - started
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    log(f"{position} {method} seed {seed}: trained in {wall:.1f} s, evaluating ...")
    result = evaluate(module, cli.datamodule, args, run_dir / "completions.jsonl")
    trainable, total = count_parameters(module)
    record.update(backbone=backbone_of(module), module=type(module).__name__, dataset=data_block(cli).get("init_args", {}).get("dataset"),
                  run_dir=str(run_dir), **result, train_wall_s=wall, **timer.summary(), peak_rss_mb=peak_rss_mb(),
                  peak_cuda_mb=peak_cuda, trainable_params=trainable, total_params=total,
                  steps=int(trainer.global_step), **environment(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    append_result(results, record)
    done.add(record_key(record))
    log(f"{position} {method} seed {seed}: {format_metrics(record)}")
    del cli, module, trainer
    gc.collect()


# ---------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(path: str) -> tuple[Path, dict[str, Any] | None]:
    """(export folder, the run's config as a dict or None) for a run directory or an export folder."""
    import yaml

    from zoo.harness.load import LoadError, export_folder

    try:
        export = export_folder(path)
    except LoadError as err:
        raise BenchError(f"--ckpt {err}") from err
    folder = Path(path).expanduser()
    run_config = next((p for p in (export.parent / "config.yaml", folder / "config.yaml") if p.exists()), None)
    return export, (yaml.safe_load(run_config.read_text()) if run_config else None)


def checkpoint_backbone(export: Path, run_config: dict[str, Any] | None, model_override: str | None) -> str:
    """The backbone name a checkpoint's tokenizer and data come from."""
    from zoo.harness.load import read_manifest

    manifest = read_manifest(export) or {}
    if model_override:
        return model_override
    if manifest.get("weights") == "full" or (not manifest and not (export / "adapter_config.json").exists()):
        return str(export)
    base = manifest.get("init_args", {}).get("model") or (run_config or {}).get("model", {}).get(
        "init_args", {}).get("model")
    if not base and (export / "adapter_config.json").exists():
        base = json.loads((export / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise BenchError(f"{export}: cannot tell the backbone; pass --model NAME")
    return str(base)


def build_datamodule(args: argparse.Namespace, run_config: dict[str, Any] | None, tokenizer: str,
                     overrides: list[str]):
    """The data to evaluate a checkpoint on: --data-config, else the run's data block, else the default."""
    import lightning as L
    import yaml
    from jsonargparse import ArgumentParser

    import zoo.datamodules  # noqa: F401  (importable class paths)

    if args.data_config:
        block = yaml.safe_load(Path(args.data_config).read_text()) or {}
        block = block.get("data", block)
    elif run_config and run_config.get("data"):
        block = run_config["data"]
    else:
        block = {"class_path": "zoo.datamodules.SFTDataModule", "init_args": {}}
    # The CLI links model -> data tokenizer and leaves the link target out of the saved config.
    block = {**block, "init_args": {**(block.get("init_args") or {}), "tokenizer": tokenizer}}
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(L.LightningDataModule, "data", required=True)
    argv = ["--data", json.dumps(block)] + data_overrides(overrides)
    try:
        config = parser.parse_args(argv)
        return parser.instantiate_classes(config).data, block
    except Exception as err:  # jsonargparse raises its own error types
        raise BenchError(f"cannot build the evaluation data ({block}): {err}") from err


def data_overrides(overrides: list[str]) -> list[str]:
    """The ``--data...`` options (with their values) among CLI overrides; the rest do not apply to --ckpt."""
    kept, keep = [], False
    for token in overrides:
        if token.startswith("--"):
            keep = token.startswith("--data")
            if keep:
                kept.append(token)
            keep = keep and "=" not in token
        elif keep:
            kept.append(token)
            keep = False
    return kept


def evaluate_checkpoint(path: str, args: argparse.Namespace, overrides: list[str], out: Path, done: set,
                        results: Path) -> None:
    from zoo.harness.load import load_run

    export, run_config = resolve_checkpoint(path)
    weights = sorted(p for p in export.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".json"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime) for p in weights]
    name = f"ckpt:{export.parent.name if export.name == 'export' else export.name}"
    record = {"method": name, "kind": "ckpt", "config": str(export), "seed": (run_config or {}).get("seed_everything"),
              "budget": budget(args, "ckpt")}
    backbone_name = checkpoint_backbone(export, run_config, args.model)
    datamodule, block = build_datamodule(args, run_config, backbone_name, overrides)
    record["config_hash"] = digest(str(export.resolve()), stamp, block)
    if record_key(record) in done:
        log(f"{name}: already in {results.name}, skipped")
        return
    log(f"{name}: loading {export} ...")
    reset_peak_rss()
    module = load_run(export, model=args.model)
    result = evaluate(module, datamodule, args, out / "runs" / f"{name.replace(':', '-')}" / "completions.jsonl")
    trainable, total = count_parameters(module)
    record.update(backbone=backbone_name, module=type(module).__name__, dataset=block.get("init_args", {}).get("dataset"),
                  **result, train_wall_s=None, tokens_per_s=None, peak_rss_mb=peak_rss_mb(), trainable_params=trainable,
                  total_params=total, steps=None, **environment(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    append_result(results, record)
    done.add(record_key(record))
    log(f"{name}: {format_metrics(record)}")


# ---------------------------------------------------------------------------- report
def format_metrics(record: dict[str, Any]) -> str:
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["metrics"].items()]
    return ", ".join(parts)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, backbone, budget): mean and std of each metric over seeds; base rows first."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        key = (record["method"], record.get("backbone"), json.dumps(record.get("budget"), sort_keys=True))
        groups.setdefault(key, []).append(record)
    rows = []
    for (method, backbone_name, _), group in groups.items():
        row = {"method": method, "backbone": backbone_name, "seeds": len(group),
               "steps": group[0].get("steps"), "main_metric": group[0].get("main_metric")}
        numeric: dict[str, list[float]] = {}
        for record in group:
            values = dict(record.get("metrics", {}))
            for key in ("train_wall_s", "tokens_per_s", "peak_rss_mb", "trainable_params"):
                values[key] = record.get(key)
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    numeric.setdefault(key, []).append(float(value))
        row["stats"] = {key: mean_std(vals) for key, vals in numeric.items()}
        rows.append(row)
    rows.sort(key=lambda r: r["method"] != "base")
    return rows


def _cell(row: dict[str, Any], key: str | None, digits: int = 3) -> str:
    if key is None or key not in row["stats"]:
        return "-"
    mean, std = row["stats"][key]
    if row["seeds"] > 1:
        return f"{mean:.{digits}f} ± {std:.{digits}f}"
    return f"{mean:.{digits}f}"


EXTRA_COLUMNS = ("reward_accuracy", "reward_margin", "logp_accuracy", "logp_margin")


def markdown(rows: list[dict[str, Any]]) -> str:
    mains = sorted({r["main_metric"] for r in rows if r["main_metric"]})
    extras = [key for key in EXTRA_COLUMNS if key not in mains and any(key in r["stats"] for r in rows)]
    mains = mains + extras
    header = ["method", "backbone", "steps", "seeds", *mains, "nll", "ppl", "train s", "tokens/s",
              "peak RSS MB", "trainable params"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        trainable = r["stats"].get("trainable_params")
        cells = [f"`{r['method']}`", str(r["backbone"]), "-" if r["steps"] is None else str(r["steps"]), str(r["seeds"]),
                 *[_cell(r, m) for m in mains], _cell(r, "nll"), _cell(r, "ppl", 2), _cell(r, "train_wall_s", 1),
                 _cell(r, "tokens_per_s", 0), _cell(r, "peak_rss_mb", 0),
                 f"{int(trainable[0]):,}" if trainable else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["method"] if sum(x["method"] == r["method"] for x in rows) == 1 else
              f"{r['method']}\n{r['backbone']}/{r['steps']}" for r in rows]
    main = next((r["main_metric"] for r in rows if r["main_metric"]), None)
    panels = [(main, main or "main metric"), ("nll", "held-out response NLL (lower is better)")]
    figure, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.4 * len(rows) + 3), 3.8))
    for axis, (key, title) in zip(axes, panels):
        stats = [r["stats"].get(key, (float("nan"), 0.0)) if key else (float("nan"), 0.0) for r in rows]
        colors = ["0.6" if r["method"] == "base" else "C0" for r in rows]
        bars = axis.bar(range(len(rows)), [s[0] for s in stats], yerr=[s[1] for s in stats], capsize=4,
                        color=colors)
        axis.bar_label(bars, labels=[f"{s[0]:.3g}" for s in stats], fontsize=8, padding=2)
        finite = [s[0] for s in stats if math.isfinite(s[0])]
        if key == main and finite and all(0.0 <= v <= 1.0 for v in finite):
            axis.set_ylim(0.0, 1.05)  # a fraction (exact match, accuracy): show it on its full scale
        axis.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("zoo bench: mean ± std over seeds", fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(results: Path, out: Path) -> list[dict[str, Any]]:
    rows = summarize(load_results(results))
    if rows:
        (out / "results.md").write_text(markdown(rows))
        plot(rows, out / "results.png")
    return rows


# ---------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(list(sys.argv[1:] if argv is None else argv))
    configs = [Path(c) for c in args.configs]
    missing = [str(c) for c in configs if not c.is_file()]
    if missing:
        raise BenchError(f"config file(s) not found: {', '.join(missing)}")
    if args.data_config and not Path(args.data_config).is_file():
        raise BenchError(f"--data-config file not found: {args.data_config}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {record_key(r) for r in load_results(results)}
    for path in args.ckpt:
        evaluate_checkpoint(path, args, overrides, out, done, results)
    jobs = [(config, seed) for config in configs for seed in args.seed_list]
    failed: list[str] = []
    for number, (config, seed) in enumerate(jobs, start=1):
        try:
            train_and_evaluate(config, seed, args, overrides, out, done, results, f"{number}/{len(jobs)}")
        except Exception as err:  # one broken run must not cost the rest of a sweep
            if len(jobs) == 1:
                raise
            log(f"{number}/{len(jobs)} {config} seed {seed}: FAILED ({type(err).__name__}: {err}); "
                "going on with the next run")
            failed.append(f"{config} (seed {seed})")
            gc.collect()
    rows = write_report(results, out)
    log(f"{len(rows)} rows -> {out / 'results.md'}, {out / 'results.png'}, {results}")
    if rows:
        print(markdown(rows))
    if failed:
        raise BenchError(f"{len(failed)} of {len(jobs)} runs failed: {', '.join(failed)}; the others are in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
