"""PANDA invariants (spec 37, Small-scale check): an objective (CE + KD) over a soft-prompt adapter."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.errors import ConfigError
from zoo.modules.adapters.peft import LoRA
from zoo.modules.base import target_mask
from zoo.modules.prompting.panda import (
    PANDAModule,
    cosine,
    kd_mse,
    kd_weight_from_similarity,
    prompt_transferability,
)
from zoo.modules.prompting.prompt_tuning import PrefixTuning, PromptTuning


def teacher_file(tmp_path, m=3, scale=1.0, seed=5):
    g = torch.Generator().manual_seed(seed)
    path = tmp_path / f"teacher{seed}.pt"
    torch.save({"soft_prompt.weight": torch.randn(m, 64, generator=g) * scale}, path)
    return path


def prompt(m=3, init="random"):
    return PromptTuning(num_virtual_tokens=m, prompt_init=init)


def response_nll(module, batch):
    """Token-mean NLL over the supervised tokens, in eval mode (what the harness scores)."""
    module.eval()
    with torch.no_grad():
        weights = target_mask(batch["labels"]).float()
        return float(module.weighted_token_loss(module(batch), weights).sum() / weights.sum())


def test_beta_zero_equals_plain_prompt_tuning(tiny_module, tiny_data, fit_tiny, tmp_path):
    panda = tiny_module(cls=PANDAModule, adapter=prompt(), teacher_prompt=str(teacher_file(tmp_path)), kd_weight=0.0,
                        lr=1e-2)
    plain = tiny_module(adapter=prompt(), lr=1e-2)
    assert torch.equal(panda.adapter.soft_prompt.weight, plain.adapter.soft_prompt.weight)
    fit_tiny(panda, tiny_data(), max_steps=3)
    fit_tiny(plain, tiny_data(), max_steps=3)
    assert torch.equal(panda.adapter.soft_prompt.weight, plain.adapter.soft_prompt.weight)


def test_teacher_is_immutable_and_only_the_prompt_trains(tiny_module, tiny_data, fit_tiny, tmp_path):
    panda = tiny_module(cls=PANDAModule, adapter=prompt(), teacher_prompt=str(teacher_file(tmp_path)),
                        kd_weight=10.0, kd_scale=1.0, lr=1e-2)
    teacher = panda.teacher["soft_prompt.weight"].clone()
    start = panda.adapter.soft_prompt.weight.detach().clone()
    backbone = {k: v.clone() for k, v in panda.model.state_dict().items()}
    assert list(panda.trainable_parameters()) == ["adapter.soft_prompt.weight"]
    fit_tiny(panda, tiny_data(), max_steps=2)
    assert torch.equal(panda.teacher["soft_prompt.weight"], teacher)
    assert not panda.teacher["soft_prompt.weight"].requires_grad
    assert not torch.equal(panda.adapter.soft_prompt.weight, start)
    assert all(torch.equal(v, backbone[k]) for k, v in panda.model.state_dict().items())
    assert all(p.grad is None for p in panda.model.parameters())


def test_kd_term_zero_for_equal_teacher_and_its_gradient(tiny_module, make_batch, tmp_path):
    path = teacher_file(tmp_path)
    panda = tiny_module(cls=PANDAModule, adapter=prompt(), teacher_prompt=str(path), kd_weight=0.5, kd_scale=0.1)
    panda.adapter.load_prompt_state(torch.load(path))
    batch = make_batch()
    weights = (batch["labels"] != -100).float()
    weights[:, 0] = 0
    outputs = panda(batch)
    ce = panda.weighted_token_loss(outputs, weights).sum() / (weights != 0).sum()
    torch.testing.assert_close(panda.compute_loss(batch, outputs, weights), ce, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        panda.adapter.soft_prompt.weight.add_(0.5)  # a different student: the KD term is positive
    assert panda.compute_loss(batch, panda(batch), weights) > panda.weighted_token_loss(panda(batch), weights).sum() \
        / (weights != 0).sum() + 1e-6
    zs = torch.randn(4, 7, requires_grad=True)
    zt = torch.randn(4, 7)
    kd_mse(zs, zt).backward()
    torch.testing.assert_close(zs.grad, 2 * (zs.detach() - zt) / zs.numel())


def test_teacher_from_an_exported_prompt_and_deep_prompts(tiny_module, make_batch, tmp_path):
    # a teacher run's export (prompt.pt keyed like the adapter's state) is a valid teacher file, shallow or deep
    for adapter, student in ((prompt(init="vocab"), prompt()), (PrefixTuning(num_virtual_tokens=2),
                                                                PrefixTuning(num_virtual_tokens=2, init_seed=1))):
        teacher_run = tiny_module(adapter=adapter)
        export = teacher_run.export(tmp_path / type(adapter).__name__)
        panda = tiny_module(cls=PANDAModule, adapter=student, teacher_prompt=str(export / "prompt.pt"))
        expected = dict(teacher_run.adapter.named_parameters())
        assert set(panda.teacher) == set(expected)
        assert all(torch.equal(panda.teacher[name], p.detach()) for name, p in expected.items())
        # the teacher pass is the teacher run's own forward
        batch = make_batch()
        teacher_run.eval()
        torch.testing.assert_close(panda.teacher_hidden(batch), teacher_run(batch).hidden, atol=1e-6, rtol=1e-6)


def test_teacher_follows_the_module_dtype(tiny_module, tmp_path):
    panda = tiny_module(cls=PANDAModule, adapter=prompt(), teacher_prompt=str(teacher_file(tmp_path)))
    panda.double()
    assert panda.teacher["soft_prompt.weight"].dtype == torch.float64
    assert panda.teacher["soft_prompt.weight"] is panda.teacher_soft_prompt_weight


def test_transferability_metric(tiny_module, make_batch, tmp_path):
    module = tiny_module(cls=PANDAModule, adapter=prompt())
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
    pot = tiny_module(adapter=PromptTuning(num_virtual_tokens=3, init_prompt=str(path)))
    assert torch.equal(pot.adapter.soft_prompt.weight.detach(), torch.load(path)["soft_prompt.weight"])


def test_bad_adapter_and_teacher_are_config_errors(tiny_module, tmp_path):
    with pytest.raises(ConfigError, match="soft-prompt adapter"):
        tiny_module(cls=PANDAModule, adapter=LoRA(r=2))
    with pytest.raises(ConfigError, match="num_virtual_tokens"):
        tiny_module(cls=PANDAModule, adapter=prompt(m=4), teacher_prompt=str(teacher_file(tmp_path)))
    with pytest.raises(ConfigError, match="does not exist"):
        tiny_module(cls=PANDAModule, adapter=prompt(), teacher_prompt=str(tmp_path / "missing.pt"))


def test_export_reloads_the_student_with_the_same_nll(tiny_module, tiny_data, fit_tiny, make_batch, tmp_path):
    teacher = teacher_file(tmp_path)
    panda = tiny_module(cls=PANDAModule, adapter=prompt(), teacher_prompt=str(teacher), kd_weight=10.0, lr=3e-2)
    fit_tiny(panda, tiny_data(), max_steps=2)
    batch = make_batch(batch_size=3, length=16, prompt=6, seed=1)
    trained = response_nll(panda, batch)
    export = panda.export(tmp_path / "export")
    teacher.unlink()  # the student reloads without its training-time teacher
    loaded = zoo.load(export)
    assert isinstance(loaded, PANDAModule) and loaded.teacher is None
    assert torch.equal(loaded.adapter.soft_prompt.weight, panda.adapter.soft_prompt.weight)
    assert abs(response_nll(loaded, batch) - trained) < 1e-5
    assert abs(response_nll(tiny_module(), batch) - trained) > 1e-4  # not the untuned base
