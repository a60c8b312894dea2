"""Selected-token linear cross-entropy: the LM head and the loss for the tokens that count only.

Given final hidden states ``hidden`` (N, H), the LM head weight ``weight`` (V, H), target ids
``labels`` (N,) and per-token weights ``token_weights`` (N,), return the weighted per-token loss
``token_weights[i] * CE(hidden[i] @ weight.T + bias, labels[i])`` (N,) in float32, zero where the
weight is 0 or the label is ``IGNORE_INDEX``.

Rows whose weight is 0 (prompt, padding, tokens a selector dropped) are gathered away first, so
they never reach the LM head; their gradient is exactly zero. The kept rows go through the head
in chunks of ``chunk_size`` rows, so at most ``chunk_size`` x V logits exist at once instead of the
full (N, V) matrix.

Three paths, Liger-style (Liger-Kernel's ``fused_linear_cross_entropy`` is the model):

- :func:`naive_linear_cross_entropy`: full logits, then ``F.cross_entropy`` (tests, benchmarks).
- :func:`selected_linear_cross_entropy_reference`: PyTorch; gather, then chunked head + CE whose
  logits are recomputed in backward (activation checkpointing).
- ``zoo.kernels.selected_ce_triton``: a ``torch.autograd.Function`` with Triton kernels for the
  online log-sum-exp and the ``softmax - onehot`` gradient. It registers itself in
  :data:`TRITON_IMPLEMENTATIONS` when imported; :func:`selected_linear_cross_entropy` (the
  dispatcher) imports it lazily the first time it sees a CUDA tensor, so CPU users without a
  working Triton never import it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100

#: Filled by a Triton implementation module when it imports; same signature as the reference.
TRITON_IMPLEMENTATIONS: dict[str, Callable[..., Tensor]] = {}

_TRITON_IMPORT_TRIED = False


def selected_rows(labels: Tensor, token_weights: Tensor) -> Tensor:
    """Indices (K,) of the rows that reach the head: ``token_weights != 0`` and ``labels != IGNORE_INDEX``.

    Shapes: labels (N,), token_weights (N,) -> (K,) int64.
    """
    return ((token_weights != 0) & (labels != IGNORE_INDEX)).nonzero(as_tuple=True)[0]


def empty_selection_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, n: int) -> Tensor:
    """(N,) float32 zeros still connected to ``hidden``, ``weight`` and ``bias``.

    Backward then runs (with exactly zero gradients, even if ``hidden`` holds NaN/inf in dropped
    rows) on every rank, which DDP needs when one rank selects no token.
    """
    zero = hidden[:0].float().sum() + weight[:0].float().sum()
    if bias is not None:
        zero = zero + bias[:0].float().sum()
    return hidden.new_zeros(n, dtype=torch.float32) + zero


#: Chunks with fewer logits than this (4M floats = 16 MB) are not checkpointed.
CHECKPOINT_MIN_LOGITS = 1 << 22


def _chunk_loss(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None) -> Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return F.cross_entropy(logits, labels, reduction="none")


def selected_linear_cross_entropy_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    token_weights: Tensor,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """PyTorch reference: gather rows with a non-zero weight, then chunked, checkpointed head + CE.

    Shapes: hidden (N, H), weight (V, H), labels (N,), token_weights (N,), bias (V,) -> (N,) float32.
    """
    index = selected_rows(labels, token_weights)
    if index.numel() == 0:
        return empty_selection_loss(hidden, weight, bias, labels.shape[0])
    losses = hidden.new_zeros(labels.shape, dtype=torch.float32)
    kept_hidden, kept_labels = hidden.index_select(0, index), labels.index_select(0, index)
    pieces = []
    for start in range(0, index.numel(), chunk_size):
        stop = start + chunk_size
        args = (kept_hidden[start:stop], weight, kept_labels[start:stop], bias)
        needs_grad = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        # Recompute in backward only where a chunk's logits are big enough to matter (SmolLM2: 200 MB
        # a chunk); below that the recompute costs more than the memory it saves.
        large = args[0].shape[0] * weight.shape[0] >= CHECKPOINT_MIN_LOGITS
        if torch.is_grad_enabled() and needs_grad and large:
            pieces.append(checkpoint(_chunk_loss, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_loss(*args))
    kept_loss = torch.cat(pieces) * token_weights.index_select(0, index).float()
    return losses.index_put((index,), kept_loss)


def _triton_implementation() -> Callable[..., Tensor] | None:
    """The registered Triton path, importing ``zoo.kernels.selected_ce_triton`` once on first use."""
    global _TRITON_IMPORT_TRIED
    if "selected_linear_cross_entropy" not in TRITON_IMPLEMENTATIONS and not _TRITON_IMPORT_TRIED:
        _TRITON_IMPORT_TRIED = True
        try:
            import zoo.kernels.selected_ce_triton  # noqa: F401  (registers itself)
        except ImportError:
            pass
    return TRITON_IMPLEMENTATIONS.get("selected_linear_cross_entropy")


def selected_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    token_weights: Tensor,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Dispatcher: the Triton kernel on CUDA when available, the PyTorch reference elsewhere.

    Shapes: hidden (N, H), weight (V, H), labels (N,), token_weights (N,), bias (V,) -> (N,) float32.
    """
    if hidden.is_cuda:
        triton_impl = _triton_implementation()
        if triton_impl is not None:
            return triton_impl(hidden, weight, labels, token_weights, bias=bias, chunk_size=chunk_size)
    return selected_linear_cross_entropy_reference(hidden, weight, labels, token_weights, bias, chunk_size)


def naive_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, token_weights: Tensor, bias: Tensor | None = None
) -> Tensor:
    """The plain path (full (N, V) logits, then CE): the reference for tests and benchmarks.

    Shapes: hidden (N, H), weight (V, H), labels (N,), token_weights (N,), bias (V,) -> (N,) float32.
    """
    loss = F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, reduction="none",
                           ignore_index=IGNORE_INDEX)
    return loss * token_weights.float()
