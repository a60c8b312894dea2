"""The checklist suite (spec 19): contamination check (planted overlap found, none in the built-in splits),
refusal rules, axis completeness, per-axis report with paired deltas, and the analyze tool on tiny-llama."""

from __future__ import annotations

import json

import pytest

from zoo.errors import ConfigError
from zoo.harness import checklist as cl


def test_contamination_finds_a_planted_long_and_a_planted_short_item():
    evals = {
        "rag": [
            "Context: Germany, officially the Federal Republic of Germany, is a country whose ISO codes "
            "are DE and DEU and whose numeric code is 276.",
            "An unrelated question about the weather in spring and the colour of the evening sky today.",
            "What is 2 + 2?",
        ]
    }
    train = {
        "clean": ["Tell me a story about a dragon.", "What is 3 + 3?"],
        # item 0 pasted inside a longer training text (case and punctuation changed), item 2 verbatim
        "planted": [
            "intro text. context germany officially the federal republic of germany is a country "
            "whose iso codes are de and deu -- and more",
            "what is 2+2 ?".replace("+", " + "),
        ],
    }
    rows = {(r["train"], r["eval"]): r for r in cl.contamination(train, evals, n=13)}
    assert rows[("clean", "rag")]["flagged_items"] == []
    assert rows[("planted", "rag")]["flagged_items"] == [0, 2]
    assert rows[("planted", "rag")]["rate"] == pytest.approx(2 / 3)


def test_a_shared_instruction_is_format_not_contamination_but_a_leaked_problem_still_is():
    instruction = ("Complete the following Python function. Reply with the complete function in one "
                   "code block.")
    problems = [f"def task_{i}(x): return the sum of the first {i} primes after x, skipping every "
                f"multiple of {i + 2} along the way" for i in range(4)]
    evals = {"code": [f"{instruction} {p}" for p in problems]}
    train = {"other": [f"{instruction} def unrelated(y): return y"],  # same instruction, new problem
             "leaked": [f"{instruction} def unrelated(y): return y", problems[2]]}
    rows = {r["train"]: r for r in cl.contamination(train, evals, n=13)}
    assert rows["other"]["flagged_items"] == []  # 4 of 4 before the format was discounted
    assert rows["leaked"]["flagged_items"] == [2]


def test_a_short_problem_inside_a_format_is_flagged_only_when_it_is_the_same_problem():
    """chain_sum as code: a long shared instruction around a short question. A training question that only
    starts like a test one is not a leak (a 13-gram straddling the format said it was); the same question
    is."""
    wrap = ("Complete the following Python function and reply with the function in one block of code. "
            "def solve(): Return the final answer to this problem: {q}").format
    questions = ["What is 5 + 3 - 2 + 7?", "What is 9 - 4 + 1?", "What is 2 + 2 + 8?", "What is 6 - 1 - 1?"]
    evals = {"code": [wrap(q=q) for q in questions]}
    train = {"prefix": [wrap(q="What is 5 + 3 - 2 + 7 - 6 + 1?")], "same": [wrap(q="What is 9 - 4 + 1?")]}
    rows = {r["train"]: r for r in cl.contamination(train, evals, n=13)}
    assert rows["prefix"]["flagged_items"] == []
    assert rows["same"]["flagged_items"] == [1]


def test_no_contamination_between_built_in_train_splits_and_the_suite():
    from zoo.datamodules import SFTDataModule
    from zoo.harness.rag.corpus import build_country_corpus

    items = {task.name: task.items(16) for task in cl.default_suite() if task.name != "generation"}
    corpus = build_country_corpus()
    train = {
        "chain_sum": cl.train_texts(
            SFTDataModule(dataset="chain_sum", tokenizer="tiny-llama", num_train=300, num_val=4, num_test=64)
        ),
        "rag_pool": [t for q in corpus.pool for t in (q.question, q.answer)],
    }
    rows = cl.contamination(train, cl.eval_texts(items), n=13)
    assert len(rows) == 2 * len(items)
    assert [r for r in rows if r["flagged"]] == []
    # the check is live on the same data: the chain_sum held-out prompts planted in train are all found
    planted = {"chain_sum+test": train["chain_sum"] + [i.prompt for i in items["heldout_chain_sum"]]}
    found = cl.contamination(planted, {"heldout_chain_sum": cl.eval_texts(items)["heldout_chain_sum"]})
    assert found[0]["flagged"] == len(items["heldout_chain_sum"])


def test_refusal_rules():
    assert cl.is_refusal("I'm sorry, but I can't help with that.")
    assert cl.is_refusal("I cannot assist with this request.")
    assert not cl.is_refusal("Run `kill -9 <pid>` to stop the process.")


def test_a_suite_without_a_mandatory_axis_is_refused_unless_marked_na():
    suite = [t for t in cl.default_suite() if t.axis is not cl.EvalAxis.SAFETY]
    with pytest.raises(ConfigError, match="safety"):
        cl.check_axes(suite, cl.NOT_APPLICABLE)
    cl.check_axes(suite, {**cl.NOT_APPLICABLE, cl.EvalAxis.SAFETY: "measured elsewhere"})


def test_summary_axis_means_and_paired_deltas_by_hand():
    task_a = cl.ChecklistTask("a", cl.EvalAxis.UTILITY, lambda n: [], lambda m, i: {}, ("m",))
    task_b = cl.ChecklistTask("b", cl.EvalAxis.UTILITY, lambda n: [], lambda m, i: {}, ("m",))
    result = {
        "suite": [task_a, task_b],
        "not_applicable": {cl.EvalAxis.DOMAIN: "none"},
        "scores": {
            "base": {"a": {"m": [0, 0, 1]}, "b": {"m": [1.0]}},
            "tuned": {"a": {"m": [1, 1, 1]}, "b": {"m": [1.0]}},
        },
    }
    rows = cl.summarize(result, base="base")
    axis = next(r for r in rows if r["model"] == "tuned" and r["task"] == "(axis)")
    assert axis["mean"] == 1.0 and axis["n"] == 4
    assert axis["delta_delta"] == pytest.approx(0.5) and axis["delta_wins"] == 2
    base_axis = next(r for r in rows if r["model"] == "base" and r["task"] == "(axis)")
    assert base_axis["mean"] == pytest.approx(0.5) and "delta_delta" not in base_axis
    assert any(r["task"] == "n/a" and r["axis"] == "domain" for r in rows)


def test_analyze_checklist_on_the_tiny_backbone(tmp_path):
    from zoo.harness.analyze import main

    assert (
        main(
            [
                "checklist",
                "--models",
                "tiny-llama",
                "tiny-llama",
                "--limit",
                "1",
                "--train-config",
                "configs/sft.yaml",
                "--num-train",
                "20",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    record = json.loads((tmp_path / "checklist.json").read_text())
    axes = {r["axis"] for r in record["rows"] if r["task"] == "(axis)"}
    assert {"utility", "faithfulness", "safety", "retention", "robustness", "multilingual"} <= axes
    assert any(r["task"] == "generation" and r["metric"] == "seconds_per_prompt" for r in record["rows"])
    # the same model twice: every paired quality delta is zero
    deltas = [
        r.get("delta_delta", 0) for r in record["rows"] if r["model"] != "base" and r["axis"] != "efficiency"
    ]
    assert deltas and all(d == 0 for d in deltas)  # timings (efficiency) differ run to run
    assert record["contamination"] and all(r["train"] == "configs/sft.yaml" for r in record["contamination"])
    assert (tmp_path / "checklist.png").exists()
    # per-item values are recorded (paired re-analysis of any two models); each row's mean is theirs
    for r in record["rows"]:
        if r["task"] not in ("(axis)", "n/a", "no delta") and r["mean"] is not None:
            values = record["scores"][r["model"]][r["task"]][r["metric"]]
            assert len(values) == r["n"] and r["mean"] == pytest.approx(sum(values) / len(values))


def test_no_delta_against_a_base_with_another_tokenizer_or_template():
    class Tok:
        def __init__(self, size, template):
            self.size, self.chat_template = size, template

        def __len__(self):
            return self.size

    class Model:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

    same, other = cl.pairing_key(Model(Tok(10, "a"))), cl.pairing_key(Model(Tok(10, "b")))
    assert same == cl.pairing_key(Model(Tok(10, "a"))) and same != other
    task = cl.ChecklistTask("a", cl.EvalAxis.UTILITY, lambda n: [], lambda m, i: {}, ("m",))
    result = {
        "suite": [task],
        "not_applicable": {},
        "pairing": {"base": same, "tuned": other},
        "scores": {"base": {"a": {"m": [0.0, 1.0]}}, "tuned": {"a": {"m": [1.0, 1.0]}}},
    }
    rows = cl.summarize(result, base="base")
    assert not any("delta_delta" in r for r in rows)
    assert any(r["model"] == "tuned" and r["task"] == "no delta" for r in rows)
    result["pairing"]["tuned"] = same
    assert any(r.get("delta_delta") == 0.5 for r in cl.summarize(result, base="base"))
