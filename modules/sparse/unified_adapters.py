"""Unified view of PEFT: parallel / scaled parallel adapters and the MAM adapter (prefix + scaled PA).

Paper: Towards a Unified View of Parameter-Efficient Transfer Learning (2021). Spec: papers/36-mam-adapter.md.

Implements: ``ParallelAdapter`` (ReLU bottleneck, "LoRA init": down-projection Kaiming-uniform a=√5,
up-projection and biases 0, so the model starts exactly at the frozen backbone) attached by a
forward hook to the FFN (reads the MLP's INPUT x, the normalised hidden state in a pre-LN block, and
adds ``s·Δh`` to the MLP output before the residual) or to the attention sub-layer (reads the
attention input); ``s`` fixed (1 = PA, 4 = scaled PA). ``PrefixEncoder``: per-layer prefix keys and
values from an embedding E (l×d) → Linear(d, mid) → tanh → Linear(mid, L·2·d_kv) (the paper's
re-parameterisation); :meth:`PrefixEncoder.cache_prefixes` computes them once and drops the MLP (the
paper's parameter count, 2·l·d_kv per attention sub-layer). The prefix enters every attention layer
as already-positioned cache entries (a pre-hook on the decoder fills an empty KV cache and extends
the attention mask by l ones); real tokens sit at positions l + (index among non-padding tokens),
the same in training (right padding) and left-padded decoding, because the unrotated prefix keys
make the prefix scores depend on the query's absolute position. MAM = prefix l=30 at attention + scaled PA (r=512, s=4) at every FFN; the backbone
is frozen. The prefix/gated-adapter identity (eq. 5 of the paper) is :func:`gated_prefix_attention`,
tested against plain attention over the concatenated keys.
Differs: decoder-only Llama-style backbone (one attention type, GQA prefixes have d_kv = kv heads ×
head dim); no prefix dropout.
Not implemented: the sequential (Houlsby) insertion and the learned-gate variants of the paper's
ablations; HF ``generate`` with a KV cache for the prefix (the module's ``generate_completions``
decodes without a cache instead, slower but exact); the export holds the adapter weights as extra
keys that a plain ``from_pretrained`` ignores (use the Lightning checkpoint to reload).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import backbone
from zoo.modules.base import CausalLMModule
from zoo.registry import register


# ---------------------------------------------------------------------------- pure functions
def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention of one head: q (T, d), k (S, d), v (S, d_v) -> (T, d_v), scale 1/sqrt(d)."""
    return torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1) @ v


def prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor) -> Tensor:
    """Prefix tuning: attention over ``[P_k; K]`` / ``[P_v; V]`` (prefix (l, d) in front)."""
    return attention(q, torch.cat([prefix_k, k]), torch.cat([prefix_v, v]))


def gated_prefix_attention(q: Tensor, k: Tensor, v: Tensor, prefix_k: Tensor, prefix_v: Tensor) -> Tensor:
    """The same output written as a gated parallel adapter (the paper's eq. 5):
    ``(1 - λ(x))·Attn(q, K, V) + λ(x)·softmax(q P_kᵀ) P_v`` with λ the softmax mass on the prefix keys."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    prefix_logits, token_logits = q @ prefix_k.T * scale, q @ k.T * scale
    total = torch.logsumexp(torch.cat([prefix_logits, token_logits], dim=-1), dim=-1, keepdim=True)
    lam = torch.exp(torch.logsumexp(prefix_logits, dim=-1, keepdim=True) - total)
    return (1 - lam) * attention(q, k, v) + lam * attention(q, prefix_k, prefix_v)


# ---------------------------------------------------------------------------- modules
class ParallelAdapter(nn.Module):
    """Δh = ReLU(x W_down + b_down) W_up + b_up, zero at initialisation (W_up = 0, b_up = 0)."""

    def __init__(self, dim: int, bottleneck: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(F.relu(self.down(x)))


def _parallel_hook(adapter: ParallelAdapter, scale: float):
    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = kwargs.get("hidden_states", args[0] if args else None)
        delta = scale * adapter(x)
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta

    return hook


class PrefixEncoder(nn.Module):
    """All layers' prefix keys/values: E (l×d) → Linear(d, mid) → tanh → Linear(mid, L·2·d_kv)."""

    def __init__(self, length: int, dim: int, mid_dim: int, num_layers: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.length, self.num_layers, self.kv_heads, self.head_dim = length, num_layers, kv_heads, head_dim
        self.embedding = nn.Parameter(torch.randn(length, dim) * 0.02)
        self.mlp: nn.Module | None = nn.Sequential(nn.Linear(dim, mid_dim), nn.Tanh(),
                                                    nn.Linear(mid_dim, num_layers * 2 * kv_heads * head_dim))
        self.cached: nn.Parameter | None = None

    def prefixes(self) -> Tensor:
        """(L, 2, kv_heads, l, head_dim) prefix keys (index 0) and values (index 1)."""
        flat = self.cached if self.cached is not None else self.mlp(self.embedding)
        return flat.view(self.length, self.num_layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def cache_prefixes(self) -> None:
        """Compute the prefixes once and drop the re-parameterisation MLP (2·l·d_kv parameters per layer remain)."""
        self.cached = nn.Parameter(self.mlp(self.embedding).detach().clone())
        self.mlp = None
        self.embedding.requires_grad_(False)

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def _prefix_pre_hook(encoder: PrefixEncoder, config):
    from transformers import DynamicCache

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None:
            raise NotImplementedError("the MAM prefix is injected only without a KV cache: decode with "
                                      "UnifiedAdapterModule.generate_completions (no cache)")
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        batch = (ids if ids is not None else embeds).shape[0]
        length = (ids if ids is not None else embeds).shape[1]
        device = (ids if ids is not None else embeds).device
        prefixes = encoder.prefixes()
        cache = DynamicCache(config=config)
        for layer in range(encoder.num_layers):
            k = prefixes[layer, 0].unsqueeze(0).expand(batch, -1, -1, -1)
            v = prefixes[layer, 1].unsqueeze(0).expand(batch, -1, -1, -1)
            cache.update(k, v, layer)
        mask = kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=device)
        if kwargs.get("position_ids") is None:  # real tokens at l + their index among non-padding tokens
            kwargs["position_ids"] = encoder.length + (mask.long().cumsum(-1) - 1).clamp_min(0)
        kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, encoder.length), mask], dim=1)
        kwargs["cache"] = cache
        kwargs.pop("past_key_values", None)
        return args, kwargs

    return hook


class UnifiedAdapterModule(CausalLMModule):
    """Frozen backbone + parallel adapters (FFN or attention, scaled) and optionally prefix tuning (MAM)."""

    def __init__(self, adapter_placement: Literal["ffn", "attn", "none"] = "ffn", bottleneck: int = 512,
                 scale: float = 4.0, prefix_length: int = 30, prefix_mid_dim: int = 800, **kwargs: Any) -> None:
        """
        Args:
            adapter_placement: where the parallel adapter reads and writes: ``ffn`` (MAM), ``attn`` or ``none``.
            bottleneck: r, adapter bottleneck (paper MAM: 512).
            scale: s, fixed composition scale (1 = parallel adapter, 4 = scaled PA as in MAM).
            prefix_length: l, prefix tokens at every attention layer (MAM: 30; 0 = no prefix).
            prefix_mid_dim: hidden size of the prefix re-parameterisation MLP (paper: 800).
            **kwargs: the CausalLMModule arguments (model, lr, ...).
        """
        self._unified = dict(adapter_placement=adapter_placement, bottleneck=bottleneck, scale=scale,
                             prefix_length=prefix_length, prefix_mid_dim=prefix_mid_dim)
        super().__init__(**kwargs)

    def configure_backbone(self, model: nn.Module) -> nn.Module:
        options = self._unified
        model.requires_grad_(False)
        dim = backbone.hidden_size(model)
        for layer in backbone.decoder_layers(model):
            if options["adapter_placement"] == "none":
                break
            sub = layer.mlp if options["adapter_placement"] == "ffn" else layer.self_attn
            sub.zoo_parallel_adapter = ParallelAdapter(dim, options["bottleneck"])
            sub.register_forward_hook(_parallel_hook(sub.zoo_parallel_adapter, options["scale"]), with_kwargs=True)
        if options["prefix_length"] > 0:
            config = backbone.base_model(model).config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            body = backbone.decoder(model)
            body.zoo_prefix = PrefixEncoder(options["prefix_length"], dim, options["prefix_mid_dim"],
                                            config.num_hidden_layers, kv_heads, head_dim)
            body.register_forward_pre_hook(_prefix_pre_hook(body.zoo_prefix, config), with_kwargs=True)
        return model

    def prefix_encoder(self) -> PrefixEncoder | None:
        return getattr(backbone.decoder(self.model), "zoo_prefix", None)

    def parameter_budget(self) -> int:
        """Trainable parameters with cached prefixes (the paper's convention): 2·l·d_kv per layer + adapters."""
        encoder = self.prefix_encoder()
        prefix = 0 if encoder is None else encoder.num_layers * 2 * encoder.length * encoder.kv_heads * encoder.head_dim
        adapters = sum(p.numel() for n, p in self.named_parameters() if "zoo_parallel_adapter" in n)
        return prefix + adapters

    @torch.no_grad()
    def generate_completions(self, prompts: list[str], max_new_tokens: int = 256, system_prompt: str | None = None,
                             batch_size: int = 8) -> list[str]:
        """Greedy decoding; without a KV cache when a prefix is attached (its hook runs on every full
        forward), else HF ``generate`` with the cache (adapters are plain module hooks)."""
        from zoo.datamodules.sft import render_prompt_ids
        from zoo.harness.generation import cut_at_eos, generate, left_pad

        if self.prefix_encoder() is None:
            return generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                            system_prompt=system_prompt, batch_size=batch_size)

        eos = {self.tokenizer.eos_token_id}
        out: list[str] = []
        for start in range(0, len(prompts), batch_size):
            encoded = [render_prompt_ids(self.tokenizer, p, system_prompt) for p in prompts[start:start + batch_size]]
            ids, mask = left_pad(encoded, self.tokenizer.pad_token_id)
            ids, mask = ids.to(self.device), mask.to(self.device)
            new = torch.empty(ids.shape[0], 0, dtype=torch.long, device=self.device)
            done = torch.zeros(ids.shape[0], dtype=torch.bool, device=self.device)
            for _ in range(max_new_tokens):
                logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False,
                                    logits_to_keep=1).logits[:, -1]
                token = logits.argmax(-1)
                token = torch.where(done, torch.full_like(token, self.tokenizer.pad_token_id), token)
                new = torch.cat([new, token[:, None]], dim=1)
                done |= torch.isin(token, torch.tensor(sorted(eos), device=self.device))
                ids = torch.cat([ids, token[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(token)[:, None]], dim=1)
                if done.all():
                    break
            out += [self.tokenizer.decode(cut_at_eos(row.tolist(), eos), skip_special_tokens=True) for row in new]
        return out


register(
    name="parallel_adapter",
    kind="module",
    paper="Towards a Unified View of Parameter-Efficient Transfer Learning (2021)",
    spec="36",
    config="configs/parallel_adapter.yaml",
    target="zoo.modules.sparse.unified_adapters:UnifiedAdapterModule",
    scope="scaled parallel adapter (FFN or attention); sequential/gated ablation variants left out",
)
register(
    name="mam_adapter",
    kind="module",
    paper="Towards a Unified View of Parameter-Efficient Transfer Learning (2021)",
    spec="36",
    config="configs/mam_adapter.yaml",
    target="zoo.modules.sparse.unified_adapters:UnifiedAdapterModule",
    scope="prefix (l=30) + scaled PA (r=512, s=4); cached-KV generation with the prefix left out",
)
