"""APT invariants (spec 15, Small-scale check)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo.modules.prompting.apt import APTModule, apt_code_term, apt_trainable_count
from zoo.modules.prompting.prompt_tuning import PrefixTuningModule


@pytest.mark.parametrize("padded", [False, True])
def test_exact_mode_equals_prefix_tuning(tiny_module, make_batch, padded):
    apt = tiny_module(cls=APTModule, num_virtual_tokens=3, mode="exact_prefix")
    prefix = tiny_module(cls=PrefixTuningModule, num_virtual_tokens=3)
    with torch.no_grad():
        apt.prefix_kv.keys.normal_()
        apt.prefix_kv.values.normal_()
        prefix.prefix.load_state_dict({"keys": apt.prefix_kv.keys, "values": apt.prefix_kv.values})
    batch = make_batch()
    if padded:
        batch["attention_mask"][0, -3:] = 0
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(apt(batch).logits()[real], prefix(batch).logits()[real], atol=1e-5, rtol=1e-5)


def test_apt_code_formula_against_numpy():
    g = np.random.default_rng(0)
    x, p, a, b = g.normal(size=(2, 5, 8)), g.normal(size=(3, 8)), g.normal(size=(8, 2)), g.normal(size=(2, 8))
    keys = p + p @ a @ b
    scores = np.maximum(x @ keys.T, 0)
    expected = scores.max(-1, keepdims=True) * (scores @ p)
    got, _ = apt_code_term(*(torch.tensor(t) for t in (x, p, a, b)))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    # with B = 0 the keys are the prompts; the max weight carries no gradient
    pt = torch.tensor(p, requires_grad=True)
    xt = torch.tensor(x)
    term, s = apt_code_term(xt, pt, torch.tensor(a), torch.zeros(2, 8, dtype=torch.float64))
    np.testing.assert_allclose(s.detach().numpy(), np.maximum(x @ p.T, 0))
    w_only = s.max(-1, keepdim=True).values.detach()
    assert not w_only.requires_grad


def test_identity_at_init_only_where_promised(tiny_module, make_batch):
    batch = make_batch()
    code = tiny_module(cls=APTModule, num_virtual_tokens=4, mode="apt_code")
    simple = tiny_module(cls=APTModule, num_virtual_tokens=4, mode="simplified")
    code.use_prompt = False
    frozen = code(batch).logits()
    code.use_prompt = True
    torch.testing.assert_close(simple(batch).logits(), frozen, atol=0, rtol=0)
    difference = (code(batch).logits() - frozen).abs().max()
    assert 0 < difference


def test_backbone_sees_n_positions_and_only_apt_gets_grads(tiny_module, make_batch):
    apt = tiny_module(cls=APTModule, num_virtual_tokens=4, rank=2)
    batch = make_batch()
    assert apt.build_inputs(batch)["inputs_embeds"].shape[1] == batch["input_ids"].shape[1]
    loss = apt.compute_loss(batch, apt(batch), (batch["labels"] != -100).float())
    loss.backward()
    assert all(p.grad is None for p in apt.model.parameters())
    assert apt.prompts.grad is not None and apt.log_scale.grad is not None
    config = apt.model.config
    total = sum(p.numel() for p in apt.trainable_parameters().values())
    assert total == apt_trainable_count(config.num_hidden_layers, 4, config.hidden_size, 2)


def test_apt_cached_generation_matches_uncached(tiny_module):
    apt = tiny_module(cls=APTModule, num_virtual_tokens=4)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    a, sa = apt.generate(ids, mask, 4, use_cache=True, eos_token_id=-1, output_scores=True)
    b, sb = apt.generate(ids, mask, 4, use_cache=False, eos_token_id=-1, output_scores=True)
    assert a.tolist() == b.tolist()
    torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)
