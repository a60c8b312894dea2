"""CausalLMModule: loss convention against HF, selectors, reductions, freezing, NaN guard, checkpoints,
export."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from zoo.errors import TrainingError
from zoo.modules.base import CausalLMModule, reduce_loss

ATOL = 1e-5


def attach(module: CausalLMModule, callbacks=()) -> CausalLMModule:
    """Give the module a (not fitting) Trainer so ``token_weights`` sees ``callbacks``."""
    module.trainer = L.Trainer(callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    return module


def zoo_loss_and_grads(module: CausalLMModule, batch, callbacks=()):
    """Loss and gradients along the path ``training_step`` takes (forward, token_weights, compute_loss)."""
    attach(module, callbacks)
    module.zero_grad(set_to_none=True)
    outputs = module(batch)
    weights = module.token_weights(batch, outputs)
    loss = module.compute_loss(batch, outputs, weights)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def hand_token_losses(module: CausalLMModule, batch) -> torch.Tensor:
    """(B, T) target-aligned CE from the full HF logits: column t = -log p(x_t | x_<t); 0 where
    unsupervised."""
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits.float().log_softmax(-1)
    labels = batch["labels"]
    out = torch.zeros(labels.shape)
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != -100:
                out[b, t] = -logp[b, t - 1, labels[b, t]]
    return out


class Constant(Callback):
    """A TokenSelector returning a fixed weight tensor (or all ones)."""

    def __init__(self, weights: torch.Tensor | None = None):
        self.weights = weights
        self.calls = 0

    def select(self, module, batch, outputs):
        self.calls += 1
        return torch.ones(batch["labels"].shape) if self.weights is None else self.weights


def test_token_mean_loss_and_gradients_equal_hf_loss(tiny_module, make_batch):
    module = tiny_module()
    batch = make_batch(batch_size=3, length=14, prompt=5)
    batch["labels"][1, 9:] = -100  # a shorter response in one row
    loss, grads = zoo_loss_and_grads(module, batch)

    module.zero_grad(set_to_none=True)
    hf = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss
    hf.backward()
    assert torch.allclose(loss, hf.detach(), atol=ATOL)
    assert len(grads) == len(list(module.parameters()))
    for name, param in module.named_parameters():
        assert torch.allclose(grads[name], param.grad, atol=ATOL), name


def test_per_token_loss_is_target_aligned_and_zero_on_prompt(tiny_module, make_batch):
    module = tiny_module()
    batch = make_batch(batch_size=2, length=12, prompt=4)
    expected = hand_token_losses(module, batch)
    outputs = module(batch)
    detached = outputs.per_token_loss()
    weights = (batch["labels"] != -100).float()
    weighted = module.weighted_token_loss(outputs, weights).detach()
    assert torch.allclose(detached, expected, atol=ATOL)
    assert torch.allclose(weighted, expected, atol=ATOL)
    assert (detached[:, :4] == 0).all() and (weighted[:, :4] == 0).all()  # prompt: no loss
    assert (detached[:, 4:] > 0).all()
    # Entropy at t is the entropy of the distribution that predicts token t.
    with torch.no_grad():
        logp = module.model(input_ids=batch["input_ids"]).logits.log_softmax(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    assert torch.allclose(outputs.entropy()[:, 4:], entropy[:, 3:-1], atol=ATOL)


def test_prompt_tokens_get_no_gradient_signal(tiny_module, make_batch):
    """Changing the labels of prompt positions (which are -100) vs. their content changes nothing."""
    module = tiny_module()
    batch = make_batch(batch_size=2, length=12, prompt=4)
    loss_a, _ = zoo_loss_and_grads(module, batch)
    relabelled = {**batch, "labels": batch["labels"].clone()}
    relabelled["labels"][:, :4] = (batch["input_ids"][:, :4] + 1) % 256  # now supervised
    relabelled["labels"][:, 0] = -100  # column 0 is never supervised anyway
    loss_b, _ = zoo_loss_and_grads(module, relabelled)
    assert not torch.allclose(loss_a, loss_b)
    per_token = hand_token_losses(module, relabelled)
    assert torch.allclose(loss_b, per_token.sum() / (relabelled["labels"][:, 1:] != -100).sum(), atol=ATOL)


def test_all_ones_selector_is_bit_identical_to_no_selector(tiny_module, make_batch):
    module = tiny_module()
    batch = make_batch(batch_size=2, length=12)
    loss_plain, grads_plain = zoo_loss_and_grads(module, batch)
    selector = Constant()
    loss_sel, grads_sel = zoo_loss_and_grads(module, batch, [selector])
    assert selector.calls == 1
    assert torch.equal(loss_plain, loss_sel)
    assert grads_plain.keys() == grads_sel.keys()
    assert all(torch.equal(grads_plain[k], grads_sel[k]) for k in grads_plain)


def test_all_ones_selector_in_fit_is_bit_identical(tiny_module, tiny_data, fit_tiny):
    """Through ``training_step`` inside Lightning: same weights after 2 steps with and without the
    selector."""

    def train(callbacks):
        module = tiny_module()
        fit_tiny(module, tiny_data(), callbacks=callbacks, max_steps=2)
        return {k: v.detach().clone() for k, v in module.state_dict().items()}

    selector = Constant()
    plain, selected = train([]), train([selector])
    assert selector.calls == 2
    assert all(torch.equal(plain[k], selected[k]) for k in plain)


def test_zero_weight_token_equals_masking_its_label(tiny_module, make_batch):
    module = tiny_module()
    batch = make_batch(batch_size=2, length=12, prompt=4)
    weights = torch.ones(batch["labels"].shape)
    weights[0, 7] = 0.0
    weights[1, 10] = 0.0
    loss_sel, grads_sel = zoo_loss_and_grads(module, batch, [Constant(weights)])
    masked = {**batch, "labels": batch["labels"].clone()}
    masked["labels"][0, 7] = -100
    masked["labels"][1, 10] = -100
    loss_mask, grads_mask = zoo_loss_and_grads(module, masked)
    loss_full, _ = zoo_loss_and_grads(module, batch)
    assert torch.allclose(loss_sel, loss_mask, atol=ATOL)
    assert not torch.allclose(loss_sel, loss_full, atol=ATOL)
    for k in grads_mask:
        assert torch.allclose(grads_sel[k], grads_mask[k], atol=ATOL), k


def test_selector_with_wrong_shape_is_rejected(tiny_module, make_batch):
    module = tiny_module()
    batch = make_batch(batch_size=2, length=12)
    with pytest.raises(ValueError, match="expected"):
        zoo_loss_and_grads(module, batch, [Constant(torch.ones(2, 11))])


@pytest.mark.parametrize("reduction", ["token_mean", "weight_mean", "sequence_mean", "sum"])
def test_every_reduction_matches_a_hand_computation(tiny_module, make_batch, reduction):
    module = tiny_module(reduction=reduction)
    batch = make_batch(batch_size=3, length=10, prompt=3)
    weights = torch.zeros(batch["labels"].shape)
    weights[0, 3:] = torch.tensor([0.5, 1.0, 2.0, 0.0, 1.0, 1.0, 0.25])
    weights[1, 5:8] = 1.0  # row 2 stays all zero: sequence_mean must ignore it
    ce = hand_token_losses(module, batch)
    weighted = [[float(weights[b, t] * ce[b, t]) for t in range(10)] for b in range(3)]
    nonzero = [[t for t in range(10) if weights[b, t] != 0] for b in range(3)]
    total = sum(sum(row) for row in weighted)
    expected = {
        "token_mean": total / sum(len(n) for n in nonzero),
        "weight_mean": total / float(weights.sum()),
        "sequence_mean": (sum(weighted[0]) / len(nonzero[0]) + sum(weighted[1]) / len(nonzero[1])) / 2,
        "sum": total,
    }[reduction]
    outputs = module(batch)
    loss = module.compute_loss(batch, outputs, weights)
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-5, abs_tol=ATOL)


def test_reduce_loss_rejects_unknown_reduction():
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce_loss(torch.ones(1, 2), torch.ones(1, 2), "mean")  # type: ignore[arg-type]


class FrozenFirstLayer(CausalLMModule):
    def configure_backbone(self, model):
        for param in model.model.layers[0].parameters():
            param.requires_grad_(False)
        return model


def test_frozen_parameters_get_no_gradient_and_are_not_optimized(tiny_module, tiny_data, fit_tiny):
    module = tiny_module(cls=FrozenFirstLayer)
    frozen = {n: p.detach().clone() for n, p in module.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    assert frozen and trainable
    assert set(module.trainable_parameters()) == set(trainable)
    trainer = fit_tiny(module, tiny_data(), max_steps=2)
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    params = dict(module.named_parameters())
    assert optimized == {id(params[n]) for n in trainable}
    for name, before in frozen.items():
        assert params[name].grad is None, name
        assert torch.equal(params[name], before), name
    assert any(not torch.equal(params[n], before) for n, before in trainable.items())


class NanAtStep(CausalLMModule):
    def __init__(self, nan_step: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.nan_step = nan_step

    def compute_loss(self, batch, outputs, weights):
        loss = super().compute_loss(batch, outputs, weights)
        return loss * float("nan") if self.global_step == self.nan_step else loss


def test_nan_loss_stops_fit_naming_the_step(tiny_module, tiny_data, fit_tiny):
    module = tiny_module(cls=NanAtStep, nan_step=2)
    with pytest.raises(TrainingError, match=r"non-finite training loss \(nan\) at step 2"):
        fit_tiny(module, tiny_data(), max_steps=5)
    assert module.global_step == 2


def test_huge_learning_rate_divergence_stops_fit(tiny_module, tiny_data, fit_tiny):
    """A callback that blows the learning rate up: the first non-finite loss stops the run."""

    class Blowup(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = 1e30

    module = tiny_module()
    with pytest.raises(TrainingError, match=r"at step \d+"):
        fit_tiny(module, tiny_data(), callbacks=[Blowup()], max_steps=20, gradient_clip_val=None)


def test_checkpoint_trainable_only_round_trips(tiny_module, tiny_data, fit_tiny, tmp_path):
    module = tiny_module(cls=FrozenFirstLayer)
    trainer = fit_tiny(module, tiny_data(), max_steps=2)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)
    assert saved["zoo_trainable_only"] is True
    expected = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
    assert "model.lm_head.weight" in expected  # tied to the (trainable) embedding: kept under both names
    assert set(saved["state_dict"]) == expected
    assert not any(".layers.0." in k for k in saved["state_dict"])

    restored = FrozenFirstLayer.load_from_checkpoint(path)
    reference = module.state_dict()
    assert restored.state_dict().keys() == reference.keys()
    for key, value in restored.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_full_checkpoint_when_trainable_only_is_off(tiny_module, tiny_data, fit_tiny, tmp_path):
    module = tiny_module(cls=FrozenFirstLayer, checkpoint_trainable_only=False)
    trainer = fit_tiny(module, tiny_data(), max_steps=1)
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    saved = torch.load(tmp_path / "full.ckpt", weights_only=False)
    assert "zoo_trainable_only" not in saved
    assert set(saved["state_dict"]) == set(module.state_dict())


def test_full_model_export_loads_with_transformers(tiny_module, tiny_data, fit_tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    module = tiny_module(export=True)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = fit_tiny(module, tiny_data(), max_steps=2)
    export = tmp_path / "export"
    assert module.export_dir() == export == tmp_path / trainer.default_root_dir / "export"
    loaded = AutoModelForCausalLM.from_pretrained(export)
    trained = module.model.state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert any(not torch.equal(before[k], trained[k]) for k in before)  # the export is the trained model
    tokenizer = AutoTokenizer.from_pretrained(export)
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True).endswith("<|im_start|>assistant\n")


def test_hand_batch_helper_is_consistent_with_hf_shift(tiny_module, make_batch):
    """Sanity of the reference used above: HF's loss equals the mean of the hand per-token CE."""
    module = tiny_module()
    batch = make_batch(batch_size=2, length=9, prompt=2)
    ce = hand_token_losses(module, batch)
    with torch.no_grad():
        logits = module.model(input_ids=batch["input_ids"]).logits
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                batch["labels"][:, 1:].reshape(-1))
    assert torch.allclose(ce.sum() / (batch["labels"][:, 1:] != -100).sum(), reference, atol=ATOL)
