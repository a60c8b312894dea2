"""DePT invariants (spec 12, Small-scale check)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from zoo.decoding import decode_ids
from zoo.errors import ConfigError
from zoo.modules.prompting.dept import DePT, dept_trainable_count
from zoo.modules.prompting.prompt_tuning import PromptTuning


@pytest.fixture
def dept_module(tiny_module):
    """Factory: a tiny CausalLMModule with a DePT adapter (module arguments ``lr``, ... split off)."""
    module_args = {"lr", "weight_decay", "scheduler"}

    def make(**kwargs):
        adapter = DePT(**{k: v for k, v in kwargs.items() if k not in module_args})
        return tiny_module(adapter=adapter, **{k: v for k, v in kwargs.items() if k in module_args})

    return make


def test_at_init_dept_equals_prompt_tuning_with_the_same_prompt(dept_module, tiny_module, make_batch):
    dept = dept_module(num_virtual_tokens=4, rank=3, max_seq_length=16)
    prompt = tiny_module(adapter=PromptTuning(num_virtual_tokens=4))
    with torch.no_grad():
        prompt.adapter.soft_prompt.weight.copy_(dept.adapter.soft_prompt.weight)
    assert torch.count_nonzero(dept.adapter.offset.A) > 0 and torch.count_nonzero(dept.adapter.offset.B) == 0
    batch = make_batch()
    torch.testing.assert_close(dept(batch).logits(), prompt(batch).logits(), atol=0, rtol=0)


def test_offset_identity_with_empty_prompt_uses_alpha_over_sqrt_r(dept_module, make_batch):
    r, alpha = 4, 8.0
    dept = dept_module(num_virtual_tokens=0, rank=r, max_seq_length=16, lora_alpha=alpha)
    with torch.no_grad():
        dept.adapter.offset.A.normal_()
        dept.adapter.offset.B.normal_()
    batch = make_batch()
    embeds = dept.model.get_input_embeddings()(batch["input_ids"])
    T = batch["input_ids"].shape[1]
    offset = (alpha / math.sqrt(r)) * (dept.adapter.offset.A[:T] @ dept.adapter.offset.B)
    reference = dept.model(inputs_embeds=embeds + offset, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(dept(batch).logits(), reference, atol=1e-5, rtol=1e-5)


def test_two_learning_rate_groups_and_update_ratio(dept_module, make_batch):
    dept = dept_module(num_virtual_tokens=2, rank=2, max_seq_length=16, lr=0.3,
                       lowrank_lr=3e-3, scheduler="constant")
    with torch.no_grad():
        dept.adapter.offset.B.normal_()  # A gets a gradient only once B != 0
    optimizer = dept.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in optimizer.param_groups] == [0.3, 3e-3]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(dept.adapter.offset.A), id(dept.adapter.offset.B)}
    before = {k: v.detach().clone() for k, v in dept.trainable_parameters().items()}
    batch = make_batch()
    loss = dept.compute_loss(batch, dept(batch), (batch["labels"] != -100).float())
    loss.backward()
    optimizer.step()
    # Adam's first step moves every coordinate with a nonzero gradient by exactly lr (sign of the grad)
    step_p = (dept.adapter.soft_prompt.weight.detach() - before["adapter.soft_prompt.weight"]).abs().max()
    step_a = (dept.adapter.offset.A.detach() - before["adapter.offset.A"]).abs().max()
    assert float(step_p / step_a) == pytest.approx(0.3 / 3e-3, rel=1e-3)


def test_both_learning_rate_groups_take_the_module_weight_decay(dept_module):
    dept = dept_module(num_virtual_tokens=2, rank=2, max_seq_length=16, weight_decay=1e-5)
    optimizer = dept.configure_optimizers()["optimizer"]
    assert [g["name"] for g in optimizer.param_groups] == ["prompt", "lowrank"]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [1e-5, 1e-5]


def test_frozen_backbone_and_trainable_count(dept_module, tiny_data, fit_tiny):
    m, r, s = 3, 2, 96
    dept = dept_module(num_virtual_tokens=m, rank=r, max_seq_length=s, lr=1e-2, lowrank_lr=1e-2)
    d = dept.model.config.hidden_size
    assert sum(p.numel() for p in dept.trainable_parameters().values()) == dept_trainable_count(m, r, s, d)
    before = {k: v.clone() for k, v in dept.model.state_dict().items()}
    fit_tiny(dept, tiny_data(), max_steps=2)
    assert all(torch.equal(v, before[k]) for k, v in dept.model.state_dict().items())
    assert torch.count_nonzero(dept.adapter.offset.B) > 0


def test_length_checks(dept_module, make_batch):
    short = dept_module(num_virtual_tokens=2, rank=2, max_seq_length=8)
    short.train()
    with pytest.raises(ConfigError, match="max_seq_length"):
        short(make_batch(length=12))
    strict = dept_module(num_virtual_tokens=2, rank=2, max_seq_length=16, strict_length=True)
    strict.train()
    with pytest.raises(ConfigError, match="exactly"):
        strict(make_batch(length=12))


def test_shorter_prompt_means_shorter_sequence(dept_module, tiny_module, make_batch):
    """DePT's saving is structural: the backbone sees m + n positions instead of l + n."""
    dept = dept_module(num_virtual_tokens=4, rank=2, max_seq_length=16)
    prompt = tiny_module(adapter=PromptTuning(num_virtual_tokens=16))
    batch = make_batch()
    assert dept.adapter.build_inputs(batch)["inputs_embeds"].shape[1] == 12 + 4
    assert prompt.adapter.build_inputs(batch)["inputs_embeds"].shape[1] == 12 + 16


def test_cached_generation_matches_uncached_with_offset(dept_module):
    dept = dept_module(num_virtual_tokens=2, rank=2, max_seq_length=32)
    L.seed_everything(0)
    with torch.no_grad():
        dept.adapter.offset.B.normal_(std=0.5)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    dept.eval()
    run = dict(max_new_tokens=5, eos={-1}, pad_id=0, hooks=dept.adapter, output_scores=True)
    a, sa = decode_ids(dept.model, ids, mask, use_cache=True, **run)
    b, sb = decode_ids(dept.model, ids, mask, use_cache=False, **run)
    assert a.tolist() == b.tolist()
    torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)


def test_generation_past_max_seq_length_gets_zero_offset(dept_module):
    """Evaluation may generate past s: those positions get no offset (no training row reached them)."""
    dept = dept_module(num_virtual_tokens=2, rank=2, max_seq_length=8)
    with torch.no_grad():
        dept.adapter.offset.B.normal_(std=0.5)
    positions = torch.arange(12)[None]
    offsets = dept.adapter.offset(positions, beyond="zero")
    torch.testing.assert_close(offsets[:, :8], dept.adapter.offset(positions[:, :8]))
    assert torch.count_nonzero(offsets[:, :8]) > 0 and torch.count_nonzero(offsets[:, 8:]) == 0
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    for mode in (True, False):  # the harness may generate right after fit, with the module still in train mode
        dept.train(mode)
        out = decode_ids(dept.model, ids, torch.ones_like(ids), max_new_tokens=6, eos={-1}, pad_id=0,
                         hooks=dept.adapter)
        assert out.shape[-1] == 6  # reached position 6 + 6 > 8 without raising
