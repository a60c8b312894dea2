"""IAPT: instruction-aware prompt tuning, per-layer generators turn the instruction into m soft tokens.

Paper: IAPT: Instruction-Aware Prompt Tuning for Large Language Models (2024; ACL 2024). Spec:
papers/20-iapt.md. Official code: none found. "IAPT-style": the paper text was not available.

Implements: m placeholder tokens inserted between the instruction (prompt) and the response; before
every decoder layer l, a generator reads the layer input at the instruction positions H_l (n x d),
``Z = H_l W_down + b`` (n x r), attention pooling to m rows ``Y = softmax_n(Z U)^T Z`` (m x r, padding
masked), a learnable rational activation ``R(x) = (a_0 + ... + a_5 x^5) / (1 + |b_1 x + ... + b_4 x^4|)``
(initialised by a least-squares fit to GELU on [-3, 3]), and ``P_l = R(Y) W_up`` (m x d), which
overwrites the placeholder hidden states. Instruction positions are untouched (causality); the
response attends to the soft tokens. Per-layer count ``d*r + r + r*m + 10 + r*d``.
Differs from the paper: the pooler parameterisation, r, rational orders and init are the spec's
documented zoo choices; placeholder embeddings are the EOS token's embedding.
Not implemented: cross-layer sharing of W_down/W_up, a separate learning rate for the rational
coefficients, the multi-tenant serving benchmark.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import backbone
from zoo.modules.prompting.soft_prompt import SoftPromptModule, prompt_segment_lengths
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


class IAPTModule(SoftPromptModule):
    """IAPT: m instruction-conditioned soft tokens per layer, at placeholders after the instruction."""

    def __init__(self, num_virtual_tokens: int = 4, bottleneck: int = 16, rational_degrees: tuple[int, int] = (5, 4),
                 init_seed: int = 0, **kwargs: Any) -> None:
        """
        Args:
            num_virtual_tokens: m, soft tokens per layer (paper 4).
            bottleneck: r, the generator's bottleneck width (unverified; zoo default 16).
            rational_degrees: (p, q) numerator / denominator orders of the rational activation (PAU 5/4).
            init_seed: seed of the generator initialisation.
            **kwargs: the CausalLMModule arguments (model, lr, ...).
        """
        self.bottleneck, self.rational_degrees = bottleneck, tuple(rational_degrees)
        self._context: dict[str, Tensor] | None = None
        self._hooks: list[Any] = []
        super().__init__(num_virtual_tokens=num_virtual_tokens, deep=False, init_seed=init_seed, **kwargs)

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
        self._hooks = [layer.register_forward_pre_hook(self._make_hook(i), with_kwargs=True)
                       for i, layer in enumerate(layers)]

    def prompt_embeddings(self, batch_size: int) -> Tensor | None:
        table = self.model.get_input_embeddings()
        eos = torch.full((batch_size, self._prompt_args["num_virtual_tokens"]), self.tokenizer.eos_token_id,
                         device=table.weight.device)
        return table(eos)

    def insert_positions(self, batch: dict[str, Tensor]) -> Tensor:
        return prompt_segment_lengths(batch)

    def generation_insert_positions(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[1], dtype=torch.long, device=input_ids.device)

    def build_inputs(self, batch: dict[str, Tensor], insert_at: Tensor | None = None) -> dict[str, Any]:
        inputs = super().build_inputs(batch, insert_at)
        if self.use_prompt:
            at = (insert_at if insert_at is not None else self.insert_positions(batch)).view(-1, 1)
            m = self._prompt_args["num_virtual_tokens"]
            cols = torch.arange(inputs["inputs_embeds"].shape[1], device=at.device).unsqueeze(0)
            self._context = {"instruction": (cols < at) & inputs["attention_mask"].bool(),
                             "placeholders": at + torch.arange(m, device=at.device).unsqueeze(0)}
        return inputs

    def run_decoder(self, inputs: dict[str, Any]) -> Tensor:
        try:
            return super().run_decoder(inputs)
        finally:
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
    kind="module",
    paper="IAPT: Instruction-Aware Prompt Tuning for Large Language Models (2024)",
    spec="20",
    config="configs/iapt.yaml",
    target="zoo.modules.prompting.iapt:IAPTModule",
    scope="IAPT-style (paper text unavailable): pooler/rational choices from the spec; no cross-layer sharing",
)
