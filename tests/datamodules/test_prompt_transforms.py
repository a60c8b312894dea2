"""Conjugate-prompt transforms (spec 17): hand-derived outputs, and map_answer inverts each transform's own
outputs on its domain."""

from __future__ import annotations

import json

import pytest

from zoo.datamodules.transforms import (
    ICLvsIFData,
    IdentityTransform,
    LabelScaleTransform,
    LeetspeakTransform,
    PigLatinTransform,
    WordTranslationTransform,
    make_transform,
)
from zoo.errors import ConfigError

WORDS = ["hello world", "WHAT", "Capitalize every character", "the quick brown fox jumps", "Output: RIVER",
         "Input: garden\nOutput:", "What is 12 plus 7?", "#### 42", "rhythm and blues"]
# leetspeak's domain: lower- or upper-case words with a letter outside a/e/i/o/s/t, numbers on their own
LEET_WORDS = ["hello world", "WHAT", "the quick brown fox jumps", "output: RIVER", "what comes after 12?",
              "#### 42", "rhythm and blues"]


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "fr.json"
    path.write_text(json.dumps({"hello": "bonjour", "world": "monde", "what": "quoi", "is": "est",
                                "the": "le"}))
    return path


def test_hand_derived_outputs(table):
    assert LeetspeakTransform().apply("Hello, Test site") == "H3ll0, 7357 5173"
    assert PigLatinTransform().apply("hello apple, string x!") == "ello-hay apple-ay, ing-stray -xay!"
    assert WordTranslationTransform(table).apply("Hello world, WHAT is it") == "Bonjour monde, QUOI est it"
    scale = LabelScaleTransform(2.0)
    assert scale.apply("x = 1, y = 2\nx = 3, y = 4.5\nx = 5, y =") == "x = 1, y = 4\nx = 3, y = 9\nx = 5, y ="
    assert scale.map_answer(" 6.5 and 7") == " 3.25 and 7"
    assert IdentityTransform().apply("Hello") == "Hello"


@pytest.mark.parametrize("name", ["identity", "leetspeak", "piglatin", "translate", "label-scale"])
def test_map_answer_inverts_the_transforms_own_outputs(name, table):
    transform = make_transform(f"translate:{table}" if name == "translate" else name)
    answers = {"label-scale": ["12", "-3.5", "0.1", "2500"], "leetspeak": LEET_WORDS}.get(name, WORDS)
    for answer in answers:
        assert transform.map_answer(transform.apply_answer(answer)) == answer


def test_leetspeak_keeps_numbers_and_upper_case_answers():
    leet = LeetspeakTransform()
    assert leet.apply_answer("WHAT") == "WH47"
    assert leet.map_answer("WH47 15 17") == "WHAT 15 17"  # plain numbers are answers, not leetspeak
    assert leet.map_answer("#### 12") == "#### 12"


def test_piglatin_roundtrip_of_a_whole_icl_prompt():
    pig = PigLatinTransform()
    record = ICLvsIFData(num_test=4, seed=10).records[0]
    assert pig.map_answer(pig.apply(record["prompt"])) == record["prompt"]


def test_translation_table_must_be_one_to_one(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_text("cat\tgato\ndog\tgato\n")
    with pytest.raises(ConfigError, match="one-to-one"):
        WordTranslationTransform(path)
    with pytest.raises(ConfigError, match="unknown prompt transform"):
        make_transform("rot13")


def test_icl_vs_if_records_and_prefix_scoring():
    data = ICLvsIFData(num_test=8, seed=10)
    assert data.records == ICLvsIFData(num_test=8, seed=10).records  # seeded
    configs = {(r["task"], r["final"]) for r in data.records}
    assert configs == {("capitalize", "arithmetic"), ("capitalize", "blank"), ("repeat", "arithmetic"),
                       ("repeat", "blank")}
    first = data.records[0]  # capitalize x arithmetic: the ICL answer is the first word upper-cased
    assert first["answer"] == "WHAT" and first["prompt"].startswith("Capitalize every character.\nInput: ")
    assert first["prompt"].endswith("?\nOutput:")
    blank = data.records[1]
    assert set(blank["answer"]) == {"_"}
    metrics = data.evaluation_metrics([first, blank], [" WHAT is it", "\\_\\_" + "x"])
    assert metrics == {"icl_match": 0.5}


def test_label_scale_recovers_continuous_tasks_under_a_discrete_heavy_prior():
    """Spec 17 check 1 (no training): the Bayes predictor of a 'fine-tuned' discrete-heavy prior does worse
    on continuous tasks than the pretraining mixture; the label-scale conjugate prompt (gamma = 3, through the
    prompt text and map_answer) brings its error back toward the ridge error."""
    import torch

    from zoo.datamodules.transforms import bayes_prediction, parse_regression_prompt, regression_prompt

    gen = torch.Generator().manual_seed(0)
    d, k, noise, trials = 4, 3, 0.5, 200
    tasks = torch.randn(16, d, generator=gen, dtype=torch.float64)  # the discrete family
    scale = LabelScaleTransform(3.0)
    errors = {"mixture": 0.0, "finetuned": 0.0, "conjugate": 0.0, "ridge": 0.0}
    for _ in range(trials):
        w = torch.randn(d, generator=gen, dtype=torch.float64)  # a continuous task
        xs = torch.randn(k, d, generator=gen, dtype=torch.float64)
        query = torch.randn(d, generator=gen, dtype=torch.float64)
        ys = xs @ w + noise * torch.randn(k, generator=gen, dtype=torch.float64)
        prompt = regression_prompt(xs, ys, query)
        target = float(w @ query)
        X, y, q = parse_regression_prompt(prompt)
        errors["mixture"] += (bayes_prediction(X, y, q, tasks, 0.5, noise) - target) ** 2
        errors["ridge"] += (bayes_prediction(X, y, q, tasks, 0.0, noise) - target) ** 2
        errors["finetuned"] += (bayes_prediction(X, y, q, tasks, 0.999, noise) - target) ** 2
        Xc, yc, qc = parse_regression_prompt(scale.apply(prompt))
        assert torch.allclose(yc, 3 * y, rtol=1e-5)
        answer = scale.map_answer(f"{bayes_prediction(Xc, yc, qc, tasks, 0.999, noise):.6g}")
        errors["conjugate"] += (float(answer) - target) ** 2
    mse = {key: value / trials for key, value in errors.items()}
    assert mse["finetuned"] > 1.2 * mse["mixture"]  # discrete-only fine-tuning hurts continuous tasks
    assert mse["conjugate"] < mse["finetuned"]  # the conjugate prompt recovers part of it ...
    assert abs(mse["conjugate"] - mse["ridge"]) < 0.5 * (mse["finetuned"] - mse["ridge"])  # ... toward ridge
