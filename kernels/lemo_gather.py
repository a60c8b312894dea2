"""LeMo selective gather and scatter-add of kept token rows (paper §4.4, "permutation-free selective load").

``gather_rows(x, index)``: ``x`` (B, T, H), ``index`` (B, K) sorted, distinct token ids per row ->
``x[b, index[b, i]]`` (B, K, H). ``scatter_add_rows(base, src, index)``: ``base`` (B, T, H) plus ``src``
(B, K, H) added at rows ``index`` -> (B, T, H); rows not in ``index`` are ``base`` unchanged (bitwise).

Kept tokens are read straight from their original rows by index (no permutation of the whole
sequence into kept + eliminated halves, no second copy of it) and the attention output is added back
row by row. Both ops are differentiable (each one's backward is the other); the Triton kernels process
a ``ROWS x COLS`` tile per program and need distinct indices within a row (no atomics). The dispatchers
pick Triton on CUDA and the PyTorch reference elsewhere.

Differs from the artifact: the artifact adds the attention output into the residual stream in place
and recovers the input as ``output - attention`` in backward; here the zoo wraps only the attention
sublayer, so the scatter-add lands in a zero tensor and the decoder layer adds the residual itself.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

Impl = Literal["auto", "triton", "torch"]
_ROWS, _COLS = 16, 64


def block_token_index(keep_blocks: Tensor, block: int) -> Tensor:
    """Token ids of kept blocks: (B, k) block ids -> (B, k * block) token ids (same order)."""
    offsets = torch.arange(block, device=keep_blocks.device)
    return (keep_blocks[..., None] * block + offsets).reshape(keep_blocks.shape[0], -1)


def gather_rows_reference(x: Tensor, index: Tensor) -> Tensor:
    """(B, T, H), (B, K) -> (B, K, H)."""
    return torch.gather(x, 1, index[..., None].expand(-1, -1, x.shape[-1]))


def scatter_add_rows_reference(base: Tensor, src: Tensor, index: Tensor) -> Tensor:
    """(B, T, H) + (B, K, H) at rows (B, K) -> (B, T, H), out of place."""
    return base.scatter_add(1, index[..., None].expand(-1, -1, base.shape[-1]), src.to(base.dtype))


if triton is not None:

    @triton.jit
    def _gather_kernel(x_ptr, idx_ptr, out_ptr, K, H, sxb, sxt, sxh, sib, sik, sob, sok, soh,
                       ROWS: tl.constexpr, COLS: tl.constexpr):
        b = tl.program_id(0)
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(2) * COLS + tl.arange(0, COLS)
        row_ok = rows < K
        mask = row_ok[:, None] & (cols[None, :] < H)
        src_rows = tl.load(idx_ptr + b * sib + rows * sik, mask=row_ok, other=0)
        values = tl.load(x_ptr + b * sxb + src_rows[:, None] * sxt + cols[None, :] * sxh, mask=mask,
                         other=0.0)
        tl.store(out_ptr + b * sob + rows[:, None] * sok + cols[None, :] * soh, values, mask=mask)

    @triton.jit
    def _scatter_add_kernel(out_ptr, src_ptr, idx_ptr, K, H, sob, sot, soh, ssb, ssk, ssh, sib, sik,
                            ROWS: tl.constexpr, COLS: tl.constexpr):
        b = tl.program_id(0)
        rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
        cols = tl.program_id(2) * COLS + tl.arange(0, COLS)
        row_ok = rows < K
        mask = row_ok[:, None] & (cols[None, :] < H)
        dst_rows = tl.load(idx_ptr + b * sib + rows * sik, mask=row_ok, other=0)
        dst = out_ptr + b * sob + dst_rows[:, None] * sot + cols[None, :] * soh
        values = tl.load(src_ptr + b * ssb + rows[:, None] * ssk + cols[None, :] * ssh, mask=mask, other=0.0)
        current = tl.load(dst, mask=mask, other=0.0)
        tl.store(dst, current + values.to(current.dtype), mask=mask)


def _grid(batch: int, rows: int, cols: int) -> tuple[int, int, int]:
    return (batch, -(-rows // _ROWS), -(-cols // _COLS))


def gather_rows_triton(x: Tensor, index: Tensor) -> Tensor:
    """Triton gather, same contract as :func:`gather_rows_reference` (forward only)."""
    bsz, kept = index.shape
    out = x.new_empty((bsz, kept, x.shape[-1]))
    _gather_kernel[_grid(bsz, kept, x.shape[-1])](x, index, out, kept, x.shape[-1],
                                                  *x.stride(), *index.stride(), *out.stride(),
                                                  ROWS=_ROWS, COLS=_COLS)
    return out


def scatter_add_rows_triton(base: Tensor, src: Tensor, index: Tensor) -> Tensor:
    """Triton scatter-add, same contract as :func:`scatter_add_rows_reference` (forward only)."""
    out = base.clone()
    bsz, kept = index.shape
    _scatter_add_kernel[_grid(bsz, kept, base.shape[-1])](out, src, index, kept, base.shape[-1],
                                                          *out.stride(), *src.stride(), *index.stride(),
                                                          ROWS=_ROWS, COLS=_COLS)
    return out


def _use_triton(x: Tensor, impl: Impl) -> bool:
    return impl == "triton" or (impl == "auto" and x.is_cuda and triton is not None)


def _gather(x: Tensor, index: Tensor, impl: Impl) -> Tensor:
    return gather_rows_triton(x, index) if _use_triton(x, impl) else gather_rows_reference(x, index)


def _scatter_add(base: Tensor, src: Tensor, index: Tensor, impl: Impl) -> Tensor:
    return scatter_add_rows_triton(base, src, index) if _use_triton(base, impl) else \
        scatter_add_rows_reference(base, src, index)


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, impl: Impl) -> Tensor:
        ctx.save_for_backward(index)
        ctx.shape, ctx.impl = x.shape, impl
        return _gather(x.contiguous(), index.contiguous(), impl)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        base = grad.new_zeros(ctx.shape)
        return _scatter_add(base, grad.contiguous(), index, ctx.impl), None, None


class _ScatterAddRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base: Tensor, src: Tensor, index: Tensor, impl: Impl) -> Tensor:
        ctx.save_for_backward(index)
        ctx.impl, ctx.src_dtype = impl, src.dtype
        return _scatter_add(base.contiguous(), src.contiguous(), index.contiguous(), impl)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        grad_src = _gather(grad.contiguous(), index, ctx.impl).to(ctx.src_dtype)
        return grad, grad_src, None, None


def gather_rows(x: Tensor, index: Tensor, impl: Impl = "auto") -> Tensor:
    """Differentiable dispatcher: (B, T, H), (B, K) distinct ids per row -> (B, K, H)."""
    return _GatherRows.apply(x, index, impl)


def scatter_add_rows(base: Tensor, src: Tensor, index: Tensor, impl: Impl = "auto") -> Tensor:
    """Differentiable dispatcher: ``base`` (B, T, H) + ``src`` (B, K, H) at rows ``index`` (B, K)."""
    return _ScatterAddRows.apply(base, src, index, impl)
