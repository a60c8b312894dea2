"""Unified view of PEFT: parallel / scaled parallel adapters and the MAM adapter (prefix + scaled PA).

Paper: Towards a Unified View of Parameter-Efficient Transfer Learning (2021). Spec: papers/36-mam-adapter.md.

Implements, as one :class:`UnifiedAdapter` (an :class:`~zoo.modules.adapters.base.Adapter` any objective
takes from YAML; :class:`ParallelAdapters` and :class:`MAM` are its presets):
``ParallelAdapter`` (ReLU bottleneck, "LoRA init": down-projection Kaiming-uniform a=√5, up-projection and
biases 0, so the model starts exactly at the frozen backbone), attached by a forward hook to the FFN
(reads the MLP's INPUT x, the normalised hidden state in a pre-LN block, and adds ``s·Δh`` to the MLP
output before the residual) or to the attention sub-layer (reads the attention input); ``s`` fixed
(1 = PA, 4 = scaled PA). ``PrefixEncoder``: per-layer prefix keys and values from an embedding E (l×d) →
Linear(d, mid) → tanh → Linear(mid, L·2·d_kv) (the paper's re-parameterisation);
:meth:`UnifiedAdapter.cache_prefixes` computes them once and drops the MLP (the paper's parameter count,
2·l·d_kv per attention sub-layer, which :meth:`UnifiedAdapter.trainable_count` reports either way).
The prefix is a ``transformers`` cache pre-filled with the per-layer key/values (the zoo's one prefix
mechanism, :func:`zoo.modules.prompting.soft_prompt.make_prefix_cache`): :meth:`UnifiedAdapter.prefill`
hands it to the common decoder (:mod:`zoo.decoding`, KV cache, left padding), and training builds the
same prefill (prefix cache, attention mask extended by l ones, real tokens at positions l + their index
among non-padding tokens), so training and decoding see the same positions. MAM = prefix l=30 at
attention + scaled PA (r=512, s=4) at every FFN; the backbone is frozen. The prefix/gated-adapter
identity (eq. 5 of the paper) is :func:`gated_prefix_attention`, tested against plain attention over the
concatenated keys.
Export: the backbone did not train, so the export holds the tokenizer and ``zoo_state`` (adapters and
prefix) and ``zoo.load(export)`` rebuilds the adapter on the original backbone (after ``cache_prefixes``
the recorded config says ``prefix_mid_dim: 0``, so the rebuilt prefix has the cached shape).
Differs: decoder-only Llama-style backbone (one attention type, GQA prefixes have d_kv = kv heads ×
head dim); no prefix dropout.
Not implemented: the sequential (Houlsby) insertion and the learned-gate variants of the paper's
ablations; gradient checkpointing with a prefix (transformers drops the cache under checkpointing: a
ConfigError says so).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import backbone
from zoo.decoding import Prefill, position_ids_from_mask
from zoo.errors import ConfigError
from zoo.modules.adapters.base import Adapter
from zoo.modules.prompting.soft_prompt import make_prefix_cache
from zoo.registry import register

Placement = Literal["ffn", "attn", "none"]


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


def prefix_parameter_count(layers: int, length: int, kv_heads: int, head_dim: int) -> int:
    """The paper's prefix count: 2·l·d_kv per attention layer (keys and values, no re-parameterisation MLP)."""
    return layers * 2 * length * kv_heads * head_dim


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


class PrefixEncoder(nn.Module):
    """All layers' prefix keys/values: E (l×d) → Linear(d, mid) → tanh → Linear(mid, L·2·d_kv), or (``mid_dim``
    0) the L·2·d_kv values per prefix token as plain parameters (``cached``)."""

    def __init__(self, length: int, dim: int, mid_dim: int, num_layers: int, kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.length, self.num_layers, self.kv_heads, self.head_dim = length, num_layers, kv_heads, head_dim
        width = num_layers * 2 * kv_heads * head_dim
        self.embedding: nn.Parameter | None = None
        self.mlp: nn.Module | None = None
        self.cached: nn.Parameter | None = None
        if mid_dim > 0:
            self.embedding = nn.Parameter(torch.randn(length, dim) * 0.02)
            self.mlp = nn.Sequential(nn.Linear(dim, mid_dim), nn.Tanh(), nn.Linear(mid_dim, width))
        else:
            self.cached = nn.Parameter(torch.randn(length, width) * 0.02)

    def prefixes(self) -> Tensor:
        """(L, 2, kv_heads, l, head_dim) prefix keys (index 0) and values (index 1)."""
        flat = self.cached if self.cached is not None else self.mlp(self.embedding)
        return flat.view(self.length, self.num_layers, 2, self.kv_heads, self.head_dim).permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def cache_prefixes(self) -> None:
        """Compute the prefixes once and drop the re-parameterisation MLP and E (2·l·d_kv per layer remain)."""
        if self.cached is None:
            self.cached = nn.Parameter(self.mlp(self.embedding).detach().clone())
            self.mlp = None
            self.embedding = None


class _ParallelHook:
    """Forward hook of one sub-layer: adds ``s·adapter(input)`` to its output while the adapter is enabled.
    A callable object rather than a closure, so a deep copy of the module follows the copied adapter."""

    def __init__(self, owner: UnifiedAdapter, index: int) -> None:
        self.owner, self.index = owner, index

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.owner.enabled:
            return output
        x = kwargs.get("hidden_states", args[0] if args else None)
        delta = self.owner.scale * self.owner.adapters[self.index](x)
        if isinstance(output, tuple):
            return (output[0] + delta, *output[1:])
        return output + delta


class UnifiedAdapter(Adapter):
    """Frozen backbone + parallel adapters (FFN or attention, scaled) and optionally prefix tuning (MAM)."""

    def __init__(self, placement: Placement = "ffn", bottleneck: int = 512, scale: float = 4.0,
                 prefix_length: int = 30, prefix_mid_dim: int = 800) -> None:
        """
        Args:
            placement: where the parallel adapter reads and writes: ``ffn`` (MAM), ``attn`` or ``none``.
            bottleneck: r, adapter bottleneck (paper MAM: 512).
            scale: s, fixed composition scale (1 = parallel adapter, 4 = scaled PA as in MAM).
            prefix_length: l, prefix tokens at every attention layer (MAM: 30; 0 = no prefix).
            prefix_mid_dim: hidden size of the prefix re-parameterisation MLP (paper: 800); 0 trains the
                prefix key/values directly (what :meth:`cache_prefixes` leaves, recorded in exports).
        """
        super().__init__()
        if placement not in ("ffn", "attn", "none"):
            raise ConfigError(f"placement {placement!r} is not one of ffn, attn, none")
        if bottleneck < 1 or prefix_length < 0 or prefix_mid_dim < 0:
            raise ConfigError(f"need bottleneck >= 1, prefix_length >= 0, prefix_mid_dim >= 0 (got {bottleneck}, "
                              f"{prefix_length}, {prefix_mid_dim})")
        if placement == "none" and prefix_length == 0:
            raise ConfigError("placement none with prefix_length 0 trains nothing: set a placement or a prefix")
        self.placement, self.bottleneck, self.scale = placement, bottleneck, scale
        self.prefix_length, self.prefix_mid_dim = prefix_length, prefix_mid_dim
        self.adapters = nn.ModuleList()
        self.prefix: PrefixEncoder | None = None
        self.enabled = True

    # ------------------------------------------------------------------ construction
    def attach(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        model.requires_grad_(False)
        reference = next(model.parameters())
        dim = backbone.hidden_size(model)
        if self.placement != "none":
            for index, layer in enumerate(backbone.decoder_layers(model)):
                sub = layer.mlp if self.placement == "ffn" else layer.self_attn
                self.adapters.append(ParallelAdapter(dim, self.bottleneck).to(reference.device, reference.dtype))
                sub.register_forward_hook(_ParallelHook(self, index), with_kwargs=True)
        if self.prefix_length > 0:
            config = backbone.base_model(model).config
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
            self.prefix = PrefixEncoder(self.prefix_length, dim, self.prefix_mid_dim, config.num_hidden_layers,
                                        kv_heads, head_dim).to(reference.device, reference.dtype)
        self.bind(model, tokenizer)
        return model

    @torch.no_grad()
    def cache_prefixes(self) -> None:
        """Drop the re-parameterisation MLP (prefixes kept as computed); exports then record ``prefix_mid_dim: 0``."""
        if self.prefix is not None:
            self.prefix.cache_prefixes()
            self.prefix_mid_dim = 0
            self._init_args["prefix_mid_dim"] = 0

    # ------------------------------------------------------------------ forward and decoding
    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Prefill:
        """Embeddings, the mask over [prefix; tokens], positions l + index among real tokens, and the prefix cache."""
        if self.prefix is None or not self.enabled:
            return super().prefill(input_ids, attention_mask)
        batch, length = input_ids.shape[0], self.prefix.length
        embeds = self.model.get_input_embeddings()(input_ids)
        full = torch.cat([attention_mask.new_ones(batch, length), attention_mask], 1)
        prefixes = self.prefix.prefixes().to(embeds.dtype)  # (L, 2, kv, l, hd)
        expand = (-1, batch, -1, -1, -1)
        keys, values = prefixes[:, 0].unsqueeze(1).expand(*expand), prefixes[:, 1].unsqueeze(1).expand(*expand)
        cache = make_prefix_cache(keys, values, backbone.base_model(self.model).config)
        return Prefill(embeds, full, position_ids_from_mask(full)[:, length:], cache)

    def hidden_states(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T, H): the decoder run on :meth:`prefill`'s inputs (the prefix in the cache), or plain."""
        if self.prefix is None or not self.enabled:
            return super().hidden_states(batch)
        if torch.is_grad_enabled() and any(getattr(layer, "gradient_checkpointing", False) and layer.training
                                           for layer in backbone.decoder_layers(self.model)):
            raise ConfigError("the MAM prefix lives in the KV cache, which transformers drops under gradient "
                              "checkpointing: set gradient_checkpointing false (or prefix_length 0)")
        pre = self.prefill(batch["input_ids"], batch["attention_mask"])
        out = backbone.decoder(self.model)(inputs_embeds=pre.inputs_embeds, attention_mask=pre.attention_mask,
                                           position_ids=pre.position_ids, cache=pre.cache, use_cache=True)
        return out.last_hidden_state

    def disabled(self) -> AbstractContextManager[None]:
        return self.switched_off()

    # ------------------------------------------------------------------ counting and export
    def trainable_count(self) -> int:
        """The paper's count: 2·l·d_kv per layer for the prefix (without its MLP) + the adapters."""
        adapters = sum(p.numel() for p in self.adapters.parameters())
        if self.prefix is None:
            return adapters
        p = self.prefix
        return adapters + prefix_parameter_count(p.num_layers, p.length, p.kv_heads, p.head_dim)

    @property
    def exports_backbone(self) -> bool:
        return False


class ParallelAdapters(UnifiedAdapter):
    """Parallel adapters only (no prefix): PA at ``scale`` 1, the scaled PA at 4."""

    def __init__(self, placement: Literal["ffn", "attn"] = "ffn", bottleneck: int = 512, scale: float = 4.0) -> None:
        """
        Args:
            placement: where the parallel adapter reads and writes: ``ffn`` or ``attn``.
            bottleneck: r, adapter bottleneck (paper: 512 at the FFN).
            scale: s, fixed composition scale (1 = parallel adapter, 4 = scaled PA).
        """
        super().__init__(placement=placement, bottleneck=bottleneck, scale=scale, prefix_length=0)


class MAM(UnifiedAdapter):
    """MAM adapter: prefix tuning (l=30, MLP 800) at attention + scaled parallel adapter (r=512, s=4) at the FFN."""

    def __init__(self, prefix_length: int = 30, prefix_mid_dim: int = 800, bottleneck: int = 512,
                 scale: float = 4.0) -> None:
        """
        Args:
            prefix_length: l, prefix tokens at every attention layer (paper: 30).
            prefix_mid_dim: hidden size of the prefix re-parameterisation MLP (paper: 800; 0 = none).
            bottleneck: r, bottleneck of the FFN parallel adapter (paper: 512).
            scale: s, its fixed composition scale (paper: 4).
        """
        super().__init__(placement="ffn", bottleneck=bottleneck, scale=scale, prefix_length=prefix_length,
                         prefix_mid_dim=prefix_mid_dim)


register(
    name="parallel_adapter",
    kind="adapter",
    paper="Towards a Unified View of Parameter-Efficient Transfer Learning (2021)",
    spec="36",
    config="configs/parallel_adapter.yaml",
    target="zoo.modules.sparse.unified_adapters:ParallelAdapters",
    scope="scaled parallel adapter (FFN or attention); sequential/gated ablation variants left out",
)
register(
    name="mam_adapter",
    kind="adapter",
    paper="Towards a Unified View of Parameter-Efficient Transfer Learning (2021)",
    spec="36",
    config="configs/mam_adapter.yaml",
    target="zoo.modules.sparse.unified_adapters:MAM",
    scope="prefix (l=30) + scaled PA (r=512, s=4); no gradient checkpointing with the prefix",
)
