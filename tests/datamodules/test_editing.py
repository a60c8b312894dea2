"""Editing data (spec 14): the pycountry facts, edit requests, the known-facts filter (stub model), the
normalised exact match, fluency, the metrics, and the DataModule's rows."""

from __future__ import annotations

import json
import math

import pytest

from zoo.datamodules.editing import (
    EditingDataModule,
    builtin_facts,
    edit_metrics,
    exact_match,
    keep_known_facts,
    make_edits,
    ngram_entropy,
    normalize_answer,
)


class StubModel:
    """Answers from a fixed table (prompt -> reply); unknown prompts get 'I do not know'."""

    def __init__(self, replies: dict[str, str]) -> None:
        self.replies, self.calls = replies, []

    def generate_text(self, prompts, max_new_tokens=16, **kwargs):
        self.calls.append(list(prompts))
        return [self.replies.get(p, "I do not know") for p in prompts]


def test_builtin_facts_come_from_pycountry_relations():
    facts = builtin_facts(per_relation=10_000)
    by_subject = {(f["relation"], f["subject"]): f["answer"] for f in facts}
    assert by_subject[("currency", "Japan")] == "Yen"
    assert by_subject[("currency", "United States")] == "US Dollar"
    assert by_subject[("subdivision", "Texas")] == "United States"
    assert by_subject[("language", "fr")] == "French"
    assert all(len(f["rephrase"]) == 2 and f["subject"] in f["prompt"] for f in facts)


def test_filter_keeps_only_the_facts_the_model_answers_correctly():
    facts = builtin_facts(relations=["currency"], per_relation=10_000)
    japan = next(f for f in facts if f["subject"] == "Japan")
    usa = next(f for f in facts if f["subject"] == "United States")
    india = next(f for f in facts if f["subject"] == "India")
    stub = StubModel({japan["prompt"]: "The currency of Japan is the yen.",
                      usa["prompt"]: "The US dollar.",
                      india["prompt"]: "The rupee, I think."})  # "Indian Rupee" is not mentioned in full
    kept = keep_known_facts([japan, usa, india], stub)
    assert [f["subject"] for f in kept] == ["Japan", "United States"]
    assert stub.calls == [[japan["prompt"], usa["prompt"], india["prompt"]]]


def test_edits_get_another_answer_of_their_relation_and_unedited_locality_prompts():
    facts = builtin_facts(per_relation=20)
    edits = make_edits(facts, num_edits=12, num_locality=3, seed=1)
    edited_prompts = {e["prompt"] for e in edits}
    answers = {f["relation"]: set() for f in facts}
    for f in facts:
        answers[f["relation"]].add(f["answer"])
    for edit in edits:
        assert edit["target_new"] != edit["ground_truth"]
        assert edit["target_new"] in answers[edit["relation"]]
        local = {item["prompt"] for item in edit["locality"]}
        assert len(edit["locality"]) == 3 and not local & edited_prompts
    assert make_edits(facts, num_edits=12, num_locality=3, seed=1) == edits


def test_exact_match_normalises_and_cuts_at_the_first_period_or_newline():
    assert normalize_answer("  The Paris. ") == "paris"
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("Yen\nand more", "yen") == 1.0
    assert exact_match("Yen is the currency.", "Yen") == 0.0


def test_ngram_entropy_matches_a_hand_computed_value():
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))  # bigrams ab, ba, ab
    h3 = 1.0  # trigrams aba, bab
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("x x x x x x") == 0.0  # a repetitive generation has no fluency


def test_edit_metrics_against_hand_counts():
    records = [{"prompt": "p1", "target_new": "Yen", "rephrase": ["r1", "r2"],
                "locality": [{"prompt": "l1", "answer": "a"}, {"prompt": "l2", "answer": "b"}]},
               {"prompt": "p2", "target_new": "Lek", "rephrase": ["r3"], "locality": []}]
    stub = StubModel({"p1": "Yen.", "p2": "Euro", "r1": "yen", "r2": "no", "r3": "The Lek",
                      "l1": "a", "l2": "c"})
    metrics = edit_metrics(stub, records, locality_before=["a", "b"], fluency_tokens=8)
    assert metrics["efficacy"] == 0.5 and metrics["generalization"] == pytest.approx(2 / 3)
    assert metrics["locality"] == 0.5
    assert metrics["fluency"] == pytest.approx((ngram_entropy("Yen.") + ngram_entropy("Euro")) / 2)


def test_datamodule_rows_supervise_the_new_target_and_eos(tmp_path):
    path = tmp_path / "edits.jsonl"
    edits = [{"prompt": f"Where is thing {i}?", "target_new": f"Place {i}",
              "rephrase": [f"Thing {i} is where?"],
              "locality": [{"prompt": "What is 2+2?", "answer": "4"}]} for i in range(3)]
    path.write_text("".join(json.dumps(e) + "\n" for e in edits))
    data = EditingDataModule(dataset=str(path), tokenizer="tiny-llama", num_train=3, num_val=3, num_test=3,
                             max_length=128, batch_size=3)
    data.setup("fit")
    assert [r["target_new"] for r in data.edit_records] == ["Place 0", "Place 1", "Place 2"]
    row = data.encoded["train"][0]
    supervised = [t for t in row["labels"] if t != -100]
    eos = data.tokenizer.eos_token_id
    assert supervised[-1] == eos and data.tokenizer.decode(supervised[:-1]) == "Place 0"
    assert data.eval_records("test")[0]["prompt"] == "Where is thing 0?"
