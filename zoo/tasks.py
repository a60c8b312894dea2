"""Built-in tasks: offline, deterministic (prompt, response, answer) records.

``gsm_symbolic``  reasoning-gym's GSM8K-derived templates; the response is the worked solution in
                  ``metadata["answer_cot"]``, which ends with a line ``#### <answer>``.
``chain_sum``     reasoning-gym's integer sums (``4 - 1 - 7 =``) with a worked solution written
                  by the zoo (one partial sum a line, then ``#### <answer>``): an easier task on
                  which a 135M model's exact match moves within a CPU-sized budget.
any other reasoning-gym generator name: the question and its short answer (``#### <answer>``).

Splits use disjoint seeds (train = seed, val = seed + 1, test = seed + 2) and every question in
val/test is removed from train, so the held-out problems are never trained on.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable

Record = dict  # {"prompt": str, "response": str, "answer": str, "source": str, "entry": dict}
SPLIT_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}


def _require_reasoning_gym():
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ImportError("built-in tasks need reasoning-gym: `pip install reasoning-gym==0.1.25` "
                          "(or `pip install -e .[embedded]`)")
    import reasoning_gym

    return reasoning_gym


def _worked_chain_sum(expression: str, answer: str) -> str:
    tokens = expression.split()
    total, lines = int(tokens[0]), []
    for op, value in zip(tokens[1::2], tokens[2::2]):
        new = total + int(value) if op == "+" else total - int(value)
        lines.append(f"{total} {op} {value} = {new}")
        total = new
    if str(total) != str(answer).strip():
        raise ValueError(f"worked solution of {expression!r} gives {total}, reasoning-gym says {answer}")
    return "\n".join(lines) + f"\n#### {answer}"


def _gsm_symbolic_response(entry: dict) -> str:
    return entry["metadata"]["answer_cot"].strip()


def _chain_sum_response(entry: dict) -> str:
    return _worked_chain_sum(entry["metadata"]["expression"], entry["answer"])


RESPONSE_WRITERS: dict[str, Callable[[dict], str]] = {
    "gsm_symbolic": _gsm_symbolic_response,
    "chain_sum": _chain_sum_response,
}


def is_builtin_task(name: str) -> bool:
    if name in RESPONSE_WRITERS:
        return True
    if "/" in name or "." in name:
        return False
    return (importlib.util.find_spec("reasoning_gym") is not None
            and name in _require_reasoning_gym().factory.DATASETS)


def task_names() -> list[str]:
    """Every built-in task name (for "did you mean"): the zoo's own plus reasoning-gym's generators."""
    names = list(RESPONSE_WRITERS)
    if importlib.util.find_spec("reasoning_gym") is not None:
        names += sorted(set(_require_reasoning_gym().factory.DATASETS) - set(names))
    return names


def generate_records(name: str, size: int, seed: int) -> tuple[list[Record], object]:
    """``size`` records of task ``name`` from seed ``seed``, and the reasoning-gym dataset (for scoring)."""
    rg = _require_reasoning_gym()
    dataset = rg.create_dataset(name, size=size, seed=seed)
    writer = RESPONSE_WRITERS.get(name, lambda entry: f"#### {entry['answer']}")
    records = [
        {"prompt": entry["question"], "response": writer(entry), "answer": str(entry["answer"]),
         "source": name, "entry": entry}
        for entry in dataset
    ]
    return records, dataset


def task_splits(name: str, sizes: dict[str, int], seed: int = 0) -> dict[str, list[Record]]:
    """Train / val / test records with disjoint seeds; held-out questions are removed from train."""
    splits = {split: generate_records(name, size, seed + SPLIT_SEED_OFFSET[split])[0]
              for split, size in sizes.items() if size > 0}
    test_prompts = {r["prompt"] for r in splits.get("test", [])}
    if "val" in splits:  # small generators (chain_sum) repeat questions across seeds: keep val off test too
        splits["val"] = [r for r in splits["val"] if r["prompt"] not in test_prompts]
    held_out = {r["prompt"] for split in ("val", "test") for r in splits.get(split, [])}
    if "train" in splits:
        splits["train"] = [r for r in splits["train"] if r["prompt"] not in held_out]
    return splits


def score_answer(record: Record, prediction: str) -> float:
    """1.0 if ``prediction`` (already extracted) is the record's answer; reasoning-gym's scorer where
    known."""
    entry = record.get("entry")
    if entry is not None and record.get("source"):
        return float(_scorer(record["source"]).score_answer(prediction, entry) >= 1.0)
    return float(_normalise(prediction) == _normalise(record["answer"]))


@functools.cache
def _scorer(name: str):
    return _require_reasoning_gym().create_dataset(name, size=1, seed=0)


def _normalise(text: str) -> str:
    text = text.strip().replace(",", "").rstrip(".")
    try:
        number = float(text)
    except ValueError:
        return text.lower()
    return str(int(number)) if number == int(number) else str(number)
