"""DPO baseline invariants."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.backbone import tiny_llama
from zoo.datamodules.preference import PreferenceDataModule, split_pairs
from zoo.modules.adapters import Adapter, LoRA, Peft
from zoo.modules.base import target_mask
from zoo.modules.objectives.dpo import DPOModule, dpo_loss


@pytest.fixture(scope="module")
def pref_data():
    data = PreferenceDataModule(tokenizer="tiny-llama", num_train=8, num_val=2, num_test=4, max_length=256,
                                batch_size=4, eval_batch_size=4)
    data.setup("fit")
    return data


def test_dpo_loss_hand_value():
    loss, chosen, rejected = dpo_loss(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0]), beta=0.5)
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(1.5))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(chosen, torch.tensor([0.5, -1.0])) and torch.allclose(rejected, torch.tensor([0.0, 0.5]))


def test_policy_equal_to_reference_gives_log2_and_zero_rewards(tiny_module, pref_data):
    module = tiny_module(cls=DPOModule)
    batch = next(iter(pref_data.train_dataloader()))
    loss = module.compute_loss(batch, module(batch), target_mask(batch["labels"]).float())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert torch.all(module.sequence_rewards(batch) == 0)


def test_reference_logps_equal_naive_hf_log_softmax(tiny_module, pref_data):
    module = tiny_module(cls=DPOModule)
    with torch.no_grad():  # make the policy differ from the reference
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = next(iter(pref_data.train_dataloader()))
    mask = target_mask(batch["labels"]).float()
    ref = module.reference_token_logps(batch, mask).sum(1)
    logits = module.reference_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["labels"][:, 1:].clamp_min(0)[..., None])[..., 0]
    assert torch.allclose(ref, (logp * mask[:, 1:]).sum(1), atol=1e-4)
    ratios = module.token_logratios(batch, module(batch), mask)
    assert ratios.abs().sum() > 0  # the perturbed policy is not the reference


def test_training_raises_margin_and_keeps_reference_frozen(tiny_module, pref_data, fit_tiny):
    module = tiny_module(cls=DPOModule, lr=3e-3, beta=0.5)
    reference = {k: v.clone() for k, v in module.reference_model.state_dict().items()}
    assert not any(k.startswith("reference_model.") for k in module.trainable_parameters())
    before = pref_data.preference_metrics(module, split="train")
    fit_tiny(module, pref_data, max_steps=20)
    after = pref_data.preference_metrics(module, split="train")
    assert before["reward_margin"] == 0.0 and after["reward_margin"] > 0.0
    assert before["logp_margin"] != 0.0  # policy = reference: implicit reward 0, its own log-probs still differ
    assert after["reward_accuracy"] > 0.5
    assert all(torch.equal(reference[k], v) for k, v in module.reference_model.state_dict().items())


class EmbeddingShift(Adapter):
    """A test adapter that cannot be switched off: ``attach`` freezes the backbone and hooks its input
    embeddings in place (every embedding + a trainable vector), so a copy of the backbone taken after attaching
    would carry the shift."""

    def __init__(self, value: float = 0.5) -> None:
        super().__init__()
        self.value = value

    def attach(self, model, tokenizer):
        self.bind(model.requires_grad_(False), tokenizer)
        self.shift = torch.nn.Parameter(torch.full((model.config.hidden_size,), self.value))
        model.get_input_embeddings().register_forward_hook(self._add_shift)
        return model

    def _add_shift(self, _module, _args, output):
        return output + self.shift


def _naive_logps(model, batch, inputs_embeds=None):
    """(B,) summed log p of the supervised targets from a plain HF forward (log_softmax of the logits)."""
    inputs = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": batch["input_ids"]}
    with torch.no_grad():
        logits = model(**inputs, attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["labels"][:, 1:].clamp_min(0)[..., None])[..., 0]
    return (logp * target_mask(batch["labels"])[:, 1:]).sum(1)


def test_lora_policy_uses_the_adapter_switched_off_as_reference(tiny_module, pref_data):
    module = tiny_module(cls=DPOModule, adapter=LoRA(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert module.reference_model is None  # no second copy of the weights
    batch = next(iter(pref_data.train_dataloader()))
    loss = module.compute_loss(batch, module(batch), target_mask(batch["labels"]).float())
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0 at init: policy == base
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    mask = target_mask(batch["labels"]).float()
    base = tiny_llama()[0].eval()
    assert torch.allclose(module.reference_token_logps(batch, mask).sum(1), _naive_logps(base, batch), atol=1e-4)
    chosen, rejected = split_pairs(module.sequence_rewards(batch))
    assert chosen.abs().sum() > 0
    assert isinstance(module.adapter, LoRA) and module.adapter.model is module.model  # rebound after the swap


def test_peft_prompt_tuning_reference_is_the_base_without_virtual_tokens(tiny_module, pref_data):
    adapter = Peft({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 3})
    module = tiny_module(cls=DPOModule, adapter=adapter)
    assert module.reference_model is None
    batch = next(iter(pref_data.train_dataloader()))
    mask = target_mask(batch["labels"]).float()
    base = tiny_llama()[0].eval()
    assert torch.allclose(module.reference_token_logps(batch, mask).sum(1), _naive_logps(base, batch), atol=1e-4)
    policy = -module.weighted_token_loss(module(batch), mask).sum(1)
    assert not torch.allclose(policy, _naive_logps(base, batch), atol=1e-3)  # the prompt is on for the policy


def test_unswitchable_adapter_gets_a_frozen_copy_of_the_backbone_taken_before_attaching(tiny_module, pref_data,
                                                                                           fit_tiny):
    module = tiny_module(cls=DPOModule, adapter=EmbeddingShift(0.5), lr=1e-2)
    assert module.reference_model is not None and module.reference_model is not module.model
    assert not any(p.requires_grad for p in module.reference_model.parameters())
    assert set(module.trainable_parameters()) == {"adapter.shift"}
    batch = next(iter(pref_data.train_dataloader()))
    mask = target_mask(batch["labels"]).float()
    base = tiny_llama()[0].eval()
    embeds = base.get_input_embeddings()(batch["input_ids"]) + 0.5
    assert torch.allclose(module.reference_token_logps(batch, mask).sum(1), _naive_logps(base, batch), atol=1e-4)
    policy = -module.weighted_token_loss(module(batch), mask).sum(1)
    assert torch.allclose(policy, _naive_logps(base, batch, inputs_embeds=embeds), atol=1e-4)
    reference = {k: v.clone() for k, v in module.reference_model.state_dict().items()}
    backbone_before = {k: v.clone() for k, v in module.model.state_dict().items()}
    fit_tiny(module, pref_data, max_steps=2)
    assert not torch.equal(module.adapter.shift, torch.full_like(module.adapter.shift, 0.5))
    assert all(torch.equal(reference[k], v) for k, v in module.reference_model.state_dict().items())
    assert all(torch.equal(backbone_before[k], v) for k, v in module.model.state_dict().items())
    assert module.adapter.model is module.model


def test_reference_folder_is_used_with_an_adapter(tiny_module, pref_data, tmp_path):
    other, tokenizer = tiny_llama(seed=3)
    other.save_pretrained(tmp_path / "ref")
    tokenizer.save_pretrained(tmp_path / "ref")
    module = tiny_module(cls=DPOModule, adapter=LoRA(r=4, lora_alpha=8), reference=str(tmp_path / "ref"))
    assert module.reference_model is not None and not any(p.requires_grad for p in module.reference_model.parameters())
    batch = next(iter(pref_data.train_dataloader()))
    mask = target_mask(batch["labels"]).float()
    expected = _naive_logps(other.eval(), batch)
    assert torch.allclose(module.reference_token_logps(batch, mask).sum(1), expected, atol=1e-4)


def test_peft_config_argument_is_gone_with_a_pointer_to_adapters(tiny_module):
    from zoo.errors import ConfigError

    with pytest.raises(ConfigError, match="adapter"):
        tiny_module(cls=DPOModule, peft_config={"peft_type": "LORA"})


def test_non_preference_batch_is_rejected_with_a_clear_error(tiny_module, make_batch):
    from zoo.errors import ConfigError

    module = tiny_module(cls=DPOModule)
    batch = make_batch()
    with pytest.raises(ConfigError, match="PreferenceDataModule"):
        module.compute_loss(batch, module(batch), target_mask(batch["labels"]).float())
