"""LeMo's attention wrapper: only the kept token blocks go through attention, at their original positions.

:class:`TokenEliminationAttention` replaces one decoder layer's ``self_attn``: it scores the blocks (oracle
or predictor), gathers the kept blocks (``floor(k_l * n_b)``, top-k, sorted), runs the wrapped attention on
them with RoPE at their ORIGINAL positions, and scatter-adds the output into zeros, so an eliminated
token's attention output is 0 and the residual carries it unchanged (paper §4.2; artifact
``modeling_llama.py``, with per-row indices where the artifact scatters into batch row 0 only). Kept
blocks are cached per batch so gradient-checkpoint recomputation reuses them. Spec: papers/01-lemo.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import ConfigError
from zoo.kernels.lemo_gather import block_token_index, gather_rows, scatter_add_rows
from zoo.kernels.lemo_scores import block_scores
from zoo.modules.qk import query_key_states
from zoo.modules.sparse.lemo.options import CausalFix
from zoo.modules.sparse.lemo.predictor import BlockPatternPredictor
from zoo.modules.sparse.lemo.scores import column_scores, kept_block_count, oracle_block_scores, select_blocks


def compact_attention_mask(valid: Tensor, kind: str, dtype: torch.dtype) -> Tensor | None:
    """Mask for compacted attention over sorted kept tokens; ``valid`` (B, K) marks non-padding keys.

    Sorted original indices keep causality as the plain lower triangle. Returns None when sdpa's own
    causal path suffices, a bool (B, 1, K, K) mask for sdpa, an additive float mask for eager. A query
    may always attend to itself, so a padded query never sees an empty row."""
    kept = valid.shape[1]
    causal = torch.ones(kept, kept, dtype=torch.bool, device=valid.device).tril()
    if kind != "eager" and bool(valid.all()):
        return None
    allowed = causal & (valid[:, None, :] | torch.eye(kept, dtype=torch.bool, device=valid.device))
    allowed = allowed[:, None]
    if kind == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    if kind == "sdpa":
        return allowed
    raise ConfigError(f"LeMo needs eager or sdpa attention when kept tokens include padding, got {kind!r}")


@dataclass
class LeMoContext:
    """Per-model state the wrappers share: the batch's token mask, a batch counter, captured data, stats."""

    token_mask: Tensor | None = None
    batch_id: int | None = None
    capture: bool = False
    captured: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    processed: dict[int, tuple[int, int]] = field(default_factory=dict)  # layer -> (kept tokens, total)
    eval_sparse: bool = False
    use_predictors: bool = False


class TokenEliminationAttention(nn.Module):
    """Wraps one attention module: only the kept token blocks go through it, at their original positions.

    The wrapped module's children (q_proj, k_proj, v_proj, o_proj, ...) are registered on the wrapper under
    their own names, so parameter names are unchanged; the wrapped module itself is called for the compacted
    attention (it is held outside the module tree)."""

    def __init__(self, attention: nn.Module, layer_idx: int, keep_fraction: float, block: int,
                 context: LeMoContext, causal_fix: CausalFix = "symmetrize", oracle_rope: bool = False,
                 predictor: BlockPatternPredictor | None = None, kernel: str = "auto",
                 bypass_dense: bool = True):
        super().__init__()
        for attr in ("q_proj", "k_proj", "o_proj"):
            if not isinstance(getattr(attention, attr, None), nn.Module):
                raise ConfigError(f"LeMo wraps Llama-style attention (q_proj/k_proj/v_proj/o_proj); "
                                  f"{type(attention).__name__} has no {attr}")
        object.__setattr__(self, "inner", attention)
        for name, child in attention.named_children():
            self.add_module(name, child)
        self.layer_idx, self.keep_fraction, self.block = layer_idx, keep_fraction, block
        self.causal_fix, self.oracle_rope = causal_fix, oracle_rope
        self.kernel, self.bypass_dense = kernel, bypass_dense
        object.__setattr__(self, "context", context)
        object.__setattr__(self, "predictor", predictor)
        self.head_dim = attention.head_dim
        self._cache: tuple[Any, Tensor] | None = None

    @property
    def config(self):  # noqa: D401 - mirrors the wrapped module
        return self.inner.config

    @torch.no_grad()
    def predictor_target(self, hidden: Tensor) -> Tensor:
        """Artifact predictor target (B, nb, nb): per-block max of sum_h ReLU(QK^T), pre-RoPE, unmasked,
        divided by 16."""
        q, k = query_key_states(self, hidden)  # pre-RoPE
        heads = q.shape[1]
        return block_scores(q, k, self.block, causal=False, scale=1.0, impl=self.kernel) * heads / 16.0

    @torch.no_grad()
    def block_scores(self, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor] | None) -> Tensor:
        """Token-block scores (B, nb): the predictor's when in use, else the oracle's (Eq. 2 + causal fix)."""
        if self.context.use_predictors and self.predictor is not None:
            # the predictors live outside the module tree: a *-true precision leaves them float32
            return column_scores(self.predictor(hidden.float()))
        q, k = query_key_states(self, hidden, position_embeddings if self.oracle_rope else None)
        return column_scores(oracle_block_scores(q, k, self.block, True, self.causal_fix, self.kernel))

    def choose_blocks(self, hidden: Tensor, position_embeddings, token_valid: Tensor) -> Tensor:
        """Sorted kept block ids (B, k), cached per batch (gradient-checkpoint recompute reuses them)."""
        key = (self.context.batch_id, tuple(hidden.shape), self.training)
        if self._cache is not None and self.context.batch_id is not None and self._cache[0] == key:
            return self._cache[1]
        nb = token_valid.shape[1] // self.block
        scores = self.block_scores(hidden, position_embeddings)
        keep = select_blocks(scores, kept_block_count(self.keep_fraction, nb),
                             token_valid.view(hidden.shape[0], nb, self.block).any(-1))
        self._cache = (key, keep)
        return keep

    def _token_valid(self, hidden: Tensor, padded: int) -> Tensor:
        mask = self.context.token_mask
        bsz, length = hidden.shape[:2]
        if mask is None or tuple(mask.shape) != (bsz, length):
            mask = torch.ones(bsz, length, dtype=torch.bool, device=hidden.device)
        return F.pad(mask.to(device=hidden.device, dtype=torch.bool), (0, padded - length), value=False)

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, **kwargs: Any):
        self.inner.training = self.training
        context = self.context
        if context.capture and self.training and self.predictor is not None:
            detached = hidden_states.detach()
            context.captured[self.layer_idx] = (detached, self.predictor_target(detached))
        active = (self.keep_fraction < 1.0 or not self.bypass_dense) \
            and (self.training or context.eval_sparse) \
            and kwargs.get("cache") is None and kwargs.get("past_key_values") is None \
            and position_embeddings is not None
        if not active:
            return self.inner(hidden_states, position_embeddings=position_embeddings,
                              attention_mask=attention_mask, **kwargs)
        bsz, length, width = hidden_states.shape
        nb = -(-length // self.block)
        padded = nb * self.block
        token_valid = self._token_valid(hidden_states, padded)
        hidden = F.pad(hidden_states, (0, 0, 0, padded - length)) if padded != length else hidden_states
        keep = self.choose_blocks(hidden, _pad_rope(position_embeddings, bsz, padded), token_valid)
        out = self.compacted_forward(hidden, position_embeddings, keep, token_valid, **kwargs)
        return out[:, :length], None

    def compacted_forward(self, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor], keep: Tensor,
                          token_valid: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Attention output (B, T, H) when only blocks ``keep`` (B, k) attend; other rows are exactly 0.

        ``hidden`` (B, T, H) with T a multiple of the block size; RoPE uses the original positions."""
        bsz, length, _ = hidden.shape
        index = block_token_index(keep, self.block)  # (B, K) sorted original positions
        cos, sin = _pad_rope(position_embeddings, bsz, length)
        rope_index = index[..., None].expand(-1, -1, cos.shape[-1])
        kept_rope = (cos.gather(1, rope_index), sin.gather(1, rope_index))
        if token_valid is None:
            valid = torch.ones_like(index, dtype=torch.bool)
        else:
            valid = token_valid.gather(1, index)
        mask = compact_attention_mask(valid, self.config._attn_implementation, hidden.dtype)
        if "position_ids" in kwargs:
            kwargs["position_ids"] = index
        kept_hidden = gather_rows(hidden, index, self.kernel)
        out, _ = self.inner(kept_hidden, position_embeddings=kept_rope, attention_mask=mask, **kwargs)
        self.context.processed[self.layer_idx] = (index.shape[1], length)
        return scatter_add_rows(hidden.new_zeros(hidden.shape), out, index, self.kernel)


def _pad_rope(position_embeddings: tuple[Tensor, Tensor], bsz: int, length: int) -> tuple[Tensor, Tensor]:
    """cos/sin expanded to the batch and padded (repeating the last row) to ``length`` positions."""
    out = []
    for table in position_embeddings:
        table = table.expand(bsz, -1, -1)
        if table.shape[1] < length:
            table = torch.cat([table, table[:, -1:].expand(-1, length - table.shape[1], -1)], dim=1)
        out.append(table)
    return out[0], out[1]
