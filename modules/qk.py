"""Query and key states of one Llama-style attention module, recomputed from its input.

Methods that score tokens by attention (LeMo's block scores, ssToken's attention probe, APT's exact
prefix attention) need the layer's own q and k, with RoPE, outside the attention forward. This is the
one place that recomputes them, so every method sees the same q/k the attention itself computes.
"""

from __future__ import annotations

from torch import Tensor, nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb


def query_key_states(attn: nn.Module, hidden_states: Tensor,
                     position_embeddings: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """q (B, Hq, T, d_h) and k (B, Hk, T, d_h) of ``attn`` for its input ``hidden_states`` (B, T, D).

    ``attn`` is a Llama-style attention module (``q_proj``, ``k_proj``, ``head_dim``; ``q_norm`` /
    ``k_norm`` are applied where the module has them, as in Qwen3). ``hidden_states`` is the module's
    input, i.e. after the decoder layer's input norm. ``position_embeddings`` is the (cos, sin) pair the
    decoder passes its layers, each (B or 1, T, d_h): RoPE is applied when given, else q/k are pre-RoPE.
    Grouped-query k is not repeated to Hq heads; the dtype is the projections' output dtype.
    """
    batch, length, _ = hidden_states.shape
    shape = (batch, length, -1, attn.head_dim)
    q = attn.q_proj(hidden_states).view(shape)
    k = attn.k_proj(hidden_states).view(shape)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if position_embeddings is not None:
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
    return q, k
