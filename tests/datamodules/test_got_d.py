"""GOT-D (spec 16) and the selection interface: OT gradients against finite differences, POT's Sinkhorn
against an exact solve, order invariance, the two-region behaviour, the embedding cache, two-stage loading."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from zoo.datamodules.embeddings import EmbeddingCache
from zoo.datamodules.got_d import GOTDSelector, calibrate, gotd_scores, sinkhorn_potentials, squared_distances
from zoo.datamodules.selection import (
    RandomSelector,
    SelectedSubsetDataModule,
    TargetOnlySelector,
    TwoStageSampler,
    normalize_lengths,
)
from zoo.errors import ConfigError


def entropic_value(a: np.ndarray, b: np.ndarray, cost: np.ndarray, eps: float) -> float:
    """<P, C> + eps * sum P log P at the optimum, from POT's plan (float64, converged tightly)."""
    plan = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=100000, stopThr=1e-14)
    return float((plan * cost).sum() + eps * (plan * np.log(plan)).sum())


def test_scores_equal_a_finite_difference_of_the_entropic_ot_value():
    rng = np.random.default_rng(0)
    target, pool = rng.normal(size=(5, 3)), rng.normal(size=(7, 3))
    eps = 0.5
    cost = ((target[:, None] - pool[None]) ** 2).sum(-1)
    a, b = np.full(5, 0.2), np.full(7, 1 / 7)
    scores = gotd_scores(target, pool, eps=eps, max_iter=100000, tol=1e-13)
    h = 1e-5
    for j in range(7):
        direction = np.full(7, -1 / 6)
        direction[j] = 1.0  # mass onto j, taken evenly from the others: the total stays 1
        up = entropic_value(a, b + h * direction, cost, eps)
        fd = (up - entropic_value(a, b - h * direction, cost, eps)) / (2 * h)
        assert scores[j] == pytest.approx(fd, rel=1e-4, abs=1e-6)


def test_pot_sinkhorn_approaches_the_exact_emd_at_small_eps():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    cost = torch.as_tensor(((x[:, None] - y[None]) ** 2).sum(-1))
    a = b = torch.full((6,), 1 / 6, dtype=torch.float64)
    exact = ot.emd2(a.numpy(), b.numpy(), cost.numpy())
    gaps = []
    for eps in (0.1, 0.01):
        f, g = sinkhorn_potentials(cost, eps=eps, max_iter=20000, tol=1e-10)
        plan = torch.exp((f[:, None] + g[None, :] - cost) / eps)
        assert torch.allclose(plan.sum(0), b, atol=1e-4) and torch.allclose(plan.sum(1), a, atol=1e-4)
        gaps.append(float((plan * cost).sum()) - exact)
    assert 0 <= gaps[1] < gaps[0] and gaps[1] < 2e-3  # the entropic plan costs more, less so as eps -> 0
    assert float(ot.sinkhorn2(a, b, cost, 0.01, method="sinkhorn_log", numItermax=20000)) \
        == pytest.approx(exact, abs=2e-3)


def test_squared_distances_in_chunks_match_cdist():
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randn(11, 5, dtype=torch.float64)
    assert torch.allclose(squared_distances(x, y, chunk=3), torch.cdist(x, y) ** 2, atol=1e-10)


def test_calibration_is_shift_invariant_and_matches_the_repo_ranking():
    g = torch.tensor([0.3, -1.0, 2.0, 0.0])
    assert torch.allclose(calibrate(g + 7.0), calibrate(g))
    repo = g - (g.sum() - g) / g.numel()  # the official code's N denominator: same order
    assert torch.equal(torch.argsort(calibrate(g)), torch.argsort(repo))


def fake_encoder(texts):
    """Deterministic 2-d 'embedding': the text's two numbers, unit-normalised."""
    vectors = np.array([[float(v) for v in t.split()[:2]] for t in texts])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def two_region_pool(seed: int = 0):
    rng = np.random.default_rng(seed)
    r1 = rng.normal([1.0, 0.0], 0.05, size=(900, 2))
    r2 = rng.normal([0.0, 1.0], 0.05, size=(100, 2))
    pool = [f"{x:.6f} {y:.6f} r1 {i}" for i, (x, y) in enumerate(r1)]
    pool += [f"{x:.6f} {y:.6f} r2 {i}" for i, (x, y) in enumerate(r2)]
    t1, t2 = rng.normal([1.0, 0.0], 0.05, size=(25, 2)), rng.normal([0.0, 1.0], 0.05, size=(25, 2))
    target = [f"{x:.6f} {y:.6f}" for x, y in np.concatenate([t1, t2])]
    return pool, target


def gotd_fake(**kwargs) -> GOTDSelector:
    selector = GOTDSelector(**kwargs)
    selector._embedder = EmbeddingCache(fake_encoder, None)
    return selector


def test_selection_is_invariant_to_pool_order():
    pool, target = two_region_pool()
    first = gotd_fake(eps=0.05).choose(pool, target, 100)
    shuffled = list(np.random.default_rng(3).permutation(pool))
    second = gotd_fake(eps=0.05).choose(shuffled, target, 100)
    assert len(first) == len(set(first)) == 100
    assert set(first) == set(second)
    random_first = RandomSelector(seed=4).choose(pool, target, 50)
    assert set(random_first) == set(RandomSelector(seed=4).choose(shuffled, target, 50))


def test_gotd_fills_the_under_represented_target_region_unlike_nearest_neighbours():
    pool, target = two_region_pool()
    chosen = gotd_fake(eps=0.05).choose(pool, target, 100)
    share_gotd = sum(" r2 " in t for t in chosen) / 100
    emb, centre = fake_encoder(pool), fake_encoder(target).mean(0)
    knn = np.argsort(((emb - centre) ** 2).sum(1))[:100]
    share_knn = sum(" r2 " in pool[i] for i in knn) / 100
    assert share_gotd > share_knn + 0.2, (share_gotd, share_knn)


def test_baselines_random_and_target_only_at_the_budget():
    pool, target = two_region_pool()
    picked = RandomSelector(seed=0).choose(pool, target, 30)
    assert len(set(picked)) == 30 and set(picked) <= set(pool)
    assert RandomSelector(seed=0).choose(pool, target, 30) == picked
    assert TargetOnlySelector().choose(pool, target[:4], 10) == (target[:4] * 3)[:10]
    with pytest.raises(ConfigError):
        RandomSelector().choose(pool, target, len(pool) + 1)


def test_embedding_cache_encodes_each_text_once_and_reloads_from_disk(tmp_path):
    calls = []

    def encoder(texts):
        calls.append(list(texts))
        return fake_encoder(texts)

    cache = EmbeddingCache(encoder, tmp_path, chunk=2)
    first = cache.embed(["1 2", "3 4", "5 6"])
    again = cache.embed(["5 6", "1 2", "7 8"])
    assert sum(len(c) for c in calls) == 4  # "7 8" is the only new text
    np.testing.assert_allclose(again[:2], first[[2, 0]])
    reloaded = EmbeddingCache(lambda texts: pytest.fail("encoded again"), tmp_path)
    np.testing.assert_allclose(reloaded.embed(["3 4"]), fake_encoder(["3 4"]))


def test_normalize_lengths_joins_short_and_splits_long_texts_independently_of_order():
    texts = ["a" * 5, "b b b b b b b b b b b b", "c" * 3, "d" * 7]
    out = normalize_lengths(texts, 10)
    assert normalize_lengths(list(reversed(texts)), 10) == out
    assert all(len(t) <= 10 + 12 for t in out)
    assert sorted("".join(out).replace("\n", "").replace(" ", "")) == sorted("".join(texts).replace(" ", ""))


def test_two_stage_sampler_serves_stage_one_first_then_only_the_task():
    sampler = TwoStageSampler(list(range(10)), stage1=4, stage1_epochs=1, seed=0)
    first_epoch = list(iter(sampler))
    assert sorted(first_epoch[:4]) == [0, 1, 2, 3] and sorted(first_epoch[4:]) == list(range(4, 10))
    sampler.set_epoch(1)
    assert len(sampler) == 6 and sorted(iter(sampler)) == list(range(4, 10))


def test_selected_subset_datamodule_prepends_the_selection(tmp_path):
    data = SelectedSubsetDataModule(dataset="chain_sum", tokenizer="tiny-llama", num_train=12, num_val=2,
                                    num_test=2, max_length=160, batch_size=4, selector=RandomSelector(seed=1),
                                    budget=8, pool_size=48, target_size=4, text_chars=64)
    data.setup("fit")
    assert len(data.stage1_rows) == 8
    row = data.stage1_rows[0]
    assert row["labels"] == row["input_ids"] and row["input_ids"][-1] == data.tokenizer.eos_token_id
    batches = list(data.train_dataloader())
    stage1_ids = {r["index"] for r in data.stage1_rows}
    served = [int(i) for batch in batches for i in batch["index"]]
    assert set(served[:8]) == stage1_ids and not set(served[8:]) & stage1_ids
    assert len(served) == 8 + len(data.encoded["train"])


def test_a_used_selector_pickles_without_its_embeddings():
    import pickle

    pool, target = two_region_pool()
    selector = gotd_fake(eps=0.05)
    selector.choose(pool, target, 10)
    clone = pickle.loads(pickle.dumps(selector))  # Lightning saves the DataModule's hparams (the selector)
    assert clone.eps == 0.05 and clone._embedder is None and clone.scores is None


def test_two_stage_iterator_resumes_at_the_same_position():
    sampler = TwoStageSampler(list(range(10)), stage1=4, stage1_epochs=1, seed=3)
    first = iter(sampler)
    served = [next(first) for _ in range(5)]
    state = first.state_dict()
    resumed = iter(TwoStageSampler(list(range(10)), stage1=4, stage1_epochs=1, seed=3))
    resumed.load_state_dict(state)
    assert served + list(resumed) == list(iter(sampler))


def hashed_trigrams(texts):
    """A cheap bag-of-character-trigrams embedding (64 buckets), unit-normalised."""
    import zlib

    out = np.zeros((len(texts), 64))
    for row, text in enumerate(texts):
        for i in range(len(text) - 2):
            out[row, zlib.crc32(text[i:i + 3].encode()) % 64] += 1.0
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_gotd_stage_one_draws_on_the_target_task_more_than_random_does():
    def data(selector):
        module = SelectedSubsetDataModule(dataset="chain_sum", tokenizer="tiny-llama", num_train=16,
                                          num_val=2, num_test=2, max_length=256, batch_size=4,
                                          selector=selector, budget=12, pool_size=240, target_size=16,
                                          text_chars=0)
        module.setup("fit")
        return sum("arithmetic problem" in text for text in module.selected)

    gotd = GOTDSelector(eps=0.05)
    gotd._embedder = EmbeddingCache(hashed_trigrams, None)
    assert data(gotd) >= 8 > data(RandomSelector(seed=0))  # the pool holds 20 chain_sum texts of 240
