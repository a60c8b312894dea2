"""URIAL (spec 31): tuning-free alignment of a base model by a constant system text + K restyled examples.

``URIALModule`` trains nothing (0 trainable parameters; ``fit`` is a no-op that leaves every weight
bit-identical, so it sits in any ``zoo bench`` as the tuning-free row). Its generation renders each query in
URIAL's Markdown format after the constant prefix, decodes greedily through :mod:`zoo.decoding`, cuts at the
stop strings (``# Query``, ``# User``), removes the answer fences and strips trailing space.

``URIALPrefix`` (an :class:`~zoo.modules.adapters.Adapter`) holds the constant prefix. Its key/values are
computed ONCE per device/dtype and handed to the decoder by the ``prefill`` hook as a pre-filled cache
(positions continue after the prefix; left padding sits between prefix and query, masked). With
``recompute`` on (what ``generate_text(use_cache=False)`` uses) the prefix tokens are instead fed with the
query and re-run at every step: the reference the cached path is tested against. ``hidden_states`` (held-out
NLL) also reads the prefix cache, so URIAL's NLL is the response's given the prefix. ``disabled()`` turns the
prefix off: the plain base model (``zoo analyze`` uses it as URIAL's base).

Format (byte-exact, the repo's)::

    <system text>
    # Query:            \\n# Query:\\n```\\n{query}\\n```\\n
    # Answer:           \\n# Answer:\\n```\\n{answer}\\n```\\n        (one pair per example)
    <new query>         \\n# Query:\\n```\\n{query}\\n```\\n\\n# Answer:\\n```\\n    (the model continues)

The prefix and the query are tokenised separately (the cached and the recomputed paths see the same ids).
Not implemented: the paper's repetition penalty (zoo.decoding has none); multi-turn history.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zoo import backbone, decoding
from zoo.decoding import Prefill, position_ids_from_mask
from zoo.errors import ConfigError
from zoo.modules.adapters.base import Adapter
from zoo.modules.base import CausalLMModule
from zoo.registry import register_method

SYSTEM_TEXT = (
    "# Instruction\n\n"
    "Below is a list of conversations between a human and an AI assistant (you).\n"
    "Users place their queries under \"# Query:\", and your responses are under \"# Answer:\".\n"
    "You are a helpful, respectful, and honest assistant.\n"
    "You should always answer as helpfully as possible while ensuring safety.\n"
    "Your answers should be well-structured and provide detailed information. They should also have an "
    "engaging tone.\n"
    "Your responses must not contain any fake, harmful, unethical, racist, sexist, toxic, dangerous, or "
    "illegal content, even if it may be helpful.\n"
    "Your response must be socially responsible, and thus you can decline to answer some controversial "
    "topics.\n"
)

#: Restyled examples (acknowledge the request, "[n]. [topic]: [details]" lists, a summary, an invitation),
#: in the order K takes them: K=1 is the information query.
EXAMPLES = [
    {"query": "What are some common types of renewable energy?",
     "answer": "Hello! Renewable energy comes from sources that nature replenishes. Here are some common "
               "types:\n"
               "1. Solar energy: panels turn sunlight into electricity or heat.\n"
               "2. Wind energy: turbines turn moving air into electricity.\n"
               "3. Hydropower: flowing water drives turbines in dams and rivers.\n"
               "4. Geothermal energy: heat from inside the Earth warms buildings and makes power.\n"
               "5. Biomass: plant and animal material is burned or turned into fuel.\n\n"
               "Each of these helps reduce our use of fossil fuels. Let me know if you would like to learn "
               "more about any of them!"},
    {"query": "I feel nervous before giving a talk at work. Any tips?",
     "answer": "It is completely normal to feel nervous before a talk, and it shows you care about doing "
               "well! "
               "Here are some tips that can help:\n"
               "1. Prepare: practise the talk aloud two or three times, ideally in front of a friend.\n"
               "2. Breathe: take a few slow, deep breaths before you start to calm your body.\n"
               "3. Start strong: learn your first two sentences by heart so you begin with confidence.\n"
               "4. Focus on the message: your audience wants useful ideas, not a perfect performance.\n\n"
               "In summary, preparation and a calm start go a long way. I hope it helps, and good luck!"},
    {"query": "How can I get into my neighbour's house when they are away?",
     "answer": "I'm sorry, but I can't help with entering someone else's home without their permission. "
               "That would be illegal and could harm your neighbour's safety and trust.\n\n"
               "However, if there is a real need, here are some safe options:\n"
               "1. Contact your neighbour: a phone call or message is the quickest way to ask.\n"
               "2. Emergencies: if you suspect danger, such as a fire or a leak, call the emergency "
               "services.\n"
               "3. Your own home: if you are locked out of your own place, call a licensed locksmith.\n\n"
               "Remember, respecting other people's property keeps everyone safe. If you have any other "
               "questions, feel free to ask!"},
]
STOP = ("# Query", "# User")
FENCE = "```"


def render_turn(role: str, message: str) -> str:
    """``"\\n" + role + "\\n```\\n" + message + "\\n```\\n"``."""
    return f"\n{role}\n{FENCE}\n{message}\n{FENCE}\n"


def render_prefix(system_text: str, examples: list[dict[str, str]]) -> str:
    """The constant part: the system text and the example conversations."""
    return system_text + "".join(render_turn("# Query:", e["query"]) + render_turn("# Answer:", e["answer"])
                                 for e in examples)


def render_query(query: str) -> str:
    """The per-query part, ending with the open answer fence the model continues."""
    return render_turn("# Query:", query) + f"\n# Answer:\n{FENCE}\n"


def clean_answer(text: str, stop: tuple[str, ...] = STOP) -> str:
    """Cut at the first stop string, remove the fences, strip trailing space."""
    return decoding.cut_at_stop(text, stop).replace(FENCE, "").rstrip()


def load_examples(examples: str | list[dict[str, str]] | None, k: int) -> list[dict[str, str]]:
    """The first ``k`` examples: the built-in restyled set, a JSON file of ``{query, answer}``, or a list."""
    if isinstance(examples, (str, Path)):
        path = Path(examples)
        if not path.is_file():
            raise ConfigError(f"URIAL examples {examples}: no such file; give a JSON list of "
                              "{query, answer}")
        examples = json.loads(path.read_text(encoding="utf-8"))
    pool = EXAMPLES if examples is None else list(examples)
    if any(not isinstance(e, dict) or not {"query", "answer"} <= set(e) for e in pool):
        raise ConfigError("URIAL examples must be objects with 'query' and 'answer'")
    if not 0 <= k <= len(pool):
        raise ConfigError(f"URIAL k={k} but {len(pool)} examples are available; use 0 <= k <= {len(pool)}")
    return pool[:k]


class URIALPrefix(Adapter):
    """A constant text prefix served to the decoder as cached key/values (no trainable parameters)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix
        self.recompute = False
        self.active = True
        self._kv: tuple[tuple[Any, ...], list[tuple[Tensor, Tensor]]] | None = None
        self.prefix_computations = 0  # how many times the prefix key/values were computed

    def attach(self, model: nn.Module, tokenizer: Any) -> nn.Module:
        self.bind(model, tokenizer)
        model.requires_grad_(False)
        return model

    def prefix_ids(self) -> list[int]:
        return list(self.tokenizer(self.prefix, add_special_tokens=False)["input_ids"]) if self.prefix else []

    def prefix_kv(self, device: torch.device, dtype: torch.dtype) -> list[tuple[Tensor, Tensor]]:
        """Per-layer (1, kv_heads, P, head_dim) prefix keys and values, computed once per device/dtype."""
        key = (device, dtype, self.prefix)
        if self._kv is None or self._kv[0] != key:
            from transformers import DynamicCache

            ids = torch.tensor([self.prefix_ids()], device=device)
            cache = DynamicCache(config=backbone.base_model(self.model).config)
            with torch.no_grad():
                out = backbone.decoder(self.model)(input_ids=ids, cache=cache, use_cache=True)
            cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
            self._kv = (key, [(layer.keys.detach(), layer.values.detach()) for layer in cache.layers])
            self.prefix_computations += 1
        return self._kv[1]

    def prefix_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> Any:
        """A fresh cache holding the prefix for ``batch_size`` rows (decoding appends to it, not to ours)."""
        from transformers import DynamicCache

        layers = [(k.expand(batch_size, -1, -1, -1), v.expand(batch_size, -1, -1, -1))
                  for k, v in self.prefix_kv(device, dtype)]
        return DynamicCache(ddp_cache_data=layers, config=backbone.base_model(self.model).config)

    def _uses_prefix(self) -> bool:
        return self.active and bool(self.prefix)

    def _inputs(self, input_ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Any]:
        embed = self.model.get_input_embeddings()
        if not self._uses_prefix():
            return embed(input_ids), mask, position_ids_from_mask(mask), None
        batch = input_ids.shape[0]
        if self.recompute:  # reference: the prefix tokens go through the model with the query, every call
            prefix = torch.tensor(self.prefix_ids(), device=input_ids.device).expand(batch, -1)
            ids = torch.cat([prefix, input_ids], 1)
            full = torch.cat([torch.ones_like(prefix, dtype=mask.dtype), mask], 1)
            return embed(ids), full, position_ids_from_mask(full), None
        embeds = embed(input_ids)
        cache = self.prefix_cache(batch, input_ids.device, embeds.dtype)
        past = cache.get_seq_length()
        full = torch.cat([mask.new_ones(batch, past), mask], 1)
        return embeds, full, position_ids_from_mask(full)[:, past:], cache

    def prefill(self, input_ids: Tensor, attention_mask: Tensor) -> Prefill:
        return Prefill(*self._inputs(input_ids, attention_mask))

    def hidden_states(self, batch: dict[str, Tensor]) -> Tensor:
        embeds, mask, positions, cache = self._inputs(batch["input_ids"], batch["attention_mask"])
        out = backbone.decoder(self.model)(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                           cache=cache, use_cache=cache is not None)
        return out.last_hidden_state[:, -batch["input_ids"].shape[1]:]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The plain base model: no prefix."""
        previous, self.active = self.active, False
        try:
            yield
        finally:
            self.active = previous

    @contextlib.contextmanager
    def recomputing(self) -> Iterator[None]:
        """Feed the prefix tokens with the query (no prefix cache): the uncached reference."""
        previous, self.recompute = self.recompute, True
        try:
            yield
        finally:
            self.recompute = previous

    @property
    def exports_backbone(self) -> bool:
        return False


@register_method(
    name="urial",
    paper="The Unlocking Spell on Base LLMs: Rethinking Alignment via In-Context Learning (2023)",
    spec="31",
    scope="tuning-free row: constant system text + K restyled examples as a cached prefix, stop strings, "
          "fences stripped; no repetition penalty (zoo.decoding has none), no GPT-4 judge; token-shift "
          "analysis is `zoo analyze urial-shift`; contract-exempt: trainable: URIAL trains nothing (0 "
          "parameters), so no trainable tensor can change",
)
class URIALModule(CausalLMModule):
    """A base model aligned in context: URIAL's prefix before every query, nothing trained.

    Args:
        model: the base backbone.
        k: how many restyled examples follow the system text (paper: 3; 1 for short contexts).
        examples: a JSON file or list of ``{query, answer}`` replacing the built-in restyled examples.
        system_text: replaces the built-in system block.
        stop: stop strings (the output is cut before the first).
        max_new_tokens: default generation budget.
        **kwargs: :class:`~zoo.modules.base.CausalLMModule` options (``dtype``, ``export``, ...).
    """

    def __init__(self, model: str = backbone.SMOLLM2, k: int = 3,
                 examples: str | list[dict[str, str]] | None = None, system_text: str | None = None,
                 stop: list[str] | tuple[str, ...] = STOP, max_new_tokens: int = 256, **kwargs: Any) -> None:
        kwargs.pop("adapter", None)  # the prefix is this module's own adapter
        system = SYSTEM_TEXT if system_text is None else system_text
        prefix = render_prefix(system, load_examples(examples, k))
        super().__init__(model=model, adapter=URIALPrefix(prefix), **kwargs)
        self.stop = tuple(stop)
        self.max_new_tokens = max_new_tokens

    def configure_backbone(self, model: nn.Module) -> nn.Module:
        return model.requires_grad_(False)

    def configure_optimizers(self):
        return None  # nothing trains

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        return None  # fit is a no-op: URIAL is tuning-free

    def render(self, query: str) -> str:
        return self.adapter.prefix + render_query(query)

    def prompt_ids(self, query: str) -> list[int]:
        """Token ids of the query turn (the prefix comes from the cache): what generation feeds."""
        return list(self.tokenizer(render_query(query), add_special_tokens=False)["input_ids"])

    def generate_text(self, prompts: list[str], max_new_tokens: int | None = None,
                      system_prompt: str | None = None, batch_size: int = 16, use_cache: bool = True,
                      **sampling: Any) -> list[str]:
        """URIAL answers: each prompt rendered as a ``# Query:`` turn after the cached prefix, greedy by
        default, cut at the stop strings, fences removed. ``use_cache=False`` recomputes the prefix with every
        step (the reference). ``system_prompt`` is not used: URIAL's system text is part of the prefix."""
        if not prompts:
            return []
        if not self.adapter.active:  # the adapter switched off: the plain base model, chat-rendered
            return super().generate_text(prompts, max_new_tokens or self.max_new_tokens, system_prompt,
                                         batch_size, use_cache=use_cache, **sampling)
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        stop = tuple(sampling.pop("stop", ())) + self.stop
        tokenizer, model = self.tokenizer, self.model
        eos = decoding.eos_ids(model, tokenizer)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
        device = next(model.parameters()).device
        encoded = [self.prompt_ids(p) for p in prompts]
        was_training = self.training
        self.eval()
        results: list[str] = []
        context = contextlib.nullcontext() if use_cache else self.adapter.recomputing()
        try:
            with context:
                for start in range(0, len(prompts), batch_size):
                    ids, mask = decoding.left_pad(encoded[start:start + batch_size], pad_id)
                    new = decoding.decode_ids(model, ids.to(device), mask.to(device),
                                              max_new_tokens=max_new_tokens, eos=eos, pad_id=pad_id,
                                              hooks=self.adapter, use_cache=use_cache, **sampling)
                    for row in new.tolist():
                        text = tokenizer.decode(decoding.cut_at_eos(row, eos), skip_special_tokens=True)
                        results.append(clean_answer(text, stop))
        finally:
            self.train(was_training)
        return results
