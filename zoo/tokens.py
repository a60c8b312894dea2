"""Extending a tokenizer with new special tokens, and the model's embeddings with it, once.

Methods that add control tokens (LeTI's ``<|good|>`` / ``<|bad|>`` / feedback delimiters, and any later one)
call :func:`extend_vocabulary` on the freshly loaded backbone, before an adapter wraps it:

* :func:`add_special_tokens` adds each token as a special token (never split, one id each; added in the
  given order, so two copies of the same base tokenizer give the same ids; a token already present keeps
  its id). Data modules call it on their own tokenizer copy.
* The model's input (and untied output) embeddings are resized only when a token id falls outside them,
  so calling it again on a model that already holds the rows (a reloaded export) changes nothing. New rows
  are the mean of the existing rows (deterministic, so a reload on a frozen backbone rebuilds them
  exactly; transformers' ``mean_resizing`` samples them instead).

Exports carry the tokens: ``CausalLMModule.export`` saves the tokenizer (its ``tokenizer.json`` lists the
added tokens with their ids) and, when the backbone trained, the resized weights; ``zoo.load`` rebuilds from
that folder and the second :func:`extend_vocabulary` is a no-op.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from zoo import backbone
from zoo.errors import ConfigError


def add_special_tokens(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` as special tokens (idempotent); returns their ids, in order."""
    from tokenizers import AddedToken

    if any(not isinstance(t, str) or not t for t in tokens):
        raise ConfigError(f"special tokens must be non-empty strings, got {list(tokens)!r}")
    vocab = tokenizer.get_vocab()
    missing = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing],
                             special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    for token, token_id in zip(tokens, ids):
        if tokenizer.encode(token, add_special_tokens=False) != [token_id]:
            raise ConfigError(f"token {token!r} does not encode to its single id {token_id} in "
                              f"{type(tokenizer).__name__}; choose another spelling")
    return ids


def extend_vocabulary(model: nn.Module, tokenizer, tokens: Sequence[str]) -> list[int]:
    """Add ``tokens`` to ``tokenizer`` and give ``model`` embedding rows for them (resized once; new rows =
    mean of the old ones). Returns the token ids."""
    ids = add_special_tokens(tokenizer, tokens)
    inner = backbone.base_model(model)
    embeddings = inner.get_input_embeddings()
    rows = embeddings.weight.shape[0]
    needed = max(ids) + 1
    if needed <= rows:
        return ids
    output = inner.get_output_embeddings()
    tied = output is not None and output.weight is embeddings.weight
    old_out = output.weight.detach().clone() if output is not None and not tied else None
    inner.resize_token_embeddings(max(needed, len(tokenizer)), mean_resizing=False)
    with torch.no_grad():
        weight = inner.get_input_embeddings().weight
        weight[rows:] = weight[:rows].mean(0, keepdim=True)
        new_out = inner.get_output_embeddings()
        if old_out is not None and new_out is not None and new_out.weight is not weight:
            new_out.weight[rows:] = old_out.mean(0, keepdim=True)
            bias = getattr(new_out, "bias", None)
            if bias is not None:
                bias[rows:] = 0.0
    return ids
