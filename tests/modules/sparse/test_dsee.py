"""DSEE (spec 38): decomposition, zero start, fixed support, exact pruning ratios, pruned entries stay zero,
trainable count, pruning masks restored from the callback state, and the merged export: a plain HF model that
``transformers`` loads and that scores what the live adapter scored."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ConfigError
from zoo.modules.base import CausalLMModule
from zoo.modules.sparse.dsee import DSEE, DSEEPruning, global_prune_masks, sparse_support


def _module(tiny_module, **kw):
    return tiny_module(adapter=DSEE(rank=4, alpha=8.0, num_sparse=16, outer_rounds=6), lr=1e-2, **kw)


def _hf_nll(model, batch) -> torch.Tensor:
    """Response NLL from a plain HF forward: mean CE of logits[t-1] against labels[t] where labels != -100."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                         reduction="sum")
    return ce / (targets != -100).sum()


def _module_nll(module, batch) -> torch.Tensor:
    """Response NLL through the module's own path (adapter hidden states + selected-row CE)."""
    from zoo.modules.base import target_mask

    weights = target_mask(batch["labels"]).float()
    return module.weighted_token_loss(module(batch), weights).sum() / weights.sum()


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


def test_trainable_count_formula_and_deltas_live_on_the_adapter(tiny_module):
    module = _module(tiny_module)
    r, n, d = 4, 16, 64
    per_layer = (r * (d + d) + n) + (r * (d + 32) + n)  # q: 64->64, v: 64->32 (GQA)
    assert sum(p.numel() for p in module.trainable_parameters().values()) == 2 * per_layer
    assert all(name.startswith("adapter.deltas.") for name in module.trainable_parameters())
    assert not any("dsee" in name for name, _ in module.model.named_parameters())  # nothing put into the backbone
    assert sorted(name for name, _, _ in module.adapter.target_modules()) == sorted(
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))


def test_training_keeps_support_fixed_pruning_exact_and_disabled_is_the_pruned_backbone(
        tiny_module, tiny_data, fit_tiny, make_batch):
    module = _module(tiny_module, weight_decay=0.1)
    pruning = DSEEPruning(prune_step=2, ratio_qv=0.3, ratio_other=0.25)
    fit_tiny(module, tiny_data(), callbacks=[pruning], max_steps=5)
    for _, _, delta in module.adapter.target_modules():
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
    # disabled(): the (pruned) backbone alone, computed here as a hook-free copy of the same weights
    batch = make_batch()
    reference = tiny_module(cls=CausalLMModule)
    reference.model.load_state_dict(module.model.state_dict())
    with torch.no_grad():
        expected = reference.model(input_ids=batch["input_ids"]).logits
        with module.adapter.disabled():
            off = module.model(input_ids=batch["input_ids"]).logits
        on = module.model(input_ids=batch["input_ids"]).logits
    assert torch.equal(off, expected) and not torch.allclose(on, expected, atol=1e-4)


def test_merged_export_loads_with_transformers_and_scores_like_the_live_module(
        tiny_module, tiny_data, fit_tiny, make_batch, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    module = _module(tiny_module)
    pruning = DSEEPruning(prune_step=2, ratio_qv=0.3, ratio_other=0.25)
    fit_tiny(module, tiny_data(), callbacks=[pruning], max_steps=4)
    module.eval()
    batch = make_batch()
    with torch.no_grad():
        live = _module_nll(module, batch)
    export = module.export(tmp_path / "export")
    saved = load_file(str(export / "model.safetensors"))
    assert set(saved) <= set(tiny_module(cls=CausalLMModule).model.state_dict())  # plain HF keys only
    loaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    base = tiny_module(cls=CausalLMModule).model.eval()
    with torch.no_grad():
        reloaded, untuned = _hf_nll(loaded, batch), _hf_nll(base, batch)
    assert torch.allclose(reloaded, live, atol=1e-5)
    assert abs(float(untuned - live)) > 1e-3
    # merge report, recounted from the exported weights and the pruning masks: a pruned q/v entry is revived
    # when the exported (merged) weight is non-zero there
    qv = {k: v for k, v in pruning.keep.items() if k.endswith(("q_proj", "v_proj"))}
    pruned = sum(int((~keep).sum()) for keep in qv.values())
    revived = 0
    for name, keep in qv.items():
        index, path = name.split(".", 1)
        revived += int((saved[f"model.layers.{index}.{path}.weight"][~keep] != 0).sum())
    report = module.adapter.merge_report
    assert report["pruned"] == pruned and report["revived"] == revived and revived > 0.9 * pruned
    for name, keep in pruning.keep.items():  # the other linears carry no update: their zeros survive
        if name not in qv:
            index, path = name.split(".", 1)
            assert torch.equal(saved[f"model.layers.{index}.{path}.weight"][~keep], torch.zeros(int((~keep).sum())))
    # zoo.load rebuilds a plain module on the merged weights (no adapter left to apply twice)
    import zoo

    manifest = json.loads((export / "zoo.json").read_text())
    assert manifest["weights"] == "merged" and manifest["init_args"]["adapter"] is None
    reload = zoo.load(export)
    with torch.no_grad():
        assert torch.allclose(_module_nll(reload, batch), live, atol=1e-5)


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
        if not name.startswith("adapter."):  # the backbone weights, pruned alike (A's random init differs)
            assert torch.equal(p, expected[name]), name
    assert any(int((p == 0).sum()) > 100 for n, p in fresh.named_parameters() if not n.startswith("adapter."))


def test_pruning_without_the_dsee_adapter_is_a_config_error(tiny_module):
    with pytest.raises(ConfigError, match="DSEE adapter"):
        DSEEPruning().setup(None, tiny_module(cls=CausalLMModule), "fit")
    with pytest.raises(ConfigError, match="match no Linear"):
        tiny_module(adapter=DSEE(targets=["nonexistent"], outer_rounds=2))
