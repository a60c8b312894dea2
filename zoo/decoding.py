"""The one decoding path: greedy or sampled decoding with the KV cache, left padding and the chat template.

Every generation in the zoo goes through :func:`decode_ids` (token level) or :func:`generate` (text level):
the bench harness, every module's ``generate_text`` and every adapter. An adapter changes decoding only
through two hooks (the :class:`DecodingHooks` protocol, implemented by ``zoo.modules.adapters.Adapter``):

``prefill(input_ids, attention_mask) -> Prefill``
    the inputs of the first (full-prompt) forward: embeddings (with any virtual tokens inserted), the
    attention mask over everything the cache will hold (a prefix cache included), position ids, and a
    cache pre-filled with per-layer prefix key/values or None.
``step_embeddings(input_ids, positions) -> Tensor``
    (B, 1, H) embeddings of the token just generated at (B, 1) ``positions`` (its index among the row's
    real tokens): a plain embedding lookup, or one with a position-dependent offset (DePT).

Prompts are LEFT-padded, so the last column predicts the next token for every row. Positions are
``cumsum(mask) - 1``, so left- and right-padded batches give a real token the same position.
``use_cache=False`` re-runs the full forward each step: the reference the cached path is tested against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import backbone
from zoo.chat import render_prompt_ids


@dataclass
class Prefill:
    """Inputs of the first decoder forward: ``inputs_embeds`` (B, S, H), ``attention_mask`` (B, P + S) with
    P the length of a pre-filled ``cache`` (0 without), ``position_ids`` (B, S)."""

    inputs_embeds: Tensor
    attention_mask: Tensor
    position_ids: Tensor
    cache: Any | None = None


class DecodingHooks(Protocol):
    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Prefill: ...

    def step_embeddings(self, input_ids: Tensor, positions: Tensor) -> Tensor: ...


def position_ids_from_mask(mask: Tensor) -> Tensor:
    """(B, T) positions ``cumsum(mask) - 1`` (clamped at 0 on leading padding)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class PlainHooks:
    """Decoding hooks of a plain causal LM: embedding lookup, positions from the mask, no prefix."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Prefill:
        embeds = self.model.get_input_embeddings()(input_ids)
        return Prefill(embeds, attention_mask, position_ids_from_mask(attention_mask), None)

    def step_embeddings(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(input_ids)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token id lists to (B, T) ``input_ids`` and ``attention_mask`` (0 on padding)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            mask[row, width - len(seq):] = 1
    return ids, mask


def cache_of(out: Any) -> Any:
    """The KV cache a decoder forward returned (``cache`` in transformers 5, ``past_key_values`` before)."""
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """The ids before the first EOS (EOS and everything after it dropped)."""
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position]
    return ids


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """The tokenizer's EOS plus any the model's generation config names."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(backbone.base_model(model), "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(configured)
    return {i for i in ids if i is not None}


def lm_head(model: nn.Module, hidden: Tensor) -> Tensor:
    """Logits of the model's output head for ``hidden`` (..., H) (FSDP2 DTensor weights gathered)."""
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return F.linear(hidden, weight, bias)


def choose_tokens(logits: Tensor, do_sample: bool, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """(B,) next tokens from (B, V) logits: argmax, or a sample at ``temperature`` within top-k / top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass = sorted_logits.softmax(-1).cumsum(-1)
        drop = mass - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _run(model: nn.Module, embeds: Tensor, mask: Tensor, positions: Tensor, cache: Any,
         use_cache: bool) -> Any:
    return backbone.decoder(model)(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                   cache=cache, use_cache=use_cache)


@torch.no_grad()
def decode_ids(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    max_new_tokens: int,
    eos: set[int],
    pad_id: int,
    hooks: DecodingHooks | None = None,
    use_cache: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    output_scores: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """(B, new) token ids after the LEFT-padded prompts (``pad_id`` after a row's EOS).

    With ``output_scores`` also the (B, new, V) logits of every step. Greedy decoding without scores drops a
    row from the batch (and from the KV cache) once it has emitted EOS, so a batch costs what its live rows
    cost rather than its longest row times its width; the ids are the same as decoding every row to the end.
    Sampling and uncached decoding keep every row (a seeded ``generator`` draws the same numbers whatever the
    rows do; uncached steps re-run the adapter's prefill on the whole batch).
    """
    from transformers import DynamicCache

    hooks = hooks if hooks is not None else PlainHooks(model)
    batch = input_ids.shape[0]
    ids, mask = input_ids, attention_mask
    compact = use_cache and not do_sample and not output_scores  # uncached steps re-run hooks on all rows
    rows = torch.arange(batch, device=ids.device)  # the original row of each row still decoding
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    eos_tensor = torch.tensor(sorted(eos), device=ids.device)
    new = input_ids.new_full((batch, max_new_tokens), pad_id)
    scores: list[Tensor] = []
    cache = full_mask = next_position = None
    steps = 0
    for step in range(max_new_tokens):
        if step == 0 or not use_cache:
            prefill = hooks.prefill(ids, mask)
            cache = prefill.cache
            if use_cache and cache is None:
                cache = DynamicCache(config=backbone.base_model(model).config)
            out = _run(model, prefill.inputs_embeds, prefill.attention_mask, prefill.position_ids, cache,
                       use_cache)
            full_mask, next_position = prefill.attention_mask, prefill.position_ids[:, -1:] + 1
        else:
            embeds = hooks.step_embeddings(ids[:, -1:], position_ids_from_mask(mask)[:, -1:])
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], 1)
            out = _run(model, embeds, full_mask, next_position, cache, True)
            next_position = next_position + 1
        if use_cache:
            cache = cache_of(out)
        logits = lm_head(model, out.last_hidden_state[:, -1])
        if output_scores:
            scores.append(logits)
        token = choose_tokens(logits, do_sample, temperature, top_k, top_p, generator)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        new[rows, step] = token
        steps = step + 1
        done |= torch.isin(token, eos_tensor)
        ids = torch.cat([ids, token.unsqueeze(1)], 1)
        mask = torch.cat([mask, torch.ones_like(token).unsqueeze(1)], 1)
        if done.all():
            break
        if compact and done.any() and hasattr(cache, "batch_select_indices"):
            keep = (~done).nonzero().flatten()
            rows, done, ids, mask = rows[keep], done[keep], ids[keep], mask[keep]
            full_mask, next_position = full_mask[keep], next_position[keep]
            cache.batch_select_indices(keep)
    new = new[:, :steps]
    return (new, torch.stack(scores, 1)) if output_scores else new


# ---------------------------------------------------------------------------- continuous batching
def _cache_tensors(cache: Any) -> list[Any] | None:
    """The cache's layers when each holds plain ``keys`` / ``values`` tensors (B, heads, T, d), else None
    (another cache kind: the caller decodes in fixed batches instead)."""
    layers = getattr(cache, "layers", None)
    if not layers or not all(isinstance(getattr(layer, "keys", None), Tensor) for layer in layers):
        return None
    return layers


def _left_pad_columns(tensor: Tensor, width: int, dim: int) -> Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim)


@dataclass
class _Running:
    """The rows decoding together: their prompt indices, KV cache, the attention mask over everything the
    cache holds, the next position id, each row's real-token count and its tokens so far."""

    rows: list[int]
    cache: Any
    mask: Tensor
    next_position: Tensor
    real_length: Tensor
    last: Tensor

    def join(self, other: _Running) -> bool:
        """Append ``other``'s rows (their cache left-padded to a common length); False when a cache is not
        made of plain key / value tensors."""
        mine, theirs = _cache_tensors(self.cache), _cache_tensors(other.cache)
        if mine is None or theirs is None or len(mine) != len(theirs):
            return False
        width = max(self.mask.shape[1], other.mask.shape[1])
        def joined(a: Tensor, b: Tensor, dim: int) -> Tensor:
            return torch.cat([_left_pad_columns(a, width, dim), _left_pad_columns(b, width, dim)])

        for a, b in zip(mine, theirs):
            a.keys, a.values = joined(a.keys, b.keys, 2), joined(a.values, b.values, 2)
        self.mask = joined(self.mask, other.mask, 1)
        self.rows += other.rows
        self.next_position = torch.cat([self.next_position, other.next_position])
        self.real_length = torch.cat([self.real_length, other.real_length])
        self.last = torch.cat([self.last, other.last])
        return True

    def keep(self, keep: Tensor) -> None:
        """Keep rows ``keep`` and drop the leading columns no kept row attends to."""
        self.cache.batch_select_indices(keep)
        self.mask = self.mask[keep]
        self.rows = [self.rows[i] for i in keep.tolist()]
        self.next_position, self.real_length, self.last = (self.next_position[keep], self.real_length[keep],
                                                           self.last[keep])
        start = int(self.mask.any(0).long().argmax())  # first column some row attends to
        if start > 0 and (layers := _cache_tensors(self.cache)) is not None:
            for layer in layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]
            self.mask = self.mask[:, start:]


@torch.no_grad()
def decode_continuous(model: nn.Module, prompts: list[list[int]], *, batch_size: int,
                      max_new_tokens: int, eos: set[int], pad_id: int,
                      hooks: DecodingHooks | None = None) -> list[list[int]] | None:
    """Greedy cached decoding of every prompt, at most ``batch_size`` rows at a time, continuously batched:
    a row leaves the batch at EOS or ``max_new_tokens`` and waiting prompts take the free places (their
    prefill runs on its own, their cache is joined to the running one, left-padded), so the batch stays full
    while prompts wait instead of shrinking to its longest row. Returns each prompt's new ids (EOS included
    when emitted); the same ids as :func:`decode_ids` on each prompt alone, up to the float rounding of a
    padded batch. None when the adapter's cache is not plain per-layer key / value tensors."""
    from transformers import DynamicCache

    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    hooks = hooks if hooks is not None else PlainHooks(model)
    device = next(model.parameters()).device
    eos_tensor = torch.tensor(sorted(eos), device=device)
    waiting = list(range(len(prompts)))
    new: list[list[int]] = [[] for _ in prompts]
    running: _Running | None = None
    refill_at = max(1, batch_size // 4)  # free places that make a refill worth its prefill and cache copy
    while waiting or running is not None:
        free = batch_size - (len(running.rows) if running is not None else 0)
        if waiting and (running is None or free >= min(refill_at, len(waiting))):
            take, waiting = waiting[:free], waiting[free:]
            ids, mask = (t.to(device) for t in left_pad([prompts[i] for i in take], pad_id))
            prefill = hooks.prefill(ids, mask)
            cache = prefill.cache if prefill.cache is not None else DynamicCache(
                config=backbone.base_model(model).config)
            out = _run(model, prefill.inputs_embeds, prefill.attention_mask, prefill.position_ids, cache,
                       True)
            token = lm_head(model, out.last_hidden_state[:, -1]).argmax(-1)
            for row, chosen in zip(take, token.tolist()):  # only the new rows moved
                new[row].append(chosen)
            joined = _Running(take, cache_of(out), prefill.attention_mask, prefill.position_ids[:, -1:] + 1,
                              mask.sum(-1, keepdim=True), token)
            if running is None and _cache_tensors(joined.cache) is None:
                return None  # checked once: a cache of another kind cannot be joined or trimmed
            if running is None:
                running = joined
            elif not running.join(joined):
                return None
        else:
            # real_length: the index among real tokens of the token just chosen, as step_embeddings takes it
            embeds = hooks.step_embeddings(running.last[:, None], running.real_length)
            running.mask = torch.cat([running.mask, torch.ones_like(running.mask[:, :1])], 1)
            out = _run(model, embeds, running.mask, running.next_position, running.cache, True)
            running.cache = cache_of(out)
            running.next_position = running.next_position + 1
            running.real_length = running.real_length + 1
            running.last = lm_head(model, out.last_hidden_state[:, -1]).argmax(-1)
            for row, chosen in zip(running.rows, running.last.tolist()):
                new[row].append(chosen)
        # rows that did not move this iteration were unfinished before it, so testing every row is safe
        finished = torch.isin(running.last, eos_tensor) | torch.tensor(
            [len(new[row]) >= max_new_tokens for row in running.rows], device=device)
        if finished.all():
            running = None
        elif finished.any():
            running.keep((~finished).nonzero().flatten())
    return new


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (the stop string itself removed)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate_token_ids(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    system_prompt: str | None = None,
    batch_size: int = 16,
    hooks: DecodingHooks | None = None,
    use_cache: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New token ids of chat-rendered ``prompts`` (EOS and after removed), in order.

    Prompts are rendered exactly like training data (:func:`zoo.chat.render_prompt_ids`, system prompt
    included), sorted by length and decoded in left-padded batches of ``batch_size`` (greedy cached
    decoding: continuously refilled, :func:`decode_continuous`); a row stops at EOS or after
    ``max_new_tokens``.
    """
    if not prompts:
        return []
    encoded = [render_prompt_ids(tokenizer, p, system_prompt) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    result: list[list[int]] = [[] for _ in prompts]
    rows = None
    if use_cache and not do_sample:  # greedy: continuous batching keeps the batch full
        rows = decode_continuous(model, [encoded[i] for i in order], batch_size=batch_size,
                                 max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id, hooks=hooks)
    if rows is None:
        device = next(model.parameters()).device
        rows = []
        for start in range(0, len(order), batch_size):
            ids, mask = left_pad([encoded[i] for i in order[start:start + batch_size]], pad_id)
            new = decode_ids(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, eos=eos,
                             pad_id=pad_id, hooks=hooks, use_cache=use_cache, do_sample=do_sample,
                             temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            rows += new.tolist()
    for i, row in zip(order, rows):
        result[i] = cut_at_eos(row, eos)
    return result


def generate(model: nn.Module, tokenizer, prompts: list[str], *, stop: Sequence[str] = (),
             **options: Any) -> list[str]:
    """Completions of chat-rendered ``prompts`` (only the new text, special tokens removed), in order:
    :func:`generate_token_ids` (``options``: its keyword arguments) decoded, each cut at the first ``stop``
    string."""
    rows = generate_token_ids(model, tokenizer, prompts, **options)
    return [cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop) for row in rows]
