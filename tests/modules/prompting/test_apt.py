"""APT invariants (spec 15, Small-scale check), as an adapter: decoding through zoo.decoding, export round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zoo
from zoo import decoding
from zoo.errors import ConfigError
from zoo.modules.base import target_mask
from zoo.modules.prompting.apt import APT, apt_code_term, apt_trainable_count
from zoo.modules.prompting.prompt_tuning import PrefixTuning


def response_nll(module, batch):
    """Token-mean NLL over the supervised tokens, in eval mode (what the harness scores)."""
    module.eval()
    with torch.no_grad():
        weights = target_mask(batch["labels"]).float()
        return float(module.weighted_token_loss(module(batch), weights).sum() / weights.sum())


def exact_pair(tiny_module):
    """APT in exact_prefix mode and prefix tuning holding the same (non-trivial) keys and values."""
    apt = tiny_module(adapter=APT(num_virtual_tokens=3, mode="exact_prefix"))
    prefix = tiny_module(adapter=PrefixTuning(num_virtual_tokens=3))
    with torch.no_grad():
        apt.adapter.prefix_kv.keys.normal_()
        apt.adapter.prefix_kv.values.normal_()
        prefix.adapter.prefix.load_state_dict({"keys": apt.adapter.prefix_kv.keys,
                                               "values": apt.adapter.prefix_kv.values})
    return apt, prefix


@pytest.mark.parametrize("padded", [False, True])
def test_exact_mode_equals_prefix_tuning(tiny_module, make_batch, padded):
    apt, prefix = exact_pair(tiny_module)
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
    code = tiny_module(adapter=APT(num_virtual_tokens=4, mode="apt_code"))
    simple = tiny_module(adapter=APT(num_virtual_tokens=4, mode="simplified"))
    frozen = tiny_module()(batch).logits()  # the same backbone without an adapter
    with code.adapter.disabled():
        torch.testing.assert_close(code(batch).logits(), frozen, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(simple(batch).logits(), frozen, atol=1e-6, rtol=1e-6)
    difference = (code(batch).logits() - frozen).abs().max()
    assert 0 < difference


def test_backbone_sees_n_positions_and_only_apt_gets_grads(tiny_module, make_batch):
    apt = tiny_module(adapter=APT(num_virtual_tokens=4, rank=2))
    batch = make_batch()
    assert apt.adapter.build_inputs(batch)["inputs_embeds"].shape[1] == batch["input_ids"].shape[1]
    loss = apt.compute_loss(batch, apt(batch), (batch["labels"] != -100).float())
    loss.backward()
    assert all(p.grad is None for p in apt.model.parameters())
    assert apt.adapter.prompts.grad is not None and apt.adapter.log_scale.grad is not None
    config = apt.model.config
    trainable = apt.trainable_parameters()
    assert all(name.startswith("adapter.") for name in trainable)
    total = sum(p.numel() for p in trainable.values())
    assert total == apt_trainable_count(config.num_hidden_layers, 4, config.hidden_size, 2)


def decode(module, ids, mask, use_cache, hooks=None):
    return decoding.decode_ids(module.model, ids, mask, max_new_tokens=4, eos=set(), pad_id=0,
                               hooks=hooks if hooks is not None else module.adapter, use_cache=use_cache,
                               output_scores=True)


def left_padded_prompt():
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return ids, mask


@pytest.mark.parametrize("mode", ["apt_code", "simplified"])
def test_cached_greedy_decoding_equals_uncached_through_the_one_decoder(tiny_module, mode):
    apt = tiny_module(adapter=APT(num_virtual_tokens=4, mode=mode))
    with torch.no_grad():
        apt.adapter.log_scale.fill_(0.5)  # simplified: alpha 0 would be the identity
    apt.eval()
    ids, mask = left_padded_prompt()
    a, sa = decode(apt, ids, mask, use_cache=True)
    b, sb = decode(apt, ids, mask, use_cache=False)
    assert a.tolist() == b.tolist()
    torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)
    with apt.adapter.disabled():
        _, plain = decode(apt, ids, mask, use_cache=True)
    assert (plain - sa).abs().max() > 1e-3  # the prompts act at every step


def test_exact_mode_decodes_as_prefix_tuning_with_the_prefix_cache(tiny_module):
    apt, prefix = exact_pair(tiny_module)
    apt.eval(), prefix.eval()
    ids, mask = left_padded_prompt()
    cached, s_cached = decode(apt, ids, mask, use_cache=True)
    uncached, s_uncached = decode(apt, ids, mask, use_cache=False)
    reference, s_reference = decode(prefix, ids, mask, use_cache=True)
    assert cached.tolist() == uncached.tolist() == reference.tolist()
    torch.testing.assert_close(s_cached, s_uncached, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(s_cached, s_reference, atol=1e-4, rtol=1e-4)
    # the first step's logits are the training forward's (the hook's decomposition) at the last prompt token
    batch = {"input_ids": ids, "attention_mask": mask}
    torch.testing.assert_close(s_cached[:, 0], apt(dict(batch, labels=ids)).logits()[:, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["apt_code", "exact_prefix"])
def test_export_reloads_with_the_same_nll(tiny_module, tiny_data, fit_tiny, make_batch, tmp_path, mode):
    module = tiny_module(adapter=APT(num_virtual_tokens=2, rank=2, mode=mode), lr=3e-2)
    fit_tiny(module, tiny_data(), max_steps=2)
    batch = make_batch(batch_size=3, length=16, prompt=6, seed=1)
    trained = response_nll(module, batch)
    loaded = zoo.load(module.export(tmp_path / "export"))
    assert isinstance(loaded.adapter, APT) and loaded.adapter.mode == mode
    assert abs(response_nll(loaded, batch) - trained) < 1e-5
    assert abs(response_nll(tiny_module(), batch) - trained) > 1e-4  # not the untuned base


def test_unknown_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="apt_code"):
        APT(mode="softmax")
