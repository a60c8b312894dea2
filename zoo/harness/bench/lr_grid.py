"""Fair learning rates (issue 13): ``zoo bench --lr-grid 1e-5,1e-4,1e-3`` or ``--lr-grid-file grids.yaml``.

For each config x seed the method is trained once per rate (``--model.init_args.lr RATE``, same budget,
same seed; run directory ``OUT/runs/<method>-s<seed>-steps<N>-lr<RATE>``) and scored on the data's
VALIDATION split response NLL only (:func:`~zoo.harness.bench.items.response_nll_items` with
``split="val"``; no generation, so the grid costs training time). Each grid point is a record of kind
``"grid"`` in ``results.jsonl`` (``lr``, ``val_nll``, training cost), keyed like the others, so a rerun skips
finished points. The rate with the lowest validation NLL is chosen (ties: the smaller rate) and only that
run is evaluated on test (generation + NLL), from its export (``zoo.load``): the usual ``"train"`` record
plus ``lr_grid`` (``{rate: val_nll}``) and ``lr_chosen``.

Only ``model.init_args.lr`` is searched. Modules with other rate knobs (ProMoT's ``prompt_lr`` /
``model_lr``, DePT's ``lowrank_lr``, ...) keep their config's values for those; set them with
``-- --model.init_args.NAME VALUE`` if they should move too.

``--lr-grid-select METRIC`` picks on a generation metric of the data instead (e.g. ``exact_match``): each grid
point also generates for the whole validation split (its completions in the run's ``val_completions.jsonl``)
and the highest value wins, ties broken by the lower validation NLL. For objectives that do not minimise the
response NLL (OTR's on-policy reward, DFT-like weights, masked inputs) the NLL can favour the rate that
changes the model least; the metric costs generation on the validation split per point.

``--lr-grid-grow N`` adds up to N rates, one half-decade (1e-4 -> 3e-4 -> 1e-3) beyond the edge each time the
choice is the grid's smallest or largest rate, so that (unless the N rates run out, which the log says) the
reported rate has a worse rate on each side; the record's ``lr_grid`` lists every rate trained.

A chosen run whose export is gone (a sweep continued on another machine from its committed ``results.jsonl``)
is trained again at the chosen rate before its test evaluation; the grid's choice is kept.

``--lr-grid-file`` is a YAML mapping of method name (registry name, else the config's file stem) to a list
of rates, e.g. ``{sft: [1e-5, 1e-4], lora: [1e-4, 1e-3]}``; a method it does not name uses ``--lr-grid``
when given, else is trained once at its config's rate.
"""

from __future__ import annotations

import argparse
import gc
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch

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

__all__ = ["add_arguments", "choose", "grid_for", "parse_rates", "train_grid_and_evaluate"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr-grid", dest="lr_grid", default=None,
                        help="comma-separated learning rates (model.init_args.lr) to train each config at; "
                             "the rate with the lowest validation NLL is evaluated on test")
    parser.add_argument("--lr-grid-file", dest="lr_grid_file", default=None,
                        help="YAML mapping method name -> list of rates (per-method grids)")
    parser.add_argument("--lr-grid-select", dest="lr_grid_select", default="nll",
                        help="what picks the rate: nll (validation response NLL, no generation; default) or "
                             "a generation metric of the data, e.g. exact_match (the validation split is "
                             "generated for each rate; highest wins, ties by NLL)")
    parser.add_argument("--lr-grid-grow", dest="lr_grid_grow", type=int, default=0,
                        help="up to this many extra rates, a half-decade beyond the grid's edge each, while "
                             "the choice is the grid's smallest or largest rate (0: the grid as given)")


def parse_rates(text: Any, where: str) -> list[float]:
    """Rates from ``"1e-5,1e-4"`` or a list; each positive and finite, duplicates dropped, sorted."""
    items = [s for s in str(text).split(",") if s.strip()] if isinstance(text, str) else text
    if not isinstance(items, (list, tuple)) or not items:
        raise BenchError(f"{where}: give learning rates as a comma list or YAML list, e.g. 1e-5,1e-4,1e-3")
    rates = []
    for item in items:
        try:
            rate = float(item)
        except (TypeError, ValueError) as err:
            raise BenchError(f"{where}: {item!r} is not a number; give rates like 1e-4") from err
        if not (math.isfinite(rate) and rate > 0):
            raise BenchError(f"{where}: {item!r} is not a positive learning rate; give rates like 1e-4")
        rates.append(rate)
    return sorted(set(rates))


def check_arguments(args: argparse.Namespace) -> None:
    """Parse ``--lr-grid`` / ``--lr-grid-file`` into ``args.lr_rates`` and ``args.lr_grids``."""
    args.lr_rates = parse_rates(args.lr_grid, "--lr-grid") if args.lr_grid is not None else None
    args.lr_grids = {}
    if args.lr_grid_file is not None:
        import yaml

        path = Path(args.lr_grid_file)
        if not path.is_file():
            raise BenchError(f"--lr-grid-file {path}: file not found")
        try:
            mapping = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise BenchError(f"--lr-grid-file {path}: not valid YAML ({err.__class__.__name__})") from err
        if not isinstance(mapping, dict) or not mapping:
            raise BenchError(f"--lr-grid-file {path}: expected a mapping of method name to a list of rates, "
                             "e.g. `sft: [1e-5, 1e-4]`")
        args.lr_grids = {str(k): parse_rates(v, f"--lr-grid-file {path}: {k}") for k, v in mapping.items()}
        methods = {method_name(Path(c)) for c in args.configs}
        unknown = sorted(set(args.lr_grids) - methods)
        if unknown and args.configs:
            raise BenchError(f"--lr-grid-file {path}: {', '.join(unknown)} is not among the configs' methods "
                             f"({', '.join(sorted(methods))}); use those names")
    grow = getattr(args, "lr_grid_grow", 0)
    if grow < 0:
        raise BenchError(f"--lr-grid-grow {grow}: give how many rates may be added (0 or more)")
    if grow and not (args.lr_rates or args.lr_grids):
        raise BenchError("--lr-grid-grow extends a grid: give --lr-grid or --lr-grid-file too")
    if selecting(args) and not (args.lr_rates or args.lr_grids):
        raise BenchError(f"--lr-grid-select {args.lr_grid_select} picks a grid's rate: give --lr-grid or "
                         "--lr-grid-file too")
    if (args.lr_rates or args.lr_grids) and getattr(args, "ckpt", None) and not args.configs:
        raise BenchError("--lr-grid trains configs; it does not apply to --ckpt alone")


def grid_for(config: Path, args: argparse.Namespace) -> list[float] | None:
    """The rates to search for ``config`` (its method's entry in --lr-grid-file, else --lr-grid), or None."""
    grids = getattr(args, "lr_grids", None) or {}
    return grids.get(method_name(config), getattr(args, "lr_rates", None))


def choose(val_nll: dict[float, float], val_metric: dict[float, float] | None = None) -> float:
    """The rate with the lowest finite validation NLL (ties: the smaller rate); with ``val_metric``, the one
    with the highest metric among those, ties by the lower NLL, then the smaller rate."""
    finite = {rate: nll for rate, nll in val_nll.items() if nll is not None and math.isfinite(nll)}
    if not finite:
        raise BenchError(f"every grid point diverged (validation NLL {val_nll}); try smaller rates")
    if val_metric is not None:
        return min(sorted(finite), key=lambda rate: (-val_metric[rate], finite[rate]))
    return min(sorted(finite), key=lambda rate: finite[rate])


def selecting(args: argparse.Namespace) -> str | None:
    """The generation metric that picks the rate (``--lr-grid-select``), or None for the validation NLL."""
    select = getattr(args, "lr_grid_select", "nll")
    return None if select == "nll" else select


def grid_budget(args: argparse.Namespace, steps: int | str) -> dict[str, Any]:
    """The records' budget; a metric selection joins it, so that its rows never merge with an NLL-selected
    sweep's in one table (the NLL sweep's budget, and so its finished records' keys, are unchanged)."""
    select = selecting(args)
    return {**budget(args, steps), **({"lr_select": select} if select else {})}


def check_metric(module, datamodule, args: argparse.Namespace) -> None:
    """Refuse, before any training, a ``--lr-grid-select`` metric the data does not compute for this module
    (its metric names: an empty completion of one validation record, scored as the evaluation scores)."""
    from zoo.harness.bench.evaluation import score_completions

    select = selecting(args)
    records = datamodule.eval_records("val")[:1]
    names = list(score_completions(module, datamodule, records, [""] * len(records)))
    if select not in names:
        raise BenchError(f"--lr-grid-select {select}: this data's metrics are {', '.join(names) or 'none'}; "
                         "pick one of them, or nll")


def validation_metrics(module, datamodule, args: argparse.Namespace, run_dir: Path) -> dict[str, float]:
    """The data's generation metrics on the whole validation split (completions to
    ``run_dir/val_completions.jsonl``)."""
    from zoo.harness.bench.evaluation import generation_metrics, write_completions

    records = datamodule.eval_records("val")
    metrics, completions = generation_metrics(module, datamodule, records, args)
    write_completions(run_dir / "val_completions.jsonl", datamodule, records, completions)
    return metrics


def rate_text(rate: float) -> str:
    return f"{rate:g}"


def next_rate(rates: list[float], chosen: float) -> float | None:
    """One half-decade beyond the edge of ``rates`` that ``chosen`` sits on (1e-4 -> 3e-4 -> 1e-3 upwards,
    1e-4 -> 3e-5 -> 1e-5 downwards), or None when ``chosen`` is interior (or the grid has one rate)."""
    if len(rates) < 2 or rates[0] < chosen < rates[-1]:
        return None
    up = chosen == rates[-1]
    mantissa = chosen / 10 ** math.floor(math.log10(chosen))
    small = mantissa < 2  # on the 1-3-10 ladder: 1 -> 3 going up, 1 -> 0.3 going down
    factor = (3 if small else 10 / 3) if up else (1 / (10 / 3) if small else 1 / 3)
    return float(f"{chosen * factor:.0e}")


def _grid_point(config: Path, seed: int, rate: float, args: argparse.Namespace, overrides: list[str],
                out: Path, done: set, results: Path, position: str, retrain: bool = False) -> dict[str, Any]:
    """Train one grid point (or find its record, unless ``retrain``) and return its grid record."""
    from zoo.harness.bench.driver import build_cli, cli_args, evaluate_base_on_eval_tasks, fit_measured
    from zoo.harness.bench.evaluation import evaluate_base
    from zoo.harness.bench.items import response_nll_items
    from zoo.harness.bench.memory import peak_rss_mb
    from zoo.harness.bench.rerun import resolved_config

    method = method_name(config)
    point_overrides = list(overrides) + ["--model.init_args.lr", rate_text(rate)]
    steps = args.max_steps if args.max_steps is not None else "config"
    select = selecting(args)
    record = {"method": method, "kind": "grid", "config": str(config),
              "config_hash": digest("lr-grid-point", config_hash(config, args, point_overrides),
                                    *([select] if select else [])),
              "seed": seed, "budget": grid_budget(args, steps), "lr": rate}
    if record_key(record) in done and not retrain:
        found = [r for r in load_results(results)
                 if r.get("kind") == "grid" and record_key(r) == record_key(record)]
        if found:
            log(f"{position} {method} seed {seed} lr {rate_text(rate)}: already in {results.name}, skipped")
            return found[-1]
    suffix = f"-sel{select}" if select else ""  # never the NLL sweep's folder (with its export)
    run_dir = out / "runs" / f"{method}-s{seed}-steps{steps}-lr{rate_text(rate)}{suffix}"
    if run_dir.exists():  # an interrupted grid point: start it again
        shutil.rmtree(run_dir)
    argv = cli_args(config, seed, args, point_overrides)
    cli = build_cli(argv, run_dir=run_dir)
    record.update(resolved_config=resolved_config(cli), cli_args=argv, overrides=point_overrides)
    if select:
        check_metric(cli.model, cli.datamodule, args)
    if args.base:
        evaluate_base(cli, args, out, config, done, results)
        evaluate_base_on_eval_tasks(cli, args, out, config, done, results)  # --eval-task
    trainer, module = cli.trainer, cli.model
    timer, wall, peak_cuda = fit_measured(cli, args, f"{position} {method} seed {seed} lr {rate_text(rate)}")
    module.to(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    val = response_nll_items(module, cli.datamodule, "val")  # the selection signal: no generation
    if select:
        record["val_metrics"] = validation_metrics(module, cli.datamodule, args, run_dir)
    trainable, total = count_parameters(module)
    record.update(backbone=backbone_of(module), module=type(module).__name__,
                  dataset=data_block(cli).get("init_args", {}).get("dataset"), run_dir=str(run_dir),
                  val_nll=val["nll"], val_tokens=val["tokens"], train_wall_s=wall, **timer.summary(),
                  peak_rss_mb=peak_rss_mb(), peak_cuda_mb=peak_cuda, trainable_params=trainable,
                  total_params=total, steps=int(trainer.global_step), **environment(),
                  time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    append_result(results, record)
    done.add(record_key(record))
    shown = f", {select} {record['val_metrics'][select]:.4f}" if select else ""
    log(f"{position} {method} seed {seed} lr {rate_text(rate)}: validation NLL {val['nll']:.4f}{shown}")
    del cli, module, trainer
    gc.collect()
    return record


def train_grid_and_evaluate(config: Path, seed: int, rates: list[float], args: argparse.Namespace,
                            overrides: list[str], out: Path, done: set, results: Path, position: str) -> None:
    """The grid for one config x seed, the choice, and the chosen run's test record."""
    from zoo.harness.bench.evaluation import evaluate
    from zoo.harness.bench.extra_evals import (
        contamination_figures,
        eval_sets,
        evaluate_eval_tasks,
        tokenizer_of,
    )
    from zoo.harness.bench.items import items_name
    from zoo.harness.load import LoadError, load_run

    method = method_name(config)
    steps = args.max_steps if args.max_steps is not None else "config"
    select = selecting(args)
    record = {"method": method, "kind": "train", "config": str(config),
              "config_hash": digest(config_hash(config, args, overrides), "lr-grid", rates,
                                    *([args.lr_grid_grow] if getattr(args, "lr_grid_grow", 0) else []),
                                    *([f"select={select}"] if select else [])),
              "seed": seed, "budget": grid_budget(args, steps)}
    if record_key(record) in done:
        log(f"{position} {method} seed {seed}: lr grid already in {results.name}, skipped")
        return
    points = {rate: _grid_point(config, seed, rate, args, overrides, out, done, results, position)
              for rate in rates}
    val_nll = {rate: point.get("val_nll") for rate, point in points.items()}
    val_metric = {rate: point["val_metrics"][select] for rate, point in points.items()} if select else None
    chosen = choose(val_nll, val_metric)
    for _ in range(getattr(args, "lr_grid_grow", 0)):  # the optimum inside the grid, not on its edge
        extra = next_rate(sorted(points), chosen)
        if extra is None:
            break
        log(f"{position} {method} seed {seed}: lr {rate_text(chosen)} is the grid's edge; "
            f"adding {rate_text(extra)}")
        points[extra] = _grid_point(config, seed, extra, args, overrides, out, done, results, position)
        val_nll[extra] = points[extra].get("val_nll")
        if select:
            val_metric[extra] = points[extra]["val_metrics"][select]
        chosen = choose(val_nll, val_metric)
    else:
        if getattr(args, "lr_grid_grow", 0) and next_rate(sorted(points), chosen) is not None:
            log(f"{position} {method} seed {seed}: lr {rate_text(chosen)} is still the grid's edge after "
                f"{args.lr_grid_grow} extra rates (raise --lr-grid-grow to search further)")
    val_nll = dict(sorted(val_nll.items()))
    point = points[chosen]
    table = ", ".join(f"{rate_text(r)}: {v:.4f}" if v is not None else f"{rate_text(r)}: -"
                      for r, v in val_nll.items())
    if select:
        table += "; validation " + select + " by lr " + ", ".join(
            f"{rate_text(r)}: {val_metric[r]:.4f}" for r in sorted(val_metric))
    log(f"{position} {method} seed {seed}: validation NLL by lr {table} -> chose lr {rate_text(chosen)}; "
        "evaluating it on test ...")
    try:
        module = load_run(point["run_dir"], model=args.model)
    except LoadError as err:  # e.g. a sweep continued on another machine from its committed records
        log(f"{position} {method} seed {seed}: the chosen run {point['run_dir']} has no usable export "
            f"({err}); training lr {rate_text(chosen)} again (same seed, same budget)")
        point = _grid_point(config, seed, chosen, args, overrides, out, done, results, position, retrain=True)
        log(f"{position} {method} seed {seed} lr {rate_text(chosen)}: validation NLL {point['val_nll']:.4f} "
            f"now, {val_nll[chosen]:.4f} in the grid (the choice stands)")
        module = load_run(point["run_dir"], model=args.model)
    datamodule = _datamodule(point, args)
    result = evaluate(module, datamodule, args, Path(point["run_dir"]) / "completions.jsonl",
                      out / "items" / items_name(record))
    keep = ("resolved_config", "cli_args", "overrides", "backbone", "module", "dataset", "run_dir",
            "train_wall_s", "train_step_s", "tokens_per_s", "train_tokens", "peak_rss_mb", "peak_cuda_mb",
            "trainable_params", "total_params", "steps")
    record.update({key: point[key] for key in keep if key in point})
    record.update(**result,
                  lr_grid={rate_text(r): v for r, v in val_nll.items()}, lr_chosen=chosen,
                  lr_grid_select=select or "nll",
                  **({"lr_grid_metric": {rate_text(r): val_metric[r] for r in sorted(val_metric)}}
                     if select else {}),
                  **environment(),
                  time=time.strftime("%Y-%m-%dT%H:%M:%S"))
    # contamination of the training split vs test and --eval-task sets; the --eval-task records
    sets = eval_sets(args, tokenizer_of(datamodule, str(point["backbone"])))
    record["contamination"] = contamination_figures(datamodule, sets, f"{method} seed {seed}")
    evaluate_eval_tasks(module, record, sets, args, out, done, results, Path(point["run_dir"]))
    append_result(results, record)
    done.add(record_key(record))
    log(f"{position} {method} seed {seed} (lr {rate_text(chosen)}): {format_metrics(record)}")
    del module, datamodule
    gc.collect()


def _datamodule(point: dict[str, Any], args: argparse.Namespace):
    """The chosen grid run's data module, from the data block of its resolved config (nothing trained)."""
    import yaml

    from zoo.harness.bench.evaluation import build_datamodule

    config = yaml.safe_load(point["resolved_config"])
    plain = argparse.Namespace(**{**vars(args), "data_config": None})  # the resolved block has it already
    datamodule, _ = build_datamodule(plain, config, str(point["backbone"]), [])
    return datamodule
