"""Batched greedy generation and held-out response NLL: the two measurements every method gets.

``generate``      left-padded batches, KV cache, prompts rendered exactly like training
                  (:func:`zoo.datamodules.sft.render_prompt_ids`), greedy, stops at EOS, returns only
                  the new text.
``response_nll``  token-mean negative log-likelihood of the reference responses of a held-out split,
                  through the module's own ``forward`` + ``weighted_token_loss`` (so wrappers that add
                  virtual tokens or change the head are measured as they train), and its perplexity.

A module whose generation needs more than ``module.model.generate`` (e.g. a soft prompt that lives
outside ``module.model``) overrides ``CausalLMModule.generate_text`` or defines
``generate_completions(prompts, max_new_tokens, system_prompt, batch_size) -> list[str]``;
:func:`generate_for_module` (what the bench calls) prefers them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from zoo.datamodules.sft import render_prompt_ids


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


def cut_at_eos(ids: list[int], eos_ids: set[int]) -> list[int]:
    """The ids before the first EOS (EOS and everything after it dropped)."""
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position]
    return ids


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, (list, tuple)):
        ids.update(configured)
    return {i for i in ids if i is not None}


@torch.no_grad()
def generate_ids(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 256,
    system_prompt: str | None = None,
    batch_size: int = 16,
    use_cache: bool = True,
) -> list[list[int]]:
    """Greedy new token ids for each prompt (EOS and after removed), in the order given.

    Prompts are chat-rendered like training, sorted by length and left-padded in batches of
    ``batch_size``; each row stops at EOS or after ``max_new_tokens``.
    """
    if not prompts:
        return []
    from transformers import GenerationConfig

    encoded = [render_prompt_ids(tokenizer, p, system_prompt) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    eos = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=sorted(eos), pad_token_id=pad_id, use_cache=use_cache)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    result: list[list[int]] = [[] for _ in prompts]
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            input_ids, attention_mask = left_pad([encoded[i] for i in chunk], pad_id)
            output = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    generation_config=config)
            for i, ids in zip(chunk, output[:, input_ids.shape[1]:].tolist()):
                result[i] = cut_at_eos(ids, eos)
    finally:
        model.train(was_training)
    return result


def generate(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 256,
    system_prompt: str | None = None,
    batch_size: int = 16,
    use_cache: bool = True,
) -> list[str]:
    """Greedy completions of ``prompts`` (see :func:`generate_ids`): only the new text, special tokens removed."""
    ids = generate_ids(model, tokenizer, prompts, max_new_tokens, system_prompt, batch_size, use_cache)
    return [tokenizer.decode(row, skip_special_tokens=True) for row in ids]


def generate_for_module(module: nn.Module, prompts: list[str], max_new_tokens: int = 256,
                        system_prompt: str | None = None, batch_size: int = 16) -> list[str]:
    """Completions from a zoo module, through the first of these it provides:

    1. ``module.generate_completions(prompts, max_new_tokens=, system_prompt=, batch_size=)``;
    2. an overridden ``CausalLMModule.generate_text(prompts, max_new_tokens=)`` (soft prompts, ...),
       called on chunks of ``batch_size`` (it gets no system prompt);
    3. :func:`generate` on ``module.model`` and ``module.tokenizer``.
    """
    was_training = module.training
    module.eval()  # whatever path generates: no dropout, and modules may branch on ``training``
    try:
        own = getattr(module, "generate_completions", None)
        if callable(own):
            return own(prompts, max_new_tokens=max_new_tokens, system_prompt=system_prompt, batch_size=batch_size)
        from zoo.modules.base import CausalLMModule

        if isinstance(module, CausalLMModule) and type(module).generate_text is not CausalLMModule.generate_text:
            completions: list[str] = []
            for start in range(0, len(prompts), batch_size):
                completions += module.generate_text(prompts[start:start + batch_size], max_new_tokens=max_new_tokens)
            return completions
        return generate(module.model, module.tokenizer, prompts, max_new_tokens=max_new_tokens,
                        system_prompt=system_prompt, batch_size=batch_size)
    finally:
        module.train(was_training)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def response_nll(module, datamodule, split: str = "test") -> dict[str, float]:
    """Held-out response NLL: ``{"nll": token mean, "ppl": exp(nll), "tokens": count}``.

    Every supervised (response) token of ``split`` counts once; the loss comes from the module's
    ``weighted_token_loss`` with the plain supervision mask (no token selectors), in eval mode.
    """
    from zoo.modules.base import target_mask

    datamodule.setup("test")
    loader = getattr(datamodule, f"{split}_dataloader")()
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    try:
        for batch in loader:
            batch = _to_device(batch, device)
            outputs = module(batch)
            weights = target_mask(batch["labels"]).float()
            total += float(module.weighted_token_loss(outputs, weights).double().sum())
            count += int(weights.sum())
    finally:
        module.train(was_training)
    nll = total / max(count, 1)
    return {"nll": nll, "ppl": math.exp(min(nll, 50.0)), "tokens": count}
