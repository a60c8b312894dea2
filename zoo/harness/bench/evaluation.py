"""Bench evaluation: generation metrics and held-out NLL of a module; the base row; ``--ckpt`` exports.

:func:`evaluate` scores any module on its data's test split; :func:`evaluate_base` adds the untuned
backbone once per (backbone, data, budget); :func:`evaluate_checkpoint` rebuilds a run's own class from its
export (``zoo.load``) and evaluates it on the run's data, or ``--data-config``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path
from typing import Any

import torch

from zoo.harness.bench.items import items_name, response_nll_items, write_items
from zoo.harness.bench.memory import peak_rss_mb, reset_peak_rss
from zoo.harness.bench.records import (
    BenchError,
    append_result,
    backbone_of,
    budget,
    count_parameters,
    data_block,
    digest,
    environment,
    format_metrics,
    log,
    record_key,
)
from zoo.harness.bench.rerun import resolved_config
from zoo.harness.generation import generate_for_module


def evaluate(module, datamodule, args: argparse.Namespace,
             completions_path: Path | None = None, items_path: Path | None = None) -> dict[str, Any]:
    """Generation metrics on the first ``limit`` test records, plus the test split's response NLL
    (classification modules, :func:`is_classifier`: label-score predictions; multi-label data adds
    per-item ``exact_match`` as the main metric);
    ``items_path``: where the per-item records go (:mod:`zoo.harness.bench.items`; the result's ``items``
    names it as ``items/<file>``)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    module.to(device)
    started = time.perf_counter()
    all_records = datamodule.eval_records("test")
    records = all_records[: args.limit] if args.limit is not None else all_records
    metrics, completions = generation_metrics(module, datamodule, records, args)
    main_metric = next(iter(metrics), None)
    # the split NLL and its per-item sums, one pass (classifiers: the NLL of the label text, one forward an
    # item, what `zoo bench --ckpt` and the contract matrix reproduce)
    nll = response_nll_items(module, datamodule, "test")
    metrics.update(nll=nll["nll"], ppl=nll["ppl"], nll_tokens=nll["tokens"])
    if hasattr(datamodule, "preference_metrics"):  # held-out pairs: reward and log-prob accuracy / margin
        metrics.update(datamodule.preference_metrics(module, split="test"))
    if completions_path is not None:
        write_completions(completions_path, datamodule, records, completions)
    result = {"metrics": metrics, "main_metric": main_metric, "eval_examples": len(records),
              "eval_wall_s": time.perf_counter() - started}
    if items_path is not None:  # per-item records (issue 13): id, prompt hash, completion, scores, NLL
        scores = [datamodule.score_completion(r, c) for r, c in zip(records, completions)]
        write_items(items_path, all_records, completions, scores, nll["per_item"])
        result["items"] = f"items/{items_path.name}"
    return result


def generation_metrics(module, datamodule, records: list[dict[str, Any]],
                       args: argparse.Namespace) -> tuple[dict[str, float], list[str]]:
    """The data's metrics of the module's completions for ``records`` (generated, or label-score
    predictions for a classifier, :func:`is_classifier`), main metric first, and the completions."""
    if is_classifier(module, datamodule):  # few-shot classification: the label scores, not generation
        completions = predict_completions(module, datamodule, records, args.batch_size)
    else:
        completions = generate_for_module(module, [r["prompt"] for r in records],
                                          max_new_tokens=args.max_new_tokens,
                                          system_prompt=datamodule.hparams.get("system_prompt"),
                                          batch_size=args.batch_size)
    return score_completions(module, datamodule, records, completions), completions


def score_completions(module, datamodule, records: list[dict[str, Any]],
                      completions: list[str]) -> dict[str, float]:
    """The data's metrics of ``completions`` for ``records``, main metric first (multi-label classification
    leads with per-item exact match, for the paired CIs)."""
    metrics = dict(datamodule.evaluation_metrics(records, completions)) if records else {}
    if records and getattr(datamodule, "multi_label", False) and is_classifier(module, datamodule):
        exact = [datamodule.score_completion(r, c)["exact_match"] for r, c in zip(records, completions)]
        metrics = {"exact_match": sum(exact) / len(exact), **metrics}
    return metrics


def write_completions(path: Path, datamodule, records: list[dict[str, Any]], completions: list[str]) -> None:
    """One JSON line per record: prompt, answer, completion and its per-record scores."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record, completion in zip(records, completions):
            score = datamodule.score_completion(record, completion)
            handle.write(json.dumps({"prompt": record["prompt"], "answer": record.get("answer"),
                                     "completion": completion, **score}, default=str) + "\n")


def is_classifier(module, datamodule) -> bool:
    """Whether ``module`` scores labels (a classification module: ``predict_labels`` / ``score_prompts``) on
    data with a label set; such modules are evaluated by their label scores, not by free generation."""
    scores_labels = all(callable(getattr(module, name, None)) for name in ("predict_labels", "score_prompts"))
    return scores_labels and bool(getattr(datamodule, "labels", None))


def predict_completions(module, datamodule, records: list[dict[str, Any]], batch_size: int) -> list[str]:
    """The predicted label text of each record (multi-label: the predicted labels joined by ", ", "none" when
    empty, as the data renders responses), so the data's ``score_completion`` / ``evaluation_metrics`` parse
    them back. The module is calibrated first as its test epoch would be (``calibration``: content-free
    prompts or the ``unlabeled`` split)."""
    from zoo.datamodules.classification import label_text

    if hasattr(module, "calibrate_from"):
        module.calibrate_from(datamodule)
    completions: list[str] = []
    for start in range(0, len(records), batch_size):
        prompts = [r["prompt"] for r in records[start: start + batch_size]]
        for predicted in module.predict_labels(prompts):
            if isinstance(predicted, str):
                completions.append(label_text(predicted))
            else:  # multi-label: a list of labels
                completions.append(", ".join(label_text(label) for label in predicted) or "none")
    return completions


def base_module(name: str, datamodule):
    """The untuned backbone for the base row: on classification data (a label set) a plain
    :class:`~zoo.modules.classification.ClassificationModule` without adapter on the same labels, scored by
    its label scores; otherwise a :class:`~zoo.modules.base.CausalLMModule` scored by generation."""
    from zoo.modules.base import CausalLMModule
    from zoo.modules.classification import ClassificationModule

    if hasattr(datamodule, "eval_records"):
        datamodule.eval_records("test")  # external data learns its label set when it loads
    labels = getattr(datamodule, "labels", None)
    if labels and hasattr(datamodule, "multi_label"):
        return ClassificationModule(model=name, labels=list(labels), multi_label=bool(datamodule.multi_label),
                                    export=False)
    module = CausalLMModule(model=name, export=False)
    extend_to_data_tokens(module, datamodule)
    return module


def extend_to_data_tokens(module, datamodule) -> None:
    """Give the base row the special tokens the data's tokenizer added (LeTI's reward tokens, ...), through
    the shared :func:`~zoo.tokens.extend_vocabulary` (new rows = the mean row, as a method's own run gets
    them), so the data's ids index its embeddings."""
    from zoo.tokens import extend_vocabulary

    tokenizer = getattr(datamodule, "tokenizer", None)
    if tokenizer is None:
        return
    have = module.tokenizer.get_vocab()
    rows = module.model.get_input_embeddings().weight.shape[0]  # a shared tokenizer may know them already
    missing = [t for t in tokenizer.get_added_vocab() if have.get(t, rows) >= rows]
    if missing:
        extend_vocabulary(module.model, module.tokenizer, missing)


def evaluate_base(cli, args: argparse.Namespace, out: Path, config: Path, done: set, results: Path) -> None:
    """The untuned backbone on this config's data, once per (backbone, data, budget); classification data:
    scored by label scores (:func:`base_module`)."""
    name = backbone_of(cli.model)
    block = data_block(cli)
    record = {"method": "base", "kind": "base", "config": str(config), "config_hash": digest(name, block),
              "seed": None, "budget": budget(args, 0)}
    if record_key(record) in done:
        return
    record["resolved_config"] = resolved_config(cli)  # the data and backbone it was evaluated on
    log(f"base ({name}): evaluating the untuned backbone ...")
    reset_peak_rss()
    module = base_module(name, cli.datamodule)
    completions = out / "runs" / f"base-{record['config_hash']}" / "completions.jsonl"
    result = evaluate(module, cli.datamodule, args, completions, out / "items" / items_name(record))
    _, total = count_parameters(module)
    record.update(backbone=name, dataset=block.get("init_args", {}).get("dataset"), **result,
                  train_wall_s=0.0, tokens_per_s=None, peak_rss_mb=peak_rss_mb(), trainable_params=0,
                  total_params=total, steps=0, **environment(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    append_result(results, record)
    done.add(record_key(record))
    log(f"base ({name}): {format_metrics(record)}")
    del module
    gc.collect()



def resolve_checkpoint(path: str, force: bool = False) -> tuple[Path, dict[str, Any] | None]:
    """(export folder, the run's config as a dict or None) for a run directory or an export folder; a run
    whose ``run.json`` says it did not finish is refused unless ``force``."""
    import yaml

    from zoo.harness.load import LoadError, export_folder
    from zoo.harness.run_state import read_run_state

    folder = Path(path).expanduser()
    state = read_run_state(folder) or (read_run_state(folder.parent) if folder.name == "export" else None)
    if state and state.get("state") != "finished" and not force:
        detail = state.get("error") or state.get("signal") or ""
        raise BenchError(f"--ckpt {path}: the run is {state.get('state')}"
                         + (f" ({detail})" if detail else "")
                         + "; resume or rerun it, or pass --force to evaluate it anyway")

    try:
        export = export_folder(path)
    except LoadError as err:
        raise BenchError(f"--ckpt {err}") from err
    folder = Path(path).expanduser()
    candidates = (export.parent / "config.yaml", folder / "config.yaml")
    run_config = next((p for p in candidates if p.exists()), None)
    return export, (yaml.safe_load(run_config.read_text()) if run_config else None)



def checkpoint_backbone(export: Path, run_config: dict[str, Any] | None, model_override: str | None) -> str:
    """The backbone name a checkpoint's tokenizer and data come from."""
    from zoo.harness.load import read_manifest

    manifest = read_manifest(export) or {}
    if model_override:
        return model_override
    bare_hf = not manifest and not (export / "adapter_config.json").exists()
    if manifest.get("weights") in ("full", "merged") or bare_hf:
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

    export, run_config = resolve_checkpoint(path, getattr(args, "force", False))
    weights = sorted(p for p in export.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".json"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime) for p in weights]
    name = f"ckpt:{export.parent.name if export.name == 'export' else export.name}"
    record = {"method": name, "kind": "ckpt", "config": str(export),
              "seed": (run_config or {}).get("seed_everything"), "budget": budget(args, "ckpt")}
    backbone_name = checkpoint_backbone(export, run_config, args.model)
    datamodule, block = build_datamodule(args, run_config, backbone_name, overrides)
    record["config_hash"] = digest(str(export.resolve()), stamp, block)
    if record_key(record) in done:
        log(f"{name}: already in {results.name}, skipped")
        return
    log(f"{name}: loading {export} ...")
    reset_peak_rss()
    module = load_run(export, model=args.model)
    completions = out / "runs" / f"{name.replace(':', '-')}" / "completions.jsonl"
    result = evaluate(module, datamodule, args, completions, out / "items" / items_name(record))
    trainable, total = count_parameters(module)
    record.update(backbone=backbone_name, module=type(module).__name__,
                  dataset=block.get("init_args", {}).get("dataset"), **result, train_wall_s=None,
                  tokens_per_s=None, peak_rss_mb=peak_rss_mb(), trainable_params=trainable,
                  total_params=total,
                  steps=None, **environment(), time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    append_result(results, record)
    done.add(record_key(record))
    log(f"{name}: {format_metrics(record)}")
