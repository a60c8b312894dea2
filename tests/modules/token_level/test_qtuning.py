"""Q-Tuning invariants (spec 02, "Small-scale check")."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.modules.base import target_mask
from zoo.modules.token_level.qtuning import (
    QTuningCallback,
    prune_tokens,
    quadrant_masks,
    token_scores,
    triage,
)


@pytest.mark.parametrize("ratio", [0.125, 0.25, 0.35, 0.5])
def test_ratio_invariant_on_64_injected_samples(ratio):
    generator = torch.Generator().manual_seed(0)
    ppl = torch.rand(64, generator=generator, dtype=torch.float64) * 20 + 1
    ent = torch.rand(64, generator=generator, dtype=torch.float64) * 5
    result = triage(ppl, ent, ratio)
    target = max(1, round(ratio * 64))
    kept = int(result.kept.sum())
    assert kept >= target
    if result.topped_up:
        assert kept == target
    assert abs(result.bisect_fraction - ratio) < 0.01 or result.iterations == 10
    # Independent recomputation of the bisection's last iterate with numpy-style quantiles.
    q2, q4 = quadrant_masks(ppl, ent, result.alpha, result.alpha)
    assert float((q2 | q4).double().mean()) == result.bisect_fraction
    assert not (result.q2 & result.q4).any()


def test_only_misconception_and_calibration_clusters_survive():
    generator = torch.Generator().manual_seed(1)

    def cluster(ppl, ent):
        return (torch.full((16,), ppl, dtype=torch.float64) + torch.rand(16, generator=generator) * 0.1,
                torch.full((16,), ent, dtype=torch.float64) + torch.rand(16, generator=generator) * 0.1)

    # A: high PPL/high Ent (noise), B: high/low (misconception), C: low/low (redundant), D: low/high
    # (calibration)
    clusters = [cluster(50.0, 4.0), cluster(50.0, 0.5), cluster(2.0, 0.5), cluster(2.0, 4.0)]
    ppl = torch.cat([c[0] for c in clusters])
    ent = torch.cat([c[1] for c in clusters])
    for ratio in (0.25, 0.5):
        result = triage(ppl, ent, ratio)
        survivors = result.kept.view(4, 16)
        assert not survivors[0].any() and not survivors[2].any()
        assert survivors[1].any() and survivors[3].any()
        assert (result.q2.view(4, 16)[1] == survivors[1]).all()  # B is Q2 (token-prunable)
        assert (result.q4.view(4, 16)[3] == survivors[3]).all()  # D is Q4 (kept whole)


def _hand_batch():
    """4 rows, width 10: prompt 3, varying response lengths, right padding; random nll."""
    lengths = [10, 8, 9, 6]
    attention = torch.zeros(4, 10, dtype=torch.long)
    response = torch.zeros(4, 10, dtype=torch.bool)
    for row, length in enumerate(lengths):
        attention[row, :length] = 1
        response[row, 3:length] = True
    nll = torch.rand(4, 10, generator=torch.Generator().manual_seed(2)) * 3 * response
    return nll, response, attention


def test_global_token_budget_cuts_the_top_scoring_q2_tokens_only():
    nll, response, attention = _hand_batch()
    q2 = torch.tensor([True, False, True, False])
    q4 = torch.tensor([False, True, False, False])
    kept = q2 | q4
    scores = token_scores(nll, response, attention, 0.5)
    for sample_ratio, token_ratio in ((0.75, 0.7), (0.75, 0.9), (0.5, 0.5)):
        weights = prune_tokens(scores, response, attention, q2, kept, sample_ratio, token_ratio)
        total = int(attention.sum())  # 33
        dropped = int(attention[~kept].sum())
        q2_tokens = response & q2[:, None]
        expected_cut = min(max(0, total - round(total * sample_ratio * token_ratio) - dropped),
                           int(q2_tokens.sum()))
        cut = q2_tokens & (weights == 0)
        assert int(cut.sum()) == expected_cut
        if 0 < expected_cut < int(q2_tokens.sum()):
            assert scores[cut].min() >= scores[q2_tokens & (weights == 1)].max()
        assert (weights[1] == response[1].float()).all()  # Q4 sample: every response token
        assert (weights[3] == 0).all()  # dropped sample
        assert (weights[~response] == 0).all()  # prompt and padding


def test_per_sample_budget_keeps_ceil_ratio_lowest_tokens_in_each_q2_sample():
    nll, response, attention = _hand_batch()
    q2 = torch.tensor([True, False, True, True])
    kept = q2 | torch.tensor([False, True, False, False])
    scores = token_scores(nll, response, attention, 0.5)
    weights = prune_tokens(scores, response, attention, q2, kept, 1.0, 0.6, budget="per_sample")
    for row in (0, 2, 3):
        n = int(response[row].sum())
        assert int(weights[row].sum()) == math.ceil(0.6 * n - 1e-9)
        kept_scores = scores[row][weights[row] == 1]
        cut_scores = scores[row][response[row] & (weights[row] == 0)]
        assert kept_scores.max() <= cut_scores.min()
    assert (weights[1] == response[1].float()).all()


def test_lambda_zero_ranks_by_raw_ppl():
    nll, response, attention = _hand_batch()
    scores = token_scores(nll, response, attention, 0.0)
    ppl = nll.double().exp()
    order = torch.argsort(ppl[response])
    assert torch.equal(torch.argsort(scores[response]), order)
    torch.testing.assert_close(scores[response], ppl[response])


def test_smoothing_on_a_spike_matches_the_formula_exactly():
    ppl = torch.tensor([[1.0, 2.0, 30.0, 2.0, 1.5, 1.0]], dtype=torch.float64)
    response = torch.tensor([[False, True, True, True, True, False]])
    attention = torch.tensor([[1, 1, 1, 1, 1, 0]])
    nll = torch.where(response, ppl.log(), torch.zeros_like(ppl))
    # Neighbours: prompt (pos 0) counts 1, padding (pos 5) counts 0.
    full = [1.0, 2.0, 30.0, 2.0, 1.5, 0.0]
    expected = [0.5 * full[i] + 0.5 * ((full[i - 1] if i else 0.0) + (full[i + 1] if i < 5 else 0.0))
                for i in range(6)]
    torch.testing.assert_close(token_scores(nll, response, attention, 0.5)[0], torch.tensor(expected,
                                                                                         dtype=torch.float64))
    halved = [0.5 * full[i] + 0.25 * ((full[i - 1] if i else 0.0) + (full[i + 1] if i < 5 else 0.0))
              for i in range(6)]
    torch.testing.assert_close(token_scores(nll, response, attention, 0.5, neighbor_mean=True)[0],
                               torch.tensor(halved, dtype=torch.float64))
    assert expected[2] == 0.5 * 30 + 0.5 * (2 + 2)


def test_token_ratio_one_and_keep_all_samples_equals_plain_sft(tiny_module, tiny_data):
    data = tiny_data(max_length=128)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))

    def loss_of(callback):
        module = tiny_module()
        outputs = module(batch)
        weights = target_mask(batch["labels"]).float()
        if callback is not None:
            weights = weights * callback.select(module, batch, outputs)
        return module.compute_loss(batch, outputs, weights)

    callback = QTuningCallback(sample_ratio=1.0, token_ratio=1.0)
    assert torch.equal(loss_of(callback), loss_of(None))
    assert int(callback.last_triage.kept.sum()) == batch["input_ids"].shape[0]


def test_callback_drops_noise_and_keeps_calibration_whole_on_the_model(tiny_module, tiny_data):
    data = tiny_data(max_length=128, batch_size=8, num_train=32)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    module = tiny_module()
    callback = QTuningCallback(sample_ratio=0.5, token_ratio=0.5)
    with torch.no_grad():
        weights = callback.select(module, batch, module(batch))
    response = target_mask(batch["labels"])
    result = callback.last_triage
    assert (weights[~result.kept] == 0).all()
    for row in result.q4.nonzero().flatten().tolist():
        assert torch.equal(weights[row], response[row].float())
    assert (weights[~response] == 0).all()


def test_separate_pass_trains_only_kept_samples_with_the_same_weights_and_loss(tiny_module, tiny_data):
    data = tiny_data(max_length=128, batch_size=8, num_train=32)
    data.setup("fit")
    original = next(iter(data.train_dataloader()))
    module = tiny_module()
    simple = QTuningCallback(sample_ratio=0.5, token_ratio=0.7)
    with torch.no_grad():
        outputs = module(original)
        simple_weights = simple.select(module, original, outputs)
        simple_loss = module.compute_loss(original, outputs, target_mask(original["labels"]) * simple_weights)
    # Rows with any kept token (a Q2 sample can lose every token to the global budget: then it goes too).
    kept = (simple_weights != 0).any(1)
    assert not (kept & ~simple.last_triage.kept).any()

    batch = dict(original)
    two_pass = QTuningCallback(sample_ratio=0.5, token_ratio=0.7, scoring="separate_pass")
    two_pass.on_train_batch_start(None, module, batch, 0)
    assert batch["input_ids"].shape[0] == int(kept.sum()) < original["input_ids"].shape[0]
    assert torch.equal(batch["labels"], original["labels"][kept])
    assert torch.equal(batch["index"], original["index"][kept])
    with torch.no_grad():
        outputs = module(batch)
        weights = two_pass.select(module, batch, outputs)
        loss = module.compute_loss(batch, outputs, target_mask(batch["labels"]) * weights)
    assert torch.equal(weights, simple_weights[kept])
    torch.testing.assert_close(loss, simple_loss, atol=1e-5, rtol=1e-5)


def test_separate_pass_runs_in_the_training_steps_precision(tiny_module, tiny_data, fit_tiny):
    """Under bf16-mixed the scoring pass, which runs before the step (outside Lightning's autocast), gets
    the step's autocast too (bf16 matmuls, as the training forward's) instead of running in fp32."""
    autocast = []

    class Recording(QTuningCallback):
        def score(self, module, batch, outputs):
            autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"))
            return super().score(module, batch, outputs)

    callback = Recording(sample_ratio=0.5, scoring="separate_pass")
    fit_tiny(tiny_module(), tiny_data(batch_size=8, num_train=16), callbacks=[callback], max_steps=1,
             precision="bf16-mixed")
    assert autocast and autocast[0] == torch.bfloat16


def test_small_batches_train_whole_with_one_warning_and_a_logged_flag(tiny_module, tiny_data, fit_tiny):
    import warnings

    import lightning as L

    sizes, active = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            sizes.append(batch["input_ids"].shape[0])
            active.append(float(trainer.callback_metrics["qtuning/active"]))

    callback = QTuningCallback(sample_ratio=0.5, min_batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = tiny_data(batch_size=4, num_train=11, max_length=256)  # 11 rows: batches of 4, 4, 3
        fit_tiny(tiny_module(), data, callbacks=[callback, Record()], max_steps=6, max_epochs=2)
    assert 4 in sizes and any(size < 4 for size in sizes)  # full and short batches both ran
    assert active == [float(size >= 4) for size in sizes]
    small = [w for w in caught if "min_batch_size" in str(w.message)]
    assert len(small) == 1  # once, not once per short batch
    message = str(small[0].message)
    assert "min_batch_size=4" in message and f"batch of {min(sizes)}" in message
