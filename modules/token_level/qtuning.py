"""Q-Tuning: per-batch joint sample and token pruning on the Error-Uncertainty plane.

Paper: Winning the Pruning Gamble: A Unified Approach to Joint Sample and Token Pruning for Efficient
Supervised Fine-Tuning (2025, arXiv 2509.23873). Spec: papers/02-qtuning.md. Official code: the
Q-tuning/Q-tuning LLaMA-Factory fork, SFT trainer plug ``wisely`` with token method ``wise``.

Implements (spec steps 1-7, following the official code where the page is ambiguous)
    * sample coordinates from the training forward's detached statistics (one forward, as the code):
      ``PPL = exp(mean nll over response tokens)`` (nll clamped at ``max_nll`` before ``exp``) and
      ``Ent = mean full-vocabulary entropy`` over response tokens (``entropy_positions="response"``,
      the page formula) or over every attention-valid position (``"all"``, the code);
    * quadrants with batch quantiles (linear interpolation): Q2 (misconception) ``PPL > Q_PPL(1-a)``
      and ``Ent <= Q_Ent(b)``, Q4 (calibration) ``PPL <= Q_PPL(a)`` and ``Ent > Q_Ent(1-b)``; Q1, Q3 and the
      middle bands are dropped (weight 0 on every token);
    * the code's bisection of ``a = b`` in ``[0, max_quantile]`` (``bisect_iterations``, ``bisect_tolerance``)
      towards ``sample_ratio`` and its top-up on shortfall to ``K = max(1, round(sample_ratio * B))`` by
      ``max(p - e, e - p)`` of min-max normalised PPL/Ent (topped-up samples join Q2 if ``p - e >= e - p``);
    * token pruning inside Q2 samples only, score ``s_i = (1 - lambda) ppl_i + lambda (ppl_{i-1} +
      ppl_{i+1})``
      (``neighbor_mean=True`` adds the /2); a prompt neighbour counts 1 (= exp(0)), padding and the
      sequence edges 0. ``token_budget="global"`` (code): keep ``round(N_tok * sample_ratio * token_ratio)``
      of the batch's attention-valid positions, tokens of dropped samples count toward the cut, and the
      rest of the cut is the highest-scoring Q2 response tokens over the whole batch (``keep="lowest"``;
      ``"highest"`` cuts the lowest, the code's ``fwise`` ablation). ``"per_sample"``: every Q2 sample
      keeps ``ceil(token_ratio * n_resp)`` tokens. Q4 samples keep every response token;
    * the loss is the module's ``token_mean``: CE summed over kept response tokens / their number.

Differs from the official code
    * alignment: scores are target-aligned (``nll[t]`` is token ``t``'s loss); the code's shifted
      array makes the last response token's right neighbour an attention-valid position (counts 1),
      here it is padding or the edge (counts 0);
    * ``loss_norm="attention"`` (the code divides by kept attention-valid positions, prompt included) is
      not offered: normalisation is the module's ``reduction``, not a selector's business.

DDP: quantiles, bisection, top-up and the global token budget are computed per rank over its own
micro-batch (no all-gather), exactly like the official per-device trainer; a rank's batch below
``min_batch_size`` trains on every token (quantiles of a few samples are degenerate): rank zero warns
once, and ``qtuning/active`` (logged every step, 1 = pruned, 0 = trained whole) shows which steps did.

Modes (``scoring``): ``training_forward`` (default, the official code) scores on the detached
statistics of the training forward, so pruned tokens save only the LM head; ``separate_pass`` (the
spec's efficient mode) runs a no-grad scoring forward in ``on_train_batch_start`` and removes the
dropped samples from the batch (every key, rows kept in order), so forward and backward run on the
kept samples only. Its scoring forward costs one extra no-grad pass; it pays off when few samples
are kept.

Not implemented: the code's ``loss_norm="attention"`` (see above); a score buffer across batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from zoo.errors import check_range
from zoo.modules.base import StepOutputs, chunked_log_probs, fit_autocast, target_mask
from zoo.registry import register


# ---------------------------------------------------------------------------- pure tensor functions
def sample_coordinates(nll: Tensor, entropy: Tensor, response_mask: Tensor,
                       entropy_mask: Tensor | None = None,
                       max_nll: float = 50.0) -> tuple[Tensor, Tensor]:
    """Per-sample ``PPL = exp(mean nll)`` over ``response_mask`` and mean ``entropy`` over ``entropy_mask``.

    Shapes: nll, entropy, masks (B, T) -> ppl (B,), ent (B,), float64.
    """
    response = response_mask.double()
    mean_nll = (nll.double() * response).sum(1) / response.sum(1).clamp_min(1.0)
    ppl = mean_nll.clamp(max=max_nll).exp()
    where = (response_mask if entropy_mask is None else entropy_mask).double()
    ent = (entropy.double() * where).sum(1) / where.sum(1).clamp_min(1.0)
    return ppl, ent


def quadrant_masks(ppl: Tensor, ent: Tensor, alpha: float, beta: float) -> tuple[Tensor, Tensor]:
    """(B,) bool Q2 (high PPL, low Ent: misconception) and Q4 (low PPL, high Ent: calibration)."""
    ppl, ent = ppl.double(), ent.double()
    ppl_hi, ppl_lo = torch.quantile(ppl, 1.0 - alpha), torch.quantile(ppl, alpha)
    ent_hi, ent_lo = torch.quantile(ent, 1.0 - beta), torch.quantile(ent, beta)
    return (ppl > ppl_hi) & (ent <= ent_lo), (ppl <= ppl_lo) & (ent > ent_hi)


def _minmax(x: Tensor) -> Tensor:
    return (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)


@dataclass
class Triage:
    """Result of the sample stage: Q2 / Q4 masks (B,), the final quantile, iterations and top-up count."""

    q2: Tensor
    q4: Tensor
    alpha: float
    iterations: int
    bisect_fraction: float
    topped_up: int

    @property
    def kept(self) -> Tensor:
        return self.q2 | self.q4


def triage(ppl: Tensor, ent: Tensor, sample_ratio: float, iterations: int = 10, tolerance: float = 0.01,
           max_quantile: float = 0.49) -> Triage:
    """Bisect ``alpha = beta`` towards ``sample_ratio`` kept samples, then top up to ``K`` (official code)."""
    size = ppl.numel()
    low, high = 0.0, max_quantile
    step = 0
    for step in range(1, iterations + 1):  # noqa: B007  (the last iterate is reported)
        alpha = (low + high) / 2
        q2, q4 = quadrant_masks(ppl, ent, alpha, alpha)
        fraction = float((q2 | q4).double().mean())
        if abs(fraction - sample_ratio) < tolerance:
            break
        if fraction < sample_ratio:
            low = alpha
        else:
            high = alpha
    target = max(1, round(sample_ratio * size))
    kept = q2 | q4
    missing = target - int(kept.sum())
    topped_up = 0
    if missing > 0:
        p, e = _minmax(ppl.double()), _minmax(ent.double())
        priority = torch.maximum(p - e, e - p).masked_fill(kept, float("-inf"))
        chosen = priority.argsort(descending=True, stable=True)[:missing]
        q2, q4 = q2.clone(), q4.clone()
        to_q2 = (p - e >= e - p)[chosen]
        q2[chosen[to_q2]] = True
        q4[chosen[~to_q2]] = True
        topped_up = int(chosen.numel())
    return Triage(q2, q4, alpha, step, fraction, topped_up)


def token_scores(nll: Tensor, response_mask: Tensor, attention_mask: Tensor, neighbor_weight: float,
                 neighbor_mean: bool = False, max_nll: float = 50.0) -> Tensor:
    """``s_i = (1 - lambda) ppl_i + lambda (ppl_{i-1} + ppl_{i+1})`` (B, T); /2 on the sum if
    ``neighbor_mean``.

    ``ppl_i = exp(nll_i)`` on response tokens, 1 on other attention-valid positions (prompt), 0 on
    padding; neighbours outside the sequence count 0.
    """
    valid = attention_mask.bool()
    ppl = torch.where(response_mask, nll.double().clamp(max=max_nll).exp(), valid.double())
    neighbours = F.pad(ppl[:, :-1], (1, 0)) + F.pad(ppl[:, 1:], (0, 1))
    if neighbor_mean:
        neighbours = neighbours / 2
    return (1.0 - neighbor_weight) * ppl + neighbor_weight * neighbours


def prune_tokens(scores: Tensor, response_mask: Tensor, attention_mask: Tensor, q2: Tensor, kept: Tensor,
                 sample_ratio: float, token_ratio: float,
                 budget: Literal["global", "per_sample"] = "global",
                 keep: Literal["lowest", "highest"] = "lowest") -> Tensor:
    """(B, T) 0/1 weights: response tokens of kept samples, minus the cut taken from Q2 tokens only."""
    weights = response_mask & kept[:, None]
    q2_tokens = response_mask & q2[:, None]
    if token_ratio >= 1.0 or not q2_tokens.any():
        return weights.float()
    ranking = scores.double() if keep == "lowest" else -scores.double()  # cut the largest ranking values
    if budget == "global":
        total = int(attention_mask.sum())
        target = round(total * sample_ratio * token_ratio)
        dropped = int(attention_mask[~kept].sum())
        cut = min(max(0, total - target - dropped), int(q2_tokens.sum()))
        if cut > 0:
            flat = ranking.masked_fill(~q2_tokens, float("-inf")).flatten()
            index = flat.argsort(descending=True, stable=True)[:cut]
            weights = weights.flatten().clone()
            weights[index] = False
            weights = weights.view(scores.shape)
        return weights.float()
    if budget != "per_sample":
        raise ValueError(f"unknown token_budget {budget!r}; use global or per_sample")
    n_resp = q2_tokens.sum(1)
    keep_n = torch.ceil(torch.round(n_resp.double() * token_ratio, decimals=9)).long()
    order = ranking.masked_fill(~q2_tokens, float("inf")).argsort(dim=1, stable=True)  # lowest ranking first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    pruned = q2_tokens & (ranks >= keep_n[:, None])
    return (weights & ~pruned).float()


def all_position_entropy(module: L.LightningModule, outputs: StepOutputs, attention_mask: Tensor,
                         chunk: int = 1024) -> Tensor:
    """(B, T) entropy of the predictive distribution at every attention-valid position (the code's Ent)."""
    weight, bias = module.lm_head_weight()
    entropy = torch.zeros(attention_mask.shape, dtype=torch.float32, device=outputs.hidden.device)
    index = attention_mask.bool().nonzero(as_tuple=True)
    with torch.no_grad():
        for rows, logp in chunked_log_probs(outputs.hidden, weight, bias, index, chunk):
            entropy[rows] = -(logp.exp() * logp).sum(-1)
    return entropy


# ---------------------------------------------------------------------------- the callback
class QTuningCallback(Callback):
    """Q-Tuning: keep misconception (token-pruned) and calibration (whole) samples of each batch."""

    def __init__(
        self,
        sample_ratio: float = 0.25,
        token_ratio: float = 0.7,
        neighbor_weight: float = 0.5,
        neighbor_mean: bool = False,
        token_budget: Literal["global", "per_sample"] = "global",
        keep: Literal["lowest", "highest"] = "lowest",
        entropy_positions: Literal["response", "all"] = "response",
        bisect_iterations: int = 10,
        bisect_tolerance: float = 0.01,
        max_quantile: float = 0.49,
        min_batch_size: int = 4,
        max_nll: float = 50.0,
        scoring: Literal["training_forward", "separate_pass"] = "training_forward",
    ) -> None:
        """
        Args:
            sample_ratio: target fraction of samples kept per batch (r_sample; the paper's main budget 25%).
            token_ratio: token keep ratio inside the budget (r_token; 0.7 or 0.5 in the main tables).
            neighbor_weight: neighbour weight lambda of the token score (code default 0.5).
            neighbor_mean: divide the neighbour sum by 2 (the code does not).
            token_budget: ``global`` batch budget (code) or ``per_sample`` ceil(r_token * n) per Q2 sample.
            keep: ``lowest`` keeps the low-score tokens (code ``wise``); ``highest`` = ``fwise`` ablation.
            entropy_positions: sample entropy over ``response`` tokens (page) or ``all`` valid positions
                (code).
            bisect_iterations: maximum bisection iterations on the quantile (code 10).
            bisect_tolerance: stop when the kept fraction is within this of sample_ratio (code 0.01).
            max_quantile: upper end of the quantile search range (code 0.49).
            min_batch_size: smaller micro-batches are trained whole (quantiles would be degenerate; warned
                once).
            max_nll: clamp of nll before exp (overflow guard).
            scoring: ``training_forward`` (code: score on the training forward) or ``separate_pass`` (a
                no-grad
                scoring pass, then train on the kept samples only: the compute-saving mode).
        """
        super().__init__()
        check_range("QTuningCallback sample_ratio", sample_ratio, 0.0, 1.0, "the paper's main budget is 0.25",
                    low_open=True)
        check_range("QTuningCallback token_ratio", token_ratio, 0.0, 1.0, "the paper uses 0.7 or 0.5",
                    low_open=True)
        self.sample_ratio, self.token_ratio = sample_ratio, token_ratio
        self.neighbor_weight, self.neighbor_mean = neighbor_weight, neighbor_mean
        self.token_budget, self.keep, self.entropy_positions = token_budget, keep, entropy_positions
        self.bisect_iterations, self.bisect_tolerance = bisect_iterations, bisect_tolerance
        self.max_quantile, self.min_batch_size, self.max_nll = max_quantile, min_batch_size, max_nll
        self.scoring = scoring
        self.last_triage: Triage | None = None
        self._pending: Tensor | None = None
        self._warned_small_batch = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: dict[str, Tensor],
                             batch_idx: int) -> None:
        if self.scoring != "separate_pass":
            return
        size = batch["input_ids"].shape[0]
        with torch.no_grad(), fit_autocast(trainer, grad=False):  # the step's precision, not fp32
            weights = self.score(pl_module, batch, pl_module(batch))
        rows = (weights != 0).any(1).nonzero().flatten()
        if rows.numel() < size:
            for key, value in list(batch.items()):
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == size:
                    batch[key] = value.index_select(0, rows.to(value.device))
        self._pending = weights.index_select(0, rows)

    def select(self, module: L.LightningModule, batch: dict[str, Tensor], outputs: StepOutputs) -> Tensor:
        """TokenSelector hook: (B, T) 0/1 weights after sample triage and Q2 token pruning."""
        if self.scoring == "separate_pass" and self._pending is not None:
            weights, self._pending = self._pending, None
            if weights.shape == batch["labels"].shape:
                return weights
        return self.score(module, batch, outputs)

    def score(self, module: L.LightningModule, batch: dict[str, Tensor], outputs: StepOutputs) -> Tensor:
        """(B, T) 0/1 weights after sample triage and Q2 token pruning, from ``outputs``' detached
        statistics."""
        attention = batch["attention_mask"]
        response = target_mask(batch["labels"]) & attention.bool()
        active = response.shape[0] >= self.min_batch_size
        if module._trainer is not None:
            module.log("qtuning/active", float(active))
        if not active:
            if not self._warned_small_batch:
                self._warned_small_batch = True
                rank_zero_warn(f"Q-Tuning: a batch of {response.shape[0]} is below min_batch_size="
                               f"{self.min_batch_size}; such batches train on every token (plain SFT). "
                               "Raise the batch size or lower min_batch_size; qtuning/active logs 0 on them.")
            return torch.ones_like(response, dtype=torch.float32)
        nll = outputs.per_token_loss()
        if self.entropy_positions == "all":
            entropy, entropy_mask = all_position_entropy(module, outputs, attention), attention.bool()
        else:
            entropy, entropy_mask = outputs.entropy(), response
        ppl, ent = sample_coordinates(nll, entropy, response, entropy_mask, self.max_nll)
        result = triage(ppl, ent, self.sample_ratio, self.bisect_iterations, self.bisect_tolerance,
                        self.max_quantile)
        self.last_triage = result
        scores = token_scores(nll, response, attention, self.neighbor_weight, self.neighbor_mean,
                              self.max_nll)
        weights = prune_tokens(scores, response, attention, result.q2, result.kept, self.sample_ratio,
                               self.token_ratio, self.token_budget, self.keep)
        if module._trainer is not None:
            module.log("qtuning/kept_samples", result.kept.float().mean())
            module.log("qtuning/q2_samples", result.q2.float().mean())
        return weights


register(
    name="qtuning",
    kind="callback",
    paper="Winning the Pruning Gamble: A Unified Approach to Joint Sample and Token Pruning for Efficient "
          "Supervised Fine-Tuning (2025)",
    spec="02",
    config="configs/qtuning.yaml",
    target="zoo.modules.token_level.qtuning:QTuningCallback",
    scope="no attention-position loss normalisation (the code's denominator); no cross-batch score buffer",
)
