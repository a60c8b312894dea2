"""PANDA invariants (spec 37, Small-scale check)."""

from __future__ import annotations

import torch

from zoo.modules.prompting.panda import (
    PANDAModule,
    cosine,
    kd_mse,
    kd_weight_from_similarity,
    prompt_transferability,
)
from zoo.modules.prompting.prompt_tuning import PromptTuningModule


def teacher_file(tmp_path, m=3, scale=1.0, seed=5):
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / f"teacher{seed}.pt"
    torch.save({"soft_prompt.weight": torch.randn(m, 64, generator=g) * scale}, path)
    return path


def test_beta_zero_equals_plain_prompt_tuning(tiny_module, tiny_data, fit_tiny, tmp_path):
    panda = tiny_module(cls=PANDAModule, num_virtual_tokens=3, teacher_prompt=str(teacher_file(tmp_path)),
                        kd_weight=0.0, prompt_init="random", lr=1e-2)
    plain = tiny_module(cls=PromptTuningModule, num_virtual_tokens=3, prompt_init="random", lr=1e-2)
    assert torch.equal(panda.soft_prompt.weight, plain.soft_prompt.weight)
    fit_tiny(panda, tiny_data(), max_steps=3)
    fit_tiny(plain, tiny_data(), max_steps=3)
    assert torch.equal(panda.soft_prompt.weight, plain.soft_prompt.weight)


def test_teacher_is_immutable_and_only_the_prompt_trains(tiny_module, tiny_data, fit_tiny, tmp_path):
    panda = tiny_module(cls=PANDAModule, num_virtual_tokens=3, teacher_prompt=str(teacher_file(tmp_path)),
                        kd_weight=10.0, kd_scale=1.0, lr=1e-2)
    teacher = panda.teacher["soft_prompt.weight"].clone()
    backbone = {k: v.clone() for k, v in panda.model.state_dict().items()}
    assert list(panda.trainable_parameters()) == ["soft_prompt.weight"]
    fit_tiny(panda, tiny_data(), max_steps=2)
    assert torch.equal(panda.teacher["soft_prompt.weight"], teacher)
    assert not panda.teacher["soft_prompt.weight"].requires_grad
    assert all(torch.equal(v, backbone[k]) for k, v in panda.model.state_dict().items())
    assert all(p.grad is None for p in panda.model.parameters())


def test_kd_term_zero_for_equal_teacher_and_its_gradient(tiny_module, make_batch, tmp_path):
    path = teacher_file(tmp_path)
    panda = tiny_module(cls=PANDAModule, num_virtual_tokens=3, teacher_prompt=str(path), kd_weight=0.5, kd_scale=0.1)
    panda.load_prompt_state(torch.load(path))
    batch = make_batch()
    weights = (batch["labels"] != -100).float()
    weights[:, 0] = 0
    outputs = panda(batch)
    ce = panda.weighted_token_loss(outputs, weights).sum() / (weights != 0).sum()
    torch.testing.assert_close(panda.compute_loss(batch, outputs, weights), ce, atol=1e-6, rtol=1e-6)
    zs = torch.randn(4, 7, requires_grad=True)
    zt = torch.randn(4, 7)
    kd_mse(zs, zt).backward()
    torch.testing.assert_close(zs.grad, 2 * (zs.detach() - zt) / zs.numel())


def test_transferability_metric(tiny_module, make_batch, tmp_path):
    module = tiny_module(cls=PANDAModule, num_virtual_tokens=3)
    batch = make_batch()
    a = torch.load(teacher_file(tmp_path, seed=1))
    b = torch.load(teacher_file(tmp_path, seed=2, scale=30.0))
    assert abs(prompt_transferability(module, batch, a, a) - 1.0) < 1e-6
    ab, ba = prompt_transferability(module, batch, a, b), prompt_transferability(module, batch, b, a)
    assert abs(ab - ba) < 1e-6 and -1.0 <= ab < 1.0
    assert cosine(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])) == -1.0
    assert kd_weight_from_similarity(0.5, 0.2) == 0.1 and kd_weight_from_similarity(-0.3, 0.2) == 0.0


def test_prompt_transfer_initialises_from_the_source(tiny_module, tmp_path):
    path = teacher_file(tmp_path)
    pot = tiny_module(cls=PromptTuningModule, num_virtual_tokens=3, init_prompt=str(path))
    assert torch.equal(pot.soft_prompt.weight.detach(), torch.load(path)["soft_prompt.weight"])
