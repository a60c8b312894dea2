"""EPT invariants (spec 06, Small-scale check)."""

from __future__ import annotations

import torch

from zoo.modules.prompting.dept import DePT
from zoo.modules.prompting.ept import EPT, ept_trainable_count, fuse_prompt, gate_weights


def test_no_subspaces_no_fusion_equals_dept(tiny_module, make_batch):
    kw = dict(num_virtual_tokens=3, rank=2, max_seq_length=16)
    ept = tiny_module(adapter=EPT(num_subspaces=0, fusion=False, **kw))
    dept = tiny_module(adapter=DePT(**kw))
    with torch.no_grad():
        ept.adapter.offset.B.normal_()
        dept.adapter.offset.load_state_dict(ept.adapter.offset.state_dict())
        dept.adapter.soft_prompt.load_state_dict(ept.adapter.soft_prompt.state_dict())
    batch = make_batch()
    torch.testing.assert_close(ept(batch).logits(), dept(batch).logits(), atol=0, rtol=0)


def test_gate_sums_to_one_and_is_one_for_a_single_subspace():
    g = torch.Generator().manual_seed(0)
    for n in (1, 3):
        weights = gate_weights(torch.randn(5, 8, generator=g), torch.randn(n, 8, generator=g), torch.randn(n, generator=g))
        assert abs(float(weights.sum()) - 1.0) < 1e-6
        if n == 1:
            assert float(weights[0]) == 1.0


def test_fusion_by_hand():
    prompt = torch.tensor([[1.0, 0.0]])
    memory = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    scores = torch.tensor([2.0, 0.0]) / 2 ** 0.5
    att = torch.softmax(scores, 0)
    expected = prompt + att[0] * memory[0] + att[1] * memory[1]
    torch.testing.assert_close(fuse_prompt(prompt, memory), expected)


def test_frozen_backbone_only_ept_grads_and_budget(tiny_module, make_batch):
    m, r, s, n, k = 3, 2, 16, 2, 4
    ept = tiny_module(adapter=EPT(num_virtual_tokens=m, rank=r, max_seq_length=s, num_subspaces=n,
                                  subspace_rank=k))
    d = ept.model.config.hidden_size
    assert sum(p.numel() for p in ept.trainable_parameters().values()) == ept_trainable_count(m, r, s, d, n, k)
    with torch.no_grad():
        ept.adapter.offset.B.normal_()
        ept.adapter.generator.V.normal_()
    batch = make_batch()
    loss = ept.compute_loss(batch, ept(batch), (batch["labels"] != -100).float())
    loss.backward()
    assert all(p.grad is None for p in ept.model.parameters())
    assert all(p.grad is not None for p in ept.trainable_parameters().values())
    assert all(name.startswith("adapter.") for name in ept.trainable_parameters())
    # the backbone sees exactly m + n positions
    assert ept.adapter.build_inputs(batch)["inputs_embeds"].shape[1] == m + batch["input_ids"].shape[1]


def test_ept_modules_train_at_the_prompt_lr_and_the_offset_at_lowrank_lr(tiny_module):
    ept = tiny_module(adapter=EPT(num_virtual_tokens=2, rank=2, max_seq_length=16, num_subspaces=2, subspace_rank=2,
                                  fusion_projections=True, lowrank_lr=7e-4), lr=3e-3)
    groups = {g["name"]: g for g in ept.configure_optimizers()["optimizer"].param_groups}
    assert (groups["prompt"]["lr"], groups["lowrank"]["lr"]) == (3e-3, 7e-4)
    adapter = ept.adapter
    assert {id(p) for p in groups["lowrank"]["params"]} == {id(adapter.offset.A), id(adapter.offset.B)}
    expected = {id(p) for p in [adapter.soft_prompt.weight, *adapter.generator.parameters()]}
    assert {id(p) for p in groups["prompt"]["params"]} == expected
