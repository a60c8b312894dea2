"""IAPT: instruction-aware prompt tuning, per-layer generators turn the instruction into m soft tokens.

Paper: IAPT: Instruction-Aware Prompt Tuning for Large Language Models (2024; ACL 2024). Spec:
papers/20-iapt.md. Official code: none found. "IAPT-style": the paper text was not available.

Implements: the :class:`IAPT` adapter (any objective takes it: ``adapter: {class_path:
zoo.modules.adapters.IAPT}``): m placeholder tokens inserted between the instruction (prompt) and the
response; before every decoder layer l, a generator reads the layer input at the instruction positions
H_l (n x d), ``Z = H_l W_down + b`` (n x r), attention pooling to m rows ``Y = softmax_n(Z U)^T Z``
(m x r, padding masked), a learnable rational activation ``R(x) = (a_0 + ... + a_5 x^5) / (1 + |b_1 x +
... + b_4 x^4|)`` (initialised by a least-squares fit to GELU on [-3, 3]), and ``P_l = R(Y) W_up``
(m x d), which overwrites the placeholder hidden states. Instruction positions are untouched
(causality); the response attends to the soft tokens. Per-layer count ``d*r + r + r*m + 10 + r*d``.
Generation goes through the zoo's one decoder: the placeholders follow the whole (left-padded) prompt,
their per-layer states enter the KV cache in the first forward and every new token attends to them.
Differs from the paper: the pooler parameterisation, r, rational orders and init are the spec's
documented zoo choices; placeholder embeddings are the EOS token's embedding.
Not implemented: cross-layer sharing of W_down/W_up, a separate learning rate for the rational
coefficients, the multi-tenant serving benchmark, gradient checkpointing (the generator hooks read the
forward's instruction mask, which a recomputation in backward would not see: refused with an error).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import backbone
from zoo.errors import ConfigError
from zoo.modules.prompting.soft_prompt import SoftPromptAdapter, prompt_segment_lengths
from zoo.registry import register


def rational(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    """``(a_0 + a_1 x + ... + a_p x^p) / (1 + |b_1 x + ... + b_q x^q|)`` elementwise; a (p+1,), b (q,)."""
    powers = torch.stack([x ** i for i in range(max(numerator.shape[0], denominator.shape[0] + 1))], -1)
    top = (powers[..., : numerator.shape[0]] * numerator).sum(-1)
    bottom = 1 + (powers[..., 1 : denominator.shape[0] + 1] * denominator).sum(-1).abs()
    return top / bottom


def fit_rational(p: int = 5, q: int = 4, target=F.gelu) -> tuple[Tensor, Tensor]:
    """Least-squares (a, b) with ``P(x) - f(x) Q(x) ~ f(x)`` on [-3, 3] (the linearised PAU fit)."""
    x = torch.linspace(-3, 3, 200, dtype=torch.float64)
    f = target(x)
    columns = [x ** i for i in range(p + 1)] + [-f * x ** j for j in range(1, q + 1)]
    solution = torch.linalg.lstsq(torch.stack(columns, 1), f.unsqueeze(1)).solution.squeeze(1)
    return solution[: p + 1].float(), solution[p + 1 :].float()


def attention_pool(z: Tensor, queries: Tensor, mask: Tensor) -> Tensor:
    """``softmax_n(Z U)^T Z``: z (B, n, r), queries U (r, m), mask (B, n) bool -> (B, m, r)."""
    scores = (z @ queries).masked_fill(~mask.unsqueeze(-1), float("-inf"))
    return torch.softmax(scores, dim=1).transpose(1, 2) @ z


class IAPTPromptGenerator(nn.Module):
    """One layer's generator: down-projection, attention pooling, rational activation, up-projection."""

    def __init__(self, hidden: int, bottleneck: int, num_tokens: int, degrees: tuple[int, int] = (5, 4)):
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck)
        self.queries = nn.Parameter(torch.randn(bottleneck, num_tokens) / bottleneck ** 0.5)
        a, b = fit_rational(*degrees)
        self.numerator, self.denominator = nn.Parameter(a), nn.Parameter(b)
        self.up = nn.Linear(bottleneck, hidden, bias=False)
        nn.init.normal_(self.up.weight, std=0.02)

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        """(B, m, d) soft tokens from instruction hidden states (B, n, d) with mask (B, n)."""
        pooled = attention_pool(self.down(hidden), self.queries, mask)
        return self.up(rational(pooled, self.numerator, self.denominator))


class IAPT(SoftPromptAdapter):
    """IAPT: m instruction-conditioned soft tokens per layer, at placeholders after the instruction.

    The generator hooks act only on the decoder forward whose inputs :meth:`build_inputs` prepared (matched
    by identity of ``inputs_embeds``): a forward without the prompt, a cached decoding step or a direct call
    of the backbone runs the layers untouched.
    """

    def __init__(self, num_virtual_tokens: int = 4, bottleneck: int = 16,
                 rational_degrees: tuple[int, int] = (5, 4), init_seed: int = 0) -> None:
        """
        Args:
            num_virtual_tokens: m, soft tokens per layer (paper 4).
            bottleneck: r, the generator's bottleneck width (unverified; zoo default 16).
            rational_degrees: (p, q) numerator / denominator orders of the rational activation (PAU 5/4).
            init_seed: seed of the generator initialisation.
        """
        if num_virtual_tokens < 1 or bottleneck < 1:
            raise ConfigError(f"IAPT needs num_virtual_tokens >= 1 and bottleneck >= 1, got {num_virtual_tokens} "
                              f"and {bottleneck}")
        super().__init__(num_virtual_tokens=num_virtual_tokens, deep=False, prompt_init="random",
                         init_seed=init_seed)
        self.bottleneck, self.rational_degrees = bottleneck, tuple(rational_degrees)
        self._pending: dict[str, Any] | None = None  # prepared by build_inputs, claimed by the decoder forward
        self._context: dict[str, Any] | None = None  # active during that forward only
        self._generation_prompt: tuple[Tensor, Tensor] | None = None
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------ construction
    def build_prompt(self, model: nn.Module) -> None:
        super().build_prompt(model)
        self.soft_prompt = None  # placeholders are fixed embeddings; generators produce the tokens
        m, d = self._prompt_args["num_virtual_tokens"], backbone.hidden_size(model)
        layers = backbone.decoder_layers(model)
        with torch.random.fork_rng():
            torch.manual_seed(self._prompt_args["init_seed"])
            self.generators = nn.ModuleList(IAPTPromptGenerator(d, self.bottleneck, m, self.rational_degrees)
                                            for _ in layers)
        for handle in self._hooks:
            handle.remove()
        body = backbone.decoder(model)
        self._hooks = [layer.register_forward_pre_hook(self._make_hook(i), with_kwargs=True)
                       for i, layer in enumerate(layers)]
        self._hooks.append(body.register_forward_pre_hook(self._claim, with_kwargs=True))
        self._hooks.append(body.register_forward_hook(self._release, always_call=True))

    # ------------------------------------------------------------------ soft-prompt hooks
    def prompt_embeddings(self, batch_size: int) -> Tensor | None:
        table = self.model.get_input_embeddings()
        eos = torch.full((batch_size, self._prompt_args["num_virtual_tokens"]), self.tokenizer.eos_token_id,
                         device=table.weight.device)
        return table(eos)

    def insert_positions(self, batch: dict[str, Tensor]) -> Tensor:
        return prompt_segment_lengths(batch)

    def generation_insert_positions(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """After the whole left-padded prompt. The uncached reference decoder re-runs the prefill with the
        prompt plus the tokens generated so far: a call that extends the last prefilled prompt (same rows,
        same leading ids and mask, ones after) keeps the placeholders where that prompt ended."""
        batch, length = input_ids.shape
        at = length
        last = self._generation_prompt
        if last is not None:
            ids, mask = last
            n = ids.shape[1]
            if (ids.shape[0] == batch and n < length and ids.device == input_ids.device
                    and torch.equal(input_ids[:, :n], ids) and torch.equal(attention_mask[:, :n], mask)
                    and bool(attention_mask[:, n:].all())):
                at = n
        if at == length:
            self._generation_prompt = (input_ids.detach(), attention_mask.detach())
        return torch.full((batch,), at, dtype=torch.long, device=input_ids.device)

    def build_inputs(self, batch: dict[str, Tensor], insert_at: Tensor | None = None) -> dict[str, Any]:
        inputs = super().build_inputs(batch, insert_at)
        self._pending = None
        if self.use_prompt:
            at = (insert_at if insert_at is not None else self.insert_positions(batch)).view(-1, 1)
            m = self._prompt_args["num_virtual_tokens"]
            cols = torch.arange(inputs["inputs_embeds"].shape[1], device=at.device).unsqueeze(0)
            self._pending = {"embeds": weakref.ref(inputs["inputs_embeds"]),
                             "instruction": (cols < at) & inputs["attention_mask"][:, -cols.shape[1]:].bool(),
                             "placeholders": at + torch.arange(m, device=at.device).unsqueeze(0)}
        return inputs

    # ------------------------------------------------------------------ backbone hooks
    def _claim(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Decoder pre-hook: activate the prepared context if this forward runs the prepared inputs."""
        pending, self._pending = self._pending, None
        embeds = kwargs.get("inputs_embeds")
        active = pending is not None and embeds is not None and pending["embeds"]() is embeds
        self._context = pending if active else None
        checkpointed = backbone.activation_checkpointing_on(backbone.base_model(self.model))
        if active and torch.is_grad_enabled() and checkpointed:
            raise ConfigError("IAPT does not support gradient_checkpointing (its generators read the instruction "
                              "mask of the forward); set gradient_checkpointing: false")

    def _release(self, *_args: Any) -> None:
        self._context = None

    def _make_hook(self, layer: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict):
            context = self._context
            if context is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            tokens = self.generators[layer](hidden, context["instruction"]).to(hidden.dtype)
            index = context["placeholders"].unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            hidden = hidden.scatter(1, index, tokens)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return hook


def iapt_trainable_count(layers: int, d: int, r: int, m: int, degrees: tuple[int, int] = (5, 4)) -> int:
    """``L * (d*r + r + r*m + (p+1+q) + r*d)``."""
    return layers * (d * r + r + r * m + degrees[0] + 1 + degrees[1] + r * d)


register(
    name="iapt",
    kind="adapter",
    paper="IAPT: Instruction-Aware Prompt Tuning for Large Language Models (2024)",
    spec="20",
    config="configs/iapt.yaml",
    target="zoo.modules.prompting.iapt:IAPT",
    scope="IAPT-style (paper text unavailable): pooler/rational choices from the spec; no cross-layer sharing",
)
