"""Personalisation presets (spec 07) and the peft study set's trainable counts (spec 34)."""

from __future__ import annotations

import pytest
import torch

from tests.modules.sparse._helpers import snapshot
from zoo.modules import PeftModule
from zoo.modules.sparse.personalization import FreezePolicyCallback


def _expected_last_block(module):
    return {n for n, _ in module.named_parameters() if n.startswith("model.model.layers.1.")}


@pytest.mark.parametrize("policy", ["l_eo", "l_ldb", "custom"])
def test_policy_name_sets_and_one_step_invariant(policy, tiny_module, tiny_data, fit_tiny):
    module = tiny_module(weight_decay=0.1, lr=1e-2)
    before = snapshot(module)
    trainer = fit_tiny(module, tiny_data(), callbacks=[FreezePolicyCallback(policy)], max_steps=1)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    everything = set(before)
    expected = {"l_eo": {"model.model.embed_tokens.weight"},  # tied with lm_head: one tensor, once
                "l_ldb": _expected_last_block(module), "custom": everything}[policy]
    assert trainable == expected
    # closed-form sizes on tiny-llama (hidden 64, ffn 128, 4 heads, 2 kv heads, vocab 258)
    size = sum(p.numel() for n, p in module.named_parameters() if n in trainable)
    closed = {"l_eo": 258 * 64, "l_ldb": 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64}
    if policy in closed:
        assert size == closed[policy]
    params = [p for g in trainer.optimizers[0].param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}) == len(trainable)
    for name, p in module.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]) or p.ndim < 2, name
        else:
            assert torch.equal(p, before[name]), name


@pytest.mark.parametrize("peft_config,expected", [
    ({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 20}, 20 * 64),          # n·d
    # L·2·n·d_kv (GQA: 2 kv heads)
    ({"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 10}, 2 * 2 * 10 * 32),
    ({"peft_type": "IA3"}, 2 * (32 + 32 + 128)),  # one vector per k, v (out 32) and down_proj (in 128)
])
def test_peft_study_trainable_counts_and_frozen_backbone(peft_config, expected, tiny_module, tiny_data,
                                                         fit_tiny):
    module = tiny_module(cls=PeftModule, peft_config=peft_config, lr=1e-2)
    backbone_before = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    assert sum(p.numel() for p in module.trainable_parameters().values()) == expected
    fit_tiny(module, tiny_data(), max_steps=1)
    for name, p in module.named_parameters():
        if name in backbone_before:
            assert torch.equal(p, backbone_before[name]), name
