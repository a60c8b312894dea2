"""DePT: decomposed prompt tuning: a shorter soft prompt plus a low-rank offset on the input embeddings.

Paper: DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning (2023; ICLR 2024).
Spec: papers/12-dept.md. Official code: ZhengxiangShi/DePT.

Implements: a short prompt P (m x d) prepended to the frozen embeddings, and the position-wise offset
``E'(x) = E(x) + c * (A B)[positions]`` with A (s x r, Kaiming-uniform), B (r x d, zero) and
``c = lora_alpha / sqrt(r)`` (the released code's scaling); two AdamW parameter groups: the prompt at
``lr`` (paper lr_p) and A, B at ``lowrank_lr`` (paper lr_lr). Trainable count ``m*d + r*(s+d)``.
An adapter: ``adapter: {class_path: zoo.modules.adapters.DePT, init_args: {...}}`` under any objective.
Differs from the official code: rows of A are indexed by each token's position within its row
(``cumsum(attention_mask) - 1``), not by the padded column, so inputs need not be padded to exactly s
and left/right padding agree (the official code requires ``pad_to_max_length``); ``strict_length``
restores the exact-s requirement. Decoder-only backbone (the paper's main runs use T5's encoder), so
generation can run past s: positions >= s get a zero offset outside training (no row trained them).
Not implemented: transfer initialisation from source tasks (few-shot setting), text-initialised P.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor, nn

from zoo import backbone
from zoo.errors import ConfigError, check_range
from zoo.modules.prompting.soft_prompt import PromptInit, SoftPromptAdapter
from zoo.registry import register


class LowRankEmbeddingOffset(nn.Module):
    """``c * (A B)`` rows picked by position: A (s x r) Kaiming-uniform, B (r x d) zeros, c = alpha / sqrt(r)."""

    def __init__(self, max_seq_length: int, rank: int, hidden: int, alpha: float = 8.0):
        super().__init__()
        self.A = nn.Parameter(torch.empty(max_seq_length, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(rank, hidden))
        self.scaling = alpha / math.sqrt(rank)

    def matrix(self) -> Tensor:
        """(s, d) the full scaled offset ``c * A B``."""
        return self.scaling * (self.A @ self.B)

    def forward(self, positions: Tensor, beyond: Literal["raise", "zero"] = "raise") -> Tensor:
        """(B, T, d) offsets for (B, T) token positions. Positions >= s raise (``beyond="raise"``, training:
        the data is longer than the offset) or get a zero offset (``beyond="zero"``: tokens generated past
        the trained range, which no training row ever reached)."""
        limit = self.A.shape[0]
        if positions.numel() and int(positions.max()) >= limit:
            if beyond == "raise":
                raise ConfigError(f"DePT: a token at position {int(positions.max())} but the offset covers only "
                                  f"max_seq_length={limit} positions; raise max_seq_length to the data's max_length")
            inside = positions < limit
            return self.scaling * (self.A[positions.clamp_max(limit - 1)] @ self.B) * inside[..., None]
        return self.scaling * (self.A[positions] @ self.B)


class DePT(SoftPromptAdapter):
    """Decomposed prompt tuning: short prompt (the module's lr) + low-rank input-embedding offset (lowrank_lr)."""

    min_virtual_tokens = 0  # the offset trains on its own (the paper's m = 0 ablation)

    def __init__(
        self,
        num_virtual_tokens: int = 60,
        rank: int = 30,
        max_seq_length: int = 256,
        lora_alpha: float = 8.0,
        lowrank_lr: float = 5e-4,
        strict_length: bool = False,
        prompt_init: PromptInit = "vocab",
        init_seed: int = 0,
        init_prompt: str | None = None,
    ) -> None:
        """
        Args:
            num_virtual_tokens: short prompt length m (paper 60, or 40 with r = 45).
            rank: rank r of the offset A B (paper 30).
            max_seq_length: s, the rows of A = the longest input (paper 256; set to the data's max_length).
            lora_alpha: numerator of the offset scaling c = lora_alpha / sqrt(r) (release default 8).
            lowrank_lr: learning rate of A and B (paper lr_lr grid 5e-4 / 5e-3); the module's ``lr`` is the
                prompt's (lr_p).
            strict_length: require every batch to be exactly max_seq_length columns wide (official behaviour).
            prompt_init: ``vocab`` (sampled vocabulary embeddings) or ``random``.
            init_seed: seed of the prompt and offset initialisation.
            init_prompt: a ``prompt.pt`` of a DePT export with the same sizes to start from (transfer).
        """
        if rank < 1 or max_seq_length < 1:
            raise ConfigError(f"DePT needs rank >= 1 and max_seq_length >= 1, got rank={rank}, "
                              f"max_seq_length={max_seq_length}")
        self._dept_args = dict(rank=rank, max_seq_length=max_seq_length, lora_alpha=lora_alpha,
                               strict_length=strict_length)
        self.lowrank_lr = lowrank_lr
        super().__init__(num_virtual_tokens=num_virtual_tokens, deep=False, prompt_init=prompt_init,
                         init_seed=init_seed, init_prompt=init_prompt)

    def build_prompt(self, model: nn.Module) -> None:
        super().build_prompt(model)
        args = self._dept_args
        hidden = backbone.hidden_size(model)
        check_range(f"{type(self).__name__} rank", args["rank"], 1, hidden,
                    f"a rank above the hidden size {hidden} adds nothing (paper r = 30 at d = 768+)")
        with torch.random.fork_rng():
            torch.manual_seed(self._prompt_args["init_seed"] + 1)
            self.offset = LowRankEmbeddingOffset(args["max_seq_length"], args["rank"], backbone.hidden_size(model),
                                                 args["lora_alpha"])

    def input_embeddings(self, embeds: Tensor, positions: Tensor) -> Tensor:
        if self._dept_args["strict_length"] and self.training and embeds.shape[1] != self._dept_args["max_seq_length"]:
            raise ConfigError(f"DePT strict_length: batch has {embeds.shape[1]} columns, expected exactly "
                              f"max_seq_length={self._dept_args['max_seq_length']}; pad the data to that length")
        training = self.training and torch.is_grad_enabled()
        return embeds + self.offset(positions, beyond="raise" if training else "zero").to(embeds.dtype)

    def parameter_groups(self, lr: float) -> list[dict[str, Any]]:
        """Two AdamW groups: every other trainable tensor (the prompt) at ``lr`` (lr_p), A and B at ``lowrank_lr``."""
        lowrank = {id(p) for p in self.offset.parameters()}
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": [p for p in params if id(p) not in lowrank], "lr": lr, "name": "prompt"},
                {"params": [p for p in params if id(p) in lowrank], "lr": self.lowrank_lr, "name": "lowrank"}]


def dept_trainable_count(m: int, r: int, s: int, d: int) -> int:
    """Closed-form DePT budget ``m*d + r*(s+d)``."""
    return m * d + r * (s + d)


register(
    name="dept",
    kind="adapter",
    paper="DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning (2023)",
    spec="12",
    config="configs/dept.yaml",
    target="zoo.modules.prompting.dept:DePT",
    scope="decoder-only; no source-task transfer initialisation",
)
