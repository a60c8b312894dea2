"""``SoftPromptModule``: the soft-prompt mechanism as a CausalLMModule subclass (before adapters).

Kept only while IAPT, APT, ProMoT and PANDA still subclass it; new code uses
:class:`zoo.modules.prompting.soft_prompt.SoftPromptAdapter`. Delete with the last user.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zoo import backbone
from zoo.modules.base import CausalLMModule
from zoo.modules.prompting.soft_prompt import (
    PrefixKV,
    PromptInit,
    SoftPrompt,
    attention_geometry,
    insert_virtual,
    make_prefix_cache,
    position_ids_from_mask,
    predicting_columns,
    vocab_init,
)


class SoftPromptModule(CausalLMModule):
    """A frozen causal LM steered by soft prompts: ``num_virtual_tokens`` shallow or deep (prefix) tokens."""

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        deep: bool = False,
        prompt_init: PromptInit = "vocab",
        init_seed: int = 0,
        init_prompt: str | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            num_virtual_tokens: prompt length m (virtual tokens per sequence, or per layer when deep).
            deep: per-layer prefix key/values (prefix tuning / P-tuning v2) instead of input embeddings.
            prompt_init: ``vocab`` (embeddings of sampled vocabulary tokens) or ``random`` (N(0, 0.02)).
            init_seed: seed of the prompt initialisation (independent of the global seed).
            init_prompt: a ``prompt.pt`` (from an export) to start from: prompt transfer (PoT).
            **kwargs: the CausalLMModule arguments (model, lr, ...).
        """
        self._prompt_args = dict(num_virtual_tokens=num_virtual_tokens, deep=deep, prompt_init=prompt_init,
                                 init_seed=init_seed, init_prompt=init_prompt)
        super().__init__(**kwargs)

    # ------------------------------------------------------------------ construction
    def configure_backbone(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        self.build_prompt(model)
        if self._prompt_args["init_prompt"]:
            self.load_prompt_state(torch.load(self._prompt_args["init_prompt"], map_location="cpu", weights_only=True))
        return model

    def load_prompt_state(self, state: dict[str, Tensor]) -> None:
        """Copy saved prompt tensors into the matching trainable parameters (names and shapes must match)."""
        params = dict(self.named_parameters())
        for name, value in state.items():
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"saved prompt tensor {name!r} {tuple(value.shape)} does not match this module's "
                                 f"parameters ({ {n: tuple(p.shape) for n, p in params.items() if p.requires_grad} })")
            with torch.no_grad():
                params[name].copy_(value)

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

    def forward_hidden(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T, H) final hidden states aligned with the REAL positions only.

        Row t is the hidden state of the column just before real token t+1 (``real_index[t+1] - 1``), the
        one that predicts it: the real token t itself when prompts are prepended, the last virtual token
        when virtual tokens sit between t and t+1 (insertion after the prompt, IAPT).
        """
        inputs = self.build_inputs(batch)
        hidden = self.run_decoder(inputs)
        index = predicting_columns(inputs["real_index"])
        return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))

    def logits(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T, V) logits at the real positions (position t predicts token t+1)."""
        return self(batch).logits()

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor, max_new_tokens: int = 32,
                 use_cache: bool = True, eos_token_id: int | None = None,
                 output_scores: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Greedy decoding through the prompt hooks; returns (B, new) ids (EOS-padded after EOS).

        With ``output_scores`` also the (B, new, V) logits of every step.

        Prompts should be LEFT-padded. ``use_cache=False`` re-runs the full forward every step (the
        reference the cached path is tested against).
        """
        eos = self.tokenizer.eos_token_id if eos_token_id is None else eos_token_id
        batch_size = input_ids.shape[0]
        insert_at = self.generation_insert_positions(input_ids, attention_mask)
        ids, mask = input_ids, attention_mask
        done = torch.zeros(batch_size, dtype=torch.bool, device=ids.device)
        new_tokens: list[Tensor] = []
        scores: list[Tensor] = []
        cache = full_mask = next_position = None
        for step in range(max_new_tokens):
            if not use_cache or step == 0:
                inputs = self.build_inputs({"input_ids": ids, "attention_mask": mask}, insert_at=insert_at)
                if use_cache and inputs["cache"] is None:
                    from transformers import DynamicCache

                    inputs["cache"] = DynamicCache(config=backbone.base_model(self.model).config)
                hidden = self.run_decoder(inputs)
                last = hidden[:, -1:]  # the last column (real or virtual) predicts the next token
                cache, full_mask = inputs["cache"], inputs["attention_mask"]
                next_position = inputs["position_ids"][:, -1:] + 1
            else:
                token_pos = position_ids_from_mask(mask)[:, -1:]
                embeds = self.model.get_input_embeddings()(ids[:, -1:])
                if self.use_prompt:
                    embeds = self.input_embeddings(embeds, token_pos)
                full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], 1)
                out = backbone.decoder(self.model)(
                    inputs_embeds=embeds, attention_mask=full_mask, position_ids=next_position,
                    cache=cache, use_cache=True)
                cache, last = out.cache, out.last_hidden_state
                next_position = next_position + 1
            weight, bias = self.lm_head_weight()
            logits = torch.nn.functional.linear(last[:, -1], weight, bias)
            scores.append(logits)
            token = logits.argmax(-1)
            token = torch.where(done, torch.full_like(token, eos), token)
            new_tokens.append(token)
            done |= token == eos
            ids = torch.cat([ids, token.unsqueeze(1)], 1)
            mask = torch.cat([mask, torch.ones_like(token).unsqueeze(1)], 1)
            if done.all():
                break
        tokens = torch.stack(new_tokens, 1)
        return (tokens, torch.stack(scores, 1)) if output_scores else tokens

    def generation_insert_positions(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Where the virtual tokens go in a left-padded generation prompt (default: in front)."""
        return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)

    def generate_text(self, prompts: list[str], max_new_tokens: int = 64, use_cache: bool = True) -> list[str]:
        """Chat-render ``prompts``, left-pad, decode greedily through the prompt; returns completions."""
        from zoo.datamodules.sft import render_prompt_ids

        rows = [render_prompt_ids(self.tokenizer, p) for p in prompts]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        device = self.device
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        out = self.generate(ids, mask, max_new_tokens=max_new_tokens, use_cache=use_cache)
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)

    # ------------------------------------------------------------------ export
    def export(self, directory: str | Path) -> Path:
        """The frozen backbone's export plus ``prompt.pt``: the trainable prompt tensors."""
        directory = super().export(directory)
        if self._trainer is None or self.trainer.is_global_zero:
            state = {name: p.detach().cpu() for name, p in self.trainable_parameters().items()}
            torch.save(state, Path(directory) / "prompt.pt")
        return directory


class PromptTuningModule(SoftPromptModule):
    """Legacy prompt tuning module (use ``CausalLMModule(adapter=PromptTuning(...))``)."""

    def __init__(self, num_virtual_tokens: int = 20, prompt_init: PromptInit = "vocab", init_seed: int = 0,
                 init_prompt: str | None = None, **kwargs: Any) -> None:
        super().__init__(num_virtual_tokens=num_virtual_tokens, deep=False, prompt_init=prompt_init,
                         init_seed=init_seed, init_prompt=init_prompt, **kwargs)


class PrefixTuningModule(SoftPromptModule):
    """Legacy prefix tuning module (use ``CausalLMModule(adapter=PrefixTuning(...))``)."""

    def __init__(self, num_virtual_tokens: int = 10, init_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(num_virtual_tokens=num_virtual_tokens, deep=True, init_seed=init_seed, **kwargs)
