"""cDPO: critical-token contrastive estimation + token-weighted DPO.

Paper: Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning Capability
(2024, arXiv 2411.19943, ICML 2025). Spec: papers/13-cdpo.md. Official code:
chenzhiling9954/Critical-Tokens-Matter.

Implements
    * :func:`train_contrast_models`: the two short fine-tunes from the initial policy, a positive model
      on the chosen (correct) responses and a negative model on the rejected (incorrect) ones of a
      :class:`~zoo.datamodules.preference.PreferenceDataModule`, with the shared ``CausalLMModule`` /
      ``PeftModule`` objective (LoRA r=8 on the MLP, lr 3e-4, as the repo), merged into plain models.
    * :func:`contrastive_token_scores` / :func:`contrastive_scores`: ``s_t = softmax((1+b) z_p - b z_n)[y_t]``
      (b = ``contrast_beta`` = 1), target-aligned (B, T), from two models or two checkpoint folders.
    * :class:`CDPOModule`: ``L = -log sigmoid(beta * (sum_t w_t^w rho_t^w - sum_t (1 - s_t^l) rho_t^l))`` with
      ``rho_t = log pi - log pi_ref`` per token and ``w^w = 1`` (``only_neg``, default) or ``s^w``; the
      official code's per-position form ``mean_t -log sigmoid(beta * (w_t^w rho_t^w - (1 - s_t^l) rho_t^l))``
      over every position of the common padded width (prompt / pad positions add log 2) is
      ``form="per_position_repo"``.
    Scores are computed on the very batch the loss sees (same tokenisation, truncation and padding),
    so the spec's score-alignment pitfall cannot occur; they are cached per (pair index, side).
    * Evaluation logs cDPO's own objective, ``val|test/cdpo_loss`` with ``cdpo_reward_accuracy`` /
      ``cdpo_reward_margin`` (the token-weighted rewards), beside DPO's ``dpo_loss`` and sequence-level
      ``reward_*`` (comparable with the DPO baseline); ``val|test/loss`` stays the chosen-response NLL
      (the shared meaning, from which ``ppl`` is derived). Without contrast models (an evaluation that
      did not fit and has no ``contrast_models`` folders) only the DPO metrics are logged, with a warning.

Differs from the paper / official code: the pairs come from the PreferenceDataModule (built-in
tasks: the worked solution vs a perturbed wrong one) instead of 64 solutions sampled per question
and selected by answer frequency; the positive / negative models train on those chosen / rejected
sides for ``contrast_steps`` steps instead of one epoch over selected samples; the reference is a
frozen copy of the initial policy (or, with an ``adapter``, the backbone with the adapter switched off).
Not implemented: the sampling + answer-frequency data selection and the 64-rollout critical-token
probe (both need large-scale generation).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from zoo import backbone
from zoo.datamodules.preference import split_pairs
from zoo.errors import ConfigError
from zoo.modules.base import CausalLMModule, StepOutputs, fit_autocast, target_mask
from zoo.modules.objectives.dpo import DPOModule
from zoo.modules.peft_module import PeftModule
from zoo.registry import register

DEFAULT_CONTRAST_PEFT = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                         "target_modules": ["gate_proj", "up_proj", "down_proj"]}


# ---------------------------------------------------------------------------- contrastive estimation
def contrastive_token_scores(pos_logits: Tensor, neg_logits: Tensor, labels: Tensor, beta: float = 1.0) -> Tensor:
    """Per-token contrastive estimation ``s_t = softmax((1+beta) z_p - beta z_n)[y_t]``.

    Args: ``pos_logits`` / ``neg_logits`` (B, T, V) with the HF alignment (position t predicts t+1),
    ``labels`` (B, T) (-100 = unsupervised). Returns (B, T) target-aligned scores in [0, 1]; 0 where the
    token is not supervised (and in column 0). The logits are combined before the softmax.
    """
    mixed = (1 + beta) * pos_logits[:, :-1].float() - beta * neg_logits[:, :-1].float()
    targets = labels[:, 1:]
    probs = mixed.softmax(-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    scores = F.pad(probs, (1, 0))
    return scores * target_mask(labels).float()


def _as_model(model: nn.Module | str | Path) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    loaded = backbone.load(str(model))[0]
    return loaded.eval().requires_grad_(False)


@torch.no_grad()
def contrastive_scores(pos_model: nn.Module | str | Path, neg_model: nn.Module | str | Path,
                       batch: dict[str, Tensor], beta: float = 1.0) -> Tensor:
    """(B, T) critical-token scores of ``batch`` (SFT- or preference-style) from two models or folders."""
    pos, neg = _as_model(pos_model), _as_model(neg_model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    return contrastive_token_scores(pos(**inputs).logits, neg(**inputs).logits, batch["labels"], beta)


def train_contrast_models(data, model: str, steps: int = 100, lr: float = 3e-4,
                          peft_config: dict[str, Any] | None = None, output_dir: str | Path | None = None,
                          seed: int = 0, device: str | torch.device = "cpu",
                          autocast: Callable[[], AbstractContextManager] = nullcontext) -> tuple[nn.Module, nn.Module]:
    """Fine-tune a positive (chosen side) and a negative (rejected side) model from ``model``.

    ``data`` is a PreferenceDataModule; each model trains ``steps`` AdamW steps on one side with the
    shared SFT objective (``CausalLMModule.compute_loss``), LoRA per ``peft_config`` (default: r=8 on the
    MLP, the repo's setting) merged afterwards; ``peft_config={}`` trains all parameters. Returns the two
    frozen models (and saves them as HF folders ``output_dir/positive`` and ``output_dir/negative``).
    ``autocast``: the forward's precision context (the fit's, :func:`zoo.modules.base.fit_autocast`).
    """
    config = DEFAULT_CONTRAST_PEFT if peft_config is None else peft_config
    trained = []
    for side in ("chosen", "rejected"):
        torch.manual_seed(seed)
        if config:
            module: CausalLMModule = PeftModule(model=model, peft_config=config, lr=lr, export=False)
        else:
            module = CausalLMModule(model=model, lr=lr, export=False)
        module.to(device).train()
        optimizer = torch.optim.AdamW(list(module.trainable_parameters().values()), lr=lr)
        step = 0
        while step < steps:
            for batch in data.side_dataloader(side):
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast():
                    outputs = module(batch)
                    loss = module.compute_loss(batch, outputs, target_mask(batch["labels"]).float())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                if step >= steps:
                    break
        net = module.model.merge_and_unload() if config else module.model
        net = net.eval().requires_grad_(False)
        if output_dir is not None:
            folder = Path(output_dir) / ("positive" if side == "chosen" else "negative")
            net.save_pretrained(folder)
            module.tokenizer.save_pretrained(folder)
        trained.append(net)
    return trained[0], trained[1]


# ---------------------------------------------------------------------------- the objective
def cdpo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_scores: Tensor, rejected_scores: Tensor,
              chosen_mask: Tensor, rejected_mask: Tensor, beta: float = 0.1, only_neg: bool = True,
              form: Literal["sequence", "per_position_repo"] = "sequence") -> tuple[Tensor, Tensor, Tensor]:
    """Token-weighted DPO.

    Args: per-token log-ratios ``log pi - log pi_ref``, contrastive scores s and 0/1 (or weight) masks, all
    (B, T) target-aligned (rows of one pair share the index b); ``beta`` the DPO temperature.
    Returns: the loss (scalar) and the weighted chosen / rejected rewards ``beta * sum_t weight * rho`` (B,).
    """
    chosen_weight = chosen_mask * (chosen_scores if not only_neg else 1.0)
    rejected_weight = rejected_mask * (1.0 - rejected_scores)
    chosen_terms = chosen_weight * chosen_logratios
    rejected_terms = rejected_weight * rejected_logratios
    chosen_sum, rejected_sum = chosen_terms.sum(dim=1), rejected_terms.sum(dim=1)
    if form == "sequence":
        loss = -F.logsigmoid(beta * (chosen_sum - rejected_sum)).mean()
    elif form == "per_position_repo":
        loss = -F.logsigmoid(beta * (chosen_terms - rejected_terms)).mean()
    else:
        raise ValueError(f"unknown cDPO form {form!r}; use sequence or per_position_repo")
    return loss, (beta * chosen_sum).detach(), (beta * rejected_sum).detach()


class CDPOModule(DPOModule):
    """Token-level DPO whose rejected-side tokens are weighted by 1 - critical-token score."""

    def __init__(
        self,
        contrast_beta: float = 1.0,
        only_neg: bool = True,
        form: Literal["sequence", "per_position_repo"] = "sequence",
        contrast_models: list[str] | None = None,
        contrast_steps: int = 100,
        contrast_lr: float = 3e-4,
        contrast_peft_config: dict[str, Any] | None = None,
        cache_scores: bool = True,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            contrast_beta: contrast strength b in s_t = softmax((1+b) z_p - b z_n)[y_t] (paper: 1).
            only_neg: weight only the rejected side (chosen weights 1; paper/repo default), else chosen by s^w.
            form: ``sequence`` (the paper's equation) or ``per_position_repo`` (the official trainer's
                position-by-position loss, for parity experiments).
            contrast_models: two folders [positive, negative]; default: train them at fit start.
            contrast_steps: steps of each contrast fine-tune when ``contrast_models`` is not given.
            contrast_lr: learning rate of the contrast fine-tunes (repo: 3e-4 with LoRA).
            contrast_peft_config: peft config of the contrast fine-tunes (default LoRA r=8 on the MLP; ``{}``
                = all parameters).
            cache_scores: keep each training pair's scores after its first visit (they never change).
            **kwargs: DPOModule arguments (beta = DPO temperature, 0.1; reference; adapter; model; lr; ...).
        """
        super().__init__(**kwargs)
        if contrast_models is not None and len(contrast_models) != 2:
            raise ConfigError("contrast_models takes two folders: [positive, negative]")
        self._contrast: list[nn.Module] = []
        self._score_cache: dict[tuple[int, bool], Tensor] = {}

    def on_fit_start(self) -> None:
        if self._contrast:
            return
        hp = self.hparams
        if hp.contrast_models:
            models = [_as_model(path) for path in hp.contrast_models]
        else:
            data = self.trainer.datamodule
            if data is None or not hasattr(data, "side_dataloader"):
                raise ConfigError("cDPO trains its contrast models on a PreferenceDataModule; or pass contrast_models")
            steps = 1 if self.trainer.fast_dev_run else hp.contrast_steps
            models = list(train_contrast_models(data, hp.model, steps=steps, lr=hp.contrast_lr,
                                                peft_config=hp.contrast_peft_config,
                                                # every rank trains the same two models (same data order
                                                # and seed); one writes them, or the writes would race
                                                output_dir=(Path(self.trainer.default_root_dir) / "contrast"
                                                            if self.trainer.is_global_zero else None),
                                                device=self.device,
                                                autocast=lambda: fit_autocast(self.trainer)))
        self.set_contrast_models(*models)

    def set_contrast_models(self, positive: nn.Module, negative: nn.Module) -> None:
        """Use these (frozen) positive / negative models for the critical-token scores."""
        self._contrast = [positive.eval().requires_grad_(False), negative.eval().requires_grad_(False)]
        self._score_cache.clear()

    def token_scores(self, batch: dict[str, Tensor]) -> Tensor:
        """(2B, T) contrastive scores of the batch's target tokens (cached per pair index and side)."""
        if not self._contrast:
            raise ConfigError("cDPO has no contrast models yet: fit() trains them, or call set_contrast_models")
        keys = [(int(i), bool(c)) for i, c in zip(batch["index"].tolist(), batch["is_chosen"].tolist())]
        width = batch["input_ids"].shape[1]
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        use_cache = self.hparams.cache_scores and self.training
        if use_cache and all(k in self._score_cache for k in keys):
            rows = [F.pad(self._score_cache[k], (0, width - self._score_cache[k].numel())) for k in keys]
            return torch.stack(rows).to(batch["input_ids"].device)
        for net in self._contrast:
            net.to(batch["input_ids"].device)
        scores = contrastive_scores(self._contrast[0], self._contrast[1], batch, self.hparams.contrast_beta)
        if use_cache:
            for key, row, length in zip(keys, scores.cpu(), lengths):
                self._score_cache[key] = row[: int(length)].clone()
        return scores

    def compute_loss(self, batch: dict[str, Tensor], outputs: StepOutputs, weights: Tensor) -> Tensor:
        self._check_pairs(batch)
        ratios = self.token_logratios(batch, outputs, weights)  # already zero where weights are 0
        scores = self.token_scores(batch)
        mask = target_mask(batch["labels"]).float()
        (ratio_c, ratio_r), (score_c, score_r), (mask_c, mask_r) = (split_pairs(t) for t in (ratios, scores, mask))
        loss, chosen_reward, rejected_reward = cdpo_loss(ratio_c, ratio_r, score_c, score_r, mask_c, mask_r,
                                                         beta=self.hparams.beta, only_neg=self.hparams.only_neg,
                                                         form=self.hparams.form)
        self._log_rewards("train", chosen_reward, rejected_reward)
        if self._trainer is not None:
            self.log("train/rejected_score", (score_r * mask_r).sum() / mask_r.sum().clamp_min(1.0))
        return loss

    def _evaluation_contrast(self) -> bool:
        """Whether evaluation can score tokens: contrast models set, or loadable from ``contrast_models``."""
        if not self._contrast and self.hparams.contrast_models:
            self.set_contrast_models(*(_as_model(path) for path in self.hparams.contrast_models))
        if not self._contrast and not getattr(self, "_warned_no_contrast", False):
            self._warned_no_contrast = True
            rank_zero_warn("cDPO evaluation without contrast models (no fit, no contrast_models folders): "
                           "logging the DPO metrics only, no cdpo_loss")
        return bool(self._contrast)

    def evaluation_objective(self, stage: str, batch: dict[str, Tensor], ratios: Tensor, weights: Tensor,
                             dpo_value: Tensor) -> Tensor:
        """cDPO's token-weighted loss and rewards beside DPO's (logged by DPO's evaluation step)."""
        if not self._evaluation_contrast():
            return dpo_value
        (ratio_c, ratio_r), (mask_c, mask_r) = split_pairs(ratios), split_pairs(weights)
        pairs = ratio_c.shape[0]
        score_c, score_r = split_pairs(self.token_scores(batch))
        loss, chosen_reward, rejected_reward = cdpo_loss(ratio_c, ratio_r, score_c, score_r, mask_c, mask_r,
                                                         beta=self.hparams.beta, only_neg=self.hparams.only_neg,
                                                         form=self.hparams.form)
        self.log(f"{stage}/cdpo_loss", loss, batch_size=pairs, sync_dist=True)
        self.log(f"{stage}/cdpo_reward_accuracy", (chosen_reward > rejected_reward).float().mean(),
                 batch_size=pairs, sync_dist=True)
        self.log(f"{stage}/cdpo_reward_margin", (chosen_reward - rejected_reward).mean(), batch_size=pairs,
                 sync_dist=True)
        return loss


register(
    name="cdpo",
    kind="module",
    paper="Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning Capability (2024)",
    spec="13",
    config="configs/cdpo.yaml",
    target="zoo.modules.objectives.cdpo:CDPOModule",
    scope="pairs from PreferenceDataModule (perturbed worked solutions), not 64 sampled solutions per question; "
          "no rollout probe",
)
