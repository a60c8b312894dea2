"""LeMo kernels (block scores, selective gather / scatter-add) against their PyTorch references.

Run under ``TRITON_INTERPRET=1`` (tests/conftest.py); grids are kept to a few dozen programs.
"""

from __future__ import annotations

import pytest
import torch

from zoo.kernels.lemo_gather import (
    block_token_index,
    gather_rows,
    gather_rows_reference,
    gather_rows_triton,
    scatter_add_rows,
    scatter_add_rows_reference,
    scatter_add_rows_triton,
)
from zoo.kernels.lemo_scores import block_scores_reference, block_scores_triton

triton = pytest.importorskip("triton")


def naive_block_scores(q, k, block, causal):
    """Materialise the full T x T matrix (allowed in a test on tiny shapes) and pool it."""
    rep = q.shape[1] // k.shape[1]
    keys = k.repeat_interleave(rep, dim=1)
    scores = (q @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.clamp_min(0).sum(1) / q.shape[1]
    length = q.shape[2]
    if causal:
        scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), 0.0)
    nb = -(-length // block)
    padded = torch.zeros(q.shape[0], nb * block, nb * block)
    padded[:, :length, :length] = scores
    return padded.view(q.shape[0], nb, block, nb, block).amax(dim=(2, 4))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [48, 40])  # 40: a partial last block
def test_block_score_reference_equals_full_matrix_pooling(causal, length):
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, length, 16), torch.randn(2, 2, length, 16)
    expected = naive_block_scores(q, k, 16, causal)
    torch.testing.assert_close(block_scores_reference(q, k, 16, causal), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [48, 40])
def test_block_score_triton_kernel_equals_reference(causal, length):
    torch.manual_seed(1)
    q, k = torch.randn(2, 4, length, 16), torch.randn(2, 2, length, 16)
    expected = block_scores_reference(q, k, 16, causal)
    torch.testing.assert_close(block_scores_triton(q, k, 16, causal), expected, rtol=1e-5, atol=1e-6)


def test_block_score_of_hand_built_two_block_example():
    """One head, d=1, block 2: scores q_i * k_j; negative entries never count, the max rules a block."""
    q = torch.tensor([1.0, -1.0, 2.0, 0.5]).view(1, 1, 4, 1)
    k = torch.tensor([3.0, 1.0, -2.0, 4.0]).view(1, 1, 4, 1)
    out = block_scores_reference(q, k, 2, causal=False, scale=1.0)
    # rows (q) x cols (k): [[3,1,-2,4],[-3,-1,2,-4],[6,2,-4,8],[1.5,.5,-1,2]]
    expected = torch.tensor([[[3.0, 4.0], [6.0, 8.0]]])
    torch.testing.assert_close(out, expected)
    causal = block_scores_reference(q, k, 2, causal=True, scale=1.0)
    # causal keeps j <= i: block (0,1) is empty (0); block (1,1) = max(q2k2, q3k2, q3k3) = max(-4,-1,2) = 2
    torch.testing.assert_close(causal, torch.tensor([[[3.0, 0.0], [6.0, 2.0]]]))


def test_gather_and_scatter_kernels_equal_references():
    torch.manual_seed(2)
    x = torch.randn(2, 40, 70)
    keep = torch.tensor([[0, 2, 4], [1, 3, 4]])
    index = block_token_index(keep, 8)
    assert index.shape == (2, 24) and index[1, 8].item() == 24
    torch.testing.assert_close(gather_rows_triton(x, index), gather_rows_reference(x, index), rtol=0, atol=0)
    src = torch.randn(2, 24, 70)
    torch.testing.assert_close(scatter_add_rows_triton(x, src, index),
                               scatter_add_rows_reference(x, src, index), rtol=0, atol=0)


def test_scatter_leaves_unselected_rows_bitwise_unchanged():
    x = torch.randn(1, 16, 8)
    index = torch.tensor([[4, 5, 6, 7]])
    out = scatter_add_rows(x, torch.randn(1, 4, 8), index, impl="triton")
    keep = torch.ones(16, dtype=torch.bool)
    keep[4:8] = False
    assert torch.equal(out[0, keep], x[0, keep])
    assert not torch.equal(out[0, 4:8], x[0, 4:8])


def test_autograd_through_triton_ops_matches_reference_gradients():
    torch.manual_seed(3)
    x = torch.randn(2, 24, 20, requires_grad=True)
    src = torch.randn(2, 8, 20, requires_grad=True)
    index = block_token_index(torch.tensor([[0, 2], [1, 2]]), 4)
    grads = []
    for impl in ("triton", "torch"):
        out = scatter_add_rows(torch.zeros(2, 24, 20), gather_rows(x, index, impl) * src, index, impl)
        (gx, gs) = torch.autograd.grad((out * torch.arange(20.0)).sum(), (x, src))
        grads.append((gx, gs))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])
    assert grads[1][0][0, 4:8].abs().sum() == 0  # block 1 of row 0 was not gathered: no gradient
