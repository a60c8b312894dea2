"""DPO: sequence-level Direct Preference Optimization with a frozen reference model (baseline).

Paper: Direct Preference Optimization: Your Language Model is Secretly a Reward Model (2023,
Rafailov et al.). The preference baseline of spec 13 (cDPO, papers/13-cdpo.md).

Implements ``L = -log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))``
averaged over pairs, on :class:`zoo.datamodules.preference.PreferenceDataModule` batches (2B rows,
chosen first). Per-token log-probs come from the shared pieces: ``self(batch)`` (one forward over
chosen + rejected rows) and ``weighted_token_loss`` (the selected-CE head), so token selectors
still apply: a token with selector weight w contributes ``w * log p``. The reference is a frozen
copy of the initial policy, a checkpoint folder (``reference``), or, with ``peft_config``, the base
model with the adapters disabled. Logs ``train|val/reward_accuracy`` and ``reward_margin`` (implicit
rewards ``beta * log-ratio``).

Differs from common implementations (TRL): no label smoothing / IPO / robust variants; the
reference log-probs are recomputed every step instead of precomputed once.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import backbone
from zoo.datamodules.preference import split_pairs
from zoo.errors import ConfigError
from zoo.modules.base import CausalLMModule, StepOutputs, target_mask
from zoo.modules.peft_module import PeftModule
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


class DPOModule(CausalLMModule):
    """Sequence-level DPO against a frozen reference model, on PreferenceDataModule batches."""

    def __init__(self, beta: float = 0.1, reference: str | None = None,
                 peft_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        """
        Args:
            beta: DPO temperature beta (KL strength); 0.1 as in the paper's and cDPO's settings.
            reference: folder of the reference model; default a frozen copy of the initial policy (or,
                with ``peft_config``, the base model with adapters disabled).
            peft_config: optional peft config dict (e.g. LoRA) for the policy; the reference is then the
                adapter-free base, with no second copy of the weights.
            **kwargs: the CausalLMModule arguments (model, lr, ...).
        """
        self._peft_config = dict(peft_config) if peft_config else None
        super().__init__(**kwargs)
        if self._peft_config is not None:
            self.reference_model: nn.Module | None = None
        else:
            ref = backbone.load(reference, dtype=self.hparams.dtype)[0] if reference else copy.deepcopy(self.model)
            ref.requires_grad_(False)
            self.reference_model = ref.eval()

    # ------------------------------------------------------------------ hooks
    def configure_backbone(self, model: nn.Module) -> nn.Module:
        if self._peft_config is None:
            return model
        return PeftModule.configure_backbone(self, model)  # the shared peft wrapping, same config format

    def train(self, mode: bool = True) -> DPOModule:
        super().train(mode)
        if self.reference_model is not None:
            self.reference_model.eval()
        return self

    @contextmanager
    def _reference(self):
        """Run the shared forward / LM-head code on the reference model."""
        if self.reference_model is None:
            with self.model.disable_adapter():
                yield
            return
        policy = self.model
        self.model = self.reference_model
        self.adapter.bind(self.reference_model, self.tokenizer)
        try:
            yield
        finally:
            self.model = policy
            self.adapter.bind(policy, self.tokenizer)

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
        return loss


register(
    name="dpo",
    kind="module",
    paper="Direct Preference Optimization: Your Language Model is Secretly a Reward Model (2023), baseline",
    spec="13",
    config="configs/dpo.yaml",
    target="zoo.modules.objectives.dpo:DPOModule",
    scope="sequence-level sigmoid DPO only (no IPO / label smoothing / precomputed reference log-probs)",
)
