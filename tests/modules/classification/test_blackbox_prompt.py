"""Unsupervised black-box prompt learning: the estimator (unbiased, zero when prompts agree, converges on a
bandit), the reliable set, the candidate vocabulary."""

from __future__ import annotations

import math

import torch

from zoo.modules.classification.blackbox_prompt import (
    DiscretePromptDistribution,
    candidate_vocabulary,
    policy_gradient,
    policy_gradient_surrogate,
    reliable_indices,
)


def test_policy_gradient_is_unbiased_on_a_toy_bandit():
    """E[estimate] = grad_theta E_z[l(z)] = p * (l - p.l) exactly (m = 1, 5 arms), within 4 standard
    errors."""
    generator = torch.Generator().manual_seed(0)
    theta = torch.tensor([[0.3, -0.5, 1.0, 0.0, -1.2]])
    arm_loss = torch.tensor([1.0, 0.2, 0.7, 0.0, 2.0])
    p = theta.softmax(-1)[0]
    exact = p * (arm_loss - (p * arm_loss).sum())
    draws = []
    for _ in range(4000):
        samples = torch.multinomial(p, 4, replacement=True, generator=generator).view(4, 1)
        draws.append(policy_gradient(theta, samples, arm_loss[samples[:, 0]])[0])
    draws = torch.stack(draws)
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    assert ((mean - exact).abs() <= 4 * stderr + 1e-4).all(), (mean, exact, stderr)
    # and the mean baseline lowers the variance of plain REINFORCE (l_s * grad log p, averaged over S)
    plain = []
    generator.manual_seed(0)
    for _ in range(4000):
        samples = torch.multinomial(p, 4, replacement=True, generator=generator)
        onehot = torch.nn.functional.one_hot(samples, 5).float()
        plain.append((arm_loss[samples].view(-1, 1) * (onehot - p)).mean(0))
    assert draws.var(0).sum() < torch.stack(plain).var(0).sum()


def test_surrogate_gradient_equals_the_estimate_and_vanishes_when_prompts_agree():
    theta = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    samples = torch.tensor([[0, 5, 2], [1, 5, 2], [0, 4, 3], [2, 2, 2]])
    losses = torch.tensor([0.4, 1.3, 0.2, 0.9])
    policy_gradient_surrogate(theta, samples, losses).backward()
    assert torch.allclose(theta.grad, policy_gradient(theta.detach(), samples, losses), atol=1e-6)
    same = torch.tensor([[1, 2, 3]] * 4)
    assert torch.count_nonzero(policy_gradient(theta.detach(), same, torch.tensor([1.0, 1.0, 1.0, 1.0]))) == 0


def test_the_distribution_learns_the_zero_loss_token():
    """l(z) = 0 if z_1 == 7 else 1, |V| = 20: softmax(theta)[7] > 0.9 within a few hundred steps."""
    torch.manual_seed(0)
    dist = DiscretePromptDistribution(1, 20)
    optimizer = torch.optim.SGD(dist.parameters(), lr=2.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        samples = dist.sample(8, generator)
        losses = (samples[:, 0] != 7).float()
        optimizer.zero_grad()
        policy_gradient_surrogate(dist.logits, samples, losses).backward()
        optimizer.step()
    assert dist.logits.softmax(-1)[0, 7] > 0.9 and dist.mode().tolist() == [7]


def test_reliable_set_keeps_ceil_rho_per_predicted_class_by_confidence():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.7, 0.3], [0.45, 0.55], [0.95, 0.05]])
    # class 0 predicted for rows 0, 1, 3, 5 (confidences .9 .6 .7 .95); class 1 for rows 2, 4 (.8 .55)
    assert reliable_indices(probs, 0.5) == [5, 0, 2]
    assert reliable_indices(probs, 0.3) == [5, 0, 2]  # ceil(1.2) = 2, ceil(0.6) = 1
    assert reliable_indices(probs, 1.0) == [5, 0, 3, 1, 2, 4]


def test_candidate_vocabulary_by_frequency():
    texts = ["The goal was late, the goal!", "A late rain and rain and rain."]
    assert candidate_vocabulary(texts, 3, frozenset({"the", "and"})) == ["rain", "goal", "late"]
