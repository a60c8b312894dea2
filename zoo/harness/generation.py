"""The two measurements every method gets: completions through the module's own decoding, and held-out NLL.

``generate_for_module``  what the bench calls: the module's ``generate_text`` (the one decoder,
                         :mod:`zoo.decoding`, with the module's adapter hooks and the data's system prompt).
``generate`` / ``generate_ids``  the same decoder on a bare HF model (left-padded batches, KV cache,
                         prompts rendered like training, greedy, stops at EOS).
``response_nll``         token-mean negative log-likelihood of the reference responses of a held-out split,
                         through the module's own ``forward`` + ``weighted_token_loss`` (so wrappers that add
                         virtual tokens or change the head are measured as they train), and its perplexity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from zoo import decoding
from zoo.decoding import cut_at_eos, left_pad

__all__ = ["cut_at_eos", "generate", "generate_for_module", "generate_ids", "left_pad", "response_nll"]


@torch.no_grad()
def generate_ids(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 256,
                 system_prompt: str | None = None, batch_size: int = 16,
                 use_cache: bool = True) -> list[list[int]]:
    """Greedy new token ids for each prompt (EOS and after removed), in the order given
    (:mod:`zoo.decoding`)."""
    was_training = model.training
    model.eval()
    try:
        return decoding.generate_token_ids(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                           system_prompt=system_prompt, batch_size=batch_size,
                                           use_cache=use_cache)
    finally:
        model.train(was_training)


def generate(model: nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 256,
             system_prompt: str | None = None, batch_size: int = 16, use_cache: bool = True) -> list[str]:
    """Greedy completions of ``prompts`` on a bare model: only the new text, special tokens removed."""
    was_training = model.training
    model.eval()
    try:
        return decoding.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 system_prompt=system_prompt, batch_size=batch_size, use_cache=use_cache)
    finally:
        model.train(was_training)


def generate_for_module(module: nn.Module, prompts: list[str], max_new_tokens: int = 256,
                        system_prompt: str | None = None, batch_size: int = 16) -> list[str]:
    """Completions from a zoo module through its ``generate_text`` (eval mode, the mode restored after)."""
    was_training = module.training
    module.eval()
    try:
        return module.generate_text(prompts, max_new_tokens=max_new_tokens, system_prompt=system_prompt,
                                    batch_size=batch_size)
    finally:
        module.train(was_training)


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def response_nll_items(module, datamodule, split: str = "test") -> dict[str, Any]:
    """Held-out response NLL of ``split`` and its per-item parts, in one pass.

    Returns ``{"nll": token mean, "ppl": exp(nll), "tokens": int, "per_item": {id: (nll_sum, tokens)}}``;
    ``id`` is the batch's ``index`` (the record's position in the split) when the batch carries one, else the
    row's position in the (unshuffled) loader. Rows sharing an id (the two sides of a preference pair) are
    summed; ``nll`` equals the sum of the per-item sums over the sum of their tokens.
    """
    from zoo.modules.base import target_mask

    datamodule.setup("test")
    loader = getattr(datamodule, f"{split}_dataloader")()
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    per_item: dict[int, list[float]] = {}
    position = 0
    try:
        for batch in loader:
            batch = _to_device(batch, device)
            outputs = module(batch)
            weights = target_mask(batch["labels"]).float()
            if "is_chosen" in batch:  # preference pairs: the response NLL is the chosen responses'
                weights = weights * batch["is_chosen"].to(weights.dtype)[:, None]
            losses = module.weighted_token_loss(outputs, weights).double().sum(dim=1).tolist()
            counts = weights.sum(dim=1).long().tolist()
            rows = len(losses)
            index = batch.get("index")
            ids = index.tolist() if isinstance(index, Tensor) else list(range(position, position + rows))
            position += rows
            for item, loss, count in zip(ids, losses, counts):
                entry = per_item.setdefault(int(item), [0.0, 0])
                entry[0] += loss
                entry[1] += count
    finally:
        module.train(was_training)
    total = sum(v[0] for v in per_item.values())
    count = sum(int(v[1]) for v in per_item.values())
    nll = total / max(count, 1)
    return {"nll": nll, "ppl": math.exp(min(nll, 50.0)), "tokens": count,
            "per_item": {k: (v[0], int(v[1])) for k, v in sorted(per_item.items())}}


def response_nll(module, datamodule, split: str = "test") -> dict[str, float]:
    """Held-out response NLL: ``{"nll": token mean, "ppl": exp(nll), "tokens": count}``.

    Every supervised (response) token of ``split`` counts once; the loss comes from the module's
    ``weighted_token_loss`` with the plain supervision mask (no token selectors), in eval mode. The one
    pass of :func:`response_nll_items`, without its per-item parts.
    """
    result = response_nll_items(module, datamodule, split)
    return {"nll": result["nll"], "ppl": result["ppl"], "tokens": result["tokens"]}
