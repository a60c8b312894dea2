"""APT: approximated prompt tuning, prompts as a cheap additive "diffusion" term on each attention output.

Paper: Approximated Prompt Tuning for Vision-Language Pre-trained Models (2023). Spec: papers/15-apt.md.
Official code: DoubtedSteam/APT (``approximate_prompt``), from which the formula is read.

Implements the :class:`APT` adapter (any objective takes it: ``adapter: {class_path:
zoo.modules.adapters.APT}``), per decoder layer, on the attention output O_i (after W_o) with x_i the
normed layer input:
  ``apt_code`` (default, the released formula): ``K_P = P + (P A) B``, ``a_ij = ReLU(x_i . K_P_j)``,
    ``D_i = sum_j a_ij P_j``, ``w_i = max_j a_ij`` (detached), ``O'_i = exp(g) (O_i + w_i D_i)``;
    P ~ N(0, 0.02), A ~ N(0, 1), B = 0, g = 0 (not the identity at init, as in the code);
  ``simplified``: ``O'_i = O_i + alpha * softmax(x_i K_P^T / sqrt(d)) P`` with alpha = 0 at init (identity);
  ``exact_prefix`` (test oracle): the exact decomposition ``(1 - lambda_i) softmax(q K^T) V + lambda_i
    softmax(q K_P^T) V_P`` per head with per-layer prefix keys/values in KV-head space, recomputed in the
    hook; equals prefix tuning with the same keys/values (tested). Real tokens sit at positions p.. as in
    prefix tuning.
The backbone never sees prompt tokens: sequence length stays n, prompt cost is O(n p d) per layer.
Generation goes through the zoo's one decoder: the ``apt_code`` / ``simplified`` term is per token, so it
applies to each cached step as to the prompt; ``exact_prefix`` decodes as prefix tuning (its keys/values in
the pre-filled cache, the backbone's own attention: the same function, by the oracle test).
Differs from the official code: text decoder instead of ViLT/METER; no dropout on scores (attn_drop 0);
``exact_prefix`` computes the input-only attention itself (eager math), so it saves nothing: it is a
reference, not a fast path.
Not implemented: the vision-language placements and heads; the ``weight``/``score_act`` sub-options
beyond the three modes above.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import backbone
from zoo.decoding import Prefill, position_ids_from_mask
from zoo.errors import ConfigError
from zoo.modules.prompting.soft_prompt import (
    PrefixKV,
    SoftPromptAdapter,
    attention_geometry,
    make_prefix_cache,
)
from zoo.modules.qk import query_key_states
from zoo.registry import register

APTMode = Literal["apt_code", "simplified", "exact_prefix"]
NATIVE_PREFIX = "zoo_apt_native_prefix"  # marks a decoding cache that already holds the prefix key/values


def apt_code_term(x: Tensor, prompt: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """The released APT diffusion: x (B, T, d), P (p, d), A (d, r), B (r, d) -> (w * D (B, T, d), a (B, T, p))."""
    keys = prompt + (prompt @ a) @ b
    scores = F.relu(x @ keys.T)
    weight = scores.max(-1, keepdim=True).values.detach() if scores.shape[-1] else scores.sum(-1, keepdim=True)
    return weight * (scores @ prompt), scores


def exact_prefix_attention(q: Tensor, k: Tensor, v: Tensor, k_p: Tensor, v_p: Tensor, mask: Tensor,
                           scale: float) -> Tensor:
    """Prefix attention by decomposition: q (B, h, T, e), k/v (B, h, S, e), k_p/v_p (B, h, p, e), mask (B, 1|h, T, S) bool.

    ``(1 - lam) softmax(q k^T) v + lam softmax(q k_p^T) v_p`` with ``lam = b / (a + b)`` from the two
    partition functions; returns (B, h, T, e). A query that sees no real key (a left-padding row) attends to
    the prefix alone (lam = 1), as in prefix tuning.
    """
    s_in = (q @ k.transpose(-1, -2)) * scale
    s_in = s_in.masked_fill(~mask, float("-inf"))
    s_p = (q @ k_p.transpose(-1, -2)) * scale
    lse_in, lse_p = torch.logsumexp(s_in, -1, keepdim=True), torch.logsumexp(s_p, -1, keepdim=True)
    lam = torch.sigmoid(lse_p - lse_in)
    out_in = torch.softmax(s_in, -1).nan_to_num(0.0) @ v  # fully masked rows: 0, not NaN (lam = 1 there)
    out_p = torch.softmax(s_p, -1) @ v_p
    return (1 - lam) * out_in + lam * out_p


class APT(SoftPromptAdapter):
    """Approximated prompt tuning on a frozen causal LM (per-layer prompt diffusion term on attention outputs)."""

    def __init__(self, num_virtual_tokens: int = 50, rank: int = 4, mode: APTMode = "apt_code",
                 init_seed: int = 0) -> None:
        """
        Args:
            num_virtual_tokens: p, prompt tokens per layer (code: 50 for ViLT, 200 for METER).
            rank: r of the low-rank key residual K_P = P + P A B (code: 4).
            mode: ``apt_code`` (released formula), ``simplified`` (identity at init) or ``exact_prefix`` (oracle).
            init_seed: seed of the prompt initialisation.
        """
        if mode not in ("apt_code", "simplified", "exact_prefix"):
            raise ConfigError(f"APT mode must be apt_code, simplified or exact_prefix, got {mode!r}")
        if num_virtual_tokens < 1 or rank < 0:
            raise ConfigError(f"APT needs num_virtual_tokens >= 1 and rank >= 0, got {num_virtual_tokens}, {rank}")
        super().__init__(num_virtual_tokens=num_virtual_tokens, deep=False, prompt_init="random",
                         init_seed=init_seed)
        self.rank, self.mode = rank, mode
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ construction
    def build_prompt(self, model: nn.Module) -> None:
        super().build_prompt(model)
        self.soft_prompt = None  # APT never puts prompt tokens into the sequence
        p, d = self._prompt_args["num_virtual_tokens"], backbone.hidden_size(model)
        layers = backbone.decoder_layers(model)
        with torch.random.fork_rng():
            torch.manual_seed(self._prompt_args["init_seed"])
            if self.mode == "exact_prefix":
                n_layers, kv_heads, head_dim = attention_geometry(model)
                self.prefix_kv = PrefixKV(n_layers, kv_heads, p, head_dim)
            else:
                self.prompts = nn.Parameter(torch.randn(len(layers), p, d) * 0.02)
                self.down = nn.Parameter(torch.randn(len(layers), d, self.rank))
                self.up = nn.Parameter(torch.zeros(len(layers), self.rank, d))
                self.log_scale = nn.Parameter(torch.zeros(len(layers)))  # g (apt_code) or alpha (simplified)
        for handle in self._hooks:
            handle.remove()
        self._hooks = [layer.self_attn.register_forward_hook(self._make_hook(i), with_kwargs=True)
                       for i, layer in enumerate(layers)]

    # ------------------------------------------------------------------ soft-prompt hooks
    def build_inputs(self, batch: dict[str, Tensor], insert_at: Tensor | None = None) -> dict[str, Any]:
        inputs = super().build_inputs(batch, insert_at)
        if self.mode == "exact_prefix" and self.use_prompt:  # positions as in prefix tuning (after p slots)
            inputs["position_ids"] = inputs["position_ids"] + self._prompt_args["num_virtual_tokens"]
        return inputs

    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Prefill:
        """``exact_prefix``: decode as prefix tuning (the prefix key/values pre-filled into the cache, which the
        hooks then leave to the backbone's own attention); the other modes: the plain prompt."""
        if self.mode != "exact_prefix" or not self.use_prompt:
            return super().prefill(input_ids, attention_mask)
        batch, p = input_ids.shape[0], self._prompt_args["num_virtual_tokens"]
        keys, values = self.prefix_kv(batch)
        dtype = self.model.get_input_embeddings().weight.dtype
        cache = make_prefix_cache(keys.to(dtype), values.to(dtype), backbone.base_model(self.model).config)
        setattr(cache, NATIVE_PREFIX, True)
        full = torch.cat([attention_mask.new_ones(batch, p), attention_mask], 1)
        embeds = self.model.get_input_embeddings()(input_ids)
        return Prefill(embeds, full, position_ids_from_mask(full)[:, p:], cache)

    # ------------------------------------------------------------------ backbone hooks
    def _make_hook(self, layer: int):
        def hook(attn: nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
            if not self.use_prompt:
                return output
            x = kwargs.get("hidden_states", args[0] if args else None)
            out = output[0]
            if self.mode == "apt_code":
                term, _ = apt_code_term(x, self.prompts[layer], self.down[layer], self.up[layer])
                out = torch.exp(self.log_scale[layer]) * (out + term)
            elif self.mode == "simplified":
                keys = self.prompts[layer] + (self.prompts[layer] @ self.down[layer]) @ self.up[layer]
                att = torch.softmax(x @ keys.T / math.sqrt(x.shape[-1]), -1)
                out = out + self.log_scale[layer] * (att @ self.prompts[layer])
            else:
                cache = _cache_of(kwargs)
                if cache is not None and getattr(cache, NATIVE_PREFIX, False):
                    return output  # decoding: the prefix is in the cache, the attention is already exact
                out = self._exact(attn, layer, x, kwargs)
            return (out, *output[1:])

        return hook

    def _exact(self, attn: nn.Module, layer: int, x: Tensor, kwargs: dict) -> Tensor:
        batch, length, _ = x.shape
        q, k = query_key_states(attn, x, kwargs["position_embeddings"])  # the zoo's one q/k (RoPE) recompute
        v = attn.v_proj(x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        cache = _cache_of(kwargs)
        if cache is not None:  # a cache without the prefix: the backbone already appended this step's k/v
            k, v = cache.layers[attn.layer_idx].keys, cache.layers[attn.layer_idx].values
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        k_p = self.prefix_kv.keys[layer].unsqueeze(0).expand(batch, -1, -1, -1).repeat_interleave(groups, 1)
        v_p = self.prefix_kv.values[layer].unsqueeze(0).expand(batch, -1, -1, -1).repeat_interleave(groups, 1)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(length, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - length)
            mask = mask.view(1, 1, length, -1)
        elif mask.dtype != torch.bool:
            mask = mask > torch.finfo(mask.dtype).min / 2
        heads = exact_prefix_attention(q, k, v, k_p.to(q.dtype), v_p.to(q.dtype), mask, attn.scaling)
        return attn.o_proj(heads.transpose(1, 2).reshape(batch, length, -1))


def _cache_of(kwargs: dict) -> Any | None:
    cache = kwargs.get("cache")
    return cache if cache is not None else kwargs.get("past_key_values")


def apt_trainable_count(layers: int, p: int, d: int, r: int) -> int:
    """``L * (p*d + 2*d*r + 1)`` for the apt_code / simplified modes."""
    return layers * (p * d + 2 * d * r + 1)


register(
    name="apt",
    kind="adapter",
    paper="Approximated Prompt Tuning for Vision-Language Pre-trained Models (2023)",
    spec="15",
    config="configs/apt.yaml",
    target="zoo.modules.prompting.apt:APT",
    scope="text decoder only (paper: ViLT/METER); formula from the released code; no score dropout",
)
