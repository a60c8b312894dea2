"""Selected-token linear CE: Triton path (interpreter), chunked reference and naive head + CE agree.

The Triton path is called directly on CPU tensors; tests/conftest.py sets TRITON_INTERPRET=1 before
it is imported. Shapes stay tiny (N <= 24, H <= 32, V <= 96) with V tiles smaller than V, so every
kernel walks several tiles and the interpreter's grids stay small.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zoo.kernels import selected_ce
from zoo.kernels.selected_ce import (
    IGNORE_INDEX,
    naive_linear_cross_entropy,
    selected_linear_cross_entropy,
    selected_linear_cross_entropy_reference,
)

triton_module = pytest.importorskip("zoo.kernels.selected_ce_triton")

N, H, V = 20, 32, 96
TOLERANCE = {  # relative to the largest magnitude of the float64 value
    torch.float32: 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


def triton_path(*args, chunk_size: int = 7, block_v: int = 32, **kwargs):
    """The Triton implementation with several chunks (7 rows) and several V tiles (32 columns)."""
    return triton_module.triton_selected_linear_cross_entropy(*args, chunk_size=chunk_size, block_v=block_v,
                                                              **kwargs)


def reference_path(*args, chunk_size: int = 7, **kwargs):
    return selected_linear_cross_entropy_reference(*args, chunk_size=chunk_size, **kwargs)


PATHS = {"triton": triton_path, "reference": reference_path, "naive": naive_linear_cross_entropy}


def make_problem(seed: int = 0, n: int = N, h: int = H, v: int = V):
    """Random hidden/weight/bias, labels with two ignored rows, weights with every third row 0."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(v, h, generator=gen) * 0.3
    bias = torch.randn(v, generator=gen)
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[1] = labels[4] = IGNORE_INDEX
    token_weights = torch.rand(n, generator=gen) + 0.25
    token_weights[::3] = 0.0
    upstream = torch.randn(n, generator=gen)  # a different upstream gradient per row
    return hidden, weight, bias, labels, token_weights, upstream


def run(path, hidden, weight, bias, labels, token_weights, upstream, dtype=torch.float32):
    """Loss and grads (hidden, weight, bias) of ``sum(upstream * loss)`` in ``dtype``, returned as float64."""
    leaves = [t.to(dtype, copy=True).requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    loss = path(leaves[0], leaves[1], labels, token_weights.to(dtype), bias=leaves[2])
    (loss * upstream.to(loss.dtype)).sum().backward()
    grads = [t.grad.double() if t is not None else None for t in leaves]
    return loss.double(), *grads


def float64_weighted_ce(hidden, weight, labels, token_weights, bias=None):
    """Ground truth written out in float64: w * (logsumexp(z) - z[label]), 0 where the label is ignored."""
    logits = hidden @ weight.t() + (bias if bias is not None else 0.0)
    valid = labels != IGNORE_INDEX
    target = logits.gather(1, labels.clamp_min(0)[:, None])[:, 0]
    return torch.where(valid, torch.logsumexp(logits, dim=1) - target, 0.0) * token_weights


def exact(hidden, weight, bias, labels, token_weights, upstream):
    """Loss and grads of the float64 ground truth, which every path is compared with."""
    return run(float64_weighted_ce, hidden.double(), weight.double(),
               bias.double() if bias is not None else None, labels, token_weights.double(), upstream.double(),
               dtype=torch.float64)


def assert_close(got, want, rel):
    for name, a, b in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), got, want):
        if b is None:
            assert a is None, name
            continue
        scale = b.abs().max().clamp_min(1e-12)
        err = (a - b).abs().max() / scale
        assert err <= rel, f"{name}: relative error {err:.2e} > {rel:.0e}"


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("path", ["triton", "reference", "naive"])
def test_fp32_forward_and_backward_match_float64_naive(path, with_bias):
    hidden, weight, bias, labels, token_weights, upstream = make_problem()
    bias = bias if with_bias else None
    got = run(PATHS[path], hidden, weight, bias, labels, token_weights, upstream)
    assert_close(got, exact(hidden, weight, bias, labels, token_weights, upstream), TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["triton", "reference", "naive"])
def test_low_precision_paths_match_float64_at_dtype_tolerance(path, dtype):
    hidden, weight, bias, labels, token_weights, upstream = make_problem(seed=1)
    got = run(PATHS[path], hidden, weight, bias, labels, token_weights, upstream, dtype=dtype)
    assert got[1].dtype == torch.float64  # run() upcasts; the grads themselves came back in `dtype`
    assert_close(got, exact(hidden, weight, bias, labels, token_weights, upstream), TOLERANCE[dtype])


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_frozen_head_gets_no_gradient_and_hidden_gradient_is_unchanged(path):
    """LoRA-style frozen LM head: only hidden requires grad."""
    hidden, weight, bias, labels, token_weights, upstream = make_problem()
    h = hidden.clone().requires_grad_()
    loss = PATHS[path](h, weight, labels, token_weights, bias=bias)
    (loss * upstream).sum().backward()
    want = exact(hidden, weight, bias, labels, token_weights, upstream)
    assert weight.grad is None and bias.grad is None
    torch.testing.assert_close(h.grad.double(), want[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grads_keep_parameter_dtype(dtype):
    hidden, weight, bias, labels, token_weights, _ = make_problem()
    h, w, b = (t.to(dtype).requires_grad_() for t in (hidden, weight, bias))
    triton_path(h, w, labels, token_weights, bias=b).sum().backward()
    assert (h.grad.dtype, w.grad.dtype, b.grad.dtype) == (dtype, dtype, dtype)


def test_hand_set_logits_give_hand_derived_loss_and_gradient():
    """Identity head, so hidden rows are the logits. Row 0: logits [0, ln 3, -inf-ish...] target 0.

    loss = log(1 + 3) - 0 = ln 4; d loss / d logits = softmax - onehot = [1/4 - 1, 3/4, 0...].
    Row 1: logits [100, 100, 0, ...] target 1: loss = ln 2 (exp(100) overflows fp32: the online max
    must be subtracted first).
    """
    v = 5
    logits = torch.tensor([[0.0, math.log(3.0), -1e4, -1e4, -1e4],
                           [100.0, 100.0, 0.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([0, 1])
    loss = triton_path(logits, torch.eye(v), labels, torch.ones(2), block_v=2)  # 3 tiles of 2
    torch.testing.assert_close(loss, torch.tensor([math.log(4.0), math.log(2.0)]), rtol=0, atol=1e-5)
    loss[0].backward()
    torch.testing.assert_close(logits.grad[0], torch.tensor([-0.75, 0.75, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(logits.grad[1], torch.zeros(v))


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_dropped_rows_get_exactly_zero_gradient_even_if_nan(path):
    hidden, weight, bias, labels, token_weights, upstream = make_problem()
    dropped = (token_weights == 0) | (labels == IGNORE_INDEX)
    hidden[dropped] = float("nan")  # a dropped row that reached the head would poison everything
    loss, grad_hidden, grad_weight, grad_bias = run(PATHS[path], hidden, weight, bias, labels, token_weights,
                                                    upstream)
    assert torch.isfinite(loss).all() and (loss[dropped] == 0).all()
    assert (grad_hidden[dropped] == 0).all() and torch.isfinite(grad_hidden).all()
    assert torch.isfinite(grad_weight).all() and torch.isfinite(grad_bias).all()
    assert (grad_hidden[~dropped].abs().sum(dim=1) > 0).all()


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_all_zero_weights_give_zero_loss_and_zero_grads(path):
    hidden, weight, bias, labels, _, upstream = make_problem()
    hidden[0] = float("nan")
    loss, grad_hidden, grad_weight, grad_bias = run(PATHS[path], hidden, weight, bias, labels, torch.zeros(N),
                                                    upstream)
    assert (loss == 0).all()
    assert (grad_hidden == 0).all() and (grad_weight == 0).all() and (grad_bias == 0).all()


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_ignore_index_rows_contribute_nothing_whatever_their_weight(path):
    hidden, weight, bias, labels, _, upstream = make_problem()
    labels[:] = IGNORE_INDEX
    labels[5] = 7
    loss, grad_hidden, _, _ = run(PATHS[path], hidden, weight, bias, labels, torch.ones(N), upstream)
    assert (loss[torch.arange(N) != 5] == 0).all() and loss[5] > 0
    assert (grad_hidden[torch.arange(N) != 5] == 0).all()
    expected = torch.nn.functional.cross_entropy((hidden[5] @ weight.t() + bias).double(), labels[5].view(()))
    torch.testing.assert_close(loss[5], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_fractional_weights_scale_loss_and_grads_linearly(path):
    """sum(w * CE): the loss and each row's hidden gradient scale by w_i; weight/bias grads are sum over
    w_i."""
    hidden, weight, bias, labels, token_weights, _ = make_problem()
    ones = (token_weights != 0).float()
    upstream = torch.ones(N)
    base = run(PATHS[path], hidden, weight, bias, labels, ones, upstream)
    scaled = run(PATHS[path], hidden, weight, bias, labels, token_weights, upstream)
    w = token_weights.double()
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(scaled[0], base[0] * w, **close)
    torch.testing.assert_close(scaled[1], base[1] * w[:, None], **close)
    doubled = run(PATHS[path], hidden, weight, bias, labels, 2.0 * token_weights, upstream)
    for a, b in zip(doubled, scaled):
        torch.testing.assert_close(a, 2.0 * b, **close)


@pytest.mark.parametrize("chunk_size,block_v", [(1, 16), (5, 32), (1024, 128)])
def test_chunk_size_and_tile_size_do_not_change_results(chunk_size, block_v):
    hidden, weight, bias, labels, token_weights, upstream = make_problem(seed=2)
    one_chunk = run(lambda *a, **k: triton_path(*a, chunk_size=4096, block_v=V, **k),
                    hidden, weight, bias, labels, token_weights, upstream)
    chunked = run(lambda *a, **k: triton_path(*a, chunk_size=chunk_size, block_v=block_v, **k),
                  hidden, weight, bias, labels, token_weights, upstream)
    reference = run(lambda *a, **k: reference_path(*a, chunk_size=chunk_size, **k),
                    hidden, weight, bias, labels, token_weights, upstream)
    for a, b, c in zip(chunked, one_chunk, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)


class RowsThroughHead(TorchDispatchMode):
    """Records the row count of every op result with V columns (the head's logits and their grads)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows = vocab, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and out.dim() == 2 \
                and out.shape[1] == self.vocab:
            self.rows.append(out.shape[0])
        return out


@pytest.mark.parametrize("path", ["triton", "reference"])
def test_head_sees_only_kept_rows_in_chunks(path, monkeypatch):
    monkeypatch.setattr(selected_ce, "CHECKPOINT_MIN_LOGITS", 0)  # checkpoint every chunk, however small
    hidden, weight, bias, labels, token_weights, upstream = make_problem()
    kept = int(((token_weights != 0) & (labels != IGNORE_INDEX)).sum())
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    with RowsThroughHead(V) as forward_mode:
        loss = PATHS[path](h, w, labels, token_weights, bias=bias)
    with RowsThroughHead(V) as backward_mode:
        (loss * upstream).sum().backward()
    assert sum(forward_mode.rows) == kept < N and max(forward_mode.rows) <= 7
    assert sum(backward_mode.rows) == kept and max(backward_mode.rows) <= 7  # recomputed, chunk by chunk


def test_reference_skips_the_recompute_for_small_chunks():
    """Below CHECKPOINT_MIN_LOGITS the reference keeps its logits: backward does not rerun the head."""
    hidden, weight, bias, labels, token_weights, upstream = make_problem()
    assert hidden.shape[0] * weight.shape[0] < selected_ce.CHECKPOINT_MIN_LOGITS
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    loss = selected_linear_cross_entropy_reference(h, w, labels, token_weights, bias=bias)
    with RowsThroughHead(V) as backward_mode:
        (loss * upstream).sum().backward()
    assert backward_mode.rows == []


def test_dispatcher_uses_reference_on_cpu_and_triton_registers_itself(monkeypatch):
    assert selected_ce.TRITON_IMPLEMENTATIONS["selected_linear_cross_entropy"] is \
        triton_module.triton_selected_linear_cross_entropy

    def refuse(*args, **kwargs):
        raise AssertionError("the Triton path must not run on CPU tensors")

    monkeypatch.setitem(selected_ce.TRITON_IMPLEMENTATIONS, "selected_linear_cross_entropy", refuse)
    hidden, weight, bias, labels, token_weights, _ = make_problem()
    torch.testing.assert_close(
        selected_linear_cross_entropy(hidden, weight, labels, token_weights, bias=bias),
        naive_linear_cross_entropy(hidden, weight, labels, token_weights, bias=bias))
