"""ProMoT invariants (spec 28, Small-scale check): an objective over a soft-prompt adapter, two stages, one
learning-rate curve, the prompt in every export."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

import zoo
from zoo.errors import ConfigError
from zoo.modules.adapters.peft import LoRA
from zoo.modules.base import EXPORT_STATE, target_mask
from zoo.modules.prompting.promot import (
    ProMoTModule,
    ProMoTStageSwitch,
    format_gradient_alignment,
    format_specialization,
    module_group,
)
from zoo.modules.prompting.prompt_tuning import PromptTuning


def promot(tiny_module, tokens=3, **kwargs):
    return tiny_module(cls=ProMoTModule, adapter=PromptTuning(num_virtual_tokens=tokens), **kwargs)


def response_nll(module, batch):
    """Token-mean NLL over the supervised tokens, in eval mode (what the harness scores)."""
    module.eval()
    with torch.no_grad():
        weights = target_mask(batch["labels"]).float()
        return float(module.weighted_token_loss(module(batch), weights).sum() / weights.sum())


class Recorder(Callback):
    def __init__(self):
        self.at_switch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.stage == 2 and self.at_switch is None:
            optimizer = trainer.optimizers[0]
            in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
            self.at_switch = dict(
                backbone={k: v.clone() for k, v in pl_module.model.state_dict().items()},
                prompt=pl_module.adapter.soft_prompt.weight.detach().clone(),
                prompt_in_optimizer=id(pl_module.adapter.soft_prompt.weight) in in_optimizer,
                optimizer_state=len(optimizer.state),
                lr=optimizer.param_groups[0]["lr"],
            )


def test_stage_isolation_and_optimizer_rebuild(tiny_module, tiny_data, fit_tiny):
    module = promot(tiny_module, prompt_lr=1e-2, model_lr=1e-3, scheduler="constant")
    start_backbone = {k: v.clone() for k, v in module.model.state_dict().items()}
    start_prompt = module.adapter.soft_prompt.weight.detach().clone()
    recorder = Recorder()
    switch = ProMoTStageSwitch(stage1_steps=2)
    fit_tiny(module, tiny_data(), callbacks=[switch, recorder], max_steps=4)
    state = recorder.at_switch
    assert switch.switched_at == 2 and module.stage == 2
    # stage 1: backbone bit-identical, prompt moved
    assert all(torch.equal(v, start_backbone[k]) for k, v in state["backbone"].items())
    assert not torch.equal(state["prompt"], start_prompt)
    # the rebuilt optimizer holds the backbone at the stage-2 lr, no prompt and no state
    assert not state["prompt_in_optimizer"] and state["optimizer_state"] == 0 and state["lr"] == 1e-3
    # stage 2: prompt bit-identical to the end of stage 1, backbone moved
    assert torch.equal(module.adapter.soft_prompt.weight, state["prompt"])
    assert any(not torch.equal(v, state["backbone"][k]) for k, v in module.model.state_dict().items())


def test_two_stage_lr_is_one_curve_scaled_by_the_stage_peaks(tiny_module, tiny_data, fit_tiny):
    # Stage 2 continues the schedule position (no second warm-up, no fresh cosine over max_steps): at every
    # global step the lr is the stage's peak times the single schedule over max_steps.
    prompt_lr, model_lr, warmup, total, switch_at = 1e-2, 1e-3, 2, 7, 3

    def factor(step):  # CausalLMModule._scheduler's warm-up + cosine, written out by hand
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    seen = []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append((trainer.global_step, pl_module.stage, [g["lr"] for g in optimizer.param_groups]))

    module = promot(tiny_module, prompt_lr=prompt_lr, model_lr=model_lr, warmup_steps=warmup, scheduler="cosine")
    switch = ProMoTStageSwitch(stage1_steps=switch_at, keep_best=False)
    fit_tiny(module, tiny_data(), callbacks=[switch, Record()], max_steps=total, max_epochs=total)
    assert [step for step, _, _ in seen] == list(range(total))
    assert [stage for _, stage, _ in seen] == [1] * switch_at + [2] * (total - switch_at)
    for step, stage, lrs in seen:
        peak = prompt_lr if stage == 1 else model_lr
        assert all(math.isclose(value, peak * factor(step), rel_tol=1e-9) for value in lrs), (step, lrs)


def test_prompt_removal_is_identity_and_prompt_extends_by_p(tiny_module, make_batch):
    module = promot(tiny_module, tokens=5)
    batch = make_batch()
    assert module.adapter.build_inputs(batch)["attention_mask"].shape[1] == batch["input_ids"].shape[1] + 5
    plain = tiny_module()(batch).logits()  # the same backbone, no adapter
    with module.adapter.disabled():
        torch.testing.assert_close(module(batch).logits(), plain, atol=1e-6, rtol=1e-6)
    assert (module(batch).logits() - plain).abs().max() > 1e-4


def test_gradient_alignment_is_one_without_shuffling_and_bounded(tiny_module, make_batch):
    module = promot(tiny_module, tokens=2)
    batch = make_batch(batch_size=3)
    same = format_gradient_alignment(module, batch, batch)
    assert set(same) >= {"q", "k", "v", "mlp"}
    assert all(abs(c - 1.0) < 1e-5 for c in same.values())
    shuffled = dict(batch, labels=batch["labels"][[1, 2, 0]], input_ids=batch["input_ids"])
    other = format_gradient_alignment(module, batch, shuffled)
    assert all(-1.0 <= c <= 1.0 for c in other.values()) and any(c < 0.999 for c in other.values())
    assert not any(p.requires_grad for p in module.model.parameters())  # flags restored (stage 1)


def test_format_specialization_by_hand():
    assert format_specialization(["True.", "false", "Paris", " 42"], ["True", "False"]) == 0.5
    assert module_group("model.layers.0.self_attn.q_proj.weight") == "q"
    assert module_group("model.layers.1.mlp.up_proj.weight") == "mlp"


def test_default_adapter_and_a_non_prompt_adapter_is_refused(tiny_module):
    module = tiny_module(cls=ProMoTModule)
    assert isinstance(module.adapter, PromptTuning) and module.adapter.soft_prompt.weight.shape[0] == 100
    with pytest.raises(ConfigError, match="soft-prompt adapter"):
        tiny_module(cls=ProMoTModule, adapter=LoRA(r=2))


@pytest.mark.parametrize("stage1_steps", [2, 1])
def test_export_holds_the_prompt_and_reloads_with_the_same_nll(tiny_module, tiny_data, fit_tiny, make_batch,
                                                             tmp_path, stage1_steps):
    # stage1_steps=2 of 2 steps: the run ends in stage 1 (prompt trainable); 1: it ends in stage 2 (backbone
    # trainable, prompt frozen), where trainable_parameters() alone would have dropped the prompt.
    module = promot(tiny_module, prompt_lr=3e-2, model_lr=1e-2, scheduler="constant")
    switch = ProMoTStageSwitch(stage1_steps=stage1_steps, keep_best=False)
    fit_tiny(module, tiny_data(), callbacks=[switch], max_steps=2)
    ends_in = 1 if stage1_steps == 2 else 2
    assert module.stage == ends_in
    batch = make_batch(batch_size=3, length=16, prompt=6, seed=1)
    trained = response_nll(module, batch)
    prompt = module.adapter.soft_prompt.weight.detach().clone()
    export = module.export(tmp_path / "export")
    assert torch.equal(load_file(str(export / EXPORT_STATE))["adapter.soft_prompt.weight"], prompt)
    assert torch.equal(torch.load(export / "prompt.pt")["soft_prompt.weight"], prompt)
    loaded = zoo.load(export)
    assert isinstance(loaded, ProMoTModule) and loaded.stage == ends_in
    assert torch.equal(loaded.adapter.soft_prompt.weight, prompt)
    assert abs(response_nll(loaded, batch) - trained) < 1e-5
    assert abs(response_nll(tiny_module(), batch) - trained) > 1e-4  # not the untuned base


def test_the_in_run_switch_is_refused_under_several_processes(tiny_module):
    """DDP syncs the tensors that trained when it wrapped the model, so a switch inside one fit is refused
    on several processes (two fits instead); a stage-2 fit, or one that ends before the switch, is not."""
    from types import SimpleNamespace

    module = promot(tiny_module)
    switch = ProMoTStageSwitch(stage1_steps=5)
    with pytest.raises(ConfigError, match="two fits"):
        switch.setup(SimpleNamespace(world_size=2, max_steps=10), module, "fit")
    switch.setup(SimpleNamespace(world_size=2, max_steps=5), module, "fit")
    switch.setup(SimpleNamespace(world_size=1, max_steps=10), module, "fit")
    module.set_stage(2)
    switch.setup(SimpleNamespace(world_size=2, max_steps=10), module, "fit")
