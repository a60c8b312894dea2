"""EleutherAI lm-evaluation-harness tasks for the zoo's built-in data, as local files (offline).

    python -m zoo.harness.lm_eval_tasks --task chain_sum --out lm_eval_tasks/    # zoo_chain_sum.{yaml,jsonl}
    lm_eval --model hf --model_args pretrained=RUN/export --include_path lm_eval_tasks/ \\
        --tasks zoo_chain_sum --apply_chat_template --batch_size 16 --log_samples --output_path lm_eval_out

The JSONL holds the test split ``zoo bench`` evaluates with the same data arguments (``--num_test``,
``--seed``: the data module's ``seed``; other split sizes do not change the test split): one line per item,
``id`` (the bench's item id), ``prompt`` (the user message; ``--apply_chat_template`` renders it with the
model's chat template, as the zoo does) and ``answer``. The YAML task ``zoo_<task>`` generates greedily
(``max_gen_toks`` = ``--max_new_tokens``, stopping at EOS) and scores ``exact_match`` after a ``regex``
filter written to mirror :func:`zoo.datamodules.sft.extract_final_answer`: the text after the last
``####`` (its first line), else the last number (commas kept, ignored by the metric).

Where lm-eval's exact match and the zoo's can differ on the same completion (the zoo's side: the
reasoning-gym scorer or ``_normalise``): a number written differently (``5.0`` / ``5``, ``+5``, leading
zeros: the zoo compares numbers, lm-eval strings); a completion with no number and no ``####`` (the zoo
compares its whole stripped text, lm-eval scores ``[invalid]``). A live zoo module runs through
:class:`zoo.harness.lm_eval_model.ZooLM` instead of ``--model hf``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

__all__ = ["EXTRACT_PATTERN", "main", "task_yaml", "write_task"]

# After the last "####" (greedy (?s).* finds the last one) up to the end of that line, else the last number.
EXTRACT_PATTERN = r"(?s)^.*####\s*([^\n]*)|(-?\d[\d,]*(?:\.\d+)?)"


def task_yaml(name: str, data_file: Path, max_new_tokens: int) -> str:
    """The lm-eval task YAML (``task: zoo_<name>``) reading ``data_file`` as its test split."""
    import yaml

    config: dict[str, Any] = {
        "task": f"zoo_{name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": [], "do_sample": False, "max_gen_toks": max_new_tokens},
        "filter_list": [{"name": "zoo-extract", "filter": [
            {"function": "regex", "regex_pattern": EXTRACT_PATTERN, "group_select": -1},
            {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                         "ignore_case": True, "regexes_to_ignore": [",", "\\.$"]}],
        "num_fewshot": 0,
        "metadata": {"version": 1.0, "source": "zoo.harness.lm_eval_tasks"},
    }
    return yaml.safe_dump(config, sort_keys=False)


def split_records(task: str, num_test: int, seed: int = 0) -> list[dict[str, Any]]:
    """The test split ``zoo bench`` scores for the built-in ``task`` (``SFTDataModule`` records)."""
    from zoo import tasks
    from zoo.errors import ConfigError

    if not tasks.is_builtin_task(task):
        raise ConfigError(f"--task {task}: not a built-in task; pick one of {', '.join(tasks.task_names())}")
    return tasks.task_splits(task, {"train": 0, "val": 0, "test": num_test}, seed=seed)["test"]


def write_task(task: str, out: Path, num_test: int = 64, seed: int = 0, max_new_tokens: int = 256) -> Path:
    """Write ``out/zoo_<task>.jsonl`` and ``out/zoo_<task>.yaml``; returns the YAML path."""
    out.mkdir(parents=True, exist_ok=True)
    data = out / f"zoo_{task}.jsonl"
    with data.open("w", encoding="utf-8") as handle:
        for index, record in enumerate(split_records(task, num_test, seed)):
            line = {"id": index, "prompt": record["prompt"], "answer": str(record["answer"])}
            handle.write(json.dumps(line) + "\n")
    path = out / f"zoo_{task}.yaml"
    path.write_text(task_yaml(task, data, max_new_tokens))
    return path


def main(argv: list[str] | None = None) -> int:
    from zoo import tasks
    from zoo.errors import ZooError

    parser = argparse.ArgumentParser(prog="python -m zoo.harness.lm_eval_tasks",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--task", action="append", required=True,
                        help=f"built-in task (repeatable): {', '.join(tasks.task_names())}")
    parser.add_argument("--out", required=True, help="folder for the YAML + JSONL (lm_eval --include_path)")
    parser.add_argument("--num_test", type=int, default=64, help="test items (the bench's num_test)")
    parser.add_argument("--seed", type=int, default=0, help="the data module's seed")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="max_gen_toks")
    args = parser.parse_args(argv)
    try:
        for task in args.task:
            print(write_task(task, Path(args.out), args.num_test, args.seed, args.max_new_tokens))
    except ZooError as err:
        print(f"zoo: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
