"""The code task: HumanEval records, the synthetic training set, code extraction, pass@k, sandboxed scoring."""

from __future__ import annotations

import math

from zoo import sandbox
from zoo.datamodules.code import (
    CodeDataModule,
    build_program,
    extract_code,
    humaneval_problems,
    pass_at_k,
    synthetic_code_tasks,
)
from zoo.sandbox import run_many


def test_humaneval_is_read_from_the_bundled_file():
    problems = humaneval_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    assert problems[0]["entry_point"] == "has_close_elements" and "def check(candidate)" in problems[0]["test"]


def test_canonical_solutions_pass_and_wrong_ones_fail():
    problems = humaneval_problems(3)
    good = [build_program(p, p["response"]) for p in problems]
    bad = build_program(problems[0], "```python\ndef has_close_elements(numbers, threshold):\n    return True\n```")
    loop = build_program(problems[1], "    while True:\n        pass\n")  # body-only continuation
    results = run_many(good + [bad, loop], workers=2, timeout=3)
    assert [r.passed for r in results] == [True, True, True, False, False]
    assert results[-1].status == "timeout"  # an infinite loop counts as a failure


def test_synthetic_tasks_are_deterministic_distinct_and_correct():
    tasks = synthetic_code_tasks(12, seed=0)
    assert tasks == synthetic_code_tasks(12, seed=0)
    assert len({t["entry_point"] for t in tasks}) == 12
    results = run_many([build_program(t, t["response"]) for t in tasks], workers=2, timeout=5)
    assert all(r.passed for r in results), [r.stderr for r in results if not r.passed]
    wrong = [build_program(t, t["response"].replace("return ", "return None and ")) for t in tasks[:3]]
    assert not any(r.passed for r in run_many(wrong, workers=2, timeout=5))


def test_extract_code_fenced_body_only_and_imports():
    record = {"entry_point": "f", "code_prompt": "from typing import List\n\ndef f(x: List[int]):\n    \"\"\"doc\"\"\"\n"}
    fenced = "Sure!\n```python\ndef helper():\n    pass\n```\n```python\ndef f(x):\n    return x\n```\nDone."
    assert extract_code(fenced, record) == "from typing import List\ndef f(x):\n    return x\n"
    assert extract_code("    return x\n", record) == record["code_prompt"] + "    return x\n"
    assert extract_code("```python\ndef f(x):\n    return 1", record).endswith("return 1")  # unterminated fence


def test_pass_at_k_estimator():
    assert math.isclose(pass_at_k(5, 2, 1), 0.4)
    assert math.isclose(pass_at_k(5, 2, 2), 1 - math.comb(3, 2) / math.comb(5, 2))
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0


def test_datamodule_splits_labels_and_metrics():
    data = CodeDataModule(tokenizer="tiny-llama", num_train=8, num_val=4, num_test=2, max_length=1024,
                          batch_size=2, timeout=5)
    data.setup("fit")
    train_names = {r["entry_point"] for r in data.records["train"]}
    assert not train_names & {r["entry_point"] for r in data.records["val"]}
    assert [r["task_id"] for r in data.records["test"]] == ["HumanEval/0", "HumanEval/1"]
    batch = next(iter(data.train_dataloader()))
    first_label = (batch["labels"][0] != -100).nonzero()[0].item()
    assert first_label > 20  # the instruction (prompt) tokens are not supervised
    records = data.eval_records("test")
    metrics = data.evaluation_metrics(records, [records[0]["response"], "no code here"])
    assert metrics == {"pass@1": 0.5}
    multi = data.evaluation_metrics(records, [[records[0]["response"], "x"], ["y", "z"]])
    assert math.isclose(multi["pass@1"], 0.25) and math.isclose(multi["pass@2"], 0.5)


def test_wrong_bodies_that_exit_early_score_zero():
    """Exit code 0 is not a pass: the program must get through the problem's ``check``."""
    problem = humaneval_problems(1)[0]
    wrong = "def has_close_elements(numbers, threshold):\n    return True\n"
    completions = [f"```python\n{wrong}import sys\nsys.exit(0)\n```",
                   f"```python\n{wrong}if __name__ == '__main__':\n    import os\n    os._exit(0)\n```",
                   "    return True\nexit()\n",  # body-only continuation
                   f"```python\n{wrong}def check(candidate):\n    pass\n```"]
    data = CodeDataModule(tokenizer="tiny-llama", num_train=2, num_val=1, num_test=1, timeout=5)
    assert data.evaluation_metrics([problem] * 4, completions) == {"pass@1": 0.0}
    assert data.evaluation_metrics([problem], [problem["response"]]) == {"pass@1": 1.0}


def test_each_program_runs_once_per_evaluation(monkeypatch):
    """The harness (zoo.harness.bench.evaluate) calls evaluation_metrics, then score_completion per record
    for completions.jsonl: the second pass reuses the first's results, and duplicates run once."""
    launched = []
    real = sandbox.run_program
    monkeypatch.setattr(sandbox, "run_program", lambda program, **kw: launched.append(program) or real(program, **kw))
    records = humaneval_problems(2)
    completions = [records[0]["response"], "    return None\n"]
    data = CodeDataModule(tokenizer="tiny-llama", num_train=2, num_val=1, num_test=2, timeout=5)
    metrics = data.evaluation_metrics(records, completions)
    scores = [data.score_completion(r, c)["pass@1"] for r, c in zip(records, completions)]
    assert metrics == {"pass@1": 0.5} and scores == [1.0, 0.0]
    assert len(launched) == 2
    data.evaluation_metrics(records[:1] * 3, [records[0]["response"]] * 3)  # three identical samples
    assert len(launched) == 3


def test_a_built_in_task_serves_as_code_problems_with_disjoint_splits_that_pass_their_own_tests():
    from zoo.datamodules.code import CodeDataModule, build_program
    from zoo.sandbox import run_many

    data = CodeDataModule(dataset="chain_sum", tokenizer="tiny-llama", num_train=6, num_val=2, num_test=3)
    records = data.load_records()
    assert {k: len(v) for k, v in records.items()} == {"train": 6, "val": 2, "test": 3}
    prompts = {split: {r["prompt"] for r in rows} for split, rows in records.items()}
    assert not prompts["train"] & prompts["test"] and not prompts["val"] & prompts["test"]
    reference = [build_program(r, r["response"]) for r in records["test"]]
    wrong = [build_program(r, r["response"].replace("return", "return 'x' +")) for r in records["test"]]
    results = run_many(reference + wrong, workers=2, timeout=10)
    assert [r.passed for r in results] == [True] * 3 + [False] * 3
