"""DePT invariants (spec 12, Small-scale check)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from zoo.errors import ConfigError
from zoo.modules.prompting.dept import DePTModule, dept_trainable_count
from zoo.modules.prompting.prompt_tuning import PromptTuningModule


def test_at_init_dept_equals_prompt_tuning_with_the_same_prompt(tiny_module, make_batch):
    dept = tiny_module(cls=DePTModule, num_virtual_tokens=4, rank=3, max_seq_length=16)
    prompt = tiny_module(cls=PromptTuningModule, num_virtual_tokens=4)
    with torch.no_grad():
        prompt.soft_prompt.weight.copy_(dept.soft_prompt.weight)
    assert torch.count_nonzero(dept.offset.A) > 0 and torch.count_nonzero(dept.offset.B) == 0
    batch = make_batch()
    torch.testing.assert_close(dept(batch).logits(), prompt(batch).logits(), atol=0, rtol=0)


def test_offset_identity_with_empty_prompt_uses_alpha_over_sqrt_r(tiny_module, make_batch):
    r, alpha = 4, 8.0
    dept = tiny_module(cls=DePTModule, num_virtual_tokens=0, rank=r, max_seq_length=16, lora_alpha=alpha)
    with torch.no_grad():
        dept.offset.A.normal_()
        dept.offset.B.normal_()
    batch = make_batch()
    embeds = dept.model.get_input_embeddings()(batch["input_ids"])
    T = batch["input_ids"].shape[1]
    offset = (alpha / math.sqrt(r)) * (dept.offset.A[:T] @ dept.offset.B)
    reference = dept.model(inputs_embeds=embeds + offset, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(dept(batch).logits(), reference, atol=1e-5, rtol=1e-5)


def test_two_learning_rate_groups_and_update_ratio(tiny_module, make_batch):
    dept = tiny_module(cls=DePTModule, num_virtual_tokens=2, rank=2, max_seq_length=16, lr=0.3,
                       lowrank_lr=3e-3, scheduler="constant")
    with torch.no_grad():
        dept.offset.B.normal_()  # A gets a gradient only once B != 0
    optimizer = dept.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in optimizer.param_groups] == [0.3, 3e-3]
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(dept.offset.A), id(dept.offset.B)}
    before = {k: v.detach().clone() for k, v in dept.trainable_parameters().items()}
    batch = make_batch()
    loss = dept.compute_loss(batch, dept(batch), (batch["labels"] != -100).float())
    loss.backward()
    optimizer.step()
    # Adam's first step moves every coordinate with a nonzero gradient by exactly lr (sign of the grad)
    step_p = (dept.soft_prompt.weight.detach() - before["soft_prompt.weight"]).abs().max()
    step_a = (dept.offset.A.detach() - before["offset.A"]).abs().max()
    assert float(step_p / step_a) == pytest.approx(0.3 / 3e-3, rel=1e-3)


def test_frozen_backbone_and_trainable_count(tiny_module, tiny_data, fit_tiny):
    m, r, s = 3, 2, 96
    dept = tiny_module(cls=DePTModule, num_virtual_tokens=m, rank=r, max_seq_length=s, lr=1e-2, lowrank_lr=1e-2)
    d = dept.model.config.hidden_size
    assert sum(p.numel() for p in dept.trainable_parameters().values()) == dept_trainable_count(m, r, s, d)
    before = {k: v.clone() for k, v in dept.model.state_dict().items()}
    fit_tiny(dept, tiny_data(), max_steps=2)
    assert all(torch.equal(v, before[k]) for k, v in dept.model.state_dict().items())
    assert torch.count_nonzero(dept.offset.B) > 0


def test_length_checks(tiny_module, make_batch):
    short = tiny_module(cls=DePTModule, num_virtual_tokens=2, rank=2, max_seq_length=8)
    short.train()
    with pytest.raises(ConfigError, match="max_seq_length"):
        short(make_batch(length=12))
    strict = tiny_module(cls=DePTModule, num_virtual_tokens=2, rank=2, max_seq_length=16, strict_length=True)
    strict.train()
    with pytest.raises(ConfigError, match="exactly"):
        strict(make_batch(length=12))


def test_shorter_prompt_means_shorter_sequence(tiny_module, make_batch):
    """DePT's saving is structural: the backbone sees m + n positions instead of l + n."""
    dept = tiny_module(cls=DePTModule, num_virtual_tokens=4, rank=2, max_seq_length=16)
    prompt = tiny_module(cls=PromptTuningModule, num_virtual_tokens=16)
    batch = make_batch()
    assert dept.build_inputs(batch)["inputs_embeds"].shape[1] == 12 + 4
    assert prompt.build_inputs(batch)["inputs_embeds"].shape[1] == 12 + 16


def test_cached_generation_matches_uncached_with_offset(tiny_module):
    dept = tiny_module(cls=DePTModule, num_virtual_tokens=2, rank=2, max_seq_length=32)
    L.seed_everything(0)
    with torch.no_grad():
        dept.offset.B.normal_(std=0.5)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    a, sa = dept.generate(ids, mask, 5, use_cache=True, eos_token_id=-1, output_scores=True)
    b, sb = dept.generate(ids, mask, 5, use_cache=False, eos_token_id=-1, output_scores=True)
    assert a.tolist() == b.tolist()
    torch.testing.assert_close(sa, sb, atol=1e-4, rtol=1e-4)


def test_generation_past_max_seq_length_gets_zero_offset(tiny_module):
    """Evaluation may generate past s: those positions get no offset (no training row reached them)."""
    dept = tiny_module(cls=DePTModule, num_virtual_tokens=2, rank=2, max_seq_length=8)
    with torch.no_grad():
        dept.offset.B.normal_(std=0.5)
    positions = torch.arange(12)[None]
    offsets = dept.offset(positions, beyond="zero")
    torch.testing.assert_close(offsets[:, :8], dept.offset(positions[:, :8]))
    assert torch.count_nonzero(offsets[:, :8]) > 0 and torch.count_nonzero(offsets[:, 8:]) == 0
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    for mode in (True, False):  # the harness may generate right after fit, with the module still in train mode
        dept.train(mode)
        out = dept.generate(ids, torch.ones_like(ids), 6, use_cache=True, eos_token_id=-1)
        assert out.shape[-1] >= 6  # reached position 6 + 6 > 8 without raising
