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
   applies it. The LM is only queried through :class:`LocalBlackBox` (``torch.no_grad``, eval mode), with a
   cache by exact input string: no gradient and no backward ever reaches it.
   ``UnsupervisedPromptLearner.training_step`` is overridden (the one exception to "override compute_loss"):
   the step has no token objective, the data batch only clocks it.
5. Every ``relabel_every`` steps the non-reliable points are re-labelled with the most probable prompt
   z* = argmax theta and demos from R; they join the demonstration pool (not the training target).
Prediction: ``demos + z* + prompt`` -> argmax class (``score_prompts`` / ``predict_labels``);
``pseudo_labelled()`` returns the pseudo-labelled set for the model owner's fine-tuning.
``DiscretePromptAdapter`` puts the tokens of z* in front of every input (hard tokens, no gradient), so
generation and the harness's NLL and validation metrics run with the learned prompt (without demonstrations).
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
from typing import Any

import torch
from torch import Tensor, nn

from zoo.datamodules.classification import label_text
from zoo.errors import ConfigError
from zoo.modules.adapters.base import Adapter
from zoo.modules.classification.blackbox import BlackBoxClassifier, LocalBlackBox
from zoo.modules.classification.module import ClassificationModule
from zoo.modules.prompting.soft_prompt import SoftPromptAdapter
from zoo.registry import register_method
from zoo.seeding import run_seed


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


# ---------------------------------------------------------------------------- the prompt as an adapter
FILLER = ["the", "a", "text", "topic", "answer", "label", "review", "about", "this", "is", "it", "one",
          "class",
          "kind", "type", "news", "report", "opinion", "title", "company"]
STOPWORDS = frozenset({"the", "a", "an", "and", "or", "of", "to", "in", "on", "at", "for", "with", "by", "is",
                       "was", "it", "as", "be", "that", "this", "from", "but", "are", "i", "my"})


class DiscretePromptAdapter(SoftPromptAdapter):
    """The learned discrete prompt: theta (m, |V|) over candidate words; the words of z* = argmax theta go in
    front of every input as hard tokens (no gradient), so generation and NLL run with the learned prompt."""

    min_virtual_tokens = 0  # no soft tokens: the prompt is hard tokens from the distribution

    def __init__(self, prompt_length: int = 10, vocab_size: int = 50, vocab: list[str] | None = None) -> None:
        """
        Args:
            prompt_length: m, prompt positions (BDPL 10-20).
            vocab_size: |V|, candidate words per position (BDPL 50-200).
            vocab: the candidate words (None: the most frequent words of the unlabeled texts at setup;
                recorded in exports).
        """
        super().__init__(num_virtual_tokens=0)
        if prompt_length < 1 or vocab_size < 2:
            raise ConfigError(f"need prompt_length >= 1 and vocab_size >= 2 (got {prompt_length}, "
                              f"{vocab_size})")
        self.prompt_length, self.vocab_size = prompt_length, vocab_size
        self.vocab: list[str] | None = None
        self.distribution = DiscretePromptDistribution(prompt_length, vocab_size)
        if vocab is not None:
            self.set_vocab(vocab)

    def set_vocab(self, words: list[str]) -> None:
        """Fix the candidate words (padded with filler words to ``vocab_size``; recorded in the config)."""
        words = list(dict.fromkeys(words))[: self.vocab_size]
        words += [w for w in FILLER if w not in words][: self.vocab_size - len(words)]
        words += [f"w{i}" for i in range(self.vocab_size - len(words))]
        self.vocab = words
        self._init_args["vocab"] = list(words)

    def prompt_text(self, indices: Tensor | None = None) -> str:
        """The prompt's words for (m,) ``indices`` (default z* = argmax theta)."""
        if self.vocab is None:
            raise ConfigError("the discrete prompt has no vocabulary yet (set at setup from the unlabeled "
                              "data)")
        chosen = self.distribution.mode() if indices is None else indices
        return " ".join(self.vocab[int(i)] for i in chosen)

    def prompt_embeddings(self, batch_size: int) -> Tensor | None:
        if self.vocab is None:
            return None
        ids = self.tokenizer(self.prompt_text() + "\n", add_special_tokens=False)["input_ids"]
        table = self.model.get_input_embeddings()
        with torch.no_grad():
            embeds = table(torch.tensor([ids], device=table.weight.device))
        return embeds.expand(batch_size, -1, -1)

    def trainable_count(self) -> int:
        return self.distribution.logits.numel()


# ---------------------------------------------------------------------------- the learner
@register_method(
    name="ubpl",
    paper="On Unsupervised Prompt Learning for Classification with Black-box Language Models (2024)",
    spec="24",
    config="configs/blackbox_prompt.yaml",
    scope="v1: reliable pseudo-labels, categorical prompt distribution with the variance-reduced policy "
          "gradient, pseudo-labelled demonstrations in training and prediction, periodic re-labelling; "
          "local black box only, frequency vocabulary (no PMI n-grams), rho/k/refresh are zoo defaults; "
          "validation metrics score z* as a prefix without demonstrations",
)
class UnsupervisedPromptLearner(ClassificationModule):
    """Learns a discrete prompt and pseudo-labels from unlabeled texts through a black-box classifier only."""

    def __init__(self, samples: int = 8, queries: int = 4, demos: int = 2, rho: float = 0.3,
                 relabel_every: int = 50, sampling_seed: int | None = None, adapter: Adapter | None = None,
                 **kwargs: Any) -> None:
        """
        Args:
            samples: S, prompts drawn per step (BDPL 20).
            queries: minibatch of reliable pseudo-labelled texts per step.
            demos: k, pseudo-labelled demonstrations in every black-box input (never the query itself).
            rho: reliable fraction per predicted class (stage 1).
            relabel_every: T_r, steps between re-labellings of the non-reliable points (0: never).
            sampling_seed: seed of the learner's own sampling (minibatches, demonstrations, prompts); None:
                the run's seed (``seed_everything``), so bench seeds vary it (not ``seed``: the data module
                records its data seed under that name, and a logger refuses two values for one key).
            adapter: the prompt (default ``DiscretePromptAdapter(prompt_length=10, vocab_size=50)``).
            **kwargs: :class:`ClassificationModule` arguments (model, lr on theta, labels, label_words, ...).
        """
        if adapter is None:
            adapter = DiscretePromptAdapter()
        elif not isinstance(adapter, DiscretePromptAdapter):
            raise ConfigError("the black-box learner needs a DiscretePromptAdapter, got "
                              f"{type(adapter).__name__}")
        if samples < 2 or queries < 1 or demos < 0 or not 0 < rho <= 1:
            raise ConfigError(f"need samples >= 2, queries >= 1, demos >= 0, 0 < rho <= 1 (got {samples}, "
                              f"{queries}, {demos}, {rho})")
        super().__init__(adapter=adapter, **kwargs)
        self.generator = torch.Generator().manual_seed(run_seed(sampling_seed))
        self.texts: list[str] = []  # the unlabeled prompts (the task's pattern applied)
        self.pseudo: dict[int, int] = {}  # index -> pseudo-label (reliable set and re-labelled points)
        self.reliable: list[int] = []
        self.blackbox: BlackBoxClassifier | None = None
        self.cache: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ the black box
    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        records = getattr(datamodule, "records", {}) or {}
        rows = records.get("unlabeled") or records.get("train") or []  # train rows: their labels are unused
        self.texts = [r["prompt"] for r in rows]
        if self.adapter.vocab is None:
            self.adapter.set_vocab(candidate_vocabulary([r.get("text", r["prompt"]) for r in rows],
                                                        self.adapter.vocab_size, STOPWORDS))
        self.blackbox = LocalBlackBox(self.model, tokenizer=self.tokenizer, verbalizer=self.verbalizer)

    def query(self, texts: list[str]) -> Tensor:
        """(N, C) label log-probabilities from the black box, cached by exact input string."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for text, row in zip(missing, self.blackbox.label_logprobs(missing)):
                self.cache[text] = row
            if len(self.cache) > 20000:
                self.cache.clear()
        return torch.stack([self.cache[t] for t in texts])

    def demonstrations(self, exclude: int, pool: list[int]) -> list[int]:
        """``demos`` indices drawn from ``pool`` without ``exclude`` (seeded)."""
        candidates = [i for i in pool if i != exclude]
        if not candidates or self.hparams.demos == 0:
            return []
        order = torch.randperm(len(candidates), generator=self.generator)[: self.hparams.demos].tolist()
        return [candidates[i] for i in order]

    def render_input(self, index: int | None, prompt: str, demos: list[int], words: str) -> str:
        """``demos + prompt words + the query``: demonstrations are (pattern, pseudo-label word) pairs."""
        labels = self.verbalizer.labels
        shots = [f"{self.texts[d]} {label_text(labels[self.pseudo[d]])}" for d in demos]
        return "\n\n".join([*shots, f"{words}\n{prompt}" if words else prompt])

    # ------------------------------------------------------------------ stage 1 and re-labelling
    def on_train_start(self) -> None:
        if not self.texts:
            raise ConfigError("the black-box learner found no unlabeled texts: set "
                              "data.init_args.num_unlabeled")
        if not self.reliable:
            probs = self.query(self.texts).exp()
            self.reliable = reliable_indices(probs, self.hparams.rho)
            self.pseudo = {i: int(probs[i].argmax()) for i in self.reliable}

    def relabel(self) -> None:
        """Label the non-reliable points with z* and demonstrations from R; they join the demo pool."""
        words = self.adapter.prompt_text()
        others = [i for i in range(len(self.texts)) if i not in set(self.reliable)]
        inputs = [self.render_input(i, self.texts[i], self.demonstrations(i, self.reliable), words)
                  for i in others]
        if inputs:
            labels = self.query(inputs).argmax(-1).tolist()
            self.pseudo.update({i: y for i, y in zip(others, labels)})

    # ------------------------------------------------------------------ the step
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        """One policy-gradient step; the data batch only clocks the step (the data are the pseudo-labels)."""
        hp = self.hparams
        theta = self.adapter.distribution.logits
        picks = torch.randperm(len(self.reliable), generator=self.generator)[: hp.queries].tolist()
        queries = [self.reliable[i] for i in picks]
        pool = list(self.pseudo)
        samples = self.adapter.distribution.sample(hp.samples, self.generator)
        inputs, targets = [], []
        for z in samples:
            words = self.adapter.prompt_text(z)
            for q in queries:
                inputs.append(self.render_input(q, self.texts[q], self.demonstrations(q, pool), words))
                targets.append(self.pseudo[q])
        logprobs = self.query(inputs)  # no gradient: the LM is a black box
        ce = -logprobs.gather(1, torch.tensor(targets).view(-1, 1)).view(hp.samples, len(queries)).mean(1)
        loss = policy_gradient_surrogate(theta, samples.to(theta.device), ce.to(theta.device, theta.dtype))
        if hp.relabel_every and (self.global_step + 1) % hp.relabel_every == 0:
            self.relabel()
        self.log_dict({"train/loss": ce.mean(), "train/pg_surrogate": loss.detach(),
                       "train/max_prob": theta.detach().softmax(-1).max(-1).values.mean()}, prog_bar=True)
        return loss

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def score_prompts(self, prompts: list[str], calibrated: bool = True, batch_size: int = 16) -> Tensor:
        """(B, C) black-box label log-probabilities of ``demos + z* + prompt`` (demos from the reliable
        set)."""
        words = self.adapter.prompt_text()
        return self.query([self.render_input(None, p, self.demonstrations(-1, self.reliable), words)
                           for p in prompts])

    def pseudo_labelled(self) -> list[dict[str, Any]]:
        """The pseudo-labelled data set ``[{prompt, label}]`` (the output the model owner fine-tunes on)."""
        labels = self.verbalizer.labels
        return [{"prompt": self.texts[i], "label": labels[y]} for i, y in sorted(self.pseudo.items())]

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["ubpl"] = {"reliable": self.reliable, "pseudo": self.pseudo,
                              "generator": self.generator.get_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("ubpl")
        if state:
            self.reliable, self.pseudo = list(state["reliable"]), dict(state["pseudo"])
            self.generator.set_state(state["generator"])
