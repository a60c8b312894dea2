"""IAPT invariants (spec 20, Small-scale check), as an adapter: decoding through zoo.decoding, export round trip."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo import decoding
from zoo.errors import ConfigError
from zoo.modules.base import target_mask
from zoo.modules.prompting.iapt import (
    IAPT,
    attention_pool,
    fit_rational,
    iapt_trainable_count,
    rational,
)


def response_nll(module, batch):
    """Token-mean NLL over the supervised tokens, in eval mode (what the harness scores)."""
    module.eval()
    with torch.no_grad():
        weights = target_mask(batch["labels"]).float()
        return float(module.weighted_token_loss(module(batch), weights).sum() / weights.sum())


def test_instruction_logits_untouched_and_response_changed(tiny_module, make_batch):
    module = tiny_module(adapter=IAPT(num_virtual_tokens=2, bottleneck=4))
    batch = make_batch(length=10, prompt=5)
    with_iapt = module(batch).logits()
    with module.adapter.disabled():
        plain = module(batch).logits()
    reference = module.model(input_ids=batch["input_ids"]).logits  # the bare backbone, no hooks active
    torch.testing.assert_close(plain, reference, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(with_iapt[:, :4], plain[:, :4], atol=1e-6, rtol=1e-6)
    # position 4 (last instruction token) now predicts from the last soft token; the response differs
    assert (with_iapt[:, 4:] - plain[:, 4:]).abs().max() > 1e-4


def test_pooling_ignores_padding_and_order():
    g = torch.Generator().manual_seed(0)
    z, u = torch.randn(1, 4, 3, generator=g), torch.randn(3, 2, generator=g)
    base = attention_pool(z, u, torch.ones(1, 4, dtype=torch.bool))
    padded = attention_pool(torch.cat([z, torch.randn(1, 2, 3, generator=g)], 1), u,
                            torch.tensor([[True] * 4 + [False] * 2]))
    torch.testing.assert_close(padded, base)
    torch.testing.assert_close(attention_pool(z[:, [2, 0, 3, 1]], u, torch.ones(1, 4, dtype=torch.bool)), base)


def test_rational_identity_no_poles_and_gradients():
    x = torch.linspace(-10, 10, 101)
    a = torch.tensor([0.0, 1, 0, 0, 0, 0], requires_grad=True)
    b = torch.zeros(4, requires_grad=True)
    torch.testing.assert_close(rational(x, a, b), x)
    b2 = torch.randn(4)
    denominator = 1 + (torch.stack([x ** i for i in range(1, 5)], -1) * b2).sum(-1).abs()
    assert bool((denominator >= 1).all())
    rational(x, a, b2.requires_grad_()).pow(2).sum().backward()
    assert a.grad is not None and b2.grad is not None
    fa, fb = fit_rational()
    grid = torch.linspace(-3, 3, 13)
    torch.testing.assert_close(rational(grid, fa, fb), torch.nn.functional.gelu(grid), atol=0.05, rtol=0)


def test_trainable_set_and_count(tiny_module):
    module = tiny_module(adapter=IAPT(num_virtual_tokens=4, bottleneck=8))
    config = module.model.config
    assert not any(p.requires_grad for p in module.model.parameters())
    trainable = module.trainable_parameters()
    assert all(name.startswith("adapter.generators.") for name in trainable)
    total = sum(p.numel() for p in trainable.values())
    assert total == iapt_trainable_count(config.num_hidden_layers, config.hidden_size, 8, 4)


def test_instance_awareness(tiny_module):
    module = tiny_module(adapter=IAPT(num_virtual_tokens=2, bottleneck=4))
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    tokens = module.adapter.generators[0](h, torch.ones(2, 5, dtype=torch.bool))
    assert (tokens[0] - tokens[1]).norm() > 0


def test_cached_greedy_decoding_equals_uncached_through_the_one_decoder(tiny_module):
    module = tiny_module(adapter=IAPT(num_virtual_tokens=2, bottleneck=4))
    with torch.no_grad():
        for gen in module.adapter.generators:
            gen.up.weight.mul_(100)
    module.eval()
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    run = dict(max_new_tokens=5, eos=set(), pad_id=0, hooks=module.adapter, output_scores=True)
    a, sa = decoding.decode_ids(module.model, ids, mask, use_cache=True, **run)
    b, sb = decoding.decode_ids(module.model, ids, mask, use_cache=False, **run)
    assert a.tolist() == b.tolist()
    torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)
    # the soft tokens steer decoding: the same prompt without them scores differently
    with module.adapter.disabled():
        _, plain = decoding.decode_ids(module.model, ids, mask, use_cache=True, **run)
    assert (plain[:, 0] - sa[:, 0]).abs().max() > 1e-3


def test_export_reloads_with_the_same_nll(tiny_module, tiny_data, fit_tiny, make_batch, tmp_path):
    module = tiny_module(adapter=IAPT(num_virtual_tokens=2, bottleneck=4), lr=3e-2)
    fit_tiny(module, tiny_data(), max_steps=2)
    batch = make_batch(batch_size=3, length=16, prompt=6, seed=1)
    trained = response_nll(module, batch)
    loaded = zoo.load(module.export(tmp_path / "export"))
    assert isinstance(loaded.adapter, IAPT)
    assert abs(response_nll(loaded, batch) - trained) < 1e-5
    assert abs(response_nll(tiny_module(), batch) - trained) > 1e-4  # not the untuned base


def test_gradient_checkpointing_is_refused(tiny_module, make_batch):
    module = tiny_module(adapter=IAPT(num_virtual_tokens=2, bottleneck=4), gradient_checkpointing=True)
    module.train()
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        module(make_batch())
