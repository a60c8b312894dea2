"""PeftModule: only adapter parameters train, the adapter export reloads with peft and gives the same
logits."""

from __future__ import annotations

import pytest
import torch

from zoo import backbone
from zoo.errors import ConfigError
from zoo.modules.peft_module import PeftModule

LORA = {"peft_type": "lora", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"}


def test_lora_trains_only_adapter_parameters(tiny_module, tiny_data, fit_tiny):
    module = tiny_module(cls=PeftModule, peft_config=LORA)
    names = set(module.trainable_parameters())
    assert names and all("lora_" in n for n in names)
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if n not in names}
    fresh, _ = backbone.tiny_llama()
    base = backbone.base_model(module.model)
    # The frozen base is the untouched backbone (LoRA layers wrap it as `base_layer`).
    for name, value in fresh.state_dict().items():
        wrapped = name.replace(".weight", ".base_layer.weight") if name not in base.state_dict() else name
        assert torch.equal(base.state_dict()[wrapped], value), name

    trainer = fit_tiny(module, tiny_data(), max_steps=2)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in module.trainable_parameters().values()}
    params = dict(module.named_parameters())
    for name, before in frozen_before.items():
        assert torch.equal(params[name], before), name
    lora_b = [p for n, p in params.items() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero, so it trained


def test_lora_export_reloads_with_peft_and_gives_the_same_logits(tiny_module, tiny_data, fit_tiny, tmp_path,
                                                                   make_batch):
    from peft import PeftModel

    module = tiny_module(cls=PeftModule, peft_config=LORA, export=True)
    fit_tiny(module, tiny_data(), max_steps=2)
    export = tmp_path / "export"
    assert (export / "adapter_config.json").exists() and (export / "tokenizer.json").exists()
    assert not (export / "model.safetensors").exists()  # the adapter, not a full copy

    base, _ = backbone.tiny_llama()
    reloaded = PeftModel.from_pretrained(base, export).eval()
    untuned, _ = backbone.tiny_llama()
    ids = make_batch(batch_size=2, length=10)["input_ids"]
    module.model.eval()
    with torch.no_grad():
        expected = module.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        base_logits = untuned.eval()(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(base_logits, expected, atol=1e-6)  # the adapter does something


@pytest.mark.parametrize("config", [
    {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"],
     "feedforward_modules": ["down_proj"]},
    {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4},
])
def test_other_peft_types_train_one_step(tiny_module, tiny_data, fit_tiny, config):
    module = tiny_module(cls=PeftModule, peft_config=config)
    trainable = {n: p.detach().clone() for n, p in module.trainable_parameters().items()}
    total = sum(p.numel() for p in module.parameters())
    assert 0 < sum(p.numel() for p in trainable.values()) < total / 10
    fit_tiny(module, tiny_data(), max_steps=1)
    after = module.trainable_parameters()
    assert any(not torch.equal(after[n], v) for n, v in trainable.items())


def test_peft_config_without_type_is_a_config_error(tiny_module):
    with pytest.raises(ConfigError, match="peft_type"):
        tiny_module(cls=PeftModule, peft_config={"r": 4})


def test_invalid_peft_field_is_a_config_error(tiny_module):
    with pytest.raises(ConfigError, match="invalid peft_config"):
        tiny_module(cls=PeftModule, peft_config={"peft_type": "LORA", "rank_typo": 4})


def test_lora_checkpoint_holds_only_the_adapter_and_round_trips(tiny_module, tiny_data, fit_tiny, tmp_path):
    module = tiny_module(cls=PeftModule, peft_config=LORA)
    trainer = fit_tiny(module, tiny_data(), max_steps=2)
    trainer.save_checkpoint(tmp_path / "lora.ckpt")
    saved = torch.load(tmp_path / "lora.ckpt", weights_only=False)
    assert saved["state_dict"] and all("lora_" in k for k in saved["state_dict"])
    restored = PeftModule.load_from_checkpoint(tmp_path / "lora.ckpt")
    reference = module.state_dict()
    assert restored.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in restored.state_dict().items())
