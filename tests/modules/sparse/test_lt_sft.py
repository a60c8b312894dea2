"""LT-SFT (spec 26) invariants: top-K selection, sparsity after phase 2, reset and optimizer reset at the
switch, SparseDelta algebra and files, the L1 gradient, and resume in phase 2."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.modules.sparse._helpers import ordered_data, snapshot, trainer
from zoo.modules.sparse.lt_sft import LotteryTicketSFT, SparseDelta, l1_to_init, l1_to_init_grad, top_k_mask


def test_top_k_selects_the_k_largest_absolute_deltas():
    deltas = {"a": torch.tensor([0.1, -5.0, 0.3]), "b": torch.tensor([[2.0, -0.2], [4.0, 0.0]])}
    masks = top_k_mask(deltas, 3)
    assert masks["a"].tolist() == [False, True, False]
    assert masks["b"].tolist() == [[True, False], [True, False]]


def test_ties_at_threshold_never_select_more_than_k_and_are_deterministic():
    deltas = {"a": torch.zeros(10), "b": torch.ones(4), "c": torch.ones(3)}
    masks = top_k_mask(deltas, 5)  # 7 entries tie at |delta| = 1
    assert sum(int(m.sum()) for m in masks.values()) == 5
    assert masks["b"].all() and masks["c"].tolist() == [True, False, False] and not masks["a"].any()
    assert all(torch.equal(masks[k], top_k_mask(deltas, 5)[k]) for k in deltas)
    zero = top_k_mask({"a": torch.zeros(6)}, 4)  # all tied at 0
    assert int(zero["a"].sum()) == 4


def test_l1_gradient_is_lambda_sign_over_n():
    p = torch.tensor([1.0, -2.0, 0.5, 3.0], requires_grad=True)
    p0 = torch.tensor([0.0, -1.0, 0.5, 4.0])
    l1_to_init({"p": p}, {"p": p0}, strength=0.1, total=40).backward()
    expected = torch.tensor([0.1, -0.1, 0.0, -0.1]) / 40
    assert torch.allclose(p.grad, expected)
    assert torch.allclose(l1_to_init_grad(p, p0, 0.1, 40), expected)


class Recording(LotteryTicketSFT):
    def start_sparse_phase(self, trainer, pl_module):
        super().start_sparse_phase(trainer, pl_module)
        self.after_reset = snapshot(pl_module)
        self.optimizer_state_size = len(trainer.optimizers[0].state)


def test_two_phases_sparsity_reset_and_fresh_optimizer(tiny_module, tiny_data, fit_tiny):
    module = tiny_module(weight_decay=0.1, lr=1e-2)
    start = snapshot(module)
    k = 300
    callback = Recording(dense_steps=2, num_entries=k, delta_path=None)
    fit_tiny(module, tiny_data(), callbacks=[callback], max_steps=5)
    # reset: right after the selection every parameter equals its pre-phase-1 value
    assert all(torch.equal(callback.after_reset[n], start[n]) for n in start)
    assert callback.optimizer_state_size == 0
    assert sum(int(m.sum()) for m in callback.masks.values()) == k
    moved = 0
    for name, p in module.named_parameters():
        if name in callback.masks:
            outside = ~callback.masks[name]
            assert torch.equal(p[outside], start[name][outside]), name  # bit-identical off the ticket
            moved += int((p != start[name]).sum())
        else:
            assert torch.equal(p, start[name]), name  # frozen norms
    assert 0 < moved <= k
    assert callback.delta.num_entries == moved


def _delta(shape_map, seed, density=0.3):
    g = torch.Generator().manual_seed(seed)
    entries = {}
    for name, shape in shape_map.items():
        n = int(torch.tensor(shape).prod())
        index = torch.randperm(n, generator=g)[: max(1, int(density * n))].sort().values
        entries[name] = (index, torch.randn(index.numel(), generator=g), shape)
    return SparseDelta(entries)


def test_composition_equals_sum_of_parts_and_revert_is_exact(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 3))
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    base = snapshot(model)
    a, b = _delta(shapes, 1), _delta({"0.weight": shapes["0.weight"]}, 2)
    saved_a = a.apply(model)
    saved_b = b.apply(model)
    for name, p in model.named_parameters():
        expected = base[name] + a.dense(name)
        if name in b.entries:
            expected = expected + b.dense(name)
        assert torch.equal(p, expected), name
    b.revert(model, saved_b)
    a.revert(model, saved_a)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    # the composed delta is the sum of its parts, and survives save/load
    composed = SparseDelta.load((a + b).save(tmp_path / "ab.pt"))
    for name in shapes:
        parts = a.dense(name) + (b.dense(name) if name in b.entries else 0)
        assert torch.equal(composed.dense(name), parts)
    composed.apply(model)
    for name, p in model.named_parameters():
        assert torch.allclose(p, base[name] + a.dense(name) + (b.dense(name) if name in b.entries else 0),
                              atol=1e-6)


def test_disjoint_deltas_commute():
    model = torch.nn.Linear(4, 4)
    index = torch.arange(16)
    a = SparseDelta({"weight": (index[:8], torch.randn(8), (4, 4))})
    b = SparseDelta({"weight": (index[8:], torch.randn(8), (4, 4))})
    first = model.weight.detach().clone()
    a.apply(model), b.apply(model)
    ab = model.weight.detach().clone()
    model.weight.data.copy_(first)
    b.apply(model), a.apply(model)
    assert torch.equal(ab, model.weight)


def _run(tmp_path, tiny_module, tiny_data, ckpt_path=None, checkpoint=None):
    L.seed_everything(0, verbose=False)
    module = tiny_module(weight_decay=0.1, lr=1e-2)
    callbacks = [LotteryTicketSFT(dense_steps=3, num_entries=200, delta_path=None)]
    callbacks += [checkpoint] if checkpoint else []
    t = trainer(tmp_path, callbacks, max_epochs=3, enable_checkpointing=checkpoint is not None)
    t.fit(module, datamodule=ordered_data(tiny_data), ckpt_path=ckpt_path)
    return module, callbacks[0]


def test_resume_in_sparse_phase_equals_uninterrupted(tmp_path, tiny_module, tiny_data):
    full, full_cb = _run(tmp_path / "a", tiny_module, tiny_data,
                         checkpoint=ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1, every_n_epochs=1))
    second = sorted((tmp_path / "ck").glob("epoch=1*.ckpt"))[0]  # after 8 steps: in phase 2
    resumed, resumed_cb = _run(tmp_path / "b", tiny_module, tiny_data, ckpt_path=str(second))
    assert resumed_cb.stage == full_cb.stage == 1
    assert all(torch.equal(resumed_cb.masks[k], full_cb.masks[k]) for k in full_cb.masks)
    full_params = dict(full.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, full_params[name]), name


def test_two_phase_lr_curve_is_the_single_phase_schedule(tiny_module, tiny_data, fit_tiny):
    # Phase 2 continues the schedule position: no second warm-up, and the run ends where one schedule
    # over max_steps ends (a fresh scheduler over max_steps in phase 2 restarted at factor(0)).
    lr, warmup, total, dense = 1e-3, 2, 8, 4

    def factor(step):  # the module's warm-up + cosine, written out by hand
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    seen = []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append((trainer.global_step, [g["lr"] for g in optimizer.param_groups]))

    module = tiny_module(lr=lr, warmup_steps=warmup, scheduler="cosine")
    callback = Recording(dense_steps=dense, num_entries=300, delta_path=None)
    fit_tiny(module, tiny_data(), callbacks=[callback, Record()], max_steps=total, max_epochs=total)
    assert callback.stage == 1 and callback.optimizer_state_size == 0  # phase 2 ran, with fresh moments
    assert [step for step, _ in seen] == list(range(total))
    for step, lrs in seen:
        assert all(math.isclose(value, lr * factor(step), rel_tol=1e-9) for value in lrs), (step, lrs)
