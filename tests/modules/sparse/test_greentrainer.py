"""GreenTrainer (spec 30): cost model, DP optimality vs brute force, ρ conversion, a side-effect-free
probe, the mask's effect in training, and resume."""

from __future__ import annotations

import copy
import itertools
import math
import random

import lightning as L
import pytest
import torch

from tests.modules.sparse._helpers import snapshot
from zoo.modules.sparse.greentrainer import (
    GreenTrainerCallback,
    backward_cost,
    greentrainer_report,
    rho_to_backward_share,
    select_tensors,
    tensor_flops,
    tensor_importance,
)


def test_cost_model_identities():
    t_dw, t_dy = [3.0, 1.0, 4.0, 1.0, 5.0], [2.0, 7.0, 1.0, 8.0, 2.0]
    assert backward_cost([1] * 5, t_dw, t_dy) == sum(t_dw) + sum(t_dy)
    assert backward_cost([0, 0, 0, 0, 1], t_dw, t_dy) == 5.0 + 2.0  # only the last tensor
    assert backward_cost([0, 1, 0, 0, 0], t_dw, t_dy) == 1.0 + 7.0 + 1.0 + 8.0 + 2.0  # dy flows down to it
    rng = random.Random(0)
    for _ in range(20):  # monotone under adding tensors
        mask = [rng.randint(0, 1) for _ in range(5)]
        more = [m | (rng.random() < 0.3) for m in mask]
        assert backward_cost(more, t_dw, t_dy) >= backward_cost(mask, t_dw, t_dy)


def test_dp_matches_brute_force_on_random_instances():
    rng = random.Random(1)
    for _ in range(60):
        n = rng.randint(1, 10)
        imp = [rng.uniform(-0.3, 1.0) for _ in range(n)]
        t_dw = [rng.randint(0, 6) for _ in range(n)]
        t_dy = [rng.randint(0, 6) for _ in range(n)]
        budget = rng.randint(0, 40)
        best = max(sum(i for i, m in zip(imp, mask) if m)
                   for mask in itertools.product([0, 1], repeat=n)
                   if backward_cost(mask, t_dw, t_dy) <= budget)
        mask = select_tensors(imp, t_dw, t_dy, budget)
        assert backward_cost(mask, t_dw, t_dy) <= budget
        assert sum(i for i, m in zip(imp, mask) if m) == pytest.approx(best, abs=1e-9)


def test_rho_conversion():
    assert rho_to_backward_share(1.0, 30.0, 70.0) == pytest.approx(1.0)
    share = rho_to_backward_share(0.6, 30.0, 70.0)
    assert (30.0 + share * 70.0) / 100.0 == pytest.approx(0.6)  # round trip to the training-FLOPs share
    assert rho_to_backward_share(0.1, 50.0, 50.0) == 0.05


def test_flops_model_order_and_hand_costs(tiny_module, make_batch):
    module, batch = tiny_module(), make_batch(batch_size=2, length=12)
    model = tensor_flops(module, batch)
    assert model.names[0] == "model.model.embed_tokens.weight" and len(set(model.names)) == len(model.names)
    assert set(model.names) == {n for n, _ in module.named_parameters()}
    q = model.names.index("model.model.layers.0.self_attn.q_proj.weight")
    assert model.t_dw[q] == model.t_dy[q] == 2 * 12 * 64 * 64
    v = model.names.index("model.model.layers.0.self_attn.v_proj.weight")
    assert model.t_dy[v] == 2 * 12 * 64 * 32 + 4 * 2 * 12 * 12 * 64


def test_probe_has_no_side_effects(tiny_module, tiny_data, fit_tiny):
    module = tiny_module(weight_decay=0.1)
    trainer = fit_tiny(module, tiny_data(), max_steps=2)
    data = tiny_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    optimizer, scheduler = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
    weights, opt_state = snapshot(module), copy.deepcopy(optimizer.state_dict())
    sched_state = scheduler.state_dict()
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    importance = tensor_importance(module, batch, [n for n, _ in module.named_parameters()], lr=1e-3)
    assert max(abs(v) for v in importance) == pytest.approx(1.0)
    assert all(torch.equal(p, weights[n]) for n, p in module.named_parameters())
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags
    after = optimizer.state_dict()
    assert after["param_groups"] == opt_state["param_groups"]
    for key, state in opt_state["state"].items():
        assert all(torch.equal(v, after["state"][key][k]) for k, v in state.items())
    assert scheduler.state_dict() == sched_state


def test_mask_freezes_unselected_tensors_in_training(tiny_module, tiny_data, fit_tiny):
    module = tiny_module(weight_decay=0.1, lr=1e-2)
    before = snapshot(module)
    callback = GreenTrainerCallback(rho=0.5, interval=10)  # one selection (epoch 0) in this run
    trainer = fit_tiny(module, tiny_data(), callbacks=[callback], max_steps=3)
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen and frozen == callback.frozen and 0 < callback.report["predicted_saving"] < 1
    in_optimizer = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    for name, p in module.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]) and id(p) not in in_optimizer, name


@pytest.mark.slow
def test_measured_backward_time_falls_with_rho(tiny_module, tiny_data):
    data = tiny_data(max_length=256, batch_size=8)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    rows = greentrainer_report(tiny_module(), batch, rhos=(1.0, 0.3), repeats=20)
    assert rows[1]["predicted_saving"] > rows[0]["predicted_saving"]
    assert rows[1]["backward_s"] < rows[0]["backward_s"] * 1.1


def test_resume_keeps_selection_and_weights(tmp_path, tiny_module, tiny_data):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.modules.sparse._helpers import ordered_data, trainer

    def run(root, ckpt_path=None, checkpoint=None):
        L.seed_everything(0, verbose=False)
        module = tiny_module(weight_decay=0.1, lr=1e-2)
        callbacks = [GreenTrainerCallback(rho=0.5, interval=2)] + ([checkpoint] if checkpoint else [])
        t = trainer(root, callbacks, max_epochs=4, enable_checkpointing=checkpoint is not None)
        t.fit(module, datamodule=ordered_data(tiny_data), ckpt_path=ckpt_path)
        return module, callbacks[0]

    full, full_cb = run(tmp_path / "a", checkpoint=ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1,
                                                                   every_n_epochs=1))
    ckpt = sorted((tmp_path / "ck").glob("epoch=2*.ckpt"))[0]  # after the second selection (epoch 2)
    resumed, resumed_cb = run(tmp_path / "b", ckpt_path=str(ckpt))
    assert resumed_cb.frozen == full_cb.frozen and resumed_cb.stage == full_cb.stage == 2
    reference = dict(full.named_parameters())
    assert all(torch.equal(p, reference[n]) for n, p in resumed.named_parameters())


def test_report_cli_prints_one_row_per_rho(capsys):
    from zoo.modules.sparse.greentrainer import main

    main(["--model", "tiny-llama", "--dataset", "chain_sum", "--length", "256", "--rhos", "1.0", "0.5",
          "--repeats", "1", "--units", "1000"])
    rows = [[cell.strip() for cell in line.strip("|").split("|")]
            for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1.0", "| 0.5"))]
    assert [row[0] for row in rows] == ["1.0", "0.5"]
    assert rows[0][1] == "0.0%" and float(rows[1][1].rstrip("%")) > 0  # predicted saving
    assert int(rows[1][2]) < int(rows[0][2])  # fewer trainable tensors at the lower budget


def test_backward_time_with_nothing_trainable_is_zero_not_an_error(tiny_module, make_batch):
    """rho below the forward's share of training FLOPs selects no tensor: no backward runs."""
    from zoo.modules.sparse.greentrainer import measure_backward_time

    module = tiny_module()
    assert measure_backward_time(module, make_batch(), trainable=set(), repeats=1) == 0.0
    assert all(p.requires_grad for p in module.parameters())  # flags restored


def _schedule_factor(step: int, warmup: int, total: int) -> float:
    """Warm-up then cosine, written out by hand (the module's ``scheduler="cosine"``)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


class _LrRecorder(L.Callback):
    """Per optimizer step: {zoo_depth or group index: lr} of the groups the step uses."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[int, float]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        lrs = {g.get("zoo_depth", i): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        self.steps.append((trainer.global_step, lrs))


def test_reselection_with_llrd_changes_group_count_and_continues_the_schedule(tiny_module, tiny_data,
                                                                              fit_tiny):
    from zoo.modules.sparse.stability import FinetuneStabilizer, llrd_lr

    class VaryingBudget(GreenTrainerCallback):  # a different budget per epoch: the selected depths change
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.rho = (0.3, 0.9)[trainer.current_epoch % 2]
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    lr, warmup, total = 1e-3, 2, 7
    module = tiny_module(lr=lr, warmup_steps=warmup, scheduler="cosine")
    green = VaryingBudget(interval=1)  # re-selects on the first batch of every epoch
    recorder = _LrRecorder()
    group_counts = []

    class CountGroups(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            group_counts.append(len(optimizer.param_groups))

    callbacks = [FinetuneStabilizer(layer_lr_decay=0.5), green, CountGroups(), recorder]
    trainer = fit_tiny(module, tiny_data(), callbacks=callbacks, max_steps=total, max_epochs=total)
    assert trainer.global_step == total and green.stage >= 3  # several re-selections, mid-schedule included
    assert len(set(group_counts[1:])) > 1  # the group count changed across mid-run rebuilds
    assert [step for step, _ in recorder.steps] == list(range(total))
    for step, lrs in recorder.steps:
        factor = _schedule_factor(step, warmup, total)
        for depth, value in lrs.items():
            assert math.isclose(value, llrd_lr(lr, 0.5, depth, 2) * factor, rel_tol=1e-9), (step, depth)
