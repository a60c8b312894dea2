"""Unsupervised prompt learning for classification with a black-box LM (zoo name ``ubpl``).

Paper: On Unsupervised Prompt Learning for Classification with Black-box Language Models (2024, arXiv
2410.03124 v1; Zhang, Zhang, Yao, Niu, Sugiyama). Spec: papers/24-unsupervised-prompt-learning.md. No
official code; the discrete-prompt optimiser follows BDPL (shizhediao/Black-Box-Prompt-Learning).

Implements (v1):
1. Reliable pseudo-labels (:func:`reliable_indices`): the :class:`BlackBoxClassifier` labels every unlabeled
   text zero-shot (no learned tokens); per predicted class the top ``ceil(rho * n_c)`` by confidence form
   the reliable set R (class balance kept). R is the fixed training target (spec pitfall: confirmation bias).
2. A prompt of ``prompt_length`` positions, each an independent categorical over a candidate vocabulary V
   (the ``vocab_size`` most frequent words of the unlabeled corpus, :func:`candidate_vocabulary`):
   logits theta (m, |V|) (:class:`DiscretePromptDistribution`).
3. Each step draws S prompts; for every query x of a minibatch of R the black-box input is
   ``demos(x) + prompt + template(x)``, with ``k`` demonstrations drawn from the pseudo-labelled pool, never
   x itself, exactly as at prediction time; ``l_s`` = mean CE against the pseudo-labels.
4. The variance-reduced policy gradient (BDPL's estimator on logits, :func:`policy_gradient`):
   ``g = 1/(S-1) sum_s (l_s - mean l) grad_theta log P(z_s)``, written as the surrogate loss
   :func:`policy_gradient_surrogate` whose gradient is g, so Lightning's optimizer step (AdamW, clipping)
   applies it. The LM is only queried under ``torch.no_grad`` through the black-box protocol: no gradient
   and no backward ever reaches it.
5. Every ``relabel_every`` steps the non-reliable points are re-labelled with the most probable prompt
   z* = argmax theta and demos from R; they join the demonstration pool (not the training target).
Prediction: ``demos + z* + template(x)`` -> argmax class (:meth:`UnsupervisedPromptLearner.predict_labels`).
``DiscretePromptAdapter`` puts the tokens of z* in front of every input (hard tokens, no gradient), so
generation and the harness's NLL run with the learned prompt.
Differs: theta are logits with an exact softmax gradient (BDPL updates probabilities and projects onto the
simplex); V is word frequency, not PMI n-grams; demos, rho, k and the refresh period are zoo defaults (not
verified against the paper text, which was not retrievable).
Not implemented: an API-backed black box (any object with ``label_logprobs`` works), the API-call budget, the
v2 "PAPO" textual-critique optimiser.
"""

from __future__ import annotations

import math
import re
from collections import Counter

import torch
from torch import Tensor, nn


# ---------------------------------------------------------------------------- pure functions
def policy_gradient(logits: Tensor, samples: Tensor, losses: Tensor) -> Tensor:
    """The variance-reduced estimate (m, V): ``1/(S-1) sum_s (l_s - mean l) (onehot(z_s) - softmax(theta))``.

    ``logits`` (m, V), ``samples`` (S, m) token indices, ``losses`` (S,). Needs S >= 2.
    """
    num = samples.shape[0]
    if num < 2:
        raise ValueError("the variance-reduced estimator needs at least 2 samples")
    probs = logits.softmax(-1)
    advantage = (losses - losses.mean()).to(logits.dtype)
    onehot = torch.nn.functional.one_hot(samples, logits.shape[-1]).to(logits.dtype)  # (S, m, V)
    return (advantage.view(-1, 1, 1) * (onehot - probs.unsqueeze(0))).sum(0) / (num - 1)


def policy_gradient_surrogate(logits: Tensor, samples: Tensor, losses: Tensor) -> Tensor:
    """A scalar whose gradient w.r.t. ``logits`` is :func:`policy_gradient` (losses are constants)."""
    num = samples.shape[0]
    advantage = (losses - losses.mean()).detach().to(logits.dtype)
    log_probs = logits.log_softmax(-1).gather(-1, samples.t()).t().sum(-1)  # (S,) log P(z_s)
    return (advantage * log_probs).sum() / (num - 1)


def reliable_indices(probs: Tensor, rho: float) -> list[int]:
    """Indices of the reliable set: per predicted class c, the ``ceil(rho * n_c)`` most confident points,
    classes in order, each sorted by decreasing confidence. ``probs`` (N, C)."""
    confidence, predicted = probs.max(-1)
    kept: list[int] = []
    for c in range(probs.shape[1]):
        members = (predicted == c).nonzero().flatten()
        if members.numel() == 0:
            continue
        count = math.ceil(rho * members.numel())
        order = confidence[members].argsort(descending=True, stable=True)
        kept += members[order[:count]].tolist()
    return kept


WORD = re.compile(r"[A-Za-z][A-Za-z'-]+")


def candidate_vocabulary(texts: list[str], size: int, stopwords: frozenset[str] = frozenset()) -> list[str]:
    """The ``size`` most frequent words (lower-cased, >= 2 letters) of ``texts``; ties by first appearance."""
    counts = Counter(w.lower() for t in texts for w in WORD.findall(t) if w.lower() not in stopwords)
    return [w for w, _ in counts.most_common(size)]


# ---------------------------------------------------------------------------- the distribution
class DiscretePromptDistribution(nn.Module):
    """``m`` independent categoricals over a vocabulary of ``V`` candidate words: logits theta (m, V)."""

    def __init__(self, length: int, vocab_size: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(length, vocab_size))

    def sample(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """(num, m) indices drawn from softmax(theta) (on the CPU, seeded by ``generator``)."""
        probs = self.logits.detach().float().softmax(-1).cpu()
        return torch.multinomial(probs, num, replacement=True, generator=generator).t()

    def mode(self) -> Tensor:
        """(m,) the most probable prompt z* = argmax theta per position."""
        return self.logits.detach().argmax(-1)
