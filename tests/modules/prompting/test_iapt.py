"""IAPT invariants (spec 20, Small-scale check)."""

from __future__ import annotations

import torch

from zoo.modules.prompting.iapt import (
    IAPTModule,
    attention_pool,
    fit_rational,
    iapt_trainable_count,
    rational,
)


def batch_with_prompt(n_prompt=5, length=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, length), generator=g)
    labels = ids.clone()
    labels[:, :n_prompt] = -100
    segments = torch.full_like(ids, 2)
    segments[:, :n_prompt] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "segments": segments}


def test_instruction_logits_untouched_and_response_changed(tiny_module):
    module = tiny_module(cls=IAPTModule, num_virtual_tokens=2, bottleneck=4)
    batch = batch_with_prompt()
    with_iapt = module(batch).logits()
    module.use_prompt = False
    plain = module(batch).logits()
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
    module = tiny_module(cls=IAPTModule, num_virtual_tokens=4, bottleneck=8)
    config = module.model.config
    assert not any(p.requires_grad for p in module.model.parameters())
    total = sum(p.numel() for p in module.trainable_parameters().values())
    assert total == iapt_trainable_count(config.num_hidden_layers, config.hidden_size, 8, 4)


def test_instance_awareness(tiny_module):
    module = tiny_module(cls=IAPTModule, num_virtual_tokens=2, bottleneck=4)
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    tokens = module.generators[0](h, torch.ones(2, 5, dtype=torch.bool))
    assert (tokens[0] - tokens[1]).norm() > 0


def test_cached_generation_matches_uncached(tiny_module):
    module = tiny_module(cls=IAPTModule, num_virtual_tokens=2, bottleneck=4)
    with torch.no_grad():
        for gen in module.generators:
            gen.up.weight.mul_(100)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    a, sa = module.generate(ids, mask, 5, use_cache=True, eos_token_id=-1, output_scores=True)
    b, sb = module.generate(ids, mask, 5, use_cache=False, eos_token_id=-1, output_scores=True)
    assert a.tolist() == b.tolist()
    torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)
