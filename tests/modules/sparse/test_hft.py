"""HFT (spec 21) invariants: selection structure, determinism, frozen-means-frozen, optimizer contents,
half-reset, and resume mid-run equals an uninterrupted run."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import LlamaConfig, LlamaForCausalLM

from tests.modules.sparse._helpers import ordered_data, snapshot, trainer
from zoo.modules.sparse.hft import HalfFineTuningCallback, block_units, half_reset, hft_selection


def four_layer_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def test_selection_structure_per_layer():
    model = four_layer_llama()
    chosen = hft_selection(model, seed=3)
    ffn_counts = []
    for units in block_units(model):
        picked = {cat: sum(all(n in chosen for n in u) for u in group) for cat, group in units.items()}
        assert len(units["attention"]) == 4 and picked["attention"] == 2
        assert len(units["norm"]) == 2 and picked["norm"] == 1
        ffn_counts.append(picked["ffn"])
        # units are all-or-nothing
        for group in units.values():
            for unit in group:
                assert len({n in chosen for n in unit}) == 1
    assert sorted(ffn_counts) == [1, 1, 2, 2]  # floor(L/2) = 2 layers train 2 of {gate, up, down}
    params = dict(model.named_parameters())
    block = {n for units in block_units(model) for g in units.values() for u in g for n in u}
    fraction = sum(params[n].numel() for n in block & chosen) / sum(params[n].numel() for n in block)
    assert 0.45 <= fraction <= 0.55
    outside = set(params) - block
    assert outside == {"model.embed_tokens.weight", "model.norm.weight"} and outside <= chosen


def test_same_seed_same_selection_new_stage_new_selection():
    model = four_layer_llama()
    assert hft_selection(model, seed=1, stage=0) == hft_selection(model, seed=1, stage=0)
    assert hft_selection(model, seed=1, stage=0) != hft_selection(model, seed=1, stage=1)


def test_frozen_tensors_bitwise_unchanged_with_weight_decay(tiny_module, tiny_data, fit_tiny):
    module = tiny_module(weight_decay=0.1, lr=1e-2)
    before = snapshot(module)
    callback = HalfFineTuningCallback(seed=0)
    trainer_ = fit_tiny(module, tiny_data(), callbacks=[callback], max_steps=4)
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert frozen and frozen == callback.frozen
    for name, p in module.named_parameters():
        if name in frozen:
            assert torch.equal(p, before[name]), name
        elif p.ndim >= 2:
            assert not torch.equal(p, before[name]), name
    # optimizer holds exactly the selected tensors, each once
    opt_params = [p for g in trainer_.optimizers[0].param_groups for p in g["params"]]
    assert len(opt_params) == len({id(p) for p in opt_params})
    assert {id(p) for p in opt_params} == {id(p) for p in module.trainable_parameters().values()}


def test_optimizer_state_about_half_of_full_finetuning_on_blocks(tiny_module, tiny_data, fit_tiny):
    def block_state(callbacks):
        module = tiny_module()
        trainer_ = fit_tiny(module, tiny_data(), callbacks=callbacks, max_steps=1)
        block = {n for units in block_units(module) for g in units.values() for u in g for n in u}
        ids = {id(p) for n, p in module.named_parameters() if n in block}
        state = trainer_.optimizers[0].state
        return sum(t.numel() for p, s in state.items() if id(p) in ids for t in s.values() if t.ndim > 0)

    ratio = block_state([HalfFineTuningCallback(seed=0)]) / block_state([])
    assert 0.3 < ratio < 0.7  # tiny-llama has GQA (k, v smaller than q, o): not exactly 0.5


def test_half_reset_restores_exactly_the_selected_tensors():
    base, tuned = four_layer_llama(0), four_layer_llama(1)
    tuned_before = snapshot(tuned)
    reset = half_reset(tuned, base, seed=5)
    assert reset == hft_selection(tuned, seed=5) & {n for u in block_units(tuned) for g in u.values()
                                                    for x in g for n in x}
    base_params = dict(base.named_parameters())
    for name, p in tuned.named_parameters():
        expected = base_params[name] if name in reset else tuned_before[name]
        assert torch.equal(p, expected), name


def _run(tmp_path, tiny_module, tiny_data, ckpt_path=None, checkpoint=None):
    L.seed_everything(0, verbose=False)
    module = tiny_module(weight_decay=0.1, lr=1e-2)
    callbacks = [HalfFineTuningCallback(seed=0, reselect="epoch")] + ([checkpoint] if checkpoint else [])
    t = trainer(tmp_path, callbacks, max_epochs=3, enable_checkpointing=checkpoint is not None)
    t.fit(module, datamodule=ordered_data(tiny_data), ckpt_path=ckpt_path)
    return module, callbacks[0], t


def test_resume_mid_run_equals_uninterrupted(tmp_path, tiny_module, tiny_data):
    full, full_cb, _ = _run(tmp_path / "a", tiny_module, tiny_data,
                            checkpoint=ModelCheckpoint(dirpath=tmp_path / "ck", save_top_k=-1,
                                                       every_n_epochs=1))
    first = sorted((tmp_path / "ck").glob("epoch=1*.ckpt"))[0]
    resumed, resumed_cb, _ = _run(tmp_path / "b", tiny_module, tiny_data, ckpt_path=str(first))
    assert full_cb.stage == resumed_cb.stage == 2
    assert full_cb.frozen == resumed_cb.frozen
    full_params = dict(full.named_parameters())
    for name, p in resumed.named_parameters():
        assert torch.equal(p, full_params[name]), name
        assert p.requires_grad == full_params[name].requires_grad


def test_select_embeddings_treats_tied_matrix_as_one_unit():
    model = four_layer_llama()
    draws = [hft_selection(model, seed=s, select_embeddings=True) for s in range(12)]
    picked = ["model.embed_tokens.weight" in d for d in draws]
    assert any(picked) and not all(picked)  # drawn like a unit, not always trained
    assert all("lm_head.weight" not in d for d in draws)  # tied: one tensor, one name


def _facts(n: int, seed: int, vocab: int = 200) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randint(0, vocab, (n, 3), generator=g),
                      torch.randint(0, vocab, (n, 1), generator=g)], 1)


def _train(model, data, steps, params, lr=3e-3):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(input_ids=data).logits[:, -2], data[:, -1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _accuracy(model, data) -> float:
    with torch.no_grad():
        return (model(input_ids=data).logits[:, -2].argmax(-1) == data[:, -1]).float().mean().item()


@pytest.mark.slow
def test_hft_forgets_less_of_task_a_than_full_finetuning():
    """Spec check 6 (direction only, 3 seeds): learn key->value facts A, then facts B with FFT vs HFT."""
    from zoo.backbone import tiny_llama

    kept, learned = {"fft": [], "hft": []}, {"fft": [], "hft": []}
    for seed in range(3):
        for mode in ("fft", "hft"):
            model, _ = tiny_llama(seed=seed, layers=4)
            task_a, task_b = _facts(64, 100 + seed), _facts(64, 200 + seed)
            _train(model, task_a, 300, list(model.parameters()))
            if mode == "hft":
                chosen = hft_selection(model, seed=seed)
                for name, p in model.named_parameters():
                    p.requires_grad_(name in chosen)
            _train(model, task_b, 150, [p for p in model.parameters() if p.requires_grad])
            kept[mode].append(_accuracy(model, task_a))
            learned[mode].append(_accuracy(model, task_b))
    assert sum(kept["hft"]) > sum(kept["fft"])
    assert sum(learned["hft"]) / 3 >= sum(learned["fft"]) / 3 - 0.1
