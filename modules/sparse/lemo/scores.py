"""LeMo block scores and keep schedules: pure tensor functions (paper §4.2, Eq. 1-2, Algorithm 1).

Token blocks of b tokens are scored from pre-softmax Q.K (positive part, summed over heads / N_head, max
inside each ``b x b`` tile, column sums), corrected for the causal bias, and the top
``floor(k_l * n_b)`` blocks of layer l are kept. The blockwise scores themselves come from
:mod:`zoo.kernels.lemo_scores` (never the full T x T matrix). Spec: papers/01-lemo.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.errors import ConfigError
from zoo.kernels.lemo_scores import block_scores
from zoo.modules.sparse.lemo.options import CausalFix, Schedule

#: Artifact ``best_meta.py``, Llama2-7B attention: eliminated fraction by relative depth (layer / 31).
PROFILED_ELIMINATION_LLAMA2 = ((0 / 31, 0.01), (7 / 31, 0.21), (14 / 31, 0.39), (18 / 31, 0.50),
                               (19 / 31, 0.575), (30 / 31, 0.575), (31 / 31, 0.51))



def layer_keep_fractions(num_layers: int, schedule: Schedule = "artifact_e2e", keep_ratio: float = 0.4,
                         start_layer: int | None = None, dense_last: bool = True,
                         keep_fractions: list[float] | None = None) -> list[float]:
    """Kept block fraction k_l per layer (1.0 = dense)."""
    if keep_fractions is not None:
        if len(keep_fractions) != num_layers:
            raise ConfigError(f"keep_fractions has {len(keep_fractions)} entries, the backbone has "
                              f"{num_layers} layers")
        return [float(f) for f in keep_fractions]
    if schedule == "artifact_e2e":
        start = round(num_layers * 15 / 32) if start_layer is None else start_layer
        out = [1.0 if layer < start else keep_ratio for layer in range(num_layers)]
        if dense_last and num_layers >= 4:
            out[-1] = 1.0
        return out
    if schedule == "profiled":
        xs, ys = zip(*PROFILED_ELIMINATION_LLAMA2)
        out = []
        for layer in range(num_layers):
            depth = layer / max(1, num_layers - 1)
            hi = next(i for i, x in enumerate(xs) if x >= depth - 1e-12)
            lo = max(0, hi - 1)
            t = 0.0 if xs[hi] == xs[lo] else (depth - xs[lo]) / (xs[hi] - xs[lo])
            out.append(1.0 - (ys[lo] + t * (ys[hi] - ys[lo])))
        return [1.0 if start_layer is not None and layer < start_layer else f for layer, f in enumerate(out)]
    if schedule == "constant":
        start = 0 if start_layer is None else start_layer
        return [1.0 if layer < start else keep_ratio for layer in range(num_layers)]
    raise ConfigError(f"unknown schedule {schedule!r}; use artifact_e2e, profiled, constant or "
                      "keep_fractions")


def kept_block_count(keep_fraction: float, num_blocks: int) -> int:
    """floor(k_l * n_b), at least one block."""
    return max(1, min(num_blocks, math.floor(keep_fraction * num_blocks + 1e-9)))


def apply_causal_fix(matrix: Tensor, causal_fix: CausalFix = "symmetrize") -> Tensor:
    """Correct a causal (lower-triangular) block matrix (B, nb, nb) for the early-block bias."""
    if causal_fix == "symmetrize":
        return matrix + torch.triu(matrix.transpose(-1, -2), diagonal=1)
    if causal_fix == "none":
        return matrix
    if causal_fix == "count_norm":
        nb = matrix.shape[-1]
        rows_per_column = torch.arange(nb, 0, -1, device=matrix.device, dtype=matrix.dtype)  # n_b - n
        return matrix / rows_per_column  # column sums become means over the causal query blocks
    raise ConfigError(f"unknown causal_fix {causal_fix!r}; use symmetrize, none or count_norm")


def column_scores(matrix: Tensor) -> Tensor:
    """Token-block scores B^T_n = sum_m B^S_mn: (B, nb, nb) -> (B, nb)."""
    return matrix.sum(dim=-2)


def oracle_block_scores(q: Tensor, k: Tensor, block: int, causal: bool = True,
                        causal_fix: CausalFix = "symmetrize", impl: str = "auto") -> Tensor:
    """Block matrix of Eq. 2 (B, nb, nb) from q (B, Hq, T, D), k (B, Hk, T, D), causal fix applied."""
    matrix = block_scores(q, k, block, causal=causal, impl=impl)
    return apply_causal_fix(matrix, causal_fix) if causal else matrix


def select_blocks(scores: Tensor, count: int, valid_blocks: Tensor | None = None) -> Tensor:
    """Sorted ids of the ``count`` best blocks per row: scores (B, nb) -> (B, count); invalid blocks last."""
    if valid_blocks is not None:
        scores = scores.masked_fill(~valid_blocks, float("-inf"))
    top = scores.topk(count, dim=-1).indices
    return top.sort(dim=-1).values


def topk_recall(predicted: Tensor, target: Tensor, count: int) -> float:
    """|top-k(predicted) ∩ top-k(target)| / k, averaged over rows: (B, nb), (B, nb)."""
    pred = F.one_hot(predicted.topk(count, -1).indices, predicted.shape[-1]).sum(-2)
    true = F.one_hot(target.topk(count, -1).indices, target.shape[-1]).sum(-2)
    return float((pred * true).sum(-1).float().mean() / count)
