"""Bootstrap confidence intervals over items and the paired comparison of two systems on the same items."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """``(mean, low, high)``: the item mean and its percentile bootstrap interval (resampling items)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, data.size, size=(resamples, data.size))].mean(axis=1)
    alpha = (1.0 - level) / 2
    return float(data.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign-test p-value of ``wins`` vs ``losses`` (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_delta(tuned: Sequence[float], base: Sequence[float], resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> dict[str, float]:
    """Per-item ``tuned - base`` on the same items: mean with a paired bootstrap CI, wins / losses / ties
    and the sign-test p-value."""
    a, b = np.asarray(tuned, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_delta needs the same items: {a.shape} vs {b.shape}")
    diff = a - b
    mean, low, high = bootstrap_ci(diff, resamples, level, seed)
    wins, losses = int((diff > 1e-12).sum()), int((diff < -1e-12).sum())
    return {"delta": mean, "low": low, "high": high, "wins": wins, "losses": losses,
            "ties": int(diff.size - wins - losses), "sign_p": sign_test(wins, losses), "n": int(diff.size)}
