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

The package: ``driver`` (options, training runs, the sweep, :func:`main`), ``evaluation`` (metrics of a
module, the base row, ``--ckpt``), ``records`` (identities and ``results.jsonl``), ``report`` (the table
and plot), ``memory`` (peak RSS and step timing). ``python -m zoo bench`` and ``python -m zoo.harness.bench``
both run :func:`main`.
"""

from zoo.harness.bench.driver import (
    DESCRIPTION,
    build_cli,
    cli_args,
    drop_checkpointing,
    main,
    parse_args,
    train_and_evaluate,
)
from zoo.harness.bench.evaluation import (
    build_datamodule,
    checkpoint_backbone,
    data_overrides,
    evaluate,
    evaluate_base,
    evaluate_checkpoint,
    resolve_checkpoint,
)
from zoo.harness.bench.memory import StepTimer, peak_rss_mb, reset_peak_rss, trim_heap
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
from zoo.harness.bench.report import EXTRA_COLUMNS, markdown, mean_std, plot, summarize, write_report

__all__ = [
    "DESCRIPTION", "EXTRA_COLUMNS", "BenchError", "StepTimer", "append_result", "backbone_of", "budget",
    "build_cli", "build_datamodule", "checkpoint_backbone", "cli_args", "config_hash", "count_parameters",
    "data_block", "data_overrides", "digest", "drop_checkpointing", "environment", "evaluate",
    "evaluate_base", "evaluate_checkpoint", "format_metrics", "load_results", "log", "main", "markdown",
    "mean_std", "method_name", "parse_args", "peak_rss_mb", "plot", "record_key", "reset_peak_rss",
    "resolve_checkpoint", "summarize", "train_and_evaluate", "trim_heap", "write_report",
]
