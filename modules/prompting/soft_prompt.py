"""The shared soft-prompt mechanism: virtual tokens in front of (or inside) the input of a frozen LM.

Every prompt-style method in the zoo (prompt tuning, prefix tuning, DePT, EPT, IAPT, APT, ProMoT,
PANDA) is a :class:`SoftPromptAdapter` (an :class:`~zoo.modules.adapters.Adapter`, so any objective
takes it from YAML: ``adapter: {class_path: zoo.modules.adapters.PromptTuning, ...}``) and overrides
one or more of its hooks:

``prompt_embeddings(batch_size)``        (B, m, H) shallow virtual tokens, or None
``input_embeddings(embeds, positions)``  transform the real tokens' embeddings (DePT's offset)
``prefix_cache(batch_size)``             a ``transformers`` Cache pre-filled with per-layer prefix
                                         key/values (deep prompts / prefix tuning), or None
``insert_positions(batch)``              where the virtual tokens go, per row (default 0: prepend)
``generation_insert_positions(ids, mask)``  the same for a left-padded generation prompt

Conventions
    * The backbone is frozen in ``attach``; only the adapter's own modules train.
    * Virtual tokens never carry a label: :meth:`SoftPromptAdapter.hidden_states` returns hidden
      states for the REAL positions only, so ``labels``/``segments`` and every TokenSelector keep
      the batch's own (B, T) layout and the virtual positions are implicitly -100.
    * Position ids are ``cumsum(attention_mask) - 1`` over the full (virtual + real) sequence, so
      virtual tokens sit at positions 0..m-1 and left- and right-padded batches give the same
      positions to the same real tokens (what makes cached generation match training).
    * Deep prompts live in the model's cache object (``cache=``, transformers >= 5): a fresh
      ``DynamicCache`` pre-filled with the prefix key/values per forward, so gradients reach them.
    * Generation is the zoo's one decoder (:mod:`zoo.decoding`, through ``CausalLMModule.generate_text``):
      the adapter hands it the first forward's inputs (:meth:`SoftPromptAdapter.prefill`: virtual tokens
      inserted, prefix cache) and the embeddings of each new token (:meth:`SoftPromptAdapter.step_embeddings`).
    * ``export_extras`` writes ``prompt.pt`` (every prompt tensor, named as in the adapter's state dict)
      for prompt transfer (``init_prompt``); ``zoo.load`` restores the run from ``zoo_state`` itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zoo import backbone
from zoo.datamodules.sft import SEGMENT_PROMPT
from zoo.decoding import Prefill, position_ids_from_mask
from zoo.errors import ConfigError, check_range
from zoo.modules.adapters.base import Adapter

PromptInit = Literal["vocab", "random"]


# ---------------------------------------------------------------------------- pure tensor functions
def insert_virtual(embeds: Tensor, mask: Tensor, prompt: Tensor, at: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Insert ``prompt`` (B, m, H) into ``embeds`` (B, T, H) before column ``at[b]`` of each row.

    Returns the (B, T+m, H) embeddings, the (B, T+m) attention mask (ones on the virtual tokens) and
    ``real_index`` (B, T): the column of each real token in the new sequence (``t + m * (t >= at)``).
    ``at = 0`` prepends.
    """
    batch, length, _ = embeds.shape
    m = prompt.shape[1]
    at = at.to(embeds.device).view(-1, 1)
    cols = torch.arange(length + m, device=embeds.device).unsqueeze(0)
    before, inside = cols < at, (cols >= at) & (cols < at + m)
    source = torch.where(before, cols, torch.where(inside, length + cols - at, cols - m))
    merged = torch.cat([embeds, prompt.to(embeds.dtype)], dim=1)
    out = merged.gather(1, source.unsqueeze(-1).expand(-1, -1, embeds.shape[-1]))
    full_mask = torch.cat([mask, torch.ones(batch, m, dtype=mask.dtype, device=mask.device)], 1)
    full_mask = full_mask.gather(1, source)
    t = torch.arange(length, device=embeds.device).unsqueeze(0)
    real_index = t + m * (t >= at).long()
    return out, full_mask, real_index


def predicting_columns(real_index: Tensor) -> Tensor:
    """(B, T) column whose hidden state predicts real token t+1: ``real_index[t+1] - 1`` (last: ``real_index[T-1]``)."""
    return torch.cat([real_index[:, 1:] - 1, real_index[:, -1:]], dim=1)


def make_prefix_cache(keys: Tensor, values: Tensor, config: Any) -> Any:
    """A ``DynamicCache`` holding per-layer prefix key/values (L, B, kv_heads, m, head_dim)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=[(keys[i], values[i]) for i in range(keys.shape[0])], config=config)


# ---------------------------------------------------------------------------- parameter modules
class SoftPrompt(nn.Module):
    """``m`` trainable virtual-token embeddings, (m, H)."""

    def __init__(self, num_virtual_tokens: int, hidden: int, init: Tensor | None = None, std: float = 0.02):
        super().__init__()
        weight = init.detach().clone().float() if init is not None else torch.randn(num_virtual_tokens, hidden) * std
        self.weight = nn.Parameter(weight)

    @property
    def num_virtual_tokens(self) -> int:
        return self.weight.shape[0]

    def forward(self, batch_size: int) -> Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class PrefixKV(nn.Module):
    """Deep prompts: per-layer prefix keys and values, (L, kv_heads, m, head_dim) each."""

    def __init__(self, layers: int, kv_heads: int, num_virtual_tokens: int, head_dim: int, std: float = 0.02):
        super().__init__()
        shape = (layers, kv_heads, num_virtual_tokens, head_dim)
        self.keys = nn.Parameter(torch.randn(shape) * std)
        self.values = nn.Parameter(torch.randn(shape) * std)

    def forward(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """(L, B, kv_heads, m, head_dim) keys and values."""
        expand = (-1, batch_size, -1, -1, -1)
        return self.keys.unsqueeze(1).expand(*expand), self.values.unsqueeze(1).expand(*expand)


def attention_geometry(model: nn.Module) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a Llama/Qwen/Mistral-style backbone."""
    config = backbone.base_model(model).config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim


def vocab_init(model: nn.Module, count: int, seed: int = 0) -> Tensor:
    """Embeddings of ``count`` vocabulary tokens drawn with a fixed seed (sampled-vocabulary init)."""
    table = model.get_input_embeddings().weight.detach()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, min(table.shape[0], 5000), (count,), generator=generator)
    return table[ids.to(table.device)].float().cpu()


# ---------------------------------------------------------------------------- the adapter
PROMPT_FILE = "prompt.pt"


class SoftPromptAdapter(Adapter):
    """A frozen causal LM steered by soft prompts: ``num_virtual_tokens`` shallow or deep (prefix) tokens."""

    #: the shortest prompt: with no virtual tokens nothing would train (DePT, whose offset trains, allows 0)
    min_virtual_tokens = 1

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        deep: bool = False,
        prompt_init: PromptInit = "vocab",
        init_seed: int = 0,
        init_prompt: str | None = None,
    ) -> None:
        """
        Args:
            num_virtual_tokens: prompt length m (virtual tokens per sequence, or per layer when deep).
            deep: per-layer prefix key/values (prefix tuning / P-tuning v2) instead of input embeddings.
            prompt_init: ``vocab`` (embeddings of sampled vocabulary tokens) or ``random`` (N(0, 0.02)).
            init_seed: seed of the prompt initialisation (independent of the global seed).
            init_prompt: a ``prompt.pt`` (from an export) to start from: prompt transfer (PoT).
        """
        super().__init__()
        check_range(f"{type(self).__name__} num_virtual_tokens", num_virtual_tokens, self.min_virtual_tokens,
                    hint="the prompt is what trains: use e.g. 20 (prompt tuning) or 60 (DePT)"
                    if self.min_virtual_tokens else "")
        if prompt_init not in ("vocab", "random"):
            raise ConfigError(f"prompt_init must be 'vocab' or 'random', got {prompt_init!r}")
        self._prompt_args = dict(num_virtual_tokens=num_virtual_tokens, deep=deep, prompt_init=prompt_init,
                                 init_seed=init_seed, init_prompt=init_prompt)
        self.soft_prompt: SoftPrompt | None = None
        self.prefix: PrefixKV | None = None
        self.use_prompt = True

    # ------------------------------------------------------------------ construction
    def attach(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        """Freeze the backbone, build the prompt modules, load ``init_prompt`` if given."""
        self.bind(model, tokenizer)
        model.requires_grad_(False)
        self.build_prompt(model)
        path = self._prompt_args["init_prompt"]
        if path:
            if not Path(path).is_file():
                raise ConfigError(f"init_prompt {path!r} does not exist; point it at an export's {PROMPT_FILE}")
            self.load_prompt_state(torch.load(path, map_location="cpu", weights_only=True))
        return model

    def build_prompt(self, model: nn.Module) -> None:
        """Create the trainable prompt modules (subclasses add their own after calling this)."""
        args = self._prompt_args
        m, hidden = args["num_virtual_tokens"], backbone.hidden_size(model)
        with torch.random.fork_rng():
            torch.manual_seed(args["init_seed"])
            if args["deep"]:
                layers, kv_heads, head_dim = attention_geometry(model)
                self.prefix = PrefixKV(layers, kv_heads, m, head_dim)
                self.soft_prompt = None
            else:
                init = vocab_init(model, m, args["init_seed"]) if args["prompt_init"] == "vocab" and m > 0 else None
                self.soft_prompt = SoftPrompt(m, hidden, init) if m > 0 else None
                self.prefix = None
        self.use_prompt = True

    def load_prompt_state(self, state: dict[str, Tensor]) -> None:
        """Copy saved prompt tensors into this adapter's matching tensors (names and shapes must match)."""
        own = dict(self.named_parameters())
        own.update(self.named_buffers())
        for name, value in state.items():
            if name not in own or own[name].shape != value.shape:
                shapes = {n: tuple(p.shape) for n, p in own.items()}
                raise ConfigError(f"saved prompt tensor {name!r} {tuple(value.shape)} does not match this adapter's "
                                  f"tensors {shapes}; start from a prompt of the same method and sizes")
            with torch.no_grad():
                own[name].copy_(value)

    # ------------------------------------------------------------------ hooks
    def prompt_embeddings(self, batch_size: int) -> Tensor | None:
        """(B, m, H) shallow virtual tokens, or None."""
        return self.soft_prompt(batch_size) if self.soft_prompt is not None else None

    def input_embeddings(self, embeds: Tensor, positions: Tensor) -> Tensor:
        """Transform the real tokens' embeddings (B, T, H); ``positions`` (B, T) index tokens within a row."""
        return embeds

    def prefix_cache(self, batch_size: int) -> Any | None:
        """A cache pre-filled with per-layer prefix key/values, or None."""
        if self.prefix is None:
            return None
        keys, values = self.prefix(batch_size)
        return make_prefix_cache(keys, values, backbone.base_model(self.model).config)

    def insert_positions(self, batch: dict[str, Tensor]) -> Tensor:
        """(B,) column before which the shallow virtual tokens go (default 0: prepend)."""
        return torch.zeros(batch["input_ids"].shape[0], dtype=torch.long, device=batch["input_ids"].device)

    def generation_insert_positions(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Where the virtual tokens go in a left-padded generation prompt (default: in front)."""
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)

    # ------------------------------------------------------------------ forward
    def build_inputs(self, batch: dict[str, Tensor], insert_at: Tensor | None = None) -> dict[str, Any]:
        """Everything the decoder needs for one full (uncached) forward, plus ``real_index`` (B, T)."""
        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        batch_size, length = input_ids.shape
        embeds = self.model.get_input_embeddings()(input_ids)
        if not self.use_prompt:
            return dict(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                        cache=None, real_index=torch.arange(length, device=input_ids.device).expand(batch_size, -1))
        embeds = self.input_embeddings(embeds, position_ids_from_mask(mask))
        prompt = self.prompt_embeddings(batch_size)
        real_index = torch.arange(length, device=input_ids.device).expand(batch_size, -1)
        if prompt is not None and prompt.shape[1] > 0:
            at = insert_at if insert_at is not None else self.insert_positions(batch)
            embeds, mask, real_index = insert_virtual(embeds, mask, prompt, at)
        cache = self.prefix_cache(batch_size)
        full_mask = mask
        if cache is not None:
            past = cache.get_seq_length()
            full_mask = torch.cat([torch.ones(batch_size, past, dtype=mask.dtype, device=mask.device), mask], 1)
        positions = position_ids_from_mask(full_mask)[:, full_mask.shape[1] - mask.shape[1]:]
        return dict(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions, cache=cache,
                    real_index=real_index)

    def run_decoder(self, inputs: dict[str, Any]) -> Tensor:
        """Final hidden states of the decoder for prepared inputs (all positions, no LM head)."""
        cache = inputs["cache"]
        out = backbone.decoder(self.model)(
            inputs_embeds=inputs["inputs_embeds"], attention_mask=inputs["attention_mask"],
            position_ids=inputs["position_ids"], cache=cache, use_cache=cache is not None,
        )
        return out.last_hidden_state

    def hidden_states(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T, H) final hidden states aligned with the REAL positions only.

        Row t is the hidden state of the column just before real token t+1 (``real_index[t+1] - 1``), the
        one that predicts it: the real token t itself when prompts are prepended, the last virtual token
        when virtual tokens sit between t and t+1 (insertion after the prompt, IAPT).
        """
        inputs = self.build_inputs(batch)
        hidden = self.run_decoder(inputs)
        index = predicting_columns(inputs["real_index"])
        return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    # ------------------------------------------------------------------ decoding hooks (zoo.decoding)
    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Prefill:
        """The first forward of a LEFT-padded prompt: virtual tokens inserted where generation puts them, and
        (deep prompts) a ``DynamicCache`` pre-filled with the prefix, which the decoder then extends."""
        insert_at = self.generation_insert_positions(input_ids, attention_mask)
        inputs = self.build_inputs({"input_ids": input_ids, "attention_mask": attention_mask}, insert_at=insert_at)
        return Prefill(inputs["inputs_embeds"], inputs["attention_mask"], inputs["position_ids"], inputs["cache"])

    def step_embeddings(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        """(B, 1, H) embeddings of the token just generated, through :meth:`input_embeddings` (DePT's offset)."""
        embeds = self.model.get_input_embeddings()(input_ids)
        return self.input_embeddings(embeds, positions) if self.use_prompt else embeds

    # ------------------------------------------------------------------ switching off
    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the frozen backbone without the prompt (``use_prompt = False``)."""
        previous = self.use_prompt
        self.use_prompt = False
        try:
            yield
        finally:
            self.use_prompt = previous

    # ------------------------------------------------------------------ export
    def prompt_state(self) -> dict[str, Tensor]:
        """Every tensor of this adapter (named as in its state dict), on the CPU: what ``prompt.pt`` holds."""
        return {name: value.detach().cpu().clone() for name, value in self.state_dict().items()}

    def export_extras(self, directory: Path) -> None:
        """``prompt.pt``: the prompt tensors, for prompt transfer (``init_prompt``) and PANDA."""
        torch.save(self.prompt_state(), Path(directory) / PROMPT_FILE)

    @property
    def exports_backbone(self) -> bool:
        return False


def prompt_segment_lengths(batch: dict[str, Tensor]) -> Tensor:
    """(B,) number of prompt tokens per (right-padded) row, from ``segments`` or else ``labels``."""
    if "segments" in batch:
        return (batch["segments"] == SEGMENT_PROMPT).sum(1)
    labels, mask = batch["labels"], batch["attention_mask"]
    return ((labels == -100) & (mask == 1)).long().cumprod(1).sum(1)
