"""The auxiliary-loss hook of CausalLMModule: nothing changes without an AuxiliaryLoss callback, and one
callback adds exactly ``weight * term`` to the loss (and its gradient), logged as ``train/aux/<name>``."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from zoo.modules.base import AuxiliaryLoss


class SquaredEmbedding(Callback):
    """Aux term = mean of the squared input embeddings (a hand-checkable function of the parameters)."""

    def __init__(self, weight: float):
        self.weight = weight

    def auxiliary_loss(self, module, batch, outputs):
        return "emb_sq", module.model.get_input_embeddings().weight.pow(2).mean()


class Bystander(Callback):
    """A callback with neither select nor auxiliary_loss."""


def step(module, batch, callbacks):
    """Loss, gradients and logged metrics of one ``training_step`` with ``callbacks`` on the trainer."""
    module.trainer = L.Trainer(callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    logged: dict = {}
    module.log_dict = lambda metrics, **_: logged.update(metrics)
    module.zero_grad(set_to_none=True)
    loss = module.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads, logged


def plain_loss_and_grads(module, batch):
    """The objective alone, along forward -> token_weights -> compute_loss (no training_step)."""
    module.trainer = L.Trainer(callbacks=[], logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    module.zero_grad(set_to_none=True)
    outputs = module(batch)
    loss = module.compute_loss(batch, outputs, module.token_weights(batch, outputs))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_protocol_is_structural():
    assert isinstance(SquaredEmbedding(1.0), AuxiliaryLoss)
    assert not isinstance(Bystander(), AuxiliaryLoss)


def test_no_aux_callback_changes_nothing(tiny_module, make_batch):
    module, batch = tiny_module(), make_batch(batch_size=2, length=12)
    reference, reference_grads = plain_loss_and_grads(module, batch)
    loss, grads, logged = step(module, batch, [Bystander()])
    assert torch.equal(loss, reference)
    assert grads.keys() == reference_grads.keys()
    for name in grads:
        assert torch.equal(grads[name], reference_grads[name]), name
    assert not any(key.startswith("train/aux/") for key in logged)


def test_one_aux_callback_adds_exactly_weight_times_term(tiny_module, make_batch):
    module, batch = tiny_module(), make_batch(batch_size=2, length=12)
    reference, reference_grads = plain_loss_and_grads(module, batch)
    embedding = module.model.get_input_embeddings().weight
    term = embedding.detach().pow(2).mean()  # hand value of the aux term
    term_grad = 2 * embedding.detach() / embedding.numel()  # its gradient, derived by hand
    loss, grads, logged = step(module, batch, [SquaredEmbedding(0.3)])
    assert torch.allclose(loss, reference + 0.3 * term, atol=1e-6)
    assert torch.allclose(logged["train/aux/emb_sq"], term)
    assert torch.allclose(logged["train/loss"], loss)
    name = next(n for n, p in module.named_parameters() if p is embedding)
    for key in grads:
        expected = reference_grads[key] + (0.3 * term_grad if key == name else 0)
        assert torch.allclose(grads[key], expected, atol=1e-6), key


def test_two_aux_callbacks_with_one_name_are_logged_apart(tiny_module, make_batch):
    module, batch = tiny_module(), make_batch(batch_size=2, length=12)
    reference, _ = plain_loss_and_grads(module, batch)
    term = module.model.get_input_embeddings().weight.detach().pow(2).mean()
    loss, _, logged = step(module, batch, [SquaredEmbedding(0.5), SquaredEmbedding(2.0)])
    assert torch.allclose(loss, reference + 2.5 * term, atol=1e-6)
    assert {k for k in logged if k.startswith("train/aux/")} == {"train/aux/emb_sq", "train/aux/emb_sq_1"}


def test_auxiliary_module_trains_but_is_not_exported(tiny_module):
    module = tiny_module()
    module.add_auxiliary_module("aux_head", torch.nn.Linear(64, 3))
    names = module.trainable_state_names()
    assert {"aux_head.weight", "aux_head.bias"} <= names
    assert "aux_head.weight" in module.state_dict()  # checkpoints hold it
    for kind in ("full", "none"):
        extra = module.export_extra_state(kind)
        assert not any(k.startswith("aux_head.") for k in extra), kind
    assert any(k.startswith("model.") for k in module.export_extra_state("none"))  # the rest still exported
