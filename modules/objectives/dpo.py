"""DPO: sequence-level Direct Preference Optimization with a frozen reference model (baseline).

Paper: Direct Preference Optimization: Your Language Model is Secretly a Reward Model (2023,
Rafailov et al.). The preference baseline of spec 13 (cDPO, papers/13-cdpo.md).

Implements ``L = -log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))``
averaged over pairs, on :class:`zoo.datamodules.preference.PreferenceDataModule` batches (2B rows,
chosen first). Per-token log-probs come from the shared pieces: ``self(batch)`` (one forward over
chosen + rejected rows) and ``weighted_token_loss`` (the selected-CE head), so token selectors
still apply: a token with selector weight w contributes ``w * log p``. The policy is wrapped by any
``adapter`` from YAML (LoRA, prompt tuning, DePT, ...; ``CausalLMModule``'s argument). The reference is
always a model WITHOUT the adapter:

* ``reference: FOLDER``: that checkpoint, frozen;
* else, when the adapter can be switched off (:meth:`Adapter.disabled`: peft, soft prompts): the same
  backbone with the adapter off, no second copy of the weights;
* else (no adapter, or one that cannot be switched off): a frozen deep copy of the initial backbone,
  taken before the adapter attaches.

Logs ``train|val/reward_accuracy`` and ``reward_margin`` (implicit rewards ``beta * log-ratio``).

Differs from common implementations (TRL): no label smoothing / IPO / robust variants; the
reference log-probs are recomputed every step instead of precomputed once.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import backbone
from zoo.datamodules.preference import split_pairs
from zoo.errors import ConfigError
from zoo.modules.adapters.base import Adapter
from zoo.modules.base import CausalLMModule, StepOutputs, target_mask
from zoo.registry import register


def dpo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Sequence-level DPO.

    Args: chosen / rejected summed log-ratios ``log pi - log pi_ref`` (B,) each.
    Returns: the mean loss (scalar), chosen rewards (B,) and rejected rewards (B,), rewards = beta * log-ratio
    (detached).
    """
    logits = beta * (chosen_logratios - rejected_logratios)
    loss = -F.logsigmoid(logits).mean()
    return loss, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def can_switch_off(adapter: Adapter) -> bool:
    """Whether ``adapter.disabled()`` runs the backbone without it (False for the identity adapter)."""
    if adapter.is_identity:
        return False
    try:
        with adapter.disabled():
            pass
    except NotImplementedError:
        return False
    return True


class DPOModule(CausalLMModule):
    """Sequence-level DPO against a frozen, adapter-free reference model, on PreferenceDataModule batches."""

    def __init__(self, beta: float = 0.1, reference: str | None = None, **kwargs: Any) -> None:
        """
        Args:
            beta: DPO temperature beta (KL strength); 0.1 as in the paper's and cDPO's settings.
            reference: folder of the reference model; default the initial backbone without the adapter (the
                policy's own weights with the adapter switched off where it can be, else a frozen copy).
            **kwargs: the CausalLMModule arguments (model, lr, adapter, ...).
        """
        if "peft_config" in kwargs:
            raise ConfigError("DPOModule takes no peft_config: give the policy an adapter instead, e.g. "
                              "adapter: {class_path: zoo.modules.adapters.LoRA, init_args: {r: 8}}")
        self._reference_folder = reference
        self.reference_model: nn.Module | None = None
        super().__init__(**kwargs)
        if reference:
            self._set_reference(backbone.load(reference, dtype=self.hparams.dtype)[0])
        elif self.reference_model is None and not can_switch_off(self.adapter):
            raise ConfigError(f"{type(self.adapter).__name__} could not be switched off after attaching (its "
                              "disabled() raised NotImplementedError): give DPO a reference folder "
                              "(model.init_args.reference)")

    # ------------------------------------------------------------------ hooks
    def configure_backbone(self, model: nn.Module) -> nn.Module:
        """Copy the adapter-free initial backbone as the reference when the adapter cannot be switched off
        (decided here, before the adapter attaches; adapters that override ``disabled`` are switchable)."""
        model = super().configure_backbone(model)
        switchable = not self.adapter.is_identity and type(self.adapter).disabled is not Adapter.disabled
        if not self._reference_folder and not switchable:
            self._set_reference(copy.deepcopy(model))
        return model

    def _set_reference(self, model: nn.Module) -> None:
        self.reference_model = model.requires_grad_(False).eval()
        self._reference_adapter = Adapter()  # the reference runs plain: no adapter, no virtual tokens
        self._reference_adapter.bind(model, self.tokenizer)

    def train(self, mode: bool = True) -> DPOModule:
        super().train(mode)
        if self.reference_model is not None:
            self.reference_model.eval()
        return self

    @contextmanager
    def _reference(self) -> Iterator[None]:
        """Run the shared forward / LM-head code on the reference: the adapter switched off, or the frozen
        reference model through a plain (identity) adapter."""
        if self.reference_model is None:
            with self.adapter.disabled():
                yield
            return
        policy, adapter = self.model, self.adapter
        self.model, self.adapter = self.reference_model, self._reference_adapter
        try:
            yield
        finally:
            self.model, self.adapter = policy, adapter

    def reference_token_logps(self, batch: dict[str, Tensor], weights: Tensor) -> Tensor:
        """(2B, T) target-aligned ``weights * log pi_ref(x_t | x_<t)``, no gradient."""
        with torch.no_grad(), self._reference():
            return -self.weighted_token_loss(self(batch), weights)

    def token_logratios(self, batch: dict[str, Tensor], outputs: StepOutputs, weights: Tensor) -> Tensor:
        """(2B, T) ``weights * (log pi - log pi_ref)`` per target token; gradient through the policy term."""
        policy = -self.weighted_token_loss(outputs, weights)
        return policy - self.reference_token_logps(batch, weights)

    @staticmethod
    def _check_pairs(batch: dict[str, Tensor]) -> None:
        if "is_chosen" not in batch:
            raise ConfigError("DPO-style modules need preference batches: use "
                              "data.class_path: zoo.datamodules.preference.PreferenceDataModule")

    def compute_loss(self, batch: dict[str, Tensor], outputs: StepOutputs, weights: Tensor) -> Tensor:
        self._check_pairs(batch)
        chosen, rejected = split_pairs(self.token_logratios(batch, outputs, weights).sum(dim=1))
        loss, chosen_reward, rejected_reward = dpo_loss(chosen, rejected, self.hparams.beta)
        self._log_rewards("train", chosen_reward, rejected_reward)
        return loss

    def _log_rewards(self, stage: str, chosen: Tensor, rejected: Tensor) -> None:
        if self._trainer is None:
            return
        size = chosen.numel()
        self.log(f"{stage}/reward_accuracy", (chosen > rejected).float().mean(), batch_size=size, sync_dist=True)
        self.log(f"{stage}/reward_margin", (chosen - rejected).mean(), batch_size=size, sync_dist=True)
        self.log(f"{stage}/chosen_reward", chosen.mean(), batch_size=size, sync_dist=True)

    @torch.no_grad()
    def sequence_rewards(self, batch: dict[str, Tensor], outputs: StepOutputs | None = None) -> Tensor:
        """(2B,) implicit rewards ``beta * sum_t (log pi - log pi_ref)`` over each response; ``outputs``: the
        policy's forward on ``batch`` when the caller already has it."""
        weights = target_mask(batch["labels"]).float()
        outputs = self(batch) if outputs is None else outputs
        return self.hparams.beta * self.token_logratios(batch, outputs, weights).sum(dim=1)

    def evaluation_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        self._check_pairs(batch)
        outputs = self(batch)
        weights = target_mask(batch["labels"]).float()
        policy = -self.weighted_token_loss(outputs, weights)
        ratios = policy - self.reference_token_logps(batch, weights)
        chosen, rejected = split_pairs(ratios.sum(dim=1))
        loss, chosen_reward, rejected_reward = dpo_loss(chosen, rejected, self.hparams.beta)
        chosen_tokens = split_pairs(weights)[0].sum()
        nll = -split_pairs(policy)[0].sum() / chosen_tokens.clamp_min(1.0)
        self.log(f"{stage}/loss", nll, prog_bar=True, batch_size=int(chosen_tokens.item()), sync_dist=True)
        self.log(f"{stage}/dpo_loss", loss, batch_size=chosen.numel(), sync_dist=True)
        self._log_rewards(stage, chosen_reward, rejected_reward)
        return self.evaluation_objective(stage, batch, ratios, weights, loss)

    def evaluation_objective(self, stage: str, batch: dict[str, Tensor], ratios: Tensor, weights: Tensor,
                             dpo_value: Tensor) -> Tensor:
        """Hook for objectives built on DPO: log their own evaluation figures from the (2B, T) per-token
        log-ratios and weights DPO's evaluation already computed; return the step's value (DPO's loss)."""
        return dpo_value


register(
    name="dpo",
    kind="module",
    paper="Direct Preference Optimization: Your Language Model is Secretly a Reward Model (2023), baseline",
    spec="13",
    config="configs/dpo.yaml",
    target="zoo.modules.objectives.dpo:DPOModule",
    scope="sequence-level sigmoid DPO only (no IPO / label smoothing / precomputed reference log-probs)",
)
