"""Masked Thought invariants (spec 18, "Small-scale check" items 1-7)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from zoo.modules.token_level.masked_thought import MaskedThoughtCallback, add_mask_token, mask_rate


class _Recorder:
    def log(self, *args, **kwargs):
        pass


def _fake_trainer(step: int = 0, total: int = 100):
    return SimpleNamespace(global_step=step, estimated_stepping_batches=total, global_rank=0)


def _padded_batch(generator: torch.Generator, batch: int = 4, width: int = 24):
    """Random rows: prompt of random length, response, then right padding (segments 1/2/3/0)."""
    ids = torch.randint(0, 256, (batch, width), generator=generator)
    labels = torch.full_like(ids, -100)
    segments = torch.zeros_like(ids)
    attention = torch.zeros_like(ids)
    for row in range(batch):
        prompt = int(torch.randint(2, 8, (1,), generator=generator))
        length = int(torch.randint(prompt + 2, width + 1, (1,), generator=generator))
        answer = int(torch.randint(prompt + 1, length, (1,), generator=generator))
        attention[row, :length] = 1
        segments[row, :prompt], segments[row, prompt:answer], segments[row, answer:length] = 1, 2, 3
        labels[row, prompt:length] = ids[row, prompt:length]
    ids = torch.where(attention.bool(), ids, torch.full_like(ids, 257))
    return {"input_ids": ids, "attention_mask": attention, "labels": labels, "segments": segments,
            "index": torch.arange(batch)}


def _random_mode_callback(**kwargs):
    callback = MaskedThoughtCallback(corruption="random_token", **kwargs)
    callback.id_range = (0, 256)
    return callback


def test_rate_zero_training_is_bit_identical_to_plain_sft(tiny_module, tiny_data, fit_tiny):
    plain = tiny_module()
    fit_tiny(plain, tiny_data(), max_steps=2)
    masked = tiny_module()
    fit_tiny(masked, tiny_data(), callbacks=[MaskedThoughtCallback(max_rate=0.0, corruption="random_token")],
             max_steps=2)
    for (name, a), (_, b) in zip(plain.named_parameters(), masked.named_parameters()):
        assert torch.equal(a, b), name


def test_labels_prompt_and_padding_never_change_over_1000_batches():
    generator = torch.Generator().manual_seed(0)
    for mode in ("random_token", "mask_token"):
        for positions in ("response", "reasoning"):
            callback = MaskedThoughtCallback(max_rate=0.7, warmup_ratio=0.0, corruption=mode,
                                             positions=positions)
            callback.id_range, callback.mask_id = (0, 256), 258
            for step in range(250):
                batch = _padded_batch(generator)
                original = {k: v.clone() for k, v in batch.items()}
                callback.on_train_batch_start(_fake_trainer(step), _Recorder(), batch, step)
                assert torch.equal(batch["labels"], original["labels"])
                assert torch.equal(batch["segments"], original["segments"])
                frozen = ((original["segments"] <= 1)
                          | (positions == "reasoning") & (original["segments"] == 3))
                assert torch.equal(batch["input_ids"][frozen], original["input_ids"][frozen])
                assert torch.equal(batch["clean_input_ids"], original["input_ids"])


def test_fraction_of_modified_response_positions_matches_rate_and_mask_id():
    generator = torch.Generator().manual_seed(1)
    rate, warmup_ratio, total, step = 0.3, 0.5, 100, 25  # rate_t = 0.3 * 25 / 50 = 0.15
    callback = MaskedThoughtCallback(max_rate=rate, warmup_ratio=warmup_ratio, corruption="mask_token")
    callback.mask_id = 258
    changed, allowed = 0, 0
    for batch_idx in range(300):
        batch = _padded_batch(generator)
        original = batch["input_ids"].clone()
        callback.on_train_batch_start(_fake_trainer(step, total), _Recorder(), batch, batch_idx)
        response = original != batch["input_ids"]
        assert (batch["input_ids"][response] == 258).all()
        changed += int(response.sum())
        allowed += int(((batch["labels"] != -100) & batch["attention_mask"].bool()).sum())
    expected = 0.15
    standard_error = math.sqrt(expected * (1 - expected) / allowed)
    assert abs(changed / allowed - expected) < 3 * standard_error


def test_schedule_endpoints_and_plateau():
    assert mask_rate(0, 90, max_rate=0.4, warmup_ratio=0.66) == 0.0
    warmup_end = 0.5 * 100
    assert mask_rate(int(warmup_end), 100, max_rate=0.4, warmup_ratio=0.5) == 0.4
    assert mask_rate(25, 100, max_rate=0.4, warmup_ratio=0.5) == 0.2
    assert mask_rate(99, 100, max_rate=0.4, warmup_ratio=0.5) == 0.4
    assert mask_rate(0, 100, max_rate=0.4, warmup_ratio=0.0) == 0.4


class _RateLog(MaskedThoughtCallback):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen: list[tuple[int, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.seen.append((trainer.global_step, self.last_rate))


def test_resume_restores_the_rate(tiny_module, tiny_data, fit_tiny, tmp_path):
    options = dict(max_rate=0.4, warmup_ratio=1.0, corruption="random_token")
    full = _RateLog(**options)
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    fit_tiny(tiny_module(), tiny_data(), callbacks=[full, saver], max_steps=4, enable_checkpointing=True)
    assert [r for _, r in full.seen] == [0.0, 0.1, 0.2, 0.30000000000000004]
    resumed = _RateLog(**options)
    checkpoint = next(p for p in (tmp_path / "ckpt").iterdir() if "step=2" in p.name)
    trainer = L.Trainer(callbacks=[resumed], max_steps=4, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(tiny_module(), datamodule=tiny_data(), ckpt_path=str(checkpoint))
    assert resumed.seen == full.seen[2:]


def test_mask_token_row_is_the_mean_of_existing_rows_tied_and_untied():
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo.backbone import byte_tokenizer, tiny_llama

    model, tokenizer = tiny_llama()
    before = model.get_input_embeddings().weight.detach().clone()
    mask_id = add_mask_token(model, tokenizer)
    assert mask_id == before.shape[0] and tokenizer.convert_ids_to_tokens(mask_id) == "<mask>"
    after = model.get_input_embeddings().weight
    torch.testing.assert_close(after[mask_id], before.mean(0))
    assert torch.equal(after[:mask_id], before)
    assert model.get_output_embeddings().weight is after

    tokenizer = byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    untied = LlamaForCausalLM(config)
    in_before = untied.get_input_embeddings().weight.detach().clone()
    out_before = untied.get_output_embeddings().weight.detach().clone()
    mask_id = add_mask_token(untied, tokenizer)
    torch.testing.assert_close(untied.get_input_embeddings().weight[mask_id], in_before.mean(0))
    torch.testing.assert_close(untied.get_output_embeddings().weight[mask_id], out_before.mean(0))
    assert add_mask_token(untied, tokenizer) == mask_id  # idempotent: no second resize
    assert untied.get_input_embeddings().weight.shape[0] == mask_id + 1


def test_validation_batches_are_never_corrupted(tiny_module, tiny_data, fit_tiny):
    from zoo.modules import CausalLMModule

    class Spy(CausalLMModule):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.val_ids, self.corrupted_train = [], 0

        def training_step(self, batch, batch_idx):
            self.corrupted_train += int((batch["input_ids"] != batch["clean_input_ids"]).sum())
            return super().training_step(batch, batch_idx)

        def validation_step(self, batch, batch_idx):
            assert "clean_input_ids" not in batch and not self.training
            self.val_ids.append(batch["input_ids"].clone())
            return super().validation_step(batch, batch_idx)

    data = tiny_data()
    module = tiny_module(cls=Spy)
    callback = MaskedThoughtCallback(max_rate=1.0, warmup_ratio=0.0, corruption="mask_token")
    fit_tiny(module, data, callbacks=[callback], max_steps=2, limit_val_batches=1, val_check_interval=1)
    assert module.corrupted_train > 0
    clean = next(iter(data.val_dataloader()))["input_ids"]
    assert module.val_ids and all(torch.equal(ids, clean) for ids in module.val_ids)


def test_drop_attention_hides_exactly_the_corrupted_positions():
    generator = torch.Generator().manual_seed(3)
    callback = MaskedThoughtCallback(max_rate=0.5, warmup_ratio=0.0, corruption="mask_token",
                                     drop_attention=True)
    callback.mask_id = 258
    batch = _padded_batch(generator, batch=8, width=32)
    attention = batch["attention_mask"].clone()
    callback.on_train_batch_start(_fake_trainer(), _Recorder(), batch, 0)
    replaced = batch["input_ids"] != batch["clean_input_ids"]
    assert replaced.any()
    assert torch.equal(batch["attention_mask"], attention * (~replaced).long())
