"""Triton path of the selected-token linear cross-entropy (Liger-style fused linear CE).

Same contract as :func:`zoo.kernels.selected_ce.selected_linear_cross_entropy_reference`:
hidden (N, H), LM head weight (V, H), labels (N,), per-token weights (N,), optional bias (V,)
-> weighted per-token loss (N,) float32. The full (N, V) logits never exist:

1. Gather the selected rows (weight != 0 and label != -100) into (K, H); dropped rows never reach
   the head and get an exactly-zero gradient (the gather's backward scatters into zeros).
2. Forward, per chunk of ``chunk_size`` kept rows: ``logits = h_c @ W.T (+ b)`` by a torch matmul
   (chunk x V, input dtype), then :func:`_lse_kernel` (one program per row) walks V in tiles of
   ``block_v`` with an online max / sum-exp in fp32 and reads the target logit, writing the row's
   log-sum-exp and ``loss = lse - logit[label]``. Only (K,) fp32 log-sum-exps are saved.
3. Backward, per chunk: the chunk's logits are recomputed by the same matmul, then
   :func:`_grad_kernel` overwrites them in place with ``g_i * (softmax - onehot)`` where
   ``g_i = grad_output_i * token_weight_i``; then ``grad_h_c = dlogits @ W`` and
   ``grad_W += dlogits.T @ h_c`` (torch matmuls), ``grad_b += dlogits.sum(0)``.

Differs from Liger-Kernel: Liger computes the gradient in forward and stores grad_hidden and
grad_weight, which is only exact when the loss is reduced to a scalar with one uniform upstream
gradient. Here the output is per token (``CausalLMModule`` reduces it afterwards with
``token_mean`` / ``sequence_mean`` / ... , so each row's upstream gradient may differ), so the
gradient is recomputed in backward: one extra (chunk x H x V) matmul per chunk, in exchange for
exact per-row upstream gradients and no stored (V, H) fp32 gradient between forward and backward.

Precision: the kernels read logits in their storage dtype and do all exp/log/sum in fp32;
bf16/fp16 ``dlogits`` are written back in the input dtype (as Liger does); with several chunks
``grad_W`` / ``grad_b`` are accumulated across chunks in an fp32 buffer (each chunk's matmul
accumulates in fp32 internally) and cast to the parameter dtype at the end.

Not implemented: label smoothing, z-loss, logit soft-capping, a fused matmul (the matmuls are
cuBLAS through torch, as in Liger), in-place reuse of ``grad_output`` buffers.

Importing this module registers :func:`triton_selected_linear_cross_entropy` in
``TRITON_IMPLEMENTATIONS["selected_linear_cross_entropy"]``. On CPU it runs only under Triton's
interpreter (``TRITON_INTERPRET=1`` set before this import), which the tests use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from zoo.kernels.selected_ce import TRITON_IMPLEMENTATIONS, empty_selection_loss, selected_rows

#: Largest V tile one program holds in registers (Liger's ``MAX_FUSED_SIZE``).
MAX_BLOCK_V = 32768


@triton.jit
def _lse_kernel(logits_ptr, logits_stride, labels_ptr, lse_ptr, loss_ptr, V, BLOCK_V: tl.constexpr):
    """One program per row: online log-sum-exp over V tiles, then ``loss = lse - logits[label]``."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    label = tl.load(labels_ptr + row)
    running_max = float("-inf")
    running_sum = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(running_max, tl.max(x, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    target = tl.load(row_ptr + label).to(tl.float32)
    tl.store(lse_ptr + row, lse)
    tl.store(loss_ptr + row, lse - target)


@triton.jit
def _grad_kernel(logits_ptr, logits_stride, labels_ptr, lse_ptr, scale_ptr, V, BLOCK_V: tl.constexpr):
    """One program per row: overwrite logits with ``scale * (softmax - onehot(label))`` in place."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_stride
    label = tl.load(labels_ptr + row)
    lse = tl.load(lse_ptr + row)
    scale = tl.load(scale_ptr + row)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < V
        x = tl.load(row_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == label, 1.0, 0.0)
        tl.store(row_ptr + cols, (scale * grad).to(logits_ptr.dtype.element_ty), mask=mask)


def _launch_options(logits: Tensor, block_v: int | None) -> dict:
    vocab = logits.shape[1]
    block = triton.next_power_of_2(block_v or min(MAX_BLOCK_V, vocab))
    options = {"BLOCK_V": block}
    if logits.is_cuda:
        options["num_warps"] = 32 if block >= 16384 else 16 if block >= 4096 else 8
    return options


def chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """(C, H) x (V, H) (+ (V,)) -> contiguous (C, V) logits in the matmul's dtype."""
    if bias is None:
        return hidden @ weight.t()
    return torch.addmm(bias, hidden, weight.t())


def lse_and_loss(logits: Tensor, labels: Tensor, block_v: int | None = None) -> tuple[Tensor, Tensor]:
    """Triton: per-row log-sum-exp and CE. logits (C, V) contiguous rows, labels (C,) -> (C,), (C,) fp32."""
    rows = logits.shape[0]
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    loss = torch.empty_like(lse)
    _lse_kernel[(rows,)](logits, logits.stride(0), labels, lse, loss, logits.shape[1],
                         **_launch_options(logits, block_v))
    return lse, loss


def softmax_minus_onehot_(logits: Tensor, labels: Tensor, lse: Tensor, scale: Tensor,
                          block_v: int | None = None) -> Tensor:
    """Triton, in place: logits (C, V) <- scale[:, None] * (softmax(logits) - onehot(labels)). Returns
    logits."""
    _grad_kernel[(logits.shape[0],)](logits, logits.stride(0), labels, lse, scale, logits.shape[1],
                                     **_launch_options(logits, block_v))
    return logits


class SelectedLinearCrossEntropyFunction(torch.autograd.Function):
    """Unweighted CE (K,) fp32 of the already-gathered rows ``hidden`` (K, H) against ``weight`` (V, H)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None,
                chunk_size: int, block_v: int | None) -> Tensor:
        lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        loss = torch.empty_like(lse)
        for start in range(0, hidden.shape[0], chunk_size):
            stop = start + chunk_size
            logits = chunk_logits(hidden[start:stop], weight, bias)
            lse[start:stop], loss[start:stop] = lse_and_loss(logits, labels[start:stop], block_v)
            del logits
        ctx.save_for_backward(hidden, weight, labels, bias, lse)
        ctx.chunk_size, ctx.block_v = chunk_size, block_v
        return loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_loss: Tensor):
        hidden, weight, labels, bias, lse = ctx.saved_tensors
        need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
        scale = grad_loss.float().contiguous()
        n_chunks = -(-hidden.shape[0] // ctx.chunk_size)
        grad_hidden = torch.empty_like(hidden) if need_h else None
        # One chunk: the matmul's own (fp32-accumulated) result. Several: an fp32 running sum.
        acc_dtype = weight.dtype if n_chunks == 1 else torch.float32
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_w else None
        grad_bias = (torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b
                     else None)
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            stop = start + ctx.chunk_size
            h = hidden[start:stop]
            dlogits = softmax_minus_onehot_(chunk_logits(h, weight, bias), labels[start:stop],
                                            lse[start:stop], scale[start:stop], ctx.block_v)
            if need_h:
                grad_hidden[start:stop] = dlogits @ weight.to(dlogits.dtype)
            if need_w and grad_weight.dtype == dlogits.dtype:
                grad_weight.addmm_(dlogits.t(), h)  # in place: no (V, H) temporary
            elif need_w:  # low-precision chunk product, summed across chunks in fp32
                grad_weight += dlogits.t() @ h.to(dlogits.dtype)
            if need_b:
                grad_bias += dlogits.sum(0, dtype=torch.float32)
            del dlogits
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, None, grad_bias, None, None


def triton_selected_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    token_weights: Tensor,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    block_v: int | None = None,
) -> Tensor:
    """Triton fused path: gather the selected rows, then chunked head + CE without (N, V) logits.

    Shapes: hidden (N, H), weight (V, H), labels (N,), token_weights (N,), bias (V,) -> (N,) float32.
    ``block_v`` is the V tile of one program, rounded up to a power of two (default: V, at most 32768).
    """
    index = selected_rows(labels, token_weights)
    if index.numel() == 0:
        return empty_selection_loss(hidden, weight, bias, labels.shape[0])
    kept_hidden = hidden.index_select(0, index)
    kept_labels = labels.index_select(0, index).contiguous()
    kept_loss = SelectedLinearCrossEntropyFunction.apply(kept_hidden, weight, kept_labels, bias,
                                                         chunk_size, block_v)
    kept_loss = kept_loss * token_weights.index_select(0, index).float()
    return hidden.new_zeros(labels.shape, dtype=torch.float32).index_put((index,), kept_loss)


TRITON_IMPLEMENTATIONS["selected_linear_cross_entropy"] = triton_selected_linear_cross_entropy
