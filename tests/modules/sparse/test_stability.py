"""Stability recipes (spec 32): identity settings, LLRD group lrs and ratios, freezing, re-init, tied
embeddings, and the seed report."""

from __future__ import annotations

import math

import torch

from tests.modules.sparse._helpers import snapshot
from zoo.modules.sparse.param_mask import layer_parameter_names
from zoo.modules.sparse.stability import FinetuneStabilizer, layer_depths, stability_report


def test_identity_settings_are_bit_identical_to_plain_training(tiny_module, tiny_data, fit_tiny):
    plain = tiny_module(weight_decay=0.1)
    fit_tiny(plain, tiny_data(), max_steps=3)
    stabilised = tiny_module(weight_decay=0.1)
    fit_tiny(stabilised, tiny_data(), callbacks=[FinetuneStabilizer()], max_steps=3)
    reference = dict(plain.named_parameters())
    assert all(torch.equal(p, reference[n]) for n, p in stabilised.named_parameters())


def test_llrd_group_lrs_and_constant_ratios(tiny_module, tiny_data, fit_tiny):
    module = tiny_module(lr=1e-3, warmup_steps=20, scheduler="cosine")  # lr still > 0 at step 10
    trainer = fit_tiny(module, tiny_data(), callbacks=[FinetuneStabilizer(layer_lr_decay=0.5)], max_steps=10)
    optimizer = trainer.optimizers[0]
    depths = layer_depths(module)
    name_of = {id(p): n for n, p in module.named_parameters()}
    L = 2
    seen = set()
    for group in optimizer.param_groups:
        d = group["zoo_depth"]
        assert group["initial_lr"] == 1e-3 * 0.5 ** (L + 1 - d)  # η·ξ^(L+1-l) exactly
        assert {depths[name_of[id(p)]] for p in group["params"]} == {d}
        seen |= {name_of[id(p)] for p in group["params"]}
        head = next(g for g in optimizer.param_groups if g["zoo_depth"] == L + 1)
        assert math.isclose(group["lr"] / head["lr"], 0.5 ** (L + 1 - d), rel_tol=1e-9)  # after 10 steps
    assert seen == set(dict(module.named_parameters()))
    top = depths[next(iter(layer_parameter_names(module)[-1]))]
    assert top == L  # the top block gets η·ξ, not η


def test_tied_embedding_is_one_group_at_depth_zero(tiny_module):
    module = tiny_module()
    names = [n for n, _ in module.named_parameters()]
    assert "model.lm_head.weight" not in names  # tied: one tensor
    assert layer_depths(module)["model.model.embed_tokens.weight"] == 0


def test_freeze_bottom_grad_none_and_bitwise_unchanged(tiny_module, tiny_data, fit_tiny):
    module = tiny_module(weight_decay=0.1, lr=1e-2)
    before = snapshot(module)
    trainer = fit_tiny(module, tiny_data(),
                       callbacks=[FinetuneStabilizer(freeze_bottom=1, layer_lr_decay=0.8)],
                       max_steps=3)
    frozen = layer_parameter_names(module)[0] | {"model.model.embed_tokens.weight"}
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for name, p in module.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p, before[name]) and id(p) not in in_optimizer, name
        else:
            assert id(p) in in_optimizer


def test_reinit_top_block_statistics_and_rest_untouched(tiny_module):
    module = tiny_module()
    before = snapshot(module)
    FinetuneStabilizer(reinit_top=1).setup(None, module, "fit")
    top = layer_parameter_names(module)[-1]
    for name, p in module.named_parameters():
        if name not in top:
            assert torch.equal(p, before[name]), name
        elif name.endswith("proj.weight"):
            assert not torch.equal(p, before[name])
            assert abs(p.mean().item()) < 0.003 and abs(p.std().item() - 0.02) < 0.002, name
        elif "norm" in name:
            assert torch.equal(p, torch.ones_like(p))


def test_stability_report_hand_values():
    records = [{"method": "sft", "seed": s, "metrics": {"acc": v}} for s, v in enumerate([0.5, 0.7, 0.1])]
    records += [{"method": "llrd", "seed": 0, "metrics": {"acc": 0.4}}, {"method": "llrd", "metrics": {}}]
    report = stability_report(records, "acc", fail_threshold=0.2)
    sft = report["sft"]
    assert sft["n"] == 3 and math.isclose(sft["mean"], 1.3 / 3) and sft["failed"] == 1
    assert math.isclose(sft["std"],
                        math.sqrt(((0.5 - 1.3 / 3) ** 2 + (0.7 - 1.3 / 3) ** 2 + (0.1 - 1.3 / 3) ** 2) / 2))
    assert report["llrd"] == {"n": 1, "mean": 0.4, "std": 0.0, "min": 0.4, "max": 0.4, "failed": 0}
    assert stability_report(records, "acc", 0.6, higher_is_better=False)["sft"]["failed"] == 1


def test_llrd_survives_an_optimizer_rebuild_by_hft(tiny_module, tiny_data, fit_tiny):
    from zoo.modules.sparse.hft import HalfFineTuningCallback

    module = tiny_module()
    callbacks = [HalfFineTuningCallback(reselect="epoch"), FinetuneStabilizer(layer_lr_decay=0.5)]
    trainer = fit_tiny(module, tiny_data(), callbacks=callbacks, max_steps=3, max_epochs=3)
    assert trainer.current_epoch >= 1 and callbacks[0].stage >= 1  # at least one re-draw and rebuild
    groups = trainer.optimizers[0].param_groups
    assert {g["zoo_depth"] for g in groups} == {0, 1, 2, 3}
    trainable = {id(p) for p in module.trainable_parameters().values()}
    assert {id(p) for g in groups for p in g["params"]} == trainable
