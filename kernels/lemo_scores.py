"""LeMo block scores: the per-block max of the head-summed positive pre-softmax scores (paper Eq. 2).

For queries ``q`` (B, Hq, T, D) and keys ``k`` (B, Hk, T, D) (grouped-query attention: ``Hq % Hk == 0``,
query head ``h`` reads key head ``h // (Hq // Hk)``), token blocks of ``block`` consecutive positions
and ``nb = ceil(T / block)`` blocks, the block matrix is

    S[b, m, n] = max_{i in block m, j in block n}  (1 / Hq) * sum_h relu(scale * q[b, h, i] . k[b, h, j])

with entries outside the sequence (the tail of a partial last block) and, when ``causal``, entries with
``j > i`` counted as 0 (a neutral value for a max over non-negative numbers). Shape (B, nb, nb), float32.

Neither implementation materialises the T x T score matrix: the PyTorch reference walks over query
blocks (``block x T`` scores at a time), the Triton kernel computes one ``block x block`` tile per program
and keeps only its max. :func:`block_scores` is the dispatcher (Triton on CUDA, the reference elsewhere).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

try:  # triton is a Linux-only dependency; the reference works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

Impl = Literal["auto", "triton", "torch"]


def block_scores_reference(q: Tensor, k: Tensor, block: int, causal: bool = True,
                           scale: float | None = None) -> Tensor:
    """PyTorch reference. q (B, Hq, T, D), k (B, Hk, T, D) -> (B, nb, nb) float32."""
    bsz, hq, length, dim = q.shape
    rep = hq // k.shape[1]
    scale = dim ** -0.5 if scale is None else scale
    keys = k.float().repeat_interleave(rep, dim=1) if rep > 1 else k.float()
    nb = -(-length // block)
    padded = nb * block
    out = q.new_zeros((bsz, nb, nb), dtype=torch.float32)
    key_pos = torch.arange(padded, device=q.device)
    for m in range(nb):
        rows = slice(m * block, min((m + 1) * block, length))
        tile = torch.einsum("bhid,bhjd->bhij", q[:, :, rows].float(), keys) * scale  # (B, Hq, <=b, T)
        tile = tile.clamp_min(0).sum(1) / hq  # (B, <=b, T)
        if causal:
            query_pos = torch.arange(rows.start, rows.stop, device=q.device)
            tile = tile.masked_fill(key_pos[None, :length] > query_pos[:, None], 0.0)
        full = tile.new_zeros((bsz, block, padded))
        full[:, : tile.shape[1], :length] = tile
        out[:, m] = full.view(bsz, block, nb, block).amax(dim=(1, 3))
    return out


if triton is not None:

    @triton.jit
    def _block_scores_kernel(q_ptr, k_ptr, out_ptr, T, HQ, REP, NB, scale,
                             sqb, sqh, sqt, sqd, skb, skh, skt, skd, sob, som, son,
                             CAUSAL: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                             BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        n = tl.program_id(1)
        b = pid // NB
        m = pid % NB
        rows = m * BLOCK + tl.arange(0, BLOCK)
        cols = n * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < T
        col_ok = cols < T
        dim_ok = dims < D
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        if (not CAUSAL) or (n <= m):  # tiles strictly above the diagonal are all zero under the causal mask
            for h in range(0, HQ):
                q = tl.load(q_ptr + b * sqb + h * sqh + rows[:, None] * sqt + dims[None, :] * sqd,
                            mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
                kh = h // REP
                k = tl.load(k_ptr + b * skb + kh * skh + cols[:, None] * skt + dims[None, :] * skd,
                            mask=col_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                acc += tl.maximum(s, 0.0)
        acc = acc / HQ
        valid = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None])
        acc = tl.where(valid, acc, 0.0)
        best = tl.max(tl.max(acc, axis=1), axis=0)
        tl.store(out_ptr + b * sob + m * som + n * son, best)


def block_scores_triton(q: Tensor, k: Tensor, block: int, causal: bool = True,
                        scale: float | None = None) -> Tensor:
    """Triton kernel, same contract as :func:`block_scores_reference`. ``block`` must be a power of 2."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    if block & (block - 1):
        raise ValueError(f"the Triton block-score kernel needs a power-of-two block size, got {block}")
    bsz, hq, length, dim = q.shape
    nb = -(-length // block)
    scale = dim ** -0.5 if scale is None else scale
    out = torch.empty((bsz, nb, nb), dtype=torch.float32, device=q.device)
    grid = (bsz * nb, nb)
    _block_scores_kernel[grid](
        q, k, out, length, hq, hq // k.shape[1], nb, float(scale),
        *q.stride(), *k.stride(), *out.stride(),
        CAUSAL=causal, BLOCK=block, D=dim, BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )
    return out


def block_scores(q: Tensor, k: Tensor, block: int, causal: bool = True, scale: float | None = None,
                 impl: Impl = "auto") -> Tensor:
    """Dispatcher: the Triton kernel on CUDA (power-of-two blocks), the PyTorch reference elsewhere."""
    use_triton = impl == "triton" or (impl == "auto" and q.is_cuda and triton is not None
                                      and not block & (block - 1))
    if use_triton:
        return block_scores_triton(q, k, block, causal, scale)
    return block_scores_reference(q, k, block, causal, scale)
