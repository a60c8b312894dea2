"""LeMo / JENGA: layer-wise token elimination in the attention sublayer for long-context fine-tuning.

Paper: LeMo: Enabling LEss Token Involvement for MOre Context Fine-tuning (2025), published as JENGA:
Enhancing Long-Context Fine-tuning of LLMs with Contextual Token Sparsity (USENIX ATC 2025).
Spec: papers/01-lemo.md (checked against the JENGA text and the authors' artifact ``Pairshoe/Jenga-AE``).

Implements
    * Block scores (Eq. 1-2): pre-softmax Q.K, positive part, summed over heads / N_head, max inside each
      ``block x block`` tile, column sums; causal bias handled by ``causal_fix`` (``symmetrize`` = the
      artifact's ``A + triu(A^T, 1)`` on the block matrix, ``count_norm`` = divide by the number of causal
      query blocks, ``none``). Blockwise, never the full T x T matrix (:mod:`zoo.kernels.lemo_scores`).
    * Per-layer keep fractions: ``artifact_e2e`` (dense before ``start_layer`` and the last layer, ``keep_ratio``
      = 0.4 in between), ``profiled`` (the artifact's Llama2-7B per-layer elimination profile, interpolated over
      depth), ``constant`` and explicit ``keep_fractions``.
    * Elimination in the attention sublayer only (:class:`TokenEliminationAttention`): the kept blocks
      (``floor(k_l * n_b)``, top-k, sorted) are gathered, go through q/k/v, RoPE at their ORIGINAL positions,
      attention and o_proj, and are scatter-added into a zero tensor, so an eliminated token's attention output
      is 0 and the residual carries it unchanged; the MLP sees every token. Per-row indices (the artifact
      scatters into batch row 0 only). Kept blocks are cached per batch so gradient-checkpoint recomputation
      reuses them.
    * Optional saved-activation channel sparsity of the SwiGLU MLP (:class:`ChannelSparseMLP`, ``mlp_drop_ratio``
      = rho): exact forward, backward only through the top ``1 - rho`` intermediate channels ranked by
      ``||SiLU(gate)[:, c]|| + ||up[:, c]||``, so only those channels' activations are saved.
    * Pattern predictors (:class:`BlockPatternPredictor`, Eq. 3): per layer a Q and a K MLP (64*d_h -> 128 ->
      64*d_h -> d_h, ReLU, shared across heads) on the normed attention input split per head and block; target
      = per-block max of sum_heads ReLU(QK^T) (pre-RoPE, unmasked, / 16), SmoothL1 (or MSE), AdamW (0.9, 0.95),
      20 warm-up steps then constant; optional elastic shrinking (drop hidden neurons whose pre-ReLU output was
      <= 0 in >= tau of samples, tau 0.8 then -0.05 per round). Recall vs the oracle is logged.
    * :class:`LeMoSparseStrategy`, the YAML entry point.

Why a Callback and not a Lightning ``Strategy`` subclass
    LeMo changes the model, not how it is distributed. A Callback that wraps the attention modules in
    ``setup`` runs before ``configure_model`` (FSDP2 sharding) and before DDP wrapping, so the same class
    composes with single-device, ``ddp`` and ``ModelParallelStrategy`` runs, with LoRA or full fine-tuning,
    without one Strategy subclass per base strategy. The wrappers re-register the wrapped module's children
    under their original names, so state-dict keys, peft adapter names, checkpoints and the export are
    unchanged (the export is the plain HF model).

Differs from the official code
    * Default ``scorer="oracle"`` (exact block scores from the layer's own q/k projections under no_grad);
      the paper uses the trained predictors at fine-tuning time (``scorer="predictor"``). Predictors train online
      on the first ``predictor_steps`` fine-tuning batches (oracle selection meanwhile; the artifact trains them
      offline for 400 steps first) or offline through :meth:`LeMoSparseStrategy.train_predictors`.
    * The scatter-add lands in a zero tensor and the decoder layer adds the residual (the artifact fuses the
      residual add in place); the LM head + loss run only on labelled rows in chunks through the shared
      ``zoo.kernels.selected_ce`` (the artifact's segment loss).
    * Channel sparsity is applied to the same layers as token elimination and needs a plain ``nn.Linear``
      ``down_proj`` (LoRA on q/k/v/o, the artifact's setting, or full fine-tuning).
    * On backbones with fewer than 4 layers ``artifact_e2e`` does not keep the last layer dense, so smoke
      runs on the 2-layer tiny model exercise elimination.

Not implemented
    Algorithm 1's finite-difference threshold search (its eps, eta and accuracy signal are not stated; the
    profiled ratios are shipped instead), the fused in-place residual kernel, 2D sparsity, sparsity-aware
    offload, non-Llama-style attention (GPT-2 style modules are rejected with a clear error), and eager /
    sdpa are the only attention implementations supported when some kept tokens are padding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from zoo import backbone
from zoo.errors import ConfigError
from zoo.kernels.lemo_gather import block_token_index, gather_rows, scatter_add_rows
from zoo.kernels.lemo_scores import block_scores
from zoo.registry import register

CausalFix = Literal["symmetrize", "none", "count_norm"]
Schedule = Literal["artifact_e2e", "profiled", "constant"]

#: Artifact ``best_meta.py``, Llama2-7B attention: eliminated fraction by relative depth (layer / 31).
PROFILED_ELIMINATION_LLAMA2 = ((0 / 31, 0.01), (7 / 31, 0.21), (14 / 31, 0.39), (18 / 31, 0.50),
                               (19 / 31, 0.575), (30 / 31, 0.575), (31 / 31, 0.51))


# ---------------------------------------------------------------------------- pure functions
def layer_keep_fractions(num_layers: int, schedule: Schedule = "artifact_e2e", keep_ratio: float = 0.4,
                         start_layer: int | None = None, dense_last: bool = True,
                         keep_fractions: list[float] | None = None) -> list[float]:
    """Kept block fraction k_l per layer (1.0 = dense)."""
    if keep_fractions is not None:
        if len(keep_fractions) != num_layers:
            raise ConfigError(f"keep_fractions has {len(keep_fractions)} entries, the backbone has {num_layers} layers")
        return [float(f) for f in keep_fractions]
    if schedule == "artifact_e2e":
        start = round(num_layers * 15 / 32) if start_layer is None else start_layer
        out = [1.0 if layer < start else keep_ratio for layer in range(num_layers)]
        if dense_last and num_layers >= 4:
            out[-1] = 1.0
        return out
    if schedule == "profiled":
        xs, ys = zip(*PROFILED_ELIMINATION_LLAMA2)
        out = []
        for layer in range(num_layers):
            depth = layer / max(1, num_layers - 1)
            hi = next(i for i, x in enumerate(xs) if x >= depth - 1e-12)
            lo = max(0, hi - 1)
            t = 0.0 if xs[hi] == xs[lo] else (depth - xs[lo]) / (xs[hi] - xs[lo])
            out.append(1.0 - (ys[lo] + t * (ys[hi] - ys[lo])))
        return [1.0 if start_layer is not None and layer < start_layer else f for layer, f in enumerate(out)]
    if schedule == "constant":
        start = 0 if start_layer is None else start_layer
        return [1.0 if layer < start else keep_ratio for layer in range(num_layers)]
    raise ConfigError(f"unknown schedule {schedule!r}; use artifact_e2e, profiled, constant or keep_fractions")


def kept_block_count(keep_fraction: float, num_blocks: int) -> int:
    """floor(k_l * n_b), at least one block."""
    return max(1, min(num_blocks, math.floor(keep_fraction * num_blocks + 1e-9)))


def apply_causal_fix(matrix: Tensor, causal_fix: CausalFix = "symmetrize") -> Tensor:
    """Correct a causal (lower-triangular) block matrix (B, nb, nb) for the early-block bias."""
    if causal_fix == "symmetrize":
        return matrix + torch.triu(matrix.transpose(-1, -2), diagonal=1)
    if causal_fix == "none":
        return matrix
    if causal_fix == "count_norm":
        nb = matrix.shape[-1]
        rows_per_column = torch.arange(nb, 0, -1, device=matrix.device, dtype=matrix.dtype)  # n_b - n
        return matrix / rows_per_column  # column sums become means over the causal query blocks
    raise ConfigError(f"unknown causal_fix {causal_fix!r}; use symmetrize, none or count_norm")


def column_scores(matrix: Tensor) -> Tensor:
    """Token-block scores B^T_n = sum_m B^S_mn: (B, nb, nb) -> (B, nb)."""
    return matrix.sum(dim=-2)


def oracle_block_scores(q: Tensor, k: Tensor, block: int, causal: bool = True,
                        causal_fix: CausalFix = "symmetrize", impl: str = "auto") -> Tensor:
    """Block matrix of Eq. 2 (B, nb, nb) from q (B, Hq, T, D), k (B, Hk, T, D), causal fix applied."""
    matrix = block_scores(q, k, block, causal=causal, impl=impl)
    return apply_causal_fix(matrix, causal_fix) if causal else matrix


def select_blocks(scores: Tensor, count: int, valid_blocks: Tensor | None = None) -> Tensor:
    """Sorted ids of the ``count`` best blocks per row: scores (B, nb) -> (B, count); invalid blocks last."""
    if valid_blocks is not None:
        scores = scores.masked_fill(~valid_blocks, float("-inf"))
    top = scores.topk(count, dim=-1).indices
    return top.sort(dim=-1).values


def topk_recall(predicted: Tensor, target: Tensor, count: int) -> float:
    """|top-k(predicted) ∩ top-k(target)| / k, averaged over rows: (B, nb), (B, nb)."""
    pred = F.one_hot(predicted.topk(count, -1).indices, predicted.shape[-1]).sum(-2)
    true = F.one_hot(target.topk(count, -1).indices, target.shape[-1]).sum(-2)
    return float((pred * true).sum(-1).float().mean() / count)


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


# ---------------------------------------------------------------------------- predictors
class _ReluMLP(nn.Module):
    """in -> w1 -> w2 -> out with ReLU between; tracks how often each hidden neuron is <= 0."""

    def __init__(self, widths: tuple[int, int, int, int]):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.track = False
        self.zero_counts: list[Tensor] = [torch.zeros(w) for w in widths[1:3]]
        self.samples = 0

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.maps[0].in_features, *(m.out_features for m in self.maps))

    def forward(self, x: Tensor) -> Tensor:
        for i, linear in enumerate(self.maps):
            x = linear(x)
            if i < 2:
                if self.track:
                    with torch.no_grad():
                        flat = x.reshape(-1, x.shape[-1])
                        self.zero_counts[i] = self.zero_counts[i].to(x.device) + (flat <= 0).float().sum(0)
                        if i == 0:
                            self.samples += flat.shape[0]
                x = F.relu(x)
        return x

    @torch.no_grad()
    def shrink(self, tau: float) -> None:
        """Drop hidden neurons of the first two maps that were <= 0 in >= tau of the tracked samples."""
        if self.samples == 0:
            return
        for i in range(2):
            freq = self.zero_counts[i].cpu() / self.samples
            keep = (freq < tau).nonzero().squeeze(-1)
            if keep.numel() == 0:
                keep = freq.argmin().view(1)
            keep = keep.to(self.maps[i].weight.device)
            old_out, old_next = self.maps[i], self.maps[i + 1]
            new_out = nn.Linear(old_out.in_features, keep.numel()).to(old_out.weight)
            new_out.weight.copy_(old_out.weight[keep])
            new_out.bias.copy_(old_out.bias[keep])
            new_next = nn.Linear(keep.numel(), old_next.out_features).to(old_next.weight)
            new_next.weight.copy_(old_next.weight[:, keep])
            new_next.bias.copy_(old_next.bias)
            self.maps[i], self.maps[i + 1] = new_out, new_next
        self.zero_counts = [torch.zeros(self.maps[0].out_features), torch.zeros(self.maps[1].out_features)]
        self.samples = 0


class BlockPatternPredictor(nn.Module):
    """Per-layer Q/K block-pattern predictor (paper §4.3, Eq. 3).

    Input: the attention input (after the input norm, before RoPE) (B, T, heads * d_h), split per head and per
    block of ``block`` tokens; each (block, head) slice, flattened to ``block * d_h`` features, goes through the
    Q and the K MLP (weights shared across heads) to one d_h vector. Predicted block matrix
    ``sum_h Q̂_h K̂_h^T`` (B, nb, nb)."""

    def __init__(self, head_dim: int, block: int, hidden: int = 128, middle: int | None = None):
        super().__init__()
        self.head_dim, self.block = head_dim, block
        width_in = block * head_dim
        widths = (width_in, hidden, middle or width_in, head_dim)
        self.q_net, self.k_net = _ReluMLP(widths), _ReluMLP(widths)

    def forward(self, hidden: Tensor) -> Tensor:
        bsz, length, width = hidden.shape
        nb = -(-length // self.block)
        if nb * self.block != length:
            hidden = F.pad(hidden, (0, 0, 0, nb * self.block - length))
        heads = width // self.head_dim
        x = hidden.view(bsz, nb, self.block, heads, self.head_dim).permute(0, 3, 1, 2, 4)
        x = x.reshape(bsz, heads, nb, self.block * self.head_dim)
        q_hat, k_hat = self.q_net(x), self.k_net(x)  # (B, heads, nb, d_h)
        return torch.einsum("bhmd,bhnd->bmn", q_hat, k_hat)

    def set_tracking(self, on: bool) -> None:
        self.q_net.track = self.k_net.track = on

    def shrink(self, tau: float) -> None:
        self.q_net.shrink(tau)
        self.k_net.shrink(tau)


# ---------------------------------------------------------------------------- the wrappers
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
                 predictor: BlockPatternPredictor | None = None, kernel: str = "auto", bypass_dense: bool = True):
        super().__init__()
        for attr in ("q_proj", "k_proj", "o_proj"):
            if not isinstance(getattr(attention, attr, None), nn.Module):
                raise ConfigError(f"LeMo wraps Llama-style attention (q_proj/k_proj/v_proj/o_proj); "
                                  f"{type(attention).__name__} has no {attr}")
        object.__setattr__(self, "inner", attention)
        for name, child in attention.named_children():
            self.add_module(name, child)
        self.layer_idx, self.keep_fraction, self.block = layer_idx, keep_fraction, block
        self.causal_fix, self.oracle_rope, self.kernel, self.bypass_dense = causal_fix, oracle_rope, kernel, bypass_dense
        object.__setattr__(self, "context", context)
        object.__setattr__(self, "predictor", predictor)
        self.head_dim = attention.head_dim
        self._cache: tuple[Any, Tensor] | None = None

    @property
    def config(self):  # noqa: D401 - mirrors the wrapped module
        return self.inner.config

    def project_qk(self, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None
                   ) -> tuple[Tensor, Tensor]:
        """q (B, Hq, T, d_h), k (B, Hk, T, d_h) from the normed attention input (RoPE applied if given)."""
        bsz, length, _ = hidden.shape
        q = self.q_proj(hidden).view(bsz, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(bsz, length, -1, self.head_dim).transpose(1, 2)
        if position_embeddings is not None:
            from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

            q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        return q, k

    @torch.no_grad()
    def predictor_target(self, hidden: Tensor) -> Tensor:
        """Artifact predictor target: per-block max of sum_h ReLU(QK^T), pre-RoPE, unmasked, / 16 (B, nb, nb)."""
        q, k = self.project_qk(hidden)
        heads = q.shape[1]
        return block_scores(q, k, self.block, causal=False, scale=1.0, impl=self.kernel) * heads / 16.0

    @torch.no_grad()
    def block_scores(self, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor] | None) -> Tensor:
        """Token-block scores (B, nb): the predictor's when in use, else the oracle's (Eq. 2 + causal fix)."""
        if self.context.use_predictors and self.predictor is not None:
            return column_scores(self.predictor(hidden))
        q, k = self.project_qk(hidden, position_embeddings if self.oracle_rope else None)
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
            context.captured[self.layer_idx] = (hidden_states.detach(), self.predictor_target(hidden_states.detach()))
        active = (self.keep_fraction < 1.0 or not self.bypass_dense) and (self.training or context.eval_sparse) \
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
        return self.compacted_forward(hidden, position_embeddings, keep, token_valid, **kwargs)[:, :length], None

    def compacted_forward(self, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor], keep: Tensor,
                          token_valid: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Attention output (B, T, H) when only blocks ``keep`` (B, k) attend; other rows are exactly 0.

        ``hidden`` (B, T, H) with T a multiple of the block size; RoPE uses the original positions."""
        bsz, length, _ = hidden.shape
        index = block_token_index(keep, self.block)  # (B, K) sorted original positions
        cos, sin = _pad_rope(position_embeddings, bsz, length)
        rope_index = index[..., None].expand(-1, -1, cos.shape[-1])
        kept_rope = (cos.gather(1, rope_index), sin.gather(1, rope_index))
        valid = torch.ones_like(index, dtype=torch.bool) if token_valid is None else token_valid.gather(1, index)
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


class _ExactForward(torch.autograd.Function):
    """Returns ``exact`` in forward; sends the whole gradient to ``surrogate`` in backward."""

    @staticmethod
    def forward(ctx, exact: Tensor, surrogate: Tensor) -> Tensor:
        return exact.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, grad


def channel_scores(activated_gate: Tensor, up: Tensor) -> Tensor:
    """||SiLU(gate)[:, c]||_2 + ||up[:, c]||_2 over all tokens: (B, T, C), (B, T, C) -> (C,)."""
    return activated_gate.flatten(0, -2).norm(dim=0) + up.flatten(0, -2).norm(dim=0)


class ChannelSparseMLP(nn.Module):
    """SwiGLU MLP whose backward uses (and whose autograd saves) only the top ``1 - drop_ratio`` channels."""

    def __init__(self, mlp: nn.Module, drop_ratio: float):
        super().__init__()
        if not isinstance(getattr(mlp, "down_proj", None), nn.Linear) or type(mlp.down_proj) is not nn.Linear:
            raise ConfigError("mlp_drop_ratio needs a SwiGLU MLP with a plain nn.Linear down_proj (full fine-tuning "
                              "or LoRA on attention only); set mlp_drop_ratio: 0")
        object.__setattr__(self, "inner", mlp)
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.drop_ratio = drop_ratio

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not torch.is_grad_enabled():
            return self.inner(x)
        act = self.inner.act_fn
        gate, up = self.gate_proj(x), self.up_proj(x)
        with torch.no_grad():
            activated = act(gate)
            exact = self.down_proj(activated * up)
            channels = gate.shape[-1]
            count = max(1, channels - math.floor(self.drop_ratio * channels))
            keep = channel_scores(activated, up).topk(count).indices.sort().values
        gate_k, up_k = gate.index_select(-1, keep), up.index_select(-1, keep)
        weight = self.down_proj.weight.index_select(1, keep)
        surrogate = F.linear(act(gate_k) * up_k, weight, self.down_proj.bias)
        return _ExactForward.apply(exact, surrogate)


# ---------------------------------------------------------------------------- the strategy
class LeMoSparseStrategy(Callback):
    """LeMo token elimination (and optional MLP channel sparsity) installed on the model in ``setup``.

    Composes with any Lightning strategy (single device, ddp, ModelParallelStrategy / FSDP2) and any
    CausalLMModule (full fine-tuning, PeftModule/LoRA): see the module docstring for why it is a Callback."""

    def __init__(
        self,
        block_size: int = 64,
        schedule: Schedule = "artifact_e2e",
        keep_ratio: float = 0.4,
        start_layer: int | None = None,
        dense_last: bool = True,
        keep_fractions: list[float] | None = None,
        causal_fix: CausalFix = "symmetrize",
        oracle_rope: bool = False,
        scorer: Literal["oracle", "predictor"] = "oracle",
        mlp_drop_ratio: float = 0.0,
        sparse_eval: bool = False,
        kernel: Literal["auto", "triton", "torch"] = "auto",
        predictor_hidden: int = 128,
        predictor_steps: int = 400,
        predictor_refresh_every: int = 0,
        predictor_lr: float = 2e-5,
        predictor_warmup: int = 20,
        predictor_loss: Literal["smooth_l1", "mse"] = "smooth_l1",
        elastic: bool = False,
        prune_every: int = 100,
        prune_until: int = 620,
        prune_tau: float = 0.8,
        prune_tau_step: float = 0.05,
    ) -> None:
        """
        Args:
            block_size: tokens per block b (paper 64; 8-16 on tiny models).
            schedule: per-layer keep fractions: ``artifact_e2e`` (dense early layers and last layer, keep_ratio
                after start_layer), ``profiled`` (artifact's Llama2 per-layer profile over depth), ``constant``.
            keep_ratio: kept block fraction k_l of sparse layers in artifact_e2e / constant (artifact 0.4).
            start_layer: first sparse layer (artifact_e2e default: round(15/32 * layers), i.e. 15 of 32).
            dense_last: keep the last layer dense in artifact_e2e (backbones with >= 4 layers).
            keep_fractions: explicit k_l per layer (overrides schedule), e.g. ratios from your own profiling.
            causal_fix: causal-bias handling of oracle scores: symmetrize (artifact), none, count_norm.
            oracle_rope: apply RoPE to q/k before oracle scoring (the artifact's target is pre-RoPE).
            scorer: ``oracle`` (exact block scores under no_grad) or ``predictor`` (paper: trained Q/K predictors).
            mlp_drop_ratio: rho, fraction of MLP channels whose saved activations are dropped (e2e Llama 0.8; 0 = off).
            sparse_eval: also eliminate tokens in validation/test forwards (default: dense evaluation).
            kernel: block-score and gather kernels: auto (Triton on CUDA), triton, torch.
            predictor_hidden: width of the predictors' first hidden map (artifact 128).
            predictor_steps: fine-tuning steps during which predictors train on oracle targets (artifact 400).
            predictor_refresh_every: after that, one more predictor step every N steps (0 = never).
            predictor_lr: predictor AdamW learning rate (artifact 2e-5).
            predictor_warmup: linear warm-up steps of the predictor learning rate (artifact 20).
            predictor_loss: predictor regression loss (artifact SmoothL1; MSE option).
            elastic: shrink predictors elastically (drop mostly-inactive hidden neurons).
            prune_every: steps between elastic shrinking rounds (artifact 100).
            prune_until: last step at which shrinking happens (artifact ~620).
            prune_tau: first zero-frequency threshold tau (artifact 0.8).
            prune_tau_step: tau decrease per round (artifact 0.05).
        """
        super().__init__()
        self.block_size, self.schedule, self.keep_ratio = block_size, schedule, keep_ratio
        self.start_layer, self.dense_last, self.keep_fractions = start_layer, dense_last, keep_fractions
        self.causal_fix, self.oracle_rope, self.scorer = causal_fix, oracle_rope, scorer
        self.mlp_drop_ratio, self.sparse_eval, self.kernel = mlp_drop_ratio, sparse_eval, kernel
        self.predictor_hidden, self.predictor_steps = predictor_hidden, predictor_steps
        self.predictor_refresh_every, self.predictor_lr = predictor_refresh_every, predictor_lr
        self.predictor_warmup, self.predictor_loss = predictor_warmup, predictor_loss
        self.elastic, self.prune_every, self.prune_until = elastic, prune_every, prune_until
        self.prune_tau, self.prune_tau_step = prune_tau, prune_tau_step
        self.context = LeMoContext(eval_sparse=sparse_eval)
        self.predictors = nn.ModuleDict()
        self.wrappers: list[TokenEliminationAttention] = []
        self.fractions: list[float] = []
        self.predictor_step = 0
        self.last_recall: float | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict[str, Any] | None = None
        self._batch_counter = 0

    # ------------------------------------------------------------------ model transform
    def apply(self, model: nn.Module) -> list[TokenEliminationAttention]:
        """Wrap the attention (and, with mlp_drop_ratio, the MLP) of every sparse layer of ``model``."""
        layers = backbone.decoder_layers(model)
        self.fractions = layer_keep_fractions(len(layers), self.schedule, self.keep_ratio, self.start_layer,
                                              self.dense_last, self.keep_fractions)
        self.wrappers = []
        for idx, (layer, fraction) in enumerate(zip(layers, self.fractions)):
            attention = getattr(layer, "self_attn", None)
            if attention is None:
                raise ConfigError(f"LeMo needs Llama-style decoder layers with .self_attn; got {type(layer).__name__}")
            if isinstance(attention, TokenEliminationAttention):
                self.wrappers.append(attention)
                continue
            if fraction >= 1.0:
                continue
            predictor = None
            if self.scorer == "predictor":
                if str(idx) not in self.predictors:
                    self.predictors[str(idx)] = BlockPatternPredictor(attention.head_dim, self.block_size,
                                                                      self.predictor_hidden)
                predictor = self.predictors[str(idx)]
            wrapper = TokenEliminationAttention(attention, idx, fraction, self.block_size, self.context,
                                                self.causal_fix, self.oracle_rope, predictor, self.kernel)
            layer.self_attn = wrapper
            self.wrappers.append(wrapper)
            if self.mlp_drop_ratio > 0 and not isinstance(layer.mlp, ChannelSparseMLP):
                layer.mlp = ChannelSparseMLP(layer.mlp, self.mlp_drop_ratio)
        return self.wrappers

    def remove(self, model: nn.Module) -> None:
        """Undo :meth:`apply` (the dense model again; parameters are shared, nothing is copied)."""
        for layer in backbone.decoder_layers(model):
            if isinstance(layer.self_attn, TokenEliminationAttention):
                layer.self_attn = layer.self_attn.inner
            if isinstance(getattr(layer, "mlp", None), ChannelSparseMLP):
                layer.mlp = layer.mlp.inner
        self.wrappers = []

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.apply(pl_module.model)
        if self._pending_state is not None:
            self._load_predictors(self._pending_state)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.predictors.to(pl_module.device)
        self.context.use_predictors = self.scorer == "predictor" and self.predictor_step >= self.predictor_steps

    def _begin_batch(self, batch: dict[str, Tensor]) -> None:
        self._batch_counter += 1
        self.context.batch_id = self._batch_counter
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        self.context.token_mask = mask.bool() if mask is not None else None
        self.context.captured.clear()
        self.context.processed.clear()

    def _wants_predictor_step(self, global_step: int) -> bool:
        if self.scorer != "predictor" or not self.predictors:
            return False
        if self.predictor_step < self.predictor_steps:
            return True
        return self.predictor_refresh_every > 0 and global_step % self.predictor_refresh_every == 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.predictors.to(pl_module.device)
        self._begin_batch(batch)
        self.context.capture = self._wants_predictor_step(trainer.global_step)
        self.context.use_predictors = self.scorer == "predictor" and self.predictor_step >= self.predictor_steps

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.predictors.to(pl_module.device)
        self._begin_batch(batch)
        self.context.capture = False

    on_test_batch_start = on_validation_batch_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        processed = self.context.processed
        if processed:
            kept = sum(k for k, _ in processed.values()) / sum(t for _, t in processed.values())
            pl_module.log("lemo/kept_token_fraction", kept, batch_size=1)
        if self.context.capture and self.context.captured:
            loss, recall = self.predictor_update(self.context.captured)
            pl_module.log("lemo/predictor_loss", loss, batch_size=1)
            pl_module.log("lemo/predictor_recall", recall, batch_size=1)
        self.context.captured.clear()
        self.context.capture = False

    # ------------------------------------------------------------------ predictor training
    def _predictor_optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self.predictors.parameters(), lr=self.predictor_lr, betas=(0.9, 0.95))
        return self._optimizer

    def predictor_update(self, captured: dict[int, tuple[Tensor, Tensor]]) -> tuple[float, float]:
        """One predictor step on captured (attention input, oracle target) pairs; the LLM stays frozen.

        Returns (mean loss, mean top-k recall vs the oracle)."""
        optimizer = self._predictor_optimizer()
        for group in optimizer.param_groups:
            group["lr"] = self.predictor_lr * min(1.0, (self.predictor_step + 1) / max(1, self.predictor_warmup))
        tracking = self.elastic and self.predictor_step < self.prune_until
        losses, recalls = [], []
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for layer, (hidden, target) in captured.items():
                predictor = self.predictors[str(layer)]
                predictor.set_tracking(tracking)
                predicted = predictor(hidden.float())
                loss_fn = F.smooth_l1_loss if self.predictor_loss == "smooth_l1" else F.mse_loss
                loss = loss_fn(predicted, target.float())
                loss.backward()
                losses.append(loss.item())
                count = kept_block_count(self.fractions[layer], target.shape[-1])
                recalls.append(topk_recall(column_scores(predicted.detach()), column_scores(target), count))
                predictor.set_tracking(False)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in self.predictors.parameters():  # keep every rank's predictors identical
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        optimizer.step()
        self.predictor_step += 1
        if tracking and self.predictor_step % self.prune_every == 0:
            rounds = self.predictor_step // self.prune_every - 1
            for predictor in self.predictors.values():
                predictor.shrink(self.prune_tau - rounds * self.prune_tau_step)
            self._optimizer = None  # shapes changed: a fresh optimizer
        self.last_recall = sum(recalls) / max(1, len(recalls))
        return sum(losses) / max(1, len(losses)), self.last_recall

    def train_predictors(self, model: nn.Module, batches: Iterable[dict[str, Tensor]], steps: int) -> list[float]:
        """Offline predictor training (artifact ``predictor_trainer.py``): frozen LLM, ``steps`` batches.

        ``model`` must already be wrapped by :meth:`apply`. Returns the recall after each step."""
        recalls, was_training = [], model.training
        model.train()
        iterator = iter(batches)
        for _ in range(steps):
            try:
                batch = next(iterator)
            except StopIteration:
                iterator = iter(batches)
                batch = next(iterator)
            self._begin_batch(batch)
            self.context.capture, self.context.use_predictors = True, False
            with torch.no_grad():
                model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False,
                      logits_to_keep=1)
            recalls.append(self.predictor_update(dict(self.context.captured))[1])
            self.context.captured.clear()
        self.context.capture = False
        self.context.batch_id = None
        model.train(was_training)
        return recalls

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"predictor_step": self.predictor_step,
                "predictors": {name: {"widths": (p.q_net.widths, p.k_net.widths), "state": p.state_dict()}
                               for name, p in self.predictors.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.predictor_step = int(state_dict.get("predictor_step", 0))
        if self.wrappers:
            self._load_predictors(state_dict)
        else:
            self._pending_state = state_dict

    def _load_predictors(self, state: dict[str, Any]) -> None:
        for name, entry in state.get("predictors", {}).items():
            predictor = self.predictors[name]
            for net, widths in zip((predictor.q_net, predictor.k_net), entry["widths"]):
                if net.widths != tuple(widths):
                    net.maps = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
            predictor.load_state_dict(entry["state"])
        self._pending_state, self._optimizer = None, None


register(
    name="lemo",
    kind="strategy",
    paper="LeMo: Enabling LEss Token Involvement for MOre Context Fine-tuning (2025) / JENGA (ATC 2025)",
    spec="01",
    config="configs/lemo.yaml",
    target="zoo.modules.sparse.lemo:LeMoSparseStrategy",
    scope="no Algorithm-1 threshold search (profiled ratios shipped), no fused in-place residual kernel, "
          "no 2D sparsity / offload; predictors train online or offline",
)
