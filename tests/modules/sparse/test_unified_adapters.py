"""Unified view (spec 36): zero start, placement, the prefix/gated-adapter identity, the paper's parameter count,
gradients only in adapters/prefix, the prefix through the real model (left padding), decoding through the common
decoder (cached = uncached = repeated training forwards), exports that ``zoo.load`` rebuilds, and an objective
other than SFT taking the adapter."""

from __future__ import annotations

import json

import pytest
import torch

from zoo import decoding
from zoo.chat import render_prompt_ids
from zoo.errors import ConfigError
from zoo.modules.base import CausalLMModule, target_mask
from zoo.modules.sparse.unified_adapters import (
    MAM,
    ParallelAdapters,
    UnifiedAdapter,
    gated_prefix_attention,
    prefix_attention,
)

D, D_KV, LAYERS = 64, 32, 2  # tiny-llama: hidden 64, 2 kv heads x head_dim 16, 2 layers


def _logits(module, batch):
    return module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _nll(module, batch) -> torch.Tensor:
    weights = target_mask(batch["labels"]).float()
    with torch.no_grad():
        return module.weighted_token_loss(module(batch), weights).sum() / weights.sum()


def _perturb(module, std=0.2, seed=0):
    """Non-zero adapters (and a changed prefix), so they must act on every output below."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.adapter.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module


def _mam(tiny_module, **kw):
    return tiny_module(adapter=MAM(prefix_length=3, prefix_mid_dim=16, bottleneck=8), **kw)


def _parallel(tiny_module, **kw):
    return tiny_module(adapter=ParallelAdapters(bottleneck=8, scale=4.0), **kw)


@pytest.mark.parametrize("placement,scale", [("ffn", 1.0), ("ffn", 4.0), ("attn", 4.0)])
def test_zero_start_equals_frozen_model(placement, scale, tiny_module, make_batch):
    plain = tiny_module()
    adapted = tiny_module(adapter=ParallelAdapters(placement=placement, scale=scale, bottleneck=8))
    batch = make_batch()
    with torch.no_grad():
        assert torch.equal(plain(batch).hidden, adapted(batch).hidden)
        assert torch.equal(_logits(plain, batch), _logits(adapted, batch))


@pytest.mark.parametrize("placement", ["ffn", "attn"])
def test_adapter_reads_the_sublayer_input(placement, tiny_module):
    module = tiny_module(adapter=ParallelAdapters(placement=placement, bottleneck=8))
    layer = module.model.model.layers[0]
    sub = layer.mlp if placement == "ffn" else layer.self_attn
    seen = {}

    def grab_input(m, a, kw):
        seen["in"] = kw.get("hidden_states", a[0] if a else None)

    def grab_adapter(m, a):
        seen["adapter"] = a[0]

    sub.register_forward_pre_hook(grab_input, with_kwargs=True)
    module.adapter.adapters[0].register_forward_pre_hook(grab_adapter)
    module.model(input_ids=torch.randint(0, 256, (1, 6)))
    assert torch.equal(seen["adapter"], seen["in"])


def test_prefix_attention_equals_gated_parallel_adapter():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(3))
    pk, pv = torch.randn(3, 8, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    assert torch.allclose(prefix_attention(q, k, v, pk, pv), gated_prefix_attention(q, k, v, pk, pv), atol=1e-6)
    assert not torch.allclose(prefix_attention(q, k, v, pk, pv), prefix_attention(q, k, v, pk, pv * 2))


def test_trainable_count_is_the_papers_with_or_without_the_mlp(tiny_module):
    length, r, mid = 4, 8, 16
    module = tiny_module(adapter=MAM(prefix_length=length, prefix_mid_dim=mid, bottleneck=r))
    adapters = (2 * r * D + r + D) * LAYERS
    paper = 2 * length * D_KV * LAYERS + adapters
    live = sum(p.numel() for p in module.trainable_parameters().values())
    assert live == adapters + length * D + (D * mid + mid) + (mid * LAYERS * 2 * D_KV + LAYERS * 2 * D_KV)
    assert module.adapter.trainable_count() == paper  # issue 11 defect 7: the MLP is not counted
    module.adapter.cache_prefixes()
    assert sum(p.numel() for p in module.trainable_parameters().values()) == paper == module.adapter.trainable_count()
    parallel = _parallel(tiny_module)
    assert parallel.adapter.trainable_count() == adapters == sum(
        p.numel() for p in parallel.trainable_parameters().values())


def test_only_adapter_and_prefix_parameters_get_gradients(tiny_module, make_batch):
    module = _mam(tiny_module)
    batch = make_batch()
    outputs = module(batch)
    weights = (batch["labels"] != -100).float()
    module.compute_loss(batch, outputs, weights).backward()
    for name, p in module.named_parameters():
        is_new = name.startswith("adapter.")
        assert p.requires_grad == is_new, name
        if is_new and "down" not in name:  # up = 0 at start: the down projection gets no gradient yet
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_prefix_enters_every_layer_and_left_padding_keeps_positions(tiny_module, make_batch):
    module = tiny_module(adapter=UnifiedAdapter(placement="none", prefix_length=3, prefix_mid_dim=16))
    plain = tiny_module(cls=CausalLMModule)
    batch = make_batch()
    with torch.no_grad():
        with_prefix, without = module(batch).hidden, plain(batch).hidden
        assert with_prefix.shape == without.shape and not torch.allclose(with_prefix, without)
        with module.adapter.disabled():
            assert torch.equal(module(batch).hidden, without)
        # positions are counted over real tokens: a left-padded row gives the unpadded row's hidden states
        ids = batch["input_ids"][:1]
        padded = {"input_ids": torch.cat([torch.zeros(1, 2, dtype=torch.long), ids], 1),
                  "attention_mask": torch.cat([torch.zeros(1, 2, dtype=torch.long), torch.ones_like(ids)], 1)}
        assert torch.allclose(module.adapter.hidden_states(padded)[0, 2:], with_prefix[0], atol=1e-5)
        # ... and real tokens sit at l + their index among real tokens (l = 3), behind the cached prefix
        positions = []
        handle = module.model.model.register_forward_pre_hook(
            lambda m, a, kw: positions.append(kw["position_ids"]), with_kwargs=True)
        module.adapter.hidden_states(padded)
        handle.remove()
        assert positions[0][0, 2:].tolist() == list(range(3, 3 + ids.shape[1]))
    # every layer sees the prefix: the first layer's attention output changes with it
    seen = []
    handle = module.model.model.layers[1].self_attn.register_forward_hook(lambda m, a, o: seen.append(o[0]))
    with torch.no_grad():
        module(batch)
        with module.adapter.disabled():
            module(batch)
    handle.remove()
    assert not torch.allclose(seen[0], seen[1])


def _greedy_by_full_forwards(module, prompt_ids: list[int], steps: int) -> list[int]:
    """Reference decoder: re-run the TRAINING forward (module(batch), adapter hidden states) on the growing
    unpadded sequence and take the argmax of the last position; no cache, no decoding hooks."""
    ids = list(prompt_ids)
    eos = module.tokenizer.eos_token_id
    out = []
    with torch.no_grad():
        for _ in range(steps):
            batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                     "labels": torch.tensor([ids])}
            token = int(module(batch).logits()[0, -1].argmax())
            out.append(token)
            if token == eos:
                break
            ids.append(token)
    return out


@pytest.mark.parametrize("make", [_mam, _parallel], ids=["mam", "parallel"])
def test_decoding_through_the_common_decoder_matches_training_forwards(make, tiny_module):
    module = _perturb(make(tiny_module)).eval()
    prompts = ["hi", "what is 2 + 3?"]
    encoded = [render_prompt_ids(module.tokenizer, p) for p in prompts]
    ids, mask = decoding.left_pad(encoded, module.tokenizer.pad_token_id)
    eos, pad = {module.tokenizer.eos_token_id}, module.tokenizer.pad_token_id
    cached, scores = decoding.decode_ids(module.model, ids, mask, max_new_tokens=6, eos=eos, pad_id=pad,
                                         hooks=module.adapter, output_scores=True)
    uncached = decoding.decode_ids(module.model, ids, mask, max_new_tokens=6, eos=eos, pad_id=pad,
                                   hooks=module.adapter, use_cache=False)
    assert torch.equal(cached, uncached)
    # first step = the training forward's last-position logits (right-padded batch, last real position)
    width = max(len(e) for e in encoded)
    right = torch.full((2, width), pad)
    right_mask = torch.zeros(2, width, dtype=torch.long)
    for row, e in enumerate(encoded):
        right[row, :len(e)], right_mask[row, :len(e)] = torch.tensor(e), 1
    with torch.no_grad():
        logits = module({"input_ids": right, "attention_mask": right_mask, "labels": right}).logits()
    last = right_mask.sum(1) - 1
    assert torch.allclose(scores[:, 0], logits[torch.arange(2), last], atol=1e-5)
    # every generated token = greedy over repeated training forwards of the unpadded row
    for row, e in enumerate(encoded):
        expected = _greedy_by_full_forwards(module, e, 6)
        assert cached[row, :len(expected)].tolist() == expected
    texts = module.generate_text(prompts, max_new_tokens=6)
    assert texts == [module.tokenizer.decode(_greedy_by_full_forwards(module, e, 6), skip_special_tokens=True)
                     .split(module.tokenizer.eos_token)[0] for e in encoded]
    with module.adapter.disabled():  # the adapter is what changes the decoding
        base = decoding.decode_ids(module.model, ids, mask, max_new_tokens=6, eos=eos, pad_id=pad,
                                   hooks=module.adapter, output_scores=True)[1]
    assert not torch.allclose(base[:, 0], scores[:, 0], atol=1e-3)


@pytest.mark.parametrize("make,cache", [(_mam, False), (_mam, True), (_parallel, False)],
                         ids=["mam", "mam-cached-prefixes", "parallel"])
def test_export_reloads_with_zoo_load_and_scores_like_the_live_module(make, cache, tiny_module, tiny_data, fit_tiny,
                                                                     make_batch, tmp_path):
    import zoo

    module = make(tiny_module, lr=1e-2)
    fit_tiny(module, tiny_data(), max_steps=2)
    if cache:
        module.adapter.cache_prefixes()
    module.eval()
    batch = make_batch()
    live = _nll(module, batch)
    export = module.export(tmp_path / "export")
    manifest = json.loads((export / "zoo.json").read_text())
    assert manifest["weights"] == "none" and not (export / "model.safetensors").exists()  # no backbone copy
    if cache:
        assert manifest["init_args"]["adapter"]["init_args"]["prefix_mid_dim"] == 0
    reloaded = zoo.load(export)
    assert type(reloaded.adapter) is type(module.adapter)
    assert torch.allclose(_nll(reloaded, batch), live, atol=1e-5)
    base = _nll(tiny_module(cls=CausalLMModule).eval(), batch)
    assert abs(float(base - live)) > 1e-4
    assert reloaded.generate_text(["hi"], max_new_tokens=5) == module.generate_text(["hi"], max_new_tokens=5)


def test_an_objective_other_than_sft_takes_the_adapter(tiny_module, tiny_data, fit_tiny):
    from zoo.modules.objectives.otr import OTRModule

    module = tiny_module(cls=OTRModule, adapter=ParallelAdapters(bottleneck=8), num_samples=8, lr=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    fit_tiny(module, tiny_data(), max_steps=1)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("adapter.adapters.") for n in changed)


def test_gradient_checkpointing_with_a_prefix_is_a_config_error(tiny_module, make_batch):
    module = _mam(tiny_module, gradient_checkpointing=True)
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        module(make_batch())
    with pytest.raises(ConfigError, match="placement"):
        UnifiedAdapter(placement="both")
