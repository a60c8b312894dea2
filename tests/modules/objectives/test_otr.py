"""OTR invariants (spec 04, "Small-scale check")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.modules.base import StepOutputs, target_mask
from zoo.modules.objectives.otr import OTRModule, otr_token_loss, sample_candidates, sampling_distribution


def _toy(n: int = 4, v: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * 1.5, torch.randint(0, v, (n,), generator=g)


def test_mc_estimator_converges_to_expected_value():
    logits, targets = _toy()
    expected = otr_token_loss(logits, targets, beta=-0.3, tau=1.5, estimator="expected")
    errors = {}
    for k in (4, 64, 1024):
        runs = torch.stack([otr_token_loss(logits, targets, beta=-0.3, tau=1.5, num_samples=k,
                                           generator=torch.Generator().manual_seed(s)) for s in range(30)])
        stderr = runs.std(0) / math.sqrt(runs.shape[0])
        errors[k] = (runs.mean(0) - expected).abs()
        assert torch.all(errors[k] <= 4 * stderr + 1e-6), (k, errors[k], stderr)
    assert errors[1024].max() < errors[4].max()
    assert errors[1024].max() < 0.05


def test_expected_gradient_at_tau_one_is_dft_scaled_by_one_minus_beta():
    for beta in (0.0, -0.1, -0.7):
        logits = torch.tensor([[0.3, -1.2, 2.0]], requires_grad=True)
        target = torch.tensor([0])
        otr_token_loss(logits, target, beta=beta, tau=1.0, estimator="expected").sum().backward()
        p = logits.detach().softmax(-1)
        grad_ce = p - F.one_hot(target, 3).float()  # d CE / d z
        assert torch.allclose(logits.grad, (1 - beta) * p[0, 0] * grad_ce, atol=1e-6)


def test_sampling_policy_carries_no_gradient():
    logits = torch.tensor([[0.5, 0.1, -0.4, 1.0]], requires_grad=True)
    target = torch.tensor([2])
    assert not sampling_distribution(logits, 2.0).requires_grad
    otr_token_loss(logits, target, beta=-0.2, tau=2.0, estimator="expected").sum().backward()
    p, q = logits.detach().softmax(-1)[0], (logits.detach() / 2.0).softmax(-1)[0]
    weights = -0.2 * q
    weights[2] = q[2]
    # d/dz of -sum_a w_a log p(a) with w held constant: -sum_a w_a (e_a - p)
    analytic = -(weights - weights.sum() * p)
    assert torch.allclose(logits.grad[0], analytic, atol=1e-6)
    # MC with fixed samples: the gradient is -(1/K) sum_k r_k (e_{a_k} - p), whatever tau is.
    samples = torch.tensor([[2, 0, 0, 3]])
    grads = []
    for tau in (0.5, 3.0):
        z = logits.detach().clone().requires_grad_(True)
        otr_token_loss(z, target, beta=-0.2, tau=tau, samples=samples).sum().backward()
        grads.append(z.grad)
    rewards = torch.tensor([1.0, -0.2, -0.2, -0.2])
    analytic = -(F.one_hot(samples[0], 4).float() * rewards[:, None]).sum(0) / 4 + rewards.mean() * p
    assert torch.allclose(grads[0], grads[1]) and torch.allclose(grads[0][0], analytic, atol=1e-6)


def test_negative_beta_lowers_a_sampled_wrong_token_and_gold_sample_raises_gold():
    def step(beta, samples):
        z = torch.tensor([[0.2, 0.0, -0.3, 0.4, 0.1]], requires_grad=True)
        otr_token_loss(z, torch.tensor([0]), beta=beta, samples=samples).sum().backward()
        new = (z - 0.5 * z.grad).detach()
        return z.detach().log_softmax(-1)[0], new.log_softmax(-1)[0]

    before, after = step(-0.5, torch.tensor([[3, 3, 3, 3]]))
    assert after[3] < before[3]  # sampled wrong token pushed down
    before, after = step(+0.5, torch.tensor([[3, 3, 3, 3]]))
    assert after[3] > before[3]  # a positive beta would reward it (the sign pitfall)
    before, after = step(-0.5, torch.tensor([[0, 0, 0, 0]]))
    assert after[0] > before[0]  # sampled gold token pulled up


def test_uniform_sampling_limit_is_sft_scaled_by_vocab():
    logits, targets = _toy(v=5)
    loss = otr_token_loss(logits, targets, beta=0.0, tau=1e6, estimator="expected")
    assert torch.allclose(loss * 5, F.cross_entropy(logits, targets, reduction="none"), atol=1e-4)


def test_module_matches_dft_on_hf_logits_and_masks_unsupervised_tokens(tiny_module, make_batch):
    module = tiny_module(cls=OTRModule, estimator="expected", tau=1.0, beta=0.0, length_norm="per_token")
    batch = make_batch(batch_size=2, length=10, prompt=4)
    hidden = module.forward_hidden(batch).detach().requires_grad_(True)
    outputs = StepOutputs(module=module, hidden=hidden, labels=batch["labels"])
    weights = target_mask(batch["labels"]).float()
    weights[0, 6] = 0.0  # a selector dropping one token
    loss = module.compute_loss(batch, outputs, weights)
    # Reference computed another way: HF logits, DFT loss -p(y) log p(y) on the kept tokens.
    logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["labels"][:, 1:].clamp_min(0)[..., None])[..., 0]
    keep = weights[:, 1:] != 0
    dft = -(logp.exp().detach() * logp)[keep].mean()
    assert torch.allclose(loss, dft, atol=1e-5)
    loss.backward()
    # hidden t predicts token t+1: rows predicting prompt tokens, the dropped token and the last column get no gradient
    grad_norm = hidden.grad.norm(dim=-1)
    assert torch.all(grad_norm[:, :3] == 0) and torch.all(grad_norm[:, -1] == 0) and grad_norm[0, 5] == 0
    assert torch.all(grad_norm[1, 3:-1] > 0)


def test_mc_sampler_is_seeded_per_step(tiny_module, make_batch):
    module = tiny_module(cls=OTRModule, num_samples=8)
    batch = make_batch()
    outputs = module(batch)
    weights = target_mask(batch["labels"]).float()
    a, b = (module.compute_loss(batch, outputs, weights) for _ in range(2))
    assert torch.equal(a, b)
    assert sample_candidates(torch.zeros(3, 4), 5, 1.0).shape == (3, 5)


@pytest.mark.parametrize("estimator", ["mc", "expected"])
def test_fit_runs(tiny_module, tiny_data, fit_tiny, estimator):
    trainer = fit_tiny(tiny_module(cls=OTRModule, num_samples=16, estimator=estimator), tiny_data(), max_steps=2)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_prompt_tuning_adapter_scores_the_real_positions_only(tiny_module, make_batch):
    """OTR on a soft-prompt policy: the DFT limit (expected, tau 1, beta 0) equals the loss from logits computed by
    hand (prompt prepended, decoder run, virtual columns dropped); the soft prompt is the only tensor that learns."""
    from zoo import backbone
    from zoo.modules.adapters import Peft

    m = 3
    module = tiny_module(cls=OTRModule, estimator="expected", tau=1.0, beta=0.0, length_norm="per_token",
                         adapter=Peft({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": m}))
    batch = make_batch(batch_size=2, length=10, prompt=4)
    weights = target_mask(batch["labels"]).float()
    loss = module.compute_loss(batch, module(batch), weights)
    peft_model = module.model
    embeds = torch.cat([peft_model.get_prompt(2), peft_model.get_input_embeddings()(batch["input_ids"])], 1)
    mask = torch.cat([torch.ones(2, m, dtype=torch.long), batch["attention_mask"]], 1)
    hidden = backbone.decoder(peft_model)(inputs_embeds=embeds, attention_mask=mask).last_hidden_state[:, m:]
    logits = peft_model.get_output_embeddings()(hidden)
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["labels"][:, 1:].clamp_min(0)[..., None])[..., 0]
    keep = weights[:, 1:] != 0
    assert torch.allclose(loss, -(logp.exp().detach() * logp)[keep].mean(), atol=1e-5)
    loss.backward()
    trainable = module.trainable_parameters()
    assert trainable and all("prompt_encoder" in name and p.grad is not None for name, p in trainable.items())
