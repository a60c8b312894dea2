"""cDPO invariants (spec 13, "Small-scale check")."""

from __future__ import annotations

import pytest
import torch

from zoo.datamodules.preference import PreferenceDataModule, split_pairs
from zoo.modules.base import target_mask
from zoo.modules.objectives.cdpo import (
    CDPOModule,
    cdpo_loss,
    contrastive_scores,
    contrastive_token_scores,
    train_contrast_models,
)
from zoo.modules.objectives.dpo import dpo_loss


def _labels(b=2, t=6, v=5, prompt=2, seed=0):
    labels = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(seed))
    labels[:, :prompt] = -100
    return labels


def test_score_with_zero_beta_is_the_positive_models_probability():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(2, 6, 5, generator=g), torch.randn(2, 6, 5, generator=g)
    labels = _labels()
    scores = contrastive_token_scores(pos, neg, labels, beta=0.0)
    p = pos[:, :-1].softmax(-1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    mask = target_mask(labels)
    assert torch.allclose(scores[:, 1:][mask[:, 1:]], p[mask[:, 1:]])
    assert torch.all(scores[~mask] == 0)


def test_score_is_low_where_the_negative_model_prefers_the_token_and_high_when_swapped():
    labels = torch.tensor([[-100, 2]])
    pos = torch.zeros(1, 2, 4)
    neg = torch.zeros(1, 2, 4)
    pos[0, 0] = torch.tensor([4.0, 0.0, 0.0, 0.0])  # the positive model prefers token 0
    neg[0, 0] = torch.tensor([0.0, 0.0, 6.0, 0.0])  # the negative model prefers the actual token 2
    assert contrastive_token_scores(pos, neg, labels, beta=1.0)[0, 1] < 0.1
    assert contrastive_token_scores(neg, pos, labels, beta=1.0)[0, 1] > 0.9


def _ratios(seed=0, b=3, t=5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t)
    mask[:, :2] = 0
    mask[0, -1] = 0  # padding
    return (torch.randn(b, t, generator=g) * mask, torch.randn(b, t, generator=g) * mask,
            torch.rand(b, t, generator=g), torch.rand(b, t, generator=g), mask)


def test_all_weights_one_equals_sequence_dpo():
    chosen, rejected, s_c, _, mask = _ratios()
    loss, cr, rr = cdpo_loss(chosen, rejected, s_c, torch.zeros_like(s_c), mask, mask, beta=0.3, only_neg=True)
    reference, ref_c, ref_r = dpo_loss(chosen.sum(1), rejected.sum(1), beta=0.3)
    assert torch.allclose(loss, reference) and torch.allclose(cr, ref_c) and torch.allclose(rr, ref_r)


@pytest.mark.parametrize("form", ["sequence", "per_position_repo"])
def test_score_one_removes_the_rejected_gradient(form):
    chosen, rejected, s_c, _, mask = _ratios()
    rejected = rejected.clone().requires_grad_(True)
    chosen = chosen.clone().requires_grad_(True)
    cdpo_loss(chosen, rejected, s_c, torch.ones_like(s_c), mask, mask, beta=0.3, form=form)[0].backward()
    assert torch.all(rejected.grad == 0) and chosen.grad.abs().sum() > 0


@pytest.mark.parametrize("form", ["sequence", "per_position_repo"])
def test_prompt_and_padding_positions_carry_zero_weight(form):
    chosen, rejected, s_c, s_r, mask = _ratios()
    base = cdpo_loss(chosen, rejected, s_c, s_r, mask, mask, beta=0.3, only_neg=False, form=form)[0]
    noise = torch.randn(4, *mask.shape, generator=torch.Generator().manual_seed(5)) * (1 - mask)
    perturbed = cdpo_loss(chosen + noise[0], rejected + noise[1], s_c + noise[2], s_r + noise[3], mask, mask,
                          beta=0.3, only_neg=False, form=form)[0]
    assert torch.allclose(base, perturbed)


def test_per_position_repo_form_hand_value():
    chosen, rejected = torch.tensor([[0.0, 2.0]]), torch.tensor([[0.0, -1.0]])
    s_r, mask = torch.tensor([[0.0, 0.25]]), torch.tensor([[0.0, 1.0]])
    loss = cdpo_loss(chosen, rejected, torch.zeros(1, 2), s_r, mask, mask, beta=0.5, form="per_position_repo")[0]
    # position 0 (prompt): -log sigmoid(0) = log 2; position 1: -log sigmoid(0.5 * (2 + 0.75))
    expected = (torch.log(torch.tensor(2.0)) - torch.nn.functional.logsigmoid(torch.tensor(1.375))) / 2
    assert torch.allclose(loss, expected)


@pytest.fixture(scope="module")
def pref_data():
    data = PreferenceDataModule(tokenizer="tiny-llama", num_train=11, num_val=2, num_test=2, max_length=256,
                                batch_size=4, eval_batch_size=4)
    data.setup("fit")
    return data


def test_pipeline_contrast_models_score_rejected_lower_and_cdpo_trains(pref_data, tiny_module, fit_tiny, tmp_path):
    positive, negative = train_contrast_models(pref_data, "tiny-llama", steps=80, lr=3e-3, peft_config={},
                                               output_dir=tmp_path)
    batch = next(iter(pref_data._loader("train", shuffle=False)))
    scores = contrastive_scores(positive, negative, batch)
    from_dirs = contrastive_scores(tmp_path / "positive", tmp_path / "negative", batch)
    assert torch.allclose(scores, from_dirs, atol=1e-5)
    mask = target_mask(batch["labels"]).float()
    chosen, rejected = split_pairs(scores)
    mask_c, mask_r = split_pairs(mask)
    # The two sides share every token but the perturbed number, where the contrast models disagree: there
    # the rejected tokens are the critical ones (low score). Over whole responses the shared tokens dominate
    # and the side means are a near tie that depends on the drawn problems, so only the differing tokens
    # carry the claim.
    ids_c, ids_r = split_pairs(batch["input_ids"])
    differ = (ids_c != ids_r) & (mask_c > 0) & (mask_r > 0)
    assert rejected[differ].mean() < chosen[differ].mean()

    module = tiny_module(cls=CDPOModule, lr=1e-3)
    module.set_contrast_models(positive, negative)
    trainer = fit_tiny(module, pref_data, max_steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert len(module._score_cache) > 0


def test_fit_trains_its_own_contrast_models(tiny_module, pref_data, fit_tiny):
    module = tiny_module(cls=CDPOModule, contrast_steps=2, form="per_position_repo")
    fit_tiny(module, pref_data, max_steps=1)
    assert len(module._contrast) == 2


def test_contrast_models_train_in_the_fits_autocast_under_bf16_mixed(tiny_module, pref_data, fit_tiny,
                                                                     monkeypatch):
    """The contrast models train at fit start, outside Lightning's step: under bf16-mixed their forward and
    loss get the step's autocast (not fp32); under 32-true none."""
    from zoo.modules.peft_module import PeftModule

    seen = []
    original = PeftModule.compute_loss

    def recording(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PeftModule, "compute_loss", recording)
    fit_tiny(tiny_module(cls=CDPOModule, contrast_steps=2), pref_data, max_steps=1, precision="bf16-mixed")
    assert seen == [True] * 4  # 2 steps on each side
    seen.clear()
    fit_tiny(tiny_module(cls=CDPOModule, contrast_steps=2), pref_data, max_steps=1)
    assert seen == [False] * 4


def _perturbed(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _target_logps(model, batch):
    """(2B, T) target-aligned log p(x_t | x_<t) of the supervised tokens, by hand from the HF logits."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    labels = batch["labels"]
    logp = logits[:, :-1].log_softmax(-1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    return torch.nn.functional.pad(logp, (1, 0)) * target_mask(labels)


def test_validation_logs_the_cdpo_loss_of_the_contrast_scores_not_plain_dpo(pref_data, tiny_module, tmp_path):
    import lightning as L

    module = tiny_module(cls=CDPOModule, beta=0.5)
    _perturbed(module.model, 1)  # policy != reference, so the log-ratios are not zero
    # briefly trained contrast models: scores well away from 0 (random models give ~1/vocab everywhere)
    positive, negative = train_contrast_models(pref_data, "tiny-llama", steps=80, lr=3e-3, peft_config={})
    module.set_contrast_models(positive, negative)
    loader = pref_data._loader("val", shuffle=False)
    assert len(loader) == 1  # one batch: the logged epoch value is this batch's
    batch = next(iter(loader))
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, dataloaders=loader)
    logged = trainer.callback_metrics

    ratios = _target_logps(module.model, batch) - _target_logps(module.reference_model, batch)
    with torch.no_grad():  # s_t = softmax(2 z_p - z_n)[y_t], target-aligned, by hand
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mixed = 2 * positive(**inputs).logits.double() - negative(**inputs).logits.double()
    labels = batch["labels"]
    scores = mixed[:, :-1].softmax(-1).gather(-1, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    scores = torch.nn.functional.pad(scores, (1, 0)) * target_mask(labels)
    mask = target_mask(labels).double()
    assert 0.05 < float(scores[mask > 0].mean()) < 0.95  # the token weights are neither all 1 nor all 0
    (ratio_c, ratio_r), (score_c, score_r), (mask_c, mask_r) = (split_pairs(t) for t in (ratios, scores, mask))
    expected = cdpo_loss(ratio_c, ratio_r, score_c, score_r, mask_c, mask_r, beta=0.5)[0]
    plain = dpo_loss(ratio_c.sum(1), ratio_r.sum(1), beta=0.5)[0]
    assert not torch.isclose(expected, plain, atol=1e-3)
    assert torch.isclose(logged["val/cdpo_loss"].double(), expected, atol=1e-5)
    assert torch.isclose(logged["val/dpo_loss"].double(), plain, atol=1e-5)  # DPO's metrics are kept
    assert {"val/reward_accuracy", "val/reward_margin", "val/cdpo_reward_margin", "val/loss"} <= set(logged)
    nll = -(split_pairs(_target_logps(module.model, batch))[0].sum() / mask_c.sum())
    assert torch.isclose(logged["val/loss"].double(), nll, atol=1e-5)  # val/loss stays the chosen NLL


def test_evaluation_without_contrast_models_logs_dpo_metrics_and_warns(pref_data, tiny_module, tmp_path):
    import lightning as L

    module = tiny_module(cls=CDPOModule)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.warns(UserWarning, match="without contrast models"):
        trainer.validate(module, dataloaders=pref_data._loader("val", shuffle=False))
    assert "val/dpo_loss" in trainer.callback_metrics and "val/cdpo_loss" not in trainer.callback_metrics
