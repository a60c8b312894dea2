"""Built-in tasks: offline, deterministic (prompt, response, answer) records.

``gsm_symbolic``  reasoning-gym's GSM8K-derived templates; the response is the worked solution in
                  ``metadata["answer_cot"]``, which ends with a line ``#### <answer>``.
``chain_sum``     reasoning-gym's integer sums (``4 - 1 - 7 =``) with a worked solution written
                  by the zoo (one partial sum a line, then ``#### <answer>``): an easier task on
                  which a 135M model's exact match moves within a CPU-sized budget.
any other reasoning-gym generator name: the question and its short answer (``#### <answer>``).

Splits are disjoint by construction (:func:`task_splits`): reasoning-gym draws item ``i`` of a dataset
with seed ``s`` from ``Random(s + i)``, so each split reads its own block of that integer stream (test:
``seed + 2 + i``, the historical test stream, so test items are unchanged; val: ``+ 10**7``; train:
``+ 2 * 10**7``), and a prompt already taken by an earlier split (test, then val, then train) or by the
same split is skipped and the split topped up from further along its block, so every split has exactly
its requested size. ``holdout="template"`` (``gsm_symbolic`` only) holds out whole problem templates: test
and val problems come from templates that never appear in training.
"""

from __future__ import annotations

import functools
import importlib.util
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from zoo.errors import ConfigError

Record = dict  # {"prompt": str, "response": str, "answer": str, "source": str, "entry": dict}
SPLIT_SEED_OFFSET = {"train": 0, "val": 1, "test": 2}  # the per-split seeds of the zoo's own generators
STREAM_BLOCK = 10**7  # items of one split's block of reasoning-gym's integer stream
STREAM_BASE = {"test": 2, "val": 2 + STREAM_BLOCK, "train": 2 + 2 * STREAM_BLOCK}
SPLIT_ORDER = ("test", "val", "train")  # who keeps an item drawn by two splits: the held-out one
TEMPLATE_SHARE = {"test": 0.2, "val": 0.1}  # holdout="template": each held-out split's share of templates


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
    """``size`` records of task ``name`` from seed ``seed``, and the reasoning-gym dataset (for scoring).
    ``gsm_symbolic`` records also carry their problem ``template`` (reasoning-gym's generator index)."""
    rg = _require_reasoning_gym()
    dataset = rg.create_dataset(name, size=size, seed=seed)
    writer = RESPONSE_WRITERS.get(name, lambda entry: f"#### {entry['answer']}")
    templates = getattr(dataset, "task_indices", None) if name == "gsm_symbolic" else None
    records = []
    for index, entry in enumerate(dataset):
        record = {"prompt": entry["question"], "response": writer(entry), "answer": str(entry["answer"]),
                  "source": name, "entry": entry}
        if templates is not None:
            record["template"] = int(templates[index])
        records.append(record)
    return records, dataset


def disjoint_splits(sizes: dict[str, int], stream: Callable[[str], Iterable[dict[str, Any]]],
                    what: str, key: Callable[[dict[str, Any]], Any] = lambda r: r["prompt"],
                    order: Iterable[str] = SPLIT_ORDER) -> dict[str, list[dict[str, Any]]]:
    """Exactly sized splits with no ``key`` (prompt) in two splits or twice in one: each split takes the
    first unseen items of its own ``stream(split)``, held-out splits first (``order``). Splits of size 0
    are left out; a stream that runs dry raises :class:`~zoo.errors.ConfigError` naming the split."""
    order = [s for s in order if s in sizes] + [s for s in sizes if s not in order]
    taken: set = set()
    out: dict[str, list[dict[str, Any]]] = {}
    for split in order:
        size = sizes[split]
        if size <= 0:
            continue
        rows: list[dict[str, Any]] = []
        for record in stream(split):
            item = key(record)
            if item in taken:
                continue
            taken.add(item)
            rows.append(record)
            if len(rows) == size:
                break
        if len(rows) < size:
            raise ConfigError(f"{what}: only {len(rows)} distinct {split} items (not in an earlier split) "
                              f"could be drawn for the {size} asked; ask for fewer "
                              f"(data.init_args.num_{split})")
        out[split] = rows
    return out


def _stream(name: str, split: str, size: int, seed: int, keep: Callable[[Record], bool]) -> Iterator[Record]:
    """Split ``split``'s records of task ``name``: reasoning-gym items ``seed + STREAM_BASE[split] + i``,
    ``i = 0, 1, ...`` (the first chunk is exactly the old ``size``-item dataset), at most a bounded number
    of draws, so a task with few distinct problems ends instead of looping."""
    base, drawn, chunk = seed + STREAM_BASE[split], 0, size
    limit = min(STREAM_BLOCK, 50 * size + 2000)
    while drawn < limit:
        chunk = min(chunk, limit - drawn)
        records, _ = generate_records(name, chunk, base + drawn)
        yield from (r for r in records if keep(r))
        drawn += chunk
        chunk = min(max(2 * chunk, 64), 4096)


def template_assignment(seed: int = 0) -> dict[int, str]:
    """``gsm_symbolic`` template index -> the split that owns it (seeded shuffle: the first 20 % test, the
    next 10 % val, the rest train)."""
    from reasoning_gym.arithmetic.gsm_symbolic import gsm_symbolic

    templates = sorted(gsm_symbolic.tasks_ok)
    random.Random(f"zoo-gsm-templates-{seed}").shuffle(templates)
    n_test = round(TEMPLATE_SHARE["test"] * len(templates))
    n_val = round(TEMPLATE_SHARE["val"] * len(templates))
    return {t: ("test" if i < n_test else "val" if i < n_test + n_val else "train")
            for i, t in enumerate(templates)}


def task_splits(name: str, sizes: dict[str, int], seed: int = 0,
                holdout: str = "item") -> dict[str, list[Record]]:
    """Train / val / test records of task ``name``, disjoint by construction and exactly sized (see the
    module docstring); ``holdout="template"``: ``gsm_symbolic`` with test / val templates never trained on."""
    _require_reasoning_gym()
    if holdout not in ("item", "template"):
        raise ConfigError(f"holdout {holdout!r} is not known; use item or template")
    owner: dict[int, str] = {}
    if holdout == "template":
        if name != "gsm_symbolic":
            raise ConfigError(f"holdout: template needs problem templates, which only gsm_symbolic has (got "
                              f"{name!r}); use holdout: item")
        owner = template_assignment(seed)

    def stream(split: str) -> Iterator[Record]:
        keep = (lambda r: owner.get(r["template"]) == split) if owner else (lambda r: True)
        return _stream(name, split, sizes[split], seed, keep)

    return disjoint_splits(sizes, stream, what=f"task {name!r}")


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
