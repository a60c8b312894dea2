"""Paired comparisons (zoo.harness.bench.stats) against hand-worked values, and per-item NLL records."""

from __future__ import annotations

import math

import numpy as np
import pytest

from zoo.harness.bench.stats import (
    bootstrap_ci,
    compare_rows,
    paired_difference,
    sign_test,
    weighted_mean_difference,
)


def test_mcnemar_exact_on_a_hand_worked_2x2_table():
    # reference x row table: both right 3, ref right/row wrong c=5, ref wrong/row right b=1, both wrong 2.
    # Discordant n=6: P(X<=1) = (C(6,0)+C(6,1))/64 = 7/64; two-sided 14/64.
    assert sign_test(1, 5) == pytest.approx(14 / 64)
    assert sign_test(5, 1) == pytest.approx(14 / 64)
    assert sign_test(0, 0) == 1.0
    assert sign_test(3, 3) == 1.0  # 2 * P(X<=3 | n=6) = 2 * 42/64 > 1
    assert sign_test(0, 10) == pytest.approx(2 / 1024)
    from scipy.stats import binomtest

    assert sign_test(4, 13) == pytest.approx(binomtest(4, 17, 0.5).pvalue)


def test_paired_difference_on_binary_scores_uses_the_discordant_items():
    row = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1, 1])
    ref = np.array([1, 0, 1, 1, 1, 1, 1, 1, 0, 1])
    result = paired_difference((row - ref)[None, :], binary=True)
    assert result["diff"] == pytest.approx(-0.2)  # 6/10 - 8/10
    # b (ref wrong, row right): items 1, 8; c (ref right, row wrong): items 3, 4, 5, 7
    assert result["p"] == pytest.approx(sign_test(2, 4))
    assert result["items"] == 10 and result["seeds"] == 1
    assert result["low"] <= -0.2 <= result["high"] and result["inconclusive"]


def test_few_discordant_items_stay_inconclusive_until_the_exact_test_agrees():
    """4 wins, 0 losses in 64: the percentile interval excludes 0 but p = 0.125 (inconclusive); 6 and 0:
    p = 0.031 and the interval excludes 0 (a direction). NLL-like (non-binary) rows follow the interval."""
    four, six = np.zeros((1, 64)), np.zeros((1, 64))
    four[0, :4], six[0, :6] = 1.0, 1.0
    assert bootstrap_ci(four)[0] > 0.0
    assert paired_difference(four, binary=True)["inconclusive"]
    assert paired_difference(four, binary=True)["p"] == pytest.approx(0.125)
    assert not paired_difference(four)["inconclusive"]  # the interval alone
    assert not paired_difference(six, binary=True)["inconclusive"]


def test_wins_and_losses_against_the_difference_stay_inconclusive():
    """3 seeds, 400 items: 100 won on every seed (item mean +1), 150 lost on one seed each (item mean -1/3).
    The difference is (300 - 150) / 1200 = +0.125 with an interval clear of 0, while 150 items lean to the
    reference against 100 to the row (sign test p = 0.002): they point opposite ways, so no direction."""
    diff = np.zeros((3, 400))
    diff[:, :100] = 1.0  # won on every seed: item mean +1
    for k in range(150):  # lost on one seed only: item mean -1/3
        diff[k % 3, 100 + k] = -1.0
    result = paired_difference(diff, binary=True)
    assert result["diff"] == pytest.approx(0.125)
    assert result["low"] > 0.0 and result["p"] < 0.05  # each alone would call a direction
    assert result["inconclusive"]


def test_bootstrap_matches_numpy_percentile_of_the_same_resamples():
    diff = np.array([[0.5, -1.0, 2.0, 0.0, 1.5]])
    low, high = bootstrap_ci(diff, resamples=500, rng=np.random.default_rng(7))
    rng = np.random.default_rng(7)
    rng.integers(0, 1, (500, 1))  # the seed draws come first (one seed: all zeros)
    draws = rng.integers(0, 5, (500, 5))
    means = [diff[0, d].mean() for d in draws]
    assert (low, high) == pytest.approx(tuple(np.percentile(means, [2.5, 97.5])))


def test_bootstrap_over_seeds_then_items_and_token_weights():
    diff = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, -2.0]])
    weights = np.array([1.0, 2.0, 4.0])
    assert weighted_mean_difference(diff, weights) == pytest.approx(8.0 / (2 * 7.0))
    low, high = bootstrap_ci(diff, weights, resamples=300, rng=np.random.default_rng(3))
    rng = np.random.default_rng(3)
    seeds, items = rng.integers(0, 2, (300, 2)), rng.integers(0, 3, (300, 3))
    stats = []
    for s, i in zip(seeds, items):
        total = sum(diff[a, b] for a in s for b in i)
        stats.append(total / (2 * weights[i].sum()))
    assert (low, high) == pytest.approx(tuple(np.percentile(stats, [2.5, 97.5])))


def test_constant_difference_has_a_degenerate_interval_not_marked_inconclusive():
    result = paired_difference(np.full((1, 4), 0.25))
    assert result["low"] == result["high"] == pytest.approx(0.25) and not result["inconclusive"]
    with pytest.raises(ValueError):
        bootstrap_ci(np.zeros((1, 0)))


def test_compare_rows_pairs_items_and_seeds(tmp_path):
    from zoo.harness.bench.items import write_items

    def record(name, seed, scores, nll):
        path = tmp_path / "items" / f"{name}.jsonl.gz"
        records = [{"prompt": f"p{i}"} for i in range(len(nll))]
        write_items(path, records, ["x"] * len(scores), [{"exact_match": s} for s in scores],
                    {i: (v, 2) for i, v in enumerate(nll)})
        return {"method": name.split("-")[0], "seed": seed, "items": f"items/{path.name}"}

    base = [record("base", None, [0, 0, 1], [4.0, 4.0, 4.0, 4.0])]
    row = [record("sft-0", 0, [1, 0, 1], [2.0, 4.0, 2.0, 4.0]),
           record("sft-1", 1, [1, 1, 1], [3.0, 3.0, 3.0, 3.0])]
    result = compare_rows(tmp_path, row, base, "exact_match", resamples=200)
    em, nll = result["exact_match"], result["nll"]
    assert em["seeds"] == 2 and em["items"] == 3  # only the 3 generated items carry exact match
    assert em["diff"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert em["p"] == pytest.approx(sign_test(2, 0))  # items 0, 1 win on seed mean; item 2 ties
    assert nll["items"] == 4 and nll["diff"] == pytest.approx(((-4.0) + (-4.0)) / (2 * 8))
    assert math.isfinite(nll["low"]) and nll["low"] <= nll["diff"] <= nll["high"]


def test_rows_of_two_data_modules_pair_only_on_the_prompts_they_share(tmp_path):
    """LeTI's data and plain code SFT's data are two data modules with the same HumanEval prompts: they pair
    (the report used to need the same ``dataset`` name); items whose prompts differ never pair."""
    from zoo.harness.bench.items import write_items
    from zoo.harness.bench.report import summarize
    from zoo.harness.bench.stats import attach_comparisons

    def record(method, dataset, prompts, scores):
        path = tmp_path / "items" / f"{method}.jsonl.gz"
        write_items(path, [{"prompt": p} for p in prompts], ["x"] * len(prompts),
                    [{"pass@1": s} for s in scores], {})
        return {"method": method, "seed": 0, "backbone": "b", "budget": {"limit": 3}, "dataset": dataset,
                "main_metric": "pass@1", "metrics": {"pass@1": sum(scores) / 3},
                "items": f"items/{path.name}"}

    records = [record("sft", "humaneval", ["a", "b", "c"], [0, 0, 0]),
               record("leti", "synthetic_code", ["a", "b", "X"], [1, 1, 1])]
    rows = summarize(records)
    attach_comparisons(rows, records, tmp_path, "sft")
    compared = next(r for r in rows if r["method"] == "leti")["compare"]["pass@1"]
    assert compared["items"] == 2 and compared["diff"] == pytest.approx(1.0)  # item 2's prompts differ


def test_per_item_nll_sums_to_the_split_nll(tiny_module, tiny_data):
    """Per-item sums from the one pass add up to generation.response_nll, and each item's sum equals HF's own
    loss on that row alone."""
    import torch

    from zoo.harness.bench.items import response_nll_items
    from zoo.harness.generation import response_nll

    module, data = tiny_module(), tiny_data(num_test=5, eval_batch_size=2, max_length=512)
    result = response_nll_items(module, data, "test")
    expected = response_nll(module, data, "test")
    assert result["tokens"] == expected["tokens"]
    assert result["nll"] == pytest.approx(expected["nll"], rel=1e-6)
    assert sorted(result["per_item"]) == list(range(5))  # keyed by the batch's index: every test item
    row = data.encoded["test"].rows[3]
    assert row["index"] == 3
    ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
    n = int((labels[:, 1:] != -100).sum())
    with torch.no_grad():
        hf = float(module.model(input_ids=ids, labels=labels).loss) * n
    assert result["per_item"][3] == (pytest.approx(hf, rel=1e-5), n)


def test_report_without_items_has_no_error_bar_source_and_names_mixed_commits(tmp_path):
    """Old records (no items files): no comparison columns, a seed interval only with >= 2 seeds, and a
    table mixing commits says so."""
    from zoo.harness.bench.report import markdown, summarize
    from zoo.harness.bench.stats import attach_comparisons

    def record(method, seed, em, commit):
        return {"method": method, "seed": seed, "backbone": "b", "budget": {"limit": 2}, "main_metric": "em",
                "metrics": {"em": em, "nll": 1.0}, "git_commit": commit}

    records = [record("sft", 0, 0.5, "aaa"), record("lora", 0, 0.25, "bbb+mixed"),
               record("lora", 1, 0.75, "bbb+mixed")]
    for item in records:
        item["backbone"] = "/machine/local/runs/pref_sft/export"
    rows = summarize(records)
    assert attach_comparisons(rows, records, tmp_path, None) == "sft"
    by_name = {r["method"]: r for r in rows}
    assert by_name["sft"]["ci"]["em"] is None  # one seed, no items: nothing to estimate an interval from
    low, high, items, seeds = by_name["lora"]["ci"]["em"]
    half = 1.96 * np.std([0.25, 0.75], ddof=1) / np.sqrt(2)
    assert (low, high, items, seeds) == (pytest.approx(0.5 - half), pytest.approx(0.5 + half), 0, 2)
    assert by_name["lora"]["compare"] == {}
    for row in rows:
        row["reference"] = "sft"
    table = markdown(rows)
    assert "vs sft" not in table and "Rows come from 2 commits (aaa, bbb+mixed)" in table
    assert "| …/pref_sft/export |" in table and "/machine/local" not in table  # a local export's own name


def test_the_commit_is_read_once_per_process(monkeypatch):
    """A bench imports its code when it starts; a commit made while it runs must not relabel its records."""
    import subprocess

    from zoo.harness.bench import records

    records.environment.cache_clear()
    first = records.environment()

    def no_more_git(*args, **kwargs):
        raise AssertionError("git was asked again")

    monkeypatch.setattr(subprocess, "run", no_more_git)
    assert records.environment()["git_commit"] == first["git_commit"]
    records.environment.cache_clear()


def test_code_from_another_checkout_marks_the_commit_mixed(monkeypatch, tmp_path):
    """An editable install maps zoo.modules to its own checkout; run from a second checkout, the commit read
    here would not describe the methods that ran."""
    from zoo.harness.bench import records

    assert records.foreign_code() == {}
    assert set(records.foreign_code(tmp_path)) == set(records.CODE_PACKAGES)
    monkeypatch.setattr(records, "foreign_code", lambda: {"zoo.modules": "/elsewhere/modules"})
    records.environment.cache_clear()
    try:
        assert records.environment()["git_commit"].endswith("+mixed")
    finally:
        records.environment.cache_clear()
