"""Unified view (spec 36): zero start, placement, the prefix/gated-adapter identity, parameter counts,
gradients only in adapters/prefix, and the prefix path through the real model."""

from __future__ import annotations

import pytest
import torch

from zoo.modules.base import CausalLMModule
from zoo.modules.sparse.unified_adapters import UnifiedAdapterModule, gated_prefix_attention, prefix_attention


def _logits(module, batch):
    return module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.parametrize("placement,scale", [("ffn", 1.0), ("ffn", 4.0), ("attn", 4.0)])
def test_zero_start_equals_frozen_model(placement, scale, tiny_module, make_batch):
    plain = tiny_module()
    adapted = tiny_module(cls=UnifiedAdapterModule, adapter_placement=placement, scale=scale, bottleneck=8,
                          prefix_length=0)
    batch = make_batch()
    assert torch.equal(_logits(plain, batch), _logits(adapted, batch))


@pytest.mark.parametrize("placement", ["ffn", "attn"])
def test_adapter_reads_the_sublayer_input(placement, tiny_module):
    module = tiny_module(cls=UnifiedAdapterModule, adapter_placement=placement, bottleneck=8, prefix_length=0)
    layer = module.model.model.layers[0]
    sub = layer.mlp if placement == "ffn" else layer.self_attn
    seen = {}
    def grab_input(m, a, kw):
        seen["in"] = kw.get("hidden_states", a[0] if a else None)

    def grab_adapter(m, a):
        seen["adapter"] = a[0]

    sub.register_forward_pre_hook(grab_input, with_kwargs=True)
    sub.zoo_parallel_adapter.register_forward_pre_hook(grab_adapter)
    module.model(input_ids=torch.randint(0, 256, (1, 6)))
    assert torch.equal(seen["adapter"], seen["in"])


def test_prefix_attention_equals_gated_parallel_adapter():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    pk, pv = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    assert torch.allclose(prefix_attention(q, k, v, pk, pv), gated_prefix_attention(q, k, v, pk, pv), atol=1e-6)
    assert not torch.allclose(prefix_attention(q, k, v, pk, pv), prefix_attention(q, k, v, pk, pv * 2))


def test_parameter_counts_with_cached_prefix(tiny_module):
    length, r = 4, 8
    module = tiny_module(cls=UnifiedAdapterModule, bottleneck=r, prefix_length=length, prefix_mid_dim=16)
    d, d_kv, layers = 64, 32, 2  # tiny-llama: 2 kv heads x head_dim 16
    adapters = (2 * r * d + r + d) * layers
    encoder = module.prefix_encoder()
    assert encoder.trainable_count() == length * d + (d * 16 + 16) + (16 * layers * 2 * d_kv + layers * 2 * d_kv)
    encoder.cache_prefixes()
    trainable = sum(p.numel() for p in module.trainable_parameters().values())
    assert trainable == 2 * length * d_kv * layers + adapters == module.parameter_budget()


def test_only_adapter_and_prefix_parameters_get_gradients(tiny_module, make_batch):
    module = tiny_module(cls=UnifiedAdapterModule, bottleneck=8, prefix_length=4, prefix_mid_dim=16)
    batch = make_batch()
    outputs = module(batch)
    weights = (batch["labels"] != -100).float()
    module.compute_loss(batch, outputs, weights).backward()
    for name, p in module.named_parameters():
        is_new = "zoo_parallel_adapter" in name or "zoo_prefix" in name
        assert p.requires_grad == is_new, name
        if is_new and "down" not in name:  # up = 0 at start: the down projection gets no gradient yet
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_prefix_enters_every_layer_and_generation_matches_forward(tiny_module):
    module = tiny_module(cls=UnifiedAdapterModule, adapter_placement="none", prefix_length=3, prefix_mid_dim=16)
    plain = tiny_module(cls=CausalLMModule)
    ids = torch.randint(0, 256, (2, 7))
    with_prefix, without = module.model(input_ids=ids).logits, plain.model(input_ids=ids).logits
    assert with_prefix.shape == without.shape and not torch.allclose(with_prefix, without)
    # positions are counted over real tokens: a left-padded row gives the unpadded row's logits
    pad = torch.full((1, 2), 0)
    padded = torch.cat([pad, ids[:1]], dim=1)
    mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)], dim=1)
    last_padded = module.model(input_ids=padded, attention_mask=mask).logits[0, -1]
    assert torch.allclose(last_padded, with_prefix[0, -1], atol=1e-5)
    # cache-free greedy decoding continues exactly like repeated full forwards (prefix included)
    from zoo.datamodules.sft import render_prompt_ids

    prompt = torch.tensor([render_prompt_ids(module.tokenizer, "hi")])
    expected = prompt
    for _ in range(3):
        expected = torch.cat([expected, module.model(input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)], 1)
    new_ids = expected[0, prompt.shape[1]:].tolist()
    eos = module.tokenizer.eos_token_id
    new_ids = new_ids[: new_ids.index(eos)] if eos in new_ids else new_ids
    text = module.generate_completions(["hi"], max_new_tokens=3)
    assert text == [module.tokenizer.decode(new_ids, skip_special_tokens=True)]
    with pytest.raises(NotImplementedError):
        module.model.generate(input_ids=ids, max_new_tokens=2)


def test_adapter_only_generation_uses_the_cache_and_matches_full_forwards(tiny_module):
    from zoo.datamodules.sft import render_prompt_ids

    module = tiny_module(cls=UnifiedAdapterModule, adapter_placement="ffn", bottleneck=8, scale=4.0,
                         prefix_length=0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "zoo_parallel_adapter" in name:
                p.normal_(std=0.2)  # a non-zero adapter, so it must act on the generated text
    prompt = torch.tensor([render_prompt_ids(module.tokenizer, "hi")])
    expected = prompt
    with torch.no_grad():
        for _ in range(4):
            expected = torch.cat([expected, module.model(input_ids=expected).logits[:, -1].argmax(-1, keepdim=True)], 1)
    new_ids = expected[0, prompt.shape[1]:].tolist()
    eos = module.tokenizer.eos_token_id
    new_ids = new_ids[: new_ids.index(eos)] if eos in new_ids else new_ids
    assert module.generate_completions(["hi"], max_new_tokens=4) == [
        module.tokenizer.decode(new_ids, skip_special_tokens=True)]
