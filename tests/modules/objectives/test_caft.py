"""CAFT invariants (spec 05, "Small-scale check")."""

from __future__ import annotations

import pytest
import torch

from zoo.modules import CausalLMModule
from zoo.modules.base import target_mask
from zoo.modules.objectives.caft import CAFTModule, aux_weight_schedule, multi_token_ce


def test_reverse_sine_schedule_starts_at_one_ends_at_zero_and_decreases():
    values = [aux_weight_schedule(t, 100, "rsine") for t in range(101)]
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(values, values[1:]))
    assert aux_weight_schedule(50, 100, "constant") == 1.0
    assert aux_weight_schedule(0, 100, "sine") == 0.0 and aux_weight_schedule(25, 100, "linear") == 0.25


def test_head_ce_uses_labels_shifted_by_one_plus_k():
    vocab, batch, length = 6, 2, 8
    labels = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    labels[:, :2] = -100
    weights = target_mask(labels).float()
    eye = torch.eye(vocab)
    for offset in (2, 3):
        hidden = torch.zeros(batch, length, vocab)
        for t in range(length - offset):  # position t puts all mass on token t + offset
            hidden[torch.arange(batch), t, labels[:, t + offset].clamp_min(0)] = 30.0
        right = multi_token_ce(hidden, eye, None, labels, weights, offset)
        wrong = multi_token_ce(hidden, eye, None, labels, weights, offset - 1)
        assert right.max() < 1e-6
        assert wrong[weights != 0][offset:].mean() > 5.0
        assert torch.all(right[:, :offset] == 0)


def test_zero_coefficient_equals_plain_sft_loss_and_trunk_gradients(tiny_module, make_batch):
    batch = make_batch()
    sft, caft = tiny_module(), tiny_module(cls=CAFTModule, heads_coefficient=0.0)
    losses = []
    for module in (sft, caft):
        outputs = module(batch)
        loss = module.compute_loss(batch, outputs, target_mask(batch["labels"]).float())
        loss.backward()
        losses.append(loss)
    assert torch.equal(losses[0], losses[1])
    for (name, p), (_, q) in zip(sft.model.named_parameters(), caft.model.named_parameters()):
        assert torch.equal(p.grad, q.grad), name
    # and a non-zero coefficient does change the trunk gradient (the aux loss reaches the trunk)
    on = tiny_module(cls=CAFTModule, heads_coefficient=1.0, schedule="constant")
    on(batch)
    on.compute_loss(batch, on(batch), target_mask(batch["labels"]).float()).backward()
    first = next(on.model.parameters())
    assert not torch.allclose(first.grad, next(sft.model.parameters()).grad)


def test_frozen_heads_get_no_gradient_and_are_not_trainable(tiny_module, make_batch):
    module = tiny_module(cls=CAFTModule, heads_coefficient=1.0, schedule="constant", finetune_heads=False)
    batch = make_batch()
    module.compute_loss(batch, module(batch), target_mask(batch["labels"]).float()).backward()
    assert all(p.grad is None for p in module.heads.parameters())
    assert not any(name.startswith("heads.") for name in module.trainable_parameters())
    tuned = tiny_module(cls=CAFTModule, heads_coefficient=1.0, schedule="constant", finetune_heads=True)
    tuned.compute_loss(batch, tuned(batch), target_mask(batch["labels"]).float()).backward()
    assert all(p.grad is not None for p in tuned.heads.parameters())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_head_block_is_causal(tiny_module, attn):
    module = tiny_module(cls=CAFTModule)
    module.heads.config._attn_implementation = attn
    for block in module.heads.blocks:
        block.self_attn.config._attn_implementation = attn
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 7:] = 0  # right padding
    base = module.heads(hidden, mask)
    changed = hidden.clone()
    changed[:, 5] += 3.0  # perturb input position t+1 = 5
    after = module.heads(changed, mask)
    for a, b in zip(base, after):
        assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6)  # positions <= t unchanged
        assert not torch.allclose(a[:, 5:7], b[:, 5:7])


def test_export_is_the_plain_base_model_with_the_main_head_logits(tiny_module, make_batch, tmp_path):
    from transformers import AutoModelForCausalLM

    from zoo.backbone import tiny_llama

    module = tiny_module(cls=CAFTModule)
    directory = module.export(tmp_path / "export")
    loaded = AutoModelForCausalLM.from_pretrained(directory)
    base = tiny_llama()[0]
    assert type(loaded) is type(base)
    assert set(loaded.state_dict()) == set(base.state_dict())
    assert (directory / "caft_heads.pt").exists()
    batch = make_batch()
    expected = module(batch).logits()
    got = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(got, expected, atol=1e-5)


def test_head_pretraining_lowers_head_loss_and_leaves_trunk_untouched(tiny_module, make_batch):
    module = tiny_module(cls=CAFTModule, num_predict=3)
    trunk = {k: v.clone() for k, v in module.model.state_dict().items()}
    batch = make_batch(batch_size=2, length=16)
    losses = module.pretrain_heads([batch], steps=30, lr=3e-3)
    assert losses[-1] < losses[0] - 0.5
    assert all(torch.equal(trunk[k], v) for k, v in module.model.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in module.heads.parameters())


def test_heads_stage_trains_only_heads(tiny_module, tiny_data, fit_tiny):
    module = tiny_module(cls=CAFTModule, stage="heads", num_predict=3)
    assert set(module.trainable_parameters()) == {f"heads.{n}" for n, _ in module.heads.named_parameters()}
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    fit_tiny(module, tiny_data(), max_steps=2)
    assert all(torch.equal(before[k], v) for k, v in module.model.state_dict().items())


def test_fit_with_head_pretraining_runs(tiny_module, tiny_data, fit_tiny):
    module = tiny_module(cls=CAFTModule, head_pretrain_steps=3)
    trainer = fit_tiny(module, tiny_data(), max_steps=2)
    assert module._heads_ready and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert isinstance(module, CausalLMModule)


def test_head_pretraining_runs_in_the_fits_autocast_under_bf16_mixed(tiny_module, tiny_data, fit_tiny):
    """Head pre-training runs at fit start, outside Lightning's step: under bf16-mixed it gets the step's
    autocast too (not fp32 matmuls)."""
    module = tiny_module(cls=CAFTModule, head_pretrain_steps=2)
    seen = []
    module.heads.register_forward_pre_hook(
        lambda *_: seen.append((module._heads_ready, torch.is_autocast_enabled("cpu"))))
    fit_tiny(module, tiny_data(), max_steps=1, precision="bf16-mixed")
    pretraining = [autocast for ready, autocast in seen if not ready]
    assert pretraining and all(pretraining)


def _prompted_real_hidden(module, batch, num_virtual):
    """Final hidden states at the real positions of a peft prompt-tuned model, computed by hand: the prompt
    prepended to the embeddings, the decoder run, the first ``num_virtual`` columns dropped."""
    from zoo import backbone

    peft_model = module.model
    prompt = peft_model.get_prompt(batch["input_ids"].shape[0])
    embeds = torch.cat([prompt, peft_model.get_input_embeddings()(batch["input_ids"])], 1)
    mask = torch.cat([torch.ones_like(batch["attention_mask"][:, :num_virtual]), batch["attention_mask"]], 1)
    body = backbone.decoder(peft_model)
    return body(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state[:, num_virtual:]


def test_heads_see_only_the_real_positions_under_a_prompt_tuning_adapter(tiny_module, make_batch):
    from zoo.errors import TrainingError
    from zoo.modules.adapters import Peft

    module = tiny_module(cls=CAFTModule, heads_coefficient=1.0, schedule="constant", num_predict=3,
                         adapter=Peft({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}))
    batch = make_batch(batch_size=2, length=12)
    seen = []
    module.heads.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    weights = target_mask(batch["labels"]).float()
    loss = module.compute_loss(batch, module(batch), weights)
    expected_hidden = _prompted_real_hidden(module, batch, 4)
    assert seen[0].shape == (2, 12, 64) and torch.allclose(seen[0], expected_hidden, atol=1e-5)
    loss.backward()  # the aux loss reaches the soft prompt, the only trainable tensor
    assert set(module.trainable_parameters()) == {n for n, p in module.named_parameters() if "prompt_encoder" in n}
    assert all(p.grad is not None for p in module.trainable_parameters().values())
    with pytest.raises(TrainingError, match="real positions"):  # virtual columns left in: refused
        module.auxiliary_losses(batch, torch.cat([expected_hidden[:, :4], expected_hidden], 1), weights)


def test_heads_are_copied_from_the_plain_backbone_not_the_lora_wrapped_one(tiny_module):
    from zoo.backbone import decoder_layers, tiny_llama
    from zoo.modules.adapters import LoRA

    module = tiny_module(cls=CAFTModule, adapter=LoRA(r=4, lora_alpha=8), num_predict=3)
    assert not any("lora" in name for name, _ in module.heads.named_parameters())
    source = decoder_layers(tiny_llama()[0])[-2].state_dict()
    for block in module.heads.blocks:
        assert block.state_dict().keys() == source.keys()
        assert all(torch.equal(v, source[k]) for k, v in block.state_dict().items())
    assert all("lora_" in name for name in module.trainable_parameters())


def test_zoo_load_of_an_export_rebuilds_caft_with_its_pretrained_heads(tiny_module, tiny_data, fit_tiny, tmp_path):
    import zoo

    module = tiny_module(cls=CAFTModule, num_predict=3, head_pretrain_steps=3, head_pretrain_lr=1e-2)
    fresh_heads = {k: v.clone() for k, v in module.heads.state_dict().items()}
    data = tiny_data()
    fit_tiny(module, data, max_steps=2)
    directory = module.export(tmp_path / "export")
    loaded = zoo.load(directory)
    assert type(loaded) is CAFTModule and loaded._heads_ready and loaded.hparams.head_pretrain_steps == 0
    trained = module.heads.state_dict()
    assert any(not torch.equal(fresh_heads[k], v) for k, v in trained.items())  # pre-training moved them
    assert all(torch.equal(trained[k], v) for k, v in loaded.heads.state_dict().items())
    batch = next(iter(data.val_dataloader()))
    module.eval()
    with torch.no_grad():
        weights = target_mask(batch["labels"]).float()
        live = [loss.item() for loss in module.auxiliary_losses(batch, module(batch).hidden, weights)]
        again = [loss.item() for loss in loaded.auxiliary_losses(batch, loaded(batch).hidden, weights)]
    assert again == pytest.approx(live, abs=1e-5)
