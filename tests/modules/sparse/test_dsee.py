"""DSEE (spec 38): decomposition, zero start, fixed support, merge equivalence, exact pruning ratios,
pruned entries stay zero, trainable count, and pruning masks restored from the callback state."""

from __future__ import annotations

import torch

from zoo.modules.base import CausalLMModule
from zoo.modules.sparse.dsee import (
    DSEEModule,
    DSEEPruning,
    dsee_targets,
    global_prune_masks,
    merge_dsee,
    sparse_support,
)


def _module(tiny_module, **kw):
    return tiny_module(cls=DSEEModule, rank=4, alpha=8.0, num_sparse=16, outer_rounds=6, lr=1e-2, **kw)


def test_decomposition_fit_improves_with_rank_and_support_finds_planted_spikes():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g) * 0.3  # rank 3
    spikes = torch.randperm(1200, generator=g)[:10]
    w.view(-1)[spikes] += 3.0
    index, history = sparse_support(w, 10, outer_rounds=4, generator=torch.Generator().manual_seed(1),
                                    return_history=True)
    assert index.numel() == 10 == index.unique().numel()
    assert all(b < a for a, b in zip(history, history[1:]))  # ||W - UV|| falls as the rank grows
    index, _ = sparse_support(w, 10, outer_rounds=2, generator=torch.Generator().manual_seed(1),
                              return_history=True)  # rank <= 6: the spikes are left to S
    assert len(set(index.tolist()) & set(spikes.tolist())) >= 8


def test_zero_start_logits_equal_frozen_model(tiny_module, make_batch):
    plain, dsee = tiny_module(cls=CausalLMModule), _module(tiny_module)
    batch = make_batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert torch.equal(plain.model(input_ids=ids, attention_mask=mask).logits,
                       dsee.model(input_ids=ids, attention_mask=mask).logits)


def test_trainable_count_formula(tiny_module):
    module = _module(tiny_module)
    r, n, d = 4, 16, 64
    per_layer = (r * (d + d) + n) + (r * (d + 32) + n)  # q: 64->64, v: 64->32 (GQA)
    assert sum(p.numel() for p in module.trainable_parameters().values()) == 2 * per_layer
    assert all("zoo_dsee" in name for name in module.trainable_parameters())


def test_training_keeps_support_fixed_pruning_exact_and_merge_equivalent(tiny_module, tiny_data, fit_tiny, make_batch):
    module = _module(tiny_module, weight_decay=0.1)
    pruning = DSEEPruning(prune_step=2, ratio_qv=0.3, ratio_other=0.25)
    fit_tiny(module, tiny_data(), callbacks=[pruning], max_steps=5)
    for _, linear in dsee_targets(module.model):
        delta = linear.zoo_dsee
        outside = torch.ones(delta.d_out * delta.d_in, dtype=torch.bool)
        outside[delta.support] = False
        assert torch.equal(delta.sparse_dense().flatten()[outside], torch.zeros(int(outside.sum())))
        assert delta.sparse_values.abs().sum() > 0 and delta.lora_B.abs().sum() > 0
    qv = {k: v for k, v in pruning.keep.items() if k.endswith(("q_proj", "v_proj"))}
    other = {k: v for k, v in pruning.keep.items() if k not in qv}
    for masks, ratio in ((qv, 0.3), (other, 0.25)):
        total = sum(m.numel() for m in masks.values())
        assert sum(int((~m).sum()) for m in masks.values()) == round(ratio * total)
    layers = module.model.model.layers
    for name, keep in pruning.keep.items():  # pruned frozen entries are still zero after stage 2 steps
        index, path = name.split(".", 1)
        assert torch.equal(layers[int(index)].get_submodule(path).weight[~keep], torch.zeros(int((~keep).sum())))
    batch = make_batch()
    before = module.model(input_ids=batch["input_ids"]).logits
    merge_dsee(module.model)
    assert not dsee_targets(module.model)
    assert torch.allclose(module.model(input_ids=batch["input_ids"]).logits, before, atol=1e-5)


def test_global_prune_masks_ties_exact():
    masks = global_prune_masks({"a": torch.zeros(5), "b": torch.tensor([0.0, 1.0, 2.0])}, 0.5)
    assert sum(int((~m).sum()) for m in masks.values()) == 4
    assert masks["b"][1:].all()


def test_pruning_masks_restored_from_callback_state(tiny_module):
    source = _module(tiny_module)
    pruning = DSEEPruning(ratio_qv=0.5, ratio_other=0.5)
    pruning.prune(source)
    fresh = _module(tiny_module)
    restored = DSEEPruning()
    restored.setup(None, fresh, "fit")
    restored.load_state_dict(pruning.state_dict())
    expected = dict(source.named_parameters())
    for name, p in fresh.named_parameters():
        if "zoo_dsee" not in name:  # the backbone weights, pruned alike (A's random init differs)
            assert torch.equal(p, expected[name]), name
    assert any(int((p == 0).sum()) > 100 for n, p in fresh.named_parameters() if "zoo_dsee" not in n)
