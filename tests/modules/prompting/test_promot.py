"""ProMoT invariants (spec 28, Small-scale check)."""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback

from zoo.modules.prompting.promot import (
    ProMoTModule,
    ProMoTStageSwitch,
    format_gradient_alignment,
    format_specialization,
    module_group,
)


class Recorder(Callback):
    def __init__(self):
        self.at_switch = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.stage == 2 and self.at_switch is None:
            optimizer = trainer.optimizers[0]
            in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
            self.at_switch = dict(
                backbone={k: v.clone() for k, v in pl_module.model.state_dict().items()},
                prompt=pl_module.soft_prompt.weight.detach().clone(),
                prompt_in_optimizer=id(pl_module.soft_prompt.weight) in in_optimizer,
                optimizer_state=len(optimizer.state),
                lr=optimizer.param_groups[0]["lr"],
            )


def test_stage_isolation_and_optimizer_rebuild(tiny_module, tiny_data, fit_tiny):
    module = tiny_module(cls=ProMoTModule, num_virtual_tokens=3, prompt_lr=1e-2, model_lr=1e-3, scheduler="constant")
    start_backbone = {k: v.clone() for k, v in module.model.state_dict().items()}
    start_prompt = module.soft_prompt.weight.detach().clone()
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
    assert torch.equal(module.soft_prompt.weight, state["prompt"])
    assert any(not torch.equal(v, state["backbone"][k]) for k, v in module.model.state_dict().items())


def test_prompt_removal_is_identity_and_prompt_extends_by_p(tiny_module, make_batch):
    module = tiny_module(cls=ProMoTModule, num_virtual_tokens=5)
    batch = make_batch()
    assert module.build_inputs(batch)["attention_mask"].shape[1] == batch["input_ids"].shape[1] + 5
    module.use_prompt = False
    plain = module.model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(module(batch).logits(), plain, atol=1e-6, rtol=1e-6)


def test_gradient_alignment_is_one_without_shuffling_and_bounded(tiny_module, make_batch):
    module = tiny_module(cls=ProMoTModule, num_virtual_tokens=2)
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
