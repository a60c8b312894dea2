"""Paired comparisons of bench rows against a reference row (``zoo bench --reference NAME``), over items.

Pure functions on numpy arrays; :func:`compare_rows` reads the per-item files
(:mod:`zoo.harness.bench.items`) of a row's records and of the reference's and returns, per metric, the
paired difference (row - reference) with a 95 % percentile-bootstrap interval and, for 0/1 scores, an exact
sign test (McNemar's exact test for one seed).

Pairing: items by ``id`` (only items both sides scored); seeds by value. A reference with one record
(``base``, seed ``None``, or one seed) is paired with every seed of the row; otherwise the seeds both sides
ran (when none match, the i-th smallest seed of each side). The bootstrap resamples seeds, then items (the
same item draw for every drawn seed), so with several seeds the interval holds seed and item noise.
"""

from __future__ import annotations

from math import comb
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["bootstrap_ci", "compare_rows", "paired_difference", "sign_test", "weighted_mean_difference"]


def weighted_mean_difference(diff: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Point estimate of the paired difference.

    ``diff``: (S, N) float, item ``i``'s summed difference under seed pairing ``s`` (for a 0/1 score: the
    difference of the scores; for NLL: the difference of the summed NLL); ``weights``: (N,) item sizes
    (response tokens for NLL), ``None`` = 1 each. Returns ``diff.sum() / (S * weights.sum())``: the
    difference of token-mean NLL over the same items, or of the mean score.
    """
    diff = np.asarray(diff, dtype=np.float64)
    w = np.ones(diff.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64)
    return float(diff.sum() / (diff.shape[0] * w.sum()))


def bootstrap_ci(diff: np.ndarray, weights: np.ndarray | None = None, resamples: int = 2000,
                 confidence: float = 0.95, rng: np.random.Generator | int | None = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of :func:`weighted_mean_difference`, resampling seeds then items.

    ``diff``: (S, N); ``weights``: (N,) or ``None``. Draw order (reproducible with the same generator): all
    seed draws ``rng.integers(0, S, (resamples, S))``, then all item draws ``rng.integers(0, N, (resamples,
    N))``; statistic ``b`` = ``diff[seeds_b][:, items_b].sum() / (S * weights[items_b].sum())``. Returns
    (low, high): ``np.percentile`` of the statistics at ``(1 -+ confidence) / 2``.
    """
    diff = np.asarray(diff, dtype=np.float64)
    if diff.ndim != 2 or diff.shape[1] == 0:
        raise ValueError(f"diff must be (seeds, items) with at least one item, got shape {diff.shape}")
    seeds, items = diff.shape
    w = np.ones(items) if weights is None else np.asarray(weights, dtype=np.float64)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    seed_draws = rng.integers(0, seeds, (resamples, seeds))
    item_draws = rng.integers(0, items, (resamples, items))
    per_seed = diff[seed_draws].sum(axis=1)  # (B, N): the drawn seeds' rows summed
    numerator = np.take_along_axis(per_seed, item_draws, axis=1).sum(axis=1)
    stats = numerator / (seeds * w[item_draws].sum(axis=1))
    alpha = (1.0 - confidence) / 2.0
    low, high = np.percentile(stats, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def sign_test(wins: int, losses: int) -> float:
    """Exact two-sided sign test p-value: ``wins`` items where the row beats the reference, ``losses`` where
    it loses (ties left out). For 0/1 scores on one seed this is McNemar's exact test on the discordant
    cells (b = wins, c = losses): ``min(1, 2 * P(Binomial(b + c, 1/2) <= min(b, c)))``; 1.0 when b + c = 0."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2.0 * tail)


def paired_difference(diff: np.ndarray, weights: np.ndarray | None = None, binary: bool = False,
                      resamples: int = 2000, rng: np.random.Generator | int | None = 0) -> dict[str, Any]:
    """Difference, 95 % bootstrap interval, ``n`` items / seeds, ``inconclusive`` and, for ``binary`` scores,
    the sign test on each item's seed-mean difference (``p``; McNemar exact for one seed). ``diff``: (S, N);
    ``weights``: (N,) or ``None``.

    ``inconclusive``: the interval holds 0, or (``binary``) ``p >= 0.05`` or the items' wins and losses point
    the other way than the difference (possible with several seeds). With few discordant items the percentile
    interval is too narrow: 4 wins and no losses in 64 items give [+0.016, +0.125] while the exact test gives
    p = 0.125, so a direction is reported only when both exclude no difference, the same way."""
    diff = np.asarray(diff, dtype=np.float64)
    low, high = bootstrap_ci(diff, weights, resamples=resamples, rng=rng)
    out = {"diff": weighted_mean_difference(diff, weights), "low": low, "high": high,
           "items": int(diff.shape[1]), "seeds": int(diff.shape[0]), "inconclusive": bool(low <= 0.0 <= high)}
    if binary:
        item_mean = diff.mean(axis=0)
        wins, losses = int((item_mean > 0).sum()), int((item_mean < 0).sum())
        out["p"] = sign_test(wins, losses)
        same_way = np.sign(wins - losses) == np.sign(out["diff"])  # several seeds can split them
        out["inconclusive"] = out["inconclusive"] or out["p"] >= 0.05 or not same_way
    return out


# ---------------------------------------------------------------------------------------- bench records
def _seed_pairs(row: list[dict[str, Any]], reference: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    if len(reference) == 1:
        return [(r, reference[0]) for r in row]
    by_seed = {r.get("seed"): r for r in reference}
    pairs = [(r, by_seed[r.get("seed")]) for r in row if r.get("seed") in by_seed]
    if pairs:
        return pairs
    key = lambda r: (r.get("seed") is None, r.get("seed") or 0)  # noqa: E731
    return list(zip(sorted(row, key=key), sorted(reference, key=key)))


def _items(out: Path, record: dict[str, Any]) -> dict[int, dict[str, Any]]:
    from zoo.harness.bench.items import read_items

    name = record.get("items")
    return {line["id"]: line for line in read_items(out / name)} if name else {}


def same_item(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two items records are the same test item: equal ids (the caller's keys) and, where both
    carry one, the same prompt hash (so rows of two data modules pair only on the prompts they share)."""
    return a.get("prompt_sha") is None or b.get("prompt_sha") is None or a["prompt_sha"] == b["prompt_sha"]


def compare_rows(out: Path, row: list[dict[str, Any]], reference: list[dict[str, Any]], metric: str | None,
                 resamples: int = 2000) -> dict[str, dict[str, Any]]:
    """Paired differences of a row's records to the reference's records (lists of ``results.jsonl``
    records), from their items files under ``out``: ``{metric: paired_difference(...), "nll": ...}``; a
    metric is left out when no item carries it on both sides."""
    pairs = [(_items(out, a), _items(out, b)) for a, b in _seed_pairs(row, reference)]
    pairs = [(a, b) for a, b in pairs if a and b]
    if not pairs:
        return {}
    result: dict[str, dict[str, Any]] = {}
    pairs = [({i: a[i] for i in a if i in b and same_item(a[i], b[i])}, b) for a, b in pairs]
    if metric:
        common = sorted(set.intersection(*[
            {i for i in a if metric in a[i].get("scores", {}) and metric in b.get(i, {}).get("scores", {})}
            for a, b in pairs]))
        if common:
            diff = np.array([[float(a[i]["scores"][metric]) - float(b[i]["scores"][metric]) for i in common]
                            for a, b in pairs])
            binary = all(float(a[i]["scores"][metric]) in (0.0, 1.0) and float(b[i]["scores"][metric]) in
                         (0.0, 1.0) for a, b in pairs for i in common)
            result[metric] = paired_difference(diff, binary=binary, resamples=resamples)
    common = sorted(set.intersection(*[
        {i for i in a if "nll_sum" in a[i] and "nll_sum" in b.get(i, {}) and a[i]["tokens"] == b[i]["tokens"]}
        for a, b in pairs]))
    common = [i for i in common if pairs[0][0][i]["tokens"] > 0]
    if common:
        diff = np.array([[a[i]["nll_sum"] - b[i]["nll_sum"] for i in common] for a, b in pairs])
        weights = np.array([pairs[0][0][i]["tokens"] for i in common], dtype=np.float64)
        result["nll"] = paired_difference(diff, weights, resamples=resamples)
    return result


def _groups(records: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    import json

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for record in records:
        key = (record["method"], record.get("backbone"), json.dumps(record.get("budget"), sort_keys=True))
        groups.setdefault(key, []).append(record)
    return groups


def default_reference(records: list[dict[str, Any]]) -> str | None:
    """``sft`` when a row has that name, else ``base``, else ``None``."""
    methods = {r["method"] for r in records}
    return next((name for name in ("sft", "base") if name in methods), None)


def _reference_group(groups: dict[tuple, list[dict[str, Any]]], key: tuple, reference: str):
    """The reference's records for a row: same backbone, the same generation budget (limit and
    max_new_tokens; training steps may differ, ``base`` has none), preferably the same data set (another
    data module's rows pair only on the items whose prompts match: :func:`same_item`)."""
    import json

    _, backbone, budget = key
    budget = json.loads(budget) or {}
    want = (budget.get("limit"), budget.get("max_new_tokens"))
    dataset = groups[key][0].get("dataset")
    candidates = []
    for (method, other_backbone, other_budget), group in groups.items():
        other = json.loads(other_budget) or {}
        if (method == reference and other_backbone == backbone
                and (other.get("limit"), other.get("max_new_tokens")) == want):
            candidates.append(((group[0].get("dataset") != dataset,
                                other_budget != json.dumps(budget, sort_keys=True)), group))
    return min(candidates, key=lambda c: c[0])[1] if candidates else None


def row_interval(out: Path, group: list[dict[str, Any]], metric: str,
                 resamples: int = 2000) -> tuple[float, float, int, int] | None:
    """(low, high, items, seeds): 95 % bootstrap interval of a row's own mean ``metric`` (``nll``: token
    mean) from its items, seeds then items; without items files, mean +- 1.96 * std / sqrt(seeds) over
    two or more seeds (items = 0); ``None`` when there is nothing to estimate it from (one seed, no items)."""
    tables = [_items(out, r) for r in group]
    tables = [t for t in tables if t]
    if tables:
        if metric == "nll":
            common = sorted(set.intersection(*[{i for i in t if t[i].get("tokens")} for t in tables]))
            if common:
                values = np.array([[t[i]["nll_sum"] for i in common] for t in tables])
                weights = np.array([tables[0][i]["tokens"] for i in common], dtype=np.float64)
                low, high = bootstrap_ci(values, weights, resamples=resamples)
                return low, high, len(common), len(tables)
        else:
            common = sorted(set.intersection(*[{i for i in t if metric in t[i].get("scores", {})}
                                               for t in tables]))
            if common:
                values = np.array([[float(t[i]["scores"][metric]) for i in common] for t in tables])
                low, high = bootstrap_ci(values, resamples=resamples)
                return low, high, len(common), len(tables)
    values = [r.get("metrics", {}).get(metric) for r in group]
    values = [float(v) for v in values if isinstance(v, (int, float))]
    if len(values) < 2:
        return None
    mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
    half = 1.96 * std / np.sqrt(len(values))
    return mean - half, mean + half, 0, len(values)


def attach_comparisons(rows: list[dict[str, Any]], records: list[dict[str, Any]], out: Path,
                       reference: str | None) -> str | None:
    """Add ``row["compare"]`` (:func:`compare_rows` to the reference; absent on the reference itself and
    where nothing pairs) and ``row["ci"]`` (``{metric: row_interval}`` for the main metric and nll) to the
    report's rows (:func:`zoo.harness.bench.report.summarize`, same grouping). Returns the reference used."""
    import json

    groups = _groups(records)
    reference = reference or default_reference(records)
    for row in rows:
        key = (row["method"], row["backbone"], json.dumps(row.get("budget"), sort_keys=True))
        if key not in groups:
            continue
        group = groups[key]
        row["commits"] = sorted({str(r.get("git_commit")) for r in group})
        metric = row.get("main_metric")
        row["ci"] = {m: row_interval(out, group, m) for m in (metric, "nll") if m}
        if reference and row["method"] != reference:
            ref_group = _reference_group(groups, key, reference)
            if ref_group:
                row["compare"] = compare_rows(out, group, ref_group, metric)
    return reference


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}"


def comparison_header(metric: str | None, reference: str) -> list[str]:
    return [f"Δ {metric} vs {reference} [95% CI]" if metric else f"Δ vs {reference}",
            f"p (sign test) vs {reference}", f"Δ nll vs {reference} [95% CI]"]


def comparison_cells(row: dict[str, Any], metric: str | None) -> list[str]:
    """Table cells for :func:`comparison_header`: ``+d [low, high] (n=items×seeds)``, *inconclusive* when the
    interval contains 0, ``-`` where nothing pairs."""
    compare = row.get("compare") or {}
    cells = []
    for key, digits in ((metric, 3), ("p", 3), ("nll", 4)):
        if key == "p":
            p = (compare.get(metric) or {}).get("p")
            cells.append("-" if p is None else f"{p:.3g}")
            continue
        entry = compare.get(key) if key else None
        if not entry:
            cells.append("-")
            continue
        text = (f"{_signed(entry['diff'], digits)} [{_signed(entry['low'], digits)}, "
                f"{_signed(entry['high'], digits)}] (n={entry['items']}×{entry['seeds']})")
        cells.append(text + (" *inconclusive*" if entry["inconclusive"] else ""))
    return cells
