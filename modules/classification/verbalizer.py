"""``Verbalizer``: label scores from a causal LM by teacher-forced log-probability of label words.

The causal analogue of PET's cloze slots (Schick & Schütze 2021; spec 35 step 8): the pattern ends where the
answer starts, and a label word ``w = (t_1, ..., t_m)`` scores ``log p(w | x) = Σ_i log p(t_i | x, t_<i)``.

* several words per label with weights ``a_w`` (SciPrompt's weighted verbalizer, spec 25; KPT): the weights
  are normalised per label and combined as ``logsumexp_w (log a_w + log p(w | x))``
  (``aggregate="logsumexp"``,
  the log of the weighted word-probability mixture) or ``Σ_w a_w log p(w | x)`` (``"mean"``); with one word
  per label both equal the plain score;
* ``max_tokens`` cuts multi-token words to m tokens (PET's m mask slots); ``length_norm`` divides by the
  number of tokens;
* contextual calibration (Zhao et al. 2021): ``prior`` (C,) is the mean label distribution on content-free
  or unlabelled inputs (:meth:`Verbalizer.set_prior`), and calibrated scores are
  ``log_softmax(s) - log prior`` (``q ∝ p / p_cf``); a uniform prior changes no probability;
* ``head="reduced_vocab"`` (PETapter, spec 35 step 4): a fresh ``Linear(d, d) -> GELU -> LayerNorm ->
  Linear(d, |T|)`` over the sub-vocabulary T of the label-word tokens replaces the LM head (log-softmax over
  T,
  randomly initialised as in the PETapter code).

API (shapes: B prompts, W words, C labels):
    ``Verbalizer(labels, words=None, aggregate="logsumexp", length_norm=False, max_tokens=None,
    head="lm_head", prefix="")``; ``bind(tokenizer, hidden_size)`` tokenizes the words (and builds the
    reduced head) -- it must run before scoring; ``word_logprobs(hidden_fn, lm_head, prompts, pad_id,
    prompt_hidden=None) -> (B, W)``; ``label_scores(word_lp) -> (B, C)``; ``calibrate(scores) -> (B, C)``;
    ``score(...) = label_scores(word_logprobs(...))``; ``set_prior(scores)`` from uncalibrated scores (N, C).
    ``hidden_fn(batch) -> (B, T, H)`` takes ``{"input_ids", "attention_mask"}`` right-padded (a module's
    ``forward_hidden``); ``lm_head = (weight, bias)``. ``prompt_hidden`` (B, H), the hidden state at each
    prompt's last token, skips the extra forward when every word is one token.
Cost: multi-token words take one teacher-forced row per (prompt, word) through ``hidden_fn``, unless the
caller passes ``hooks`` (the adapter whose forward ``hidden_fn`` runs: its decoding hooks, ``zoo.decoding``,
and its ``.model``): then each prompt runs once, soft prompts and prefixes included, and its KV cache serves
every word (:meth:`Verbalizer.cached_word_logprobs`, training included; equal to the per-row path, tested).
Left out: PET's MLM auxiliary loss and the bidirectional mask-slot scoring (no encoders here).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import backbone
from zoo.datamodules.sft import SEGMENT_ANSWER, SEGMENT_PAD, SEGMENT_PROMPT
from zoo.decoding import DecodingHooks
from zoo.errors import ConfigError

Words = dict[str, list[str] | dict[str, float]]
Head = tuple[Tensor, Tensor | None]
HiddenFn = Callable[[dict[str, Tensor]], Tensor]


class CacheHooks(DecodingHooks, Protocol):
    """What the cached scoring path needs: an adapter's decoding hooks and the backbone they run
    (``zoo.modules.adapters.Adapter``, or ``zoo.decoding.PlainHooks(model)``)."""

    model: nn.Module


def right_pad(rows: list[list[int]], pad_id: int, device: torch.device,
              prompt_lengths: list[int] | None = None) -> dict[str, Tensor]:
    """``{"input_ids", "attention_mask"}`` (B, T) right-padded to the longest row.

    With ``prompt_lengths`` (each row's prompt tokens; the rest is its label word), also ``segments``
    (prompt / answer / pad), which adapters that insert virtual tokens after the prompt read (IAPT), and one
    more pad column, so that every row's last token has a column after it: the one whose hidden state
    predicts the next token when virtual tokens follow the prompt (``predicting_columns``)."""
    extra = 0 if prompt_lengths is None else 1
    width = max(len(r) for r in rows) + extra
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
        mask[i, : len(row)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if prompt_lengths is not None:
        columns = torch.arange(width, device=device).unsqueeze(0)
        prompt = torch.tensor(prompt_lengths, device=device).unsqueeze(1)
        batch["segments"] = torch.where(columns < prompt, SEGMENT_PROMPT,
                                        torch.where(mask.bool(), SEGMENT_ANSWER, SEGMENT_PAD))
    return batch


def pad_prompts(prompts: list[list[int]], pad_id: int, device: torch.device) -> dict[str, Tensor]:
    """Prompt-only rows (no label word yet), right-padded, segments marking every token a prompt token."""
    return right_pad(prompts, pad_id, device, [len(p) for p in prompts])


class Verbalizer(nn.Module):
    """Label words -> label scores (see the module docstring)."""

    def __init__(self, labels: list[str], words: Words | None = None,
                 aggregate: Literal["logsumexp", "mean"] = "logsumexp", length_norm: bool = False,
                 max_tokens: int | None = None, head: Literal["lm_head", "reduced_vocab"] = "lm_head",
                 prefix: str = "") -> None:
        """
        Args:
            labels: the class names, in class-index order.
            words: per label, its words (a list: equal weights) or ``{word: weight}``; default: the label
                itself (underscores as spaces).
            aggregate: how a label's words combine: ``logsumexp`` (log of the weighted probability mixture)
                or ``mean`` (weighted mean of word log-probabilities).
            length_norm: divide each word's log-probability by its token count.
            max_tokens: cut every word to its first m tokens (PET's m); None keeps all.
            head: ``lm_head`` (the backbone's head, PET) or ``reduced_vocab`` (PETapter's new head over T).
            prefix: text put before every word when tokenizing (" " for plain-text patterns).
        """
        super().__init__()
        if not labels:
            raise ConfigError("a Verbalizer needs at least one label")
        words = dict(words or {})
        unknown = sorted(set(words) - set(labels))
        if unknown:
            raise ConfigError(f"label_words names label(s) {unknown} that are not in labels {labels}")
        self.labels = list(labels)
        self.words: dict[str, dict[str, float]] = {}
        for label in self.labels:
            entry = words.get(label) or [label.replace("_", " ")]
            weights = dict(entry) if isinstance(entry, dict) else {w: 1.0 for w in entry}
            if any(v <= 0 for v in weights.values()):
                raise ConfigError(f"label_words weights of {label!r} must be positive, got {weights}")
            total = sum(weights.values())
            self.words[label] = {w: v / total for w, v in weights.items()}
        self.aggregate, self.length_norm, self.max_tokens = aggregate, length_norm, max_tokens
        self.head_kind, self.prefix = head, prefix
        self.word_ids: list[list[int]] = []
        self.word_label: list[int] = []
        self.register_buffer("word_weight", torch.zeros(0), persistent=False)
        self.register_buffer("prior", torch.full((len(self.labels),), 1.0 / len(self.labels)))
        self.reduced_head: nn.Module | None = None

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def single_token(self) -> bool:
        return all(len(ids) == 1 for ids in self.word_ids)

    def bind(self, tokenizer, hidden_size: int | None = None) -> Verbalizer:
        """Tokenize the words; with ``head="reduced_vocab"`` build the head over their tokens (needs
        ``hidden_size``)."""
        self.word_ids, self.word_label, weights = [], [], []
        for c, label in enumerate(self.labels):
            for word, weight in self.words[label].items():
                ids = list(tokenizer(self.prefix + word, add_special_tokens=False)["input_ids"])
                if self.max_tokens is not None:
                    ids = ids[: self.max_tokens]
                if not ids:
                    raise ConfigError(f"label word {word!r} of {label!r} tokenizes to nothing")
                self.word_ids.append(ids)
                self.word_label.append(c)
                weights.append(weight)
        self.word_weight = torch.tensor(weights, dtype=self.prior.dtype, device=self.prior.device)
        if self.head_kind == "reduced_vocab":
            if hidden_size is None:
                raise ConfigError("head: reduced_vocab needs the backbone's hidden size")
            vocab = sorted({t for ids in self.word_ids for t in ids})
            self.register_buffer("vocab", torch.tensor(vocab, dtype=torch.long), persistent=False)
            self.reduced_head = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(),
                                              nn.LayerNorm(hidden_size), nn.Linear(hidden_size, len(vocab)))
        elif self.head_kind != "lm_head":
            raise ConfigError(f"unknown verbalizer head {self.head_kind!r}; use lm_head or reduced_vocab")
        return self

    # ------------------------------------------------------------------ scoring
    def token_logprobs(self, hidden: Tensor, targets: Tensor, lm_head: Head) -> Tensor:
        """log p(target | hidden) for (N, H) hidden states and (N,) token ids -> (N,)."""
        if self.reduced_head is not None:
            logits = self.reduced_head(hidden)
            targets = torch.searchsorted(self.vocab, targets)
        else:
            logits = F.linear(hidden, *lm_head)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)

    def word_logprobs(self, hidden_fn: HiddenFn, lm_head: Head,
                      prompts: list[list[int]], pad_id: int, prompt_hidden: Tensor | None = None,
                      hooks: CacheHooks | None = None) -> Tensor:
        """Teacher-forced ``log p(word | prompt)`` (B, W) for every prompt and word (module docstring).
        ``hooks``: the adapter ``hidden_fn`` runs, for multi-token words: each prompt runs once and its cache
        serves every word (:meth:`cached_word_logprobs`; with gradient too, unless activation checkpointing
        drops the cache)."""
        if not self.word_ids:
            raise ConfigError("the Verbalizer is not bound to a tokenizer: call bind(tokenizer) first")
        cacheable = (hooks is not None and not self.single_token and prompt_hidden is None
                     and self.reduced_head is None)
        if cacheable and not (torch.is_grad_enabled() and backbone.activation_checkpointing_on(hooks.model)):
            return self.cached_word_logprobs(hooks, lm_head, prompts, pad_id)
        device = lm_head[0].device
        num_words = len(self.word_ids)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        if self.single_token:
            if prompt_hidden is None:
                hidden = hidden_fn(pad_prompts(prompts, pad_id, device))
                prompt_hidden = hidden[torch.arange(len(prompts), device=device), lengths - 1]
            firsts = torch.tensor([ids[0] for ids in self.word_ids], device=device)
            rows = prompt_hidden.repeat_interleave(num_words, 0)
            token_lp = self.token_logprobs(rows, firsts.repeat(len(prompts)), lm_head)
            return token_lp.view(len(prompts), num_words)
        rows = [p + w for p in prompts for w in self.word_ids]
        hidden = hidden_fn(right_pad(rows, pad_id, device, [len(p) for p in prompts for _ in self.word_ids]))
        row_index, positions, targets = [], [], []
        for r, (p, w) in enumerate((p, w) for p in prompts for w in self.word_ids):
            for j, token in enumerate(w):  # position len(p) - 1 + j predicts w[j]
                row_index.append(r)
                positions.append(len(p) - 1 + j)
                targets.append(token)
        row_t = torch.tensor(row_index, device=device)
        token_lp = self.token_logprobs(hidden[row_t, torch.tensor(positions, device=device)],
                                       torch.tensor(targets, device=device), lm_head)
        summed = torch.zeros(len(rows), dtype=token_lp.dtype, device=device).index_add(0, row_t, token_lp)
        if self.length_norm:
            sizes = torch.tensor([len(w) for w in self.word_ids], dtype=summed.dtype, device=device)
            summed = summed / sizes.repeat(len(prompts))
        return summed.view(len(prompts), num_words)

    def cached_word_logprobs(self, hooks: CacheHooks, lm_head: Head, prompts: list[list[int]],
                             pad_id: int) -> Tensor:
        """:meth:`word_logprobs` for multi-token words with the prompt run once: prompts left-padded through
        ``hooks.prefill`` (the adapter's virtual tokens or prefix included) with a KV cache, the cache
        repeated per word, then only the words' own tokens run through ``hooks.step_embeddings`` (B x W rows
        of at most m - 1 tokens instead of B x W rows of prompt + word). Equal to the teacher-forced path up
        to float rounding, gradients included (the cache is part of the graph)."""
        from zoo import decoding

        device = lm_head[0].device
        num, num_words = len(prompts), len(self.word_ids)
        ids, mask = (t.to(device) for t in decoding.left_pad(prompts, pad_id))  # all end in the last column
        decoder = backbone.decoder(hooks.model)  # the decoding loop's entry point: no LM head over the prompt
        prefill = hooks.prefill(ids, mask)
        out = decoder(inputs_embeds=prefill.inputs_embeds, attention_mask=prefill.attention_mask,
                      position_ids=prefill.position_ids, cache=prefill.cache, use_cache=True)
        firsts = torch.tensor([w[0] for w in self.word_ids], device=device)
        summed = self.token_logprobs(out.last_hidden_state[:, -1].repeat_interleave(num_words, 0),
                                     firsts.repeat(num), lm_head).view(num, num_words)
        longest = max(len(w) for w in self.word_ids)
        if longest > 1:
            # the words' later tokens, (W, longest - 1): inputs w[:-1], targets w[1:], valid where w has them
            inputs = torch.full((num_words, longest - 1), pad_id, dtype=torch.long, device=device)
            targets = torch.zeros_like(inputs)
            valid = torch.zeros_like(inputs, dtype=torch.bool)
            for w, word in enumerate(self.word_ids):
                inputs[w, : len(word) - 1] = torch.tensor(word[:-1], dtype=torch.long, device=device)
                targets[w, : len(word) - 1] = torch.tensor(word[1:], dtype=torch.long, device=device)
                valid[w, : len(word) - 1] = True
            cache = decoding.cache_of(out)
            cache.batch_repeat_interleave(num_words)
            steps = torch.arange(longest - 1, device=device)
            rows = inputs.repeat(num, 1)  # (B*W, longest - 1), row b*W + w = word w after prompt b
            real_index = mask.sum(-1).repeat_interleave(num_words)[:, None] + steps  # among real tokens
            position = (prefill.position_ids[:, -1:] + 1).repeat_interleave(num_words, 0) + steps
            hidden = decoder(inputs_embeds=hooks.step_embeddings(rows, real_index), cache=cache,
                             use_cache=True,
                             attention_mask=torch.cat([prefill.attention_mask.repeat_interleave(num_words, 0),
                                                       torch.ones_like(rows)], -1),
                             position_ids=position).last_hidden_state
            hidden = hidden.view(num, num_words, longest - 1, -1)[:, valid]  # (B, K, H), K valid positions
            later = self.token_logprobs(hidden.reshape(-1, hidden.shape[-1]), targets[valid].repeat(num),
                                        lm_head).view(num, -1)
            word_of = valid.nonzero()[:, 0]  # (K,) the word each valid position belongs to
            summed = summed.index_add(1, word_of, later.to(summed.dtype))
        if self.length_norm:
            sizes = torch.tensor([len(w) for w in self.word_ids], dtype=summed.dtype, device=device)
            summed = summed / sizes
        return summed

    def label_scores(self, word_lp: Tensor) -> Tensor:
        """(B, W) word log-probabilities -> (B, C) label scores (weighted per label, ``aggregate``)."""
        label = torch.tensor(self.word_label, device=word_lp.device)
        weight = self.word_weight.to(word_lp.dtype)
        columns = []
        for c in range(self.num_labels):
            idx = (label == c).nonzero().squeeze(-1)
            if self.aggregate == "mean":
                columns.append((word_lp[:, idx] * weight[idx]).sum(-1))
            else:
                columns.append((word_lp[:, idx] + weight[idx].log()).logsumexp(-1))
        return torch.stack(columns, dim=-1)

    def score(self, hidden_fn: HiddenFn, lm_head: Head, prompts: list[list[int]], pad_id: int,
              prompt_hidden: Tensor | None = None, hooks: CacheHooks | None = None) -> Tensor:
        """Uncalibrated label scores (B, C)."""
        word_lp = self.word_logprobs(hidden_fn, lm_head, prompts, pad_id, prompt_hidden, hooks)
        return self.label_scores(word_lp)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, scores: Tensor) -> Tensor:
        """Contextual calibration: ``log_softmax(scores) - log prior`` (B, C)."""
        return scores.log_softmax(-1) - self.prior.to(scores.dtype).log()

    @torch.no_grad()
    def set_prior(self, scores: Tensor) -> None:
        """Set ``prior`` to the mean label distribution of (N, C) uncalibrated scores (content-free
        inputs)."""
        self.prior.copy_(scores.detach().softmax(-1).mean(0).to(self.prior.dtype))

    def reset_prior(self) -> None:
        with torch.no_grad():
            self.prior.fill_(1.0 / self.num_labels)
