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


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any stop string (the stop string itself removed)."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 256,
    system_prompt: str | None = None,
    batch_size: int = 16,
    stop: Sequence[str] = (),
    hooks: DecodingHooks | None = None,
    use_cache: bool = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Completions of chat-rendered ``prompts`` (only the new text, special tokens removed), in order.

    Prompts are rendered exactly like training data (:func:`zoo.chat.render_prompt_ids`, system prompt
    included), sorted by length and decoded in left-padded batches of ``batch_size``; a row stops at
    EOS, after ``max_new_tokens``, or (text level) at the first ``stop`` string.
    """
    if not prompts:
        return []
    encoded = [render_prompt_ids(tokenizer, p, system_prompt) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    device = next(model.parameters()).device
    result: list[str] = [""] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        ids, mask = left_pad([encoded[i] for i in chunk], pad_id)
        new = decode_ids(model, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens, eos=eos,
                         pad_id=pad_id, hooks=hooks, use_cache=use_cache, do_sample=do_sample,
                         temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        for i, row in zip(chunk, new.tolist()):
            result[i] = cut_at_stop(tokenizer.decode(cut_at_eos(row, eos), skip_special_tokens=True), stop)
    return result
