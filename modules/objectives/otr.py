"""OTR: One-Token Rollout, SFT rewritten as a token-level policy gradient over sampled candidate tokens.

Paper: One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy Gradient (2025,
arXiv 2509.26313). Spec: papers/04-otr.md. No official code is public.

Implements, at every supervised position t (teacher forcing, no autoregressive rollout, no extra
forward: the LM head runs on the module's own final hidden states):
    1. K candidate tokens a_{t,k} ~ pi'(.|s_t) = softmax(z_t / tau), sampled with replacement from the
       DETACHED temperature-scaled policy (fp32; a per-step seeded generator);
    2. reward r(a) = 1 if a == y_t else beta (beta < 0), under stop-gradient;
    3. the REINFORCE surrogate ``L_t = -(1/K) sum_k r(a_{t,k}) log pi(a_{t,k} | s_t)`` (no baseline, no ratio);
    4. per-token terms times the token-selector weights, reduced with the shared ``reduce_loss``:
       ``length_norm="per_sequence"`` (the paper's 1/T per sequence, then the batch mean) or ``per_token``.
    ``estimator="expected"`` is the K -> infinity closed form
    ``-pi'(y) log pi(y) - beta sum_{a != y} pi'(a) log pi(a)`` (a zoo addition, labelled as such; with
    beta = 0 and tau = 1 it is Dynamic Fine-Tuning's ``-sg(p(y)) log p(y)``).
    Any ``adapter`` from YAML wraps the policy (``configs/otr_lora.yaml``: OTR with LoRA): the candidates are
    drawn from the head logits of the adapter's hidden states at the real positions (a soft prompt's virtual
    tokens never score), in the training forward itself: no decoding.

Unverified against the paper's text (the spec only has reviewers' quotes), so options with these
defaults: ``tau=1.5`` (reviews: "> 1"), ``beta=-0.1`` (reviews: "slightly negative"), ``sft_weight=0``
(no SFT term mixed in), ``include_gold=False`` (the gold token is not forced into the sample set).
``num_samples=256`` is the paper's K.
Not implemented: nothing of the method itself; the paper's 7B-scale runs are out of scope.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from zoo.modules.base import CausalLMModule, StepOutputs, reduce_loss, shift_for_prediction
from zoo.registry import register


def sampling_distribution(logits: Tensor, tau: float) -> Tensor:
    """pi' = softmax(z / tau) in fp32, detached: (N, V) -> (N, V)."""
    return (logits.detach().float() / tau).softmax(dim=-1)


def sample_candidates(logits: Tensor, num_samples: int, tau: float, generator: torch.Generator | None = None) -> Tensor:
    """K candidate tokens per row from pi', with replacement: (N, V) -> (N, K) long."""
    return torch.multinomial(sampling_distribution(logits, tau), num_samples, replacement=True, generator=generator)


def otr_token_loss(
    logits: Tensor,
    targets: Tensor,
    beta: float = -0.1,
    tau: float = 1.5,
    estimator: Literal["mc", "expected"] = "mc",
    samples: Tensor | None = None,
    num_samples: int = 256,
    include_gold: bool = False,
    generator: torch.Generator | None = None,
) -> Tensor:
    """OTR per-token loss.

    Args: ``logits`` (N, V) predicting ``targets`` (N,); ``samples`` (N, K) optional pre-drawn candidates
    (drawn from pi' when None). Returns (N,) losses, with gradient only through log pi (never pi').
    """
    logp = logits.float().log_softmax(dim=-1)
    if estimator == "expected":
        weights = sampling_distribution(logits, tau) * beta
        gold = sampling_distribution(logits, tau).gather(-1, targets.unsqueeze(-1))
        weights = weights.scatter(-1, targets.unsqueeze(-1), gold)
        return -(weights * logp).sum(dim=-1)
    if estimator != "mc":
        raise ValueError(f"unknown OTR estimator {estimator!r}; use mc or expected")
    if samples is None:
        samples = sample_candidates(logits, num_samples, tau, generator)
    if include_gold:
        samples = torch.cat([samples, targets.unsqueeze(-1)], dim=-1)
    rewards = torch.where(samples == targets.unsqueeze(-1), 1.0, beta).to(logp.dtype)
    return -(rewards * logp.gather(-1, samples)).mean(dim=-1)


def _chunk_otr(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, samples: Tensor,
               beta: float, tau: float, estimator: str, sft_weight: float) -> Tensor:
    logits = F.linear(hidden, weight, bias)
    loss = otr_token_loss(logits, targets, beta=beta, tau=tau, estimator=estimator,
                          samples=samples if estimator == "mc" else None)
    if sft_weight:
        loss = loss + sft_weight * F.cross_entropy(logits.float(), targets, reduction="none")
    return loss


class OTRModule(CausalLMModule):
    """SFT as one-token on-policy rollouts: sampled candidates, reward 1 for the gold token, beta otherwise."""

    def __init__(
        self,
        num_samples: int = 256,
        tau: float = 1.5,
        beta: float = -0.1,
        estimator: Literal["mc", "expected"] = "mc",
        length_norm: Literal["per_sequence", "per_token"] = "per_sequence",
        sft_weight: float = 0.0,
        include_gold: bool = False,
        sample_seed: int = 0,
        chunk_size: int = 1024,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_samples: K, candidate tokens sampled per supervised position (paper: 256).
            tau: temperature of the detached sampling policy pi' = softmax(z / tau) (paper: > 1; unverified, 1.5).
            beta: reward of a sampled token that is not the gold one (paper: slightly negative; unverified, -0.1).
            estimator: ``mc`` (sampled, the paper) or ``expected`` (closed form over the vocabulary, zoo addition).
            length_norm: ``per_sequence`` (1/T per sequence, the paper) or ``per_token`` (mean over all tokens).
            sft_weight: weight of an added plain CE term (unverified whether the paper mixes one in; 0).
            include_gold: also append the gold token to every sample set (unverified; off).
            sample_seed: base seed of the sampler; step s uses sample_seed + s (reproducible runs).
            chunk_size: supervised rows per LM-head chunk (logits are recomputed in backward).
            **kwargs: the CausalLMModule arguments (model, lr, ...).
        """
        super().__init__(**kwargs)

    def otr_per_token(self, outputs: StepOutputs, weights: Tensor) -> Tensor:
        """(B, T) target-aligned OTR loss on tokens with weight != 0 (zero elsewhere), not yet weighted."""
        hp = self.hparams
        pred_hidden, targets = shift_for_prediction(outputs.hidden, outputs.labels)
        keep = (weights[:, 1:] != 0) & (targets >= 0)
        rows = keep.nonzero(as_tuple=True)
        head_weight, head_bias = self.lm_head_weight()
        out = outputs.hidden.new_zeros(targets.shape, dtype=torch.float32)
        if rows[0].numel() == 0:
            return F.pad(out, (1, 0)) + 0.0 * outputs.hidden.sum()
        hidden, gold = pred_hidden[rows], targets[rows]
        device = hidden.device
        seed = hp.sample_seed + int(self.global_step) + (int(self.global_rank) << 32)  # ranks draw independently
        generator = torch.Generator(device=device).manual_seed(seed)
        pieces = []
        for start in range(0, gold.numel(), hp.chunk_size):
            h, y = hidden[start : start + hp.chunk_size], gold[start : start + hp.chunk_size]
            if hp.estimator == "mc":
                with torch.no_grad():  # draw outside the checkpointed function: recomputation must not resample
                    samples = sample_candidates(F.linear(h, head_weight, head_bias), hp.num_samples, hp.tau, generator)
                if hp.include_gold:
                    samples = torch.cat([samples, y.unsqueeze(-1)], dim=-1)
            else:
                samples = y.unsqueeze(-1)  # unused by the expected estimator
            args = (h, head_weight, head_bias, y, samples, hp.beta, hp.tau, hp.estimator, hp.sft_weight)
            if torch.is_grad_enabled() and (h.requires_grad or head_weight.requires_grad):
                pieces.append(checkpoint(_chunk_otr, *args, use_reentrant=False))
            else:
                pieces.append(_chunk_otr(*args))
        out = out.index_put(rows, torch.cat(pieces))
        return F.pad(out, (1, 0))

    def compute_loss(self, batch: dict[str, Tensor], outputs: StepOutputs, weights: Tensor) -> Tensor:
        per_token = self.otr_per_token(outputs, weights) * weights
        reduction = "sequence_mean" if self.hparams.length_norm == "per_sequence" else "token_mean"
        return reduce_loss(per_token, weights, reduction)


register(
    name="otr",
    kind="module",
    paper="One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy Gradient (2025)",
    spec="04",
    config="configs/otr.yaml",
    target="zoo.modules.objectives.otr:OTRModule",
    scope="full; tau, beta, SFT mixing and gold forcing unverified against the paper text (options)",
)
