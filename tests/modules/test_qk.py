"""The shared q/k recompute (``zoo.modules.qk``): its q/k rebuild the attention module's own output."""

from __future__ import annotations

import pytest
import torch

from zoo.modules.qk import query_key_states


def _llama():
    from zoo import backbone

    model, _ = backbone.tiny_llama()  # 4 query heads, 2 key/value heads, d_h 16
    return backbone.decoder_layers(model)[0].self_attn.eval(), backbone.decoder(model).rotary_emb


def _qwen3():  # q_norm / k_norm on each head before RoPE
    from transformers import Qwen3Config
    from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3RotaryEmbedding

    config = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         intermediate_size=128, num_hidden_layers=1, vocab_size=32,
                         attn_implementation="eager")
    torch.manual_seed(0)
    attention = Qwen3Attention(config, layer_idx=0).eval()
    with torch.no_grad():  # non-trivial norm weights, so a missing q_norm / k_norm shows
        attention.q_norm.weight.uniform_(0.5, 1.5)
        attention.k_norm.weight.uniform_(0.5, 1.5)
    return attention, Qwen3RotaryEmbedding(config)


def _rotate(x, cos, sin):
    """RoPE written out: pairs (x_i, x_{i + d/2}) rotated by the position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


@pytest.mark.parametrize("build", [_llama, _qwen3], ids=["llama", "qwen3"])
def test_query_key_states_rebuild_the_attention_output(build):
    attention, rotary = build()
    torch.manual_seed(1)
    batch, length = 2, 12
    hidden = torch.randn(batch, length, 64)
    cos_sin = rotary(hidden, torch.arange(length)[None])
    q, k = query_key_states(attention, hidden, cos_sin)
    assert q.shape == (batch, 4, length, 16) and k.shape == (batch, 2, length, 16)

    causal = torch.ones(length, length, dtype=torch.bool).tril()
    v = attention.v_proj(hidden).view(batch, length, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
    scores = (q @ k.repeat_interleave(2, dim=1).transpose(-1, -2)) * 16 ** -0.5
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    rebuilt = attention.o_proj((probs @ v).transpose(1, 2).reshape(batch, length, 64))
    mask = torch.zeros(1, 1, length, length).masked_fill(~causal, torch.finfo(torch.float32).min)
    expected, _ = attention(hidden, position_embeddings=cos_sin, attention_mask=mask)
    torch.testing.assert_close(rebuilt, expected, rtol=1e-5, atol=1e-6)


def test_without_position_embeddings_q_and_k_are_pre_rope():
    attention, rotary = _llama()
    hidden = torch.randn(1, 8, 64)
    cos, sin = rotary(hidden, torch.arange(8)[None])
    q_pre, k_pre = query_key_states(attention, hidden)
    q, k = query_key_states(attention, hidden, (cos, sin))
    torch.testing.assert_close(_rotate(q_pre, cos, sin), q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(_rotate(k_pre, cos, sin), k, rtol=1e-6, atol=1e-6)
    assert torch.equal(q_pre[:, :, 0], q[:, :, 0])  # position 0: RoPE is the identity
    assert not torch.allclose(q_pre[:, :, 1:], q[:, :, 1:])
