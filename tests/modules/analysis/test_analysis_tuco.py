"""TuCo (spec 10): the components split the fine-tuned residual stream exactly; FTCScaler endpoints."""

from __future__ import annotations

import copy

import pytest
import torch

from zoo import backbone
from zoo.modules.analysis.tuco import BlockPair, FTCScaler, decompose, encode_prompts, module_tuco, tuco


def perturbed(model, scale=0.05, seed=1):
    """A 'fine-tuned' copy: every block weight moved by a random delta (embeddings, norm, head shared)."""
    tuned = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in backbone.decoder_layers(tuned).parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return tuned


@pytest.fixture(scope="module")
def models():
    base, tokenizer = backbone.tiny_llama(layers=3)
    base = base.double().eval()
    return base, perturbed(base).eval(), tokenizer


@pytest.fixture(scope="module")
def batch(models):
    return encode_prompts(models[2], ["What is 2 + 3?", "Name a colour", "x"], chat=True)


def test_components_sum_to_the_tuned_hidden_states_at_every_layer(models, batch):
    base, tuned, _ = models
    ids, mask = batch["input_ids"], batch["attention_mask"]
    result = decompose(BlockPair(tuned, base=base), lambda: tuned(input_ids=ids, attention_mask=mask))
    reference = tuned(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    layers = len(backbone.decoder_layers(tuned))
    assert result.ptc.shape[0] == layers
    for layer in range(layers):  # HF hidden_states[l] = the input of block l (pre-norm residual)
        torch.testing.assert_close(result.residual(layer), reference[layer], rtol=0, atol=1e-12)
    final_norm = backbone.decoder(tuned).norm  # hidden_states[L] is after the final norm
    torch.testing.assert_close(final_norm(result.residual(layers)), reference[layers], rtol=0, atol=1e-12)
    assert result.ftc.abs().max() > 1e-3  # the perturbation is visible, so the check above is not vacuous


def test_ptc_is_the_base_block_on_the_tuned_trajectory(models, batch):
    base, tuned, _ = models
    ids, mask = batch["input_ids"], batch["attention_mask"]
    result = decompose(BlockPair(tuned, base=base), lambda: tuned(input_ids=ids, attention_mask=mask))
    # layer 0 sees the shared embedding: PTC_0 is the base model's own first block update
    base_states = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    real = mask.bool()
    own_update = (base_states[1] - base_states[0])[real]
    torch.testing.assert_close(result.ptc[0][real], own_update, rtol=0, atol=1e-12)
    # deeper layers: the base trajectory differs from the tuned one, so PTC_1 != base's own update there
    assert not torch.allclose(result.ptc[1][real], (base_states[2] - base_states[1])[real], atol=1e-6)


def test_identical_models_give_zero_ftc_and_zero_tuco(models, batch):
    base, _, _ = models
    same = copy.deepcopy(base)
    result = decompose(BlockPair(same, base=base),
                       lambda: same(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
    assert torch.count_nonzero(result.ftc) == 0
    ratio, ptc_norms, ftc_norms = tuco(result, batch["last"])
    assert torch.equal(ratio, torch.zeros_like(ratio)) and bool((ptc_norms > 0).all())


def test_tuco_ratio_hand_computed(models, batch):
    base, tuned, _ = models
    result = decompose(BlockPair(tuned, base=base), lambda: tuned(input_ids=batch["input_ids"],
                                                                  attention_mask=batch["attention_mask"]))
    ratio, _, _ = tuco(result, batch["last"])
    for row, last in enumerate(batch["last"].tolist()):
        i_ptc = sum(result.ptc[layer, row, last] for layer in range(result.ptc.shape[0]))
        i_ftc = sum(result.ftc[layer, row, last] for layer in range(result.ftc.shape[0]))
        expected = i_ftc.abs().sum() / (i_ptc.abs().sum() + i_ftc.abs().sum())
        assert 0 < float(ratio[row]) < 1
        assert float(ratio[row]) == pytest.approx(float(expected), rel=1e-12)


def test_tuco_grows_with_the_size_of_the_update(models, batch):
    base, _, _ = models
    values = []
    for scale in (0.01, 0.03, 0.1):
        tuned = perturbed(base, scale=scale, seed=3)
        result = decompose(BlockPair(tuned, base=base), lambda t=tuned: t(input_ids=batch["input_ids"],
                                                                            attention_mask=batch["attention_mask"]))
        values.append(tuco(result, batch["last"])[0])
    assert bool((values[0] < values[1]).all() and (values[1] < values[2]).all())


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_ftc_scaler_endpoints(models, batch, alpha):
    base, tuned, _ = models
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with FTCScaler(alpha).applied(BlockPair(tuned, base=base)):
        scaled = tuned(input_ids=ids, attention_mask=mask).logits
    reference = (tuned if alpha == 1.0 else base)(input_ids=ids, attention_mask=mask).logits
    other = (base if alpha == 1.0 else tuned)(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(scaled[real], reference[real], rtol=0, atol=1e-10)
    assert (scaled[real] - other[real]).abs().max() > 1e-4
    with FTCScaler(2.0).applied(BlockPair(tuned, base=base)):  # amplification moves past the tuned model
        amplified = tuned(input_ids=ids, attention_mask=mask).logits
    assert (amplified[real] - reference[real]).abs().max() > 1e-4


def test_peft_path_equals_two_copies(tiny_module):
    from zoo.modules.adapters import LoRA

    module = tiny_module(adapter=LoRA(r=4, target_modules=["q_proj", "v_proj", "down_proj"])).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    base = tiny_module().eval()  # the same random backbone (seeded) as a second copy
    batch = encode_prompts(module.tokenizer, ["What is 2 + 3?", "hello there"], chat=True)
    shared, last = module_tuco(module, batch)
    separate, last2 = module_tuco(module, batch, base=base)
    assert torch.equal(last, last2)
    torch.testing.assert_close(shared.ptc, separate.ptc, rtol=0, atol=1e-5)
    torch.testing.assert_close(shared.ftc, separate.ftc, rtol=0, atol=1e-5)
    ratio = tuco(shared, last)[0]
    assert bool((ratio > 0).all()) and bool((ratio < 1).all())
    with module.adapter.disabled():  # the base context really switches LoRA off
        ids, mask = batch["input_ids"], batch["attention_mask"]
        torch.testing.assert_close(module.model(input_ids=ids, attention_mask=mask).logits,
                                   base.model(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-5)


def test_ftc_scaler_cached_decoding_equals_recompute(models):
    """Under KV caching the base blocks keep their own cache: cached greedy decoding == uncached."""
    from zoo import decoding

    base, tuned, tokenizer = models
    with FTCScaler(0.5).applied(BlockPair(tuned, base=base)):
        cached = decoding.generate(tuned, tokenizer, ["What is 2 + 3?"], max_new_tokens=6, use_cache=True)
        again = decoding.generate(tuned, tokenizer, ["What is 2 + 3?"], max_new_tokens=6, use_cache=True)
        uncached = decoding.generate(tuned, tokenizer, ["What is 2 + 3?"], max_new_tokens=6, use_cache=False)
    assert cached == uncached == again


@pytest.mark.parametrize("with_lora", [True, False])
def test_tuco_callback_logs_during_fit(tiny_module, tmp_path, with_lora):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from zoo.datamodules import SFTDataModule
    from zoo.modules.adapters import LoRA
    from zoo.modules.analysis import TuCoCallback

    module = tiny_module(lr=5e-2, **({"adapter": LoRA(r=4)} if with_lora else {}))
    data = SFTDataModule(dataset="chain_sum", tokenizer="tiny-llama", num_train=8, num_val=2, num_test=2,
                         max_length=128, batch_size=2)
    callback = TuCoCallback(probes=["What is 2 + 3?", "hi"], every_n_steps=2)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=CSVLogger(tmp_path),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, datamodule=data)
    steps = [step for step, _ in callback.history]
    assert steps == [2, 4, 5]  # every 2 optimizer steps, and at the end of fit
    values = [v for _, v in callback.history]
    assert all(0.0 < v < 1.0 for v in values)  # fine-tuning moved the blocks, but is not everything
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "tuco/mean" in metrics
