"""Selected-token linear cross-entropy: the LM head and the loss for the tokens that count only.

Given final hidden states ``hidden`` (N, H), the LM head weight ``weight`` (V, H), target ids
``labels`` (N,) and per-token weights ``token_weights`` (N,), return the weighted per-token loss
``token_weights[i] * CE(hidden[i] @ weight.T, labels[i])`` (N,), zero where the weight is 0.

Rows whose weight is 0 (prompt, padding, tokens a selector dropped) are gathered away first, so
they never reach the LM head; the kept rows go through the head in chunks whose logits are
recomputed in backward (activation checkpointing), so at most ``chunk_size`` x V logits exist at
once instead of the full (N, V) matrix.

``selected_linear_cross_entropy`` is the dispatcher: a Triton kernel on CUDA when one is
registered in :data:`TRITON_IMPLEMENTATIONS`, the PyTorch reference elsewhere.
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

    Shapes: hidden (N, H), weight (V, H), labels (N,), token_weights (N,) -> (N,) float32.
    """
    keep = (token_weights != 0) & (labels != IGNORE_INDEX)
    losses = hidden.new_zeros(labels.shape, dtype=torch.float32)
    index = keep.nonzero(as_tuple=True)[0]
    if index.numel() == 0:
        # Keep the graph connected so backward still runs (with zero gradients) on every rank.
        return losses + 0.0 * hidden.sum() + 0.0 * weight.sum()
    kept_hidden, kept_labels = hidden.index_select(0, index), labels.index_select(0, index)
    pieces = []
    for start in range(0, index.numel(), chunk_size):
        stop = start + chunk_size
        args = (kept_hidden[start:stop], weight, kept_labels[start:stop], bias)
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            pieces.append(checkpoint(_chunk_loss, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_loss(*args))
    kept_loss = torch.cat(pieces) * token_weights.index_select(0, index).float()
    return losses.index_put((index,), kept_loss)


def selected_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    token_weights: Tensor,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Dispatcher: the Triton kernel on CUDA when available, the PyTorch reference elsewhere."""
    triton_impl = TRITON_IMPLEMENTATIONS.get("selected_linear_cross_entropy")
    if triton_impl is not None and hidden.is_cuda:
        return triton_impl(hidden, weight, labels, token_weights, bias=bias, chunk_size=chunk_size)
    return selected_linear_cross_entropy_reference(hidden, weight, labels, token_weights, bias, chunk_size)


def naive_linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, token_weights: Tensor, bias: Tensor | None = None
) -> Tensor:
    """The plain path (full logits, then CE): the reference for tests and benchmarks."""
    loss = F.cross_entropy(F.linear(hidden, weight, bias).float(), labels, reduction="none",
                           ignore_index=IGNORE_INDEX)
    return loss * token_weights.float()
