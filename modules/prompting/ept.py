"""EPT: efficient prompt tuning by multi-space projection and prompt fusion (DePT plus two modules).

Paper: Efficient Prompt Tuning by Multi-Space Projection and Prompt Fusion (2024; AAAI 2025).
Spec: papers/06-ept.md. Official code: none found.

Implements (on the :class:`~zoo.modules.prompting.dept.DePT` adapter: short prompt P_s, low-rank offset
Z = c*A B, two learning rates):
  1. prompt fusion ``P_f = P_s + softmax((P_s W_q)(Z W_k)^T / sqrt(d)) (Z W_v)`` (identity W_q/W_k/W_v
     unless ``fusion_projections``);
  2. N subspace projections ``P_i = P_f U_i V_i`` (U_i d x k random, V_i k x d zero, so training starts
     from DePT + fusion) and a gate ``g = softmax(W_g mean_rows(P_f) + b_g)``; ``P* = P_f + sum_i g_i P_i``;
  3. P* replaces the prompt in front of the offset embeddings.
With ``num_subspaces=0`` and ``fusion=False`` the model is DePT exactly (tested).
Differs from the paper: the full text was not available; the fusion projections/residual, the
subspace form, the gate input (mean-pooled prompt, task-level) and all defaults are the spec's
reconstruction. Z is the *scaled* offset c*A B (what is added to the embeddings).
Not implemented: the 4-bit quantised backbone; SVD initialisation of A, B from a long prompt.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from zoo import backbone
from zoo.errors import ConfigError
from zoo.modules.prompting.dept import DePT
from zoo.modules.prompting.soft_prompt import PromptInit
from zoo.registry import register


def fuse_prompt(prompt: Tensor, memory: Tensor, w_q: Tensor | None = None, w_k: Tensor | None = None,
                w_v: Tensor | None = None) -> Tensor:
    """``P + softmax((P Wq)(Z Wk)^T / sqrt(d)) (Z Wv)``: prompt (m, d) attends to memory Z (s, d); -> (m, d)."""
    q = prompt @ w_q if w_q is not None else prompt
    k = memory @ w_k if w_k is not None else memory
    v = memory @ w_v if w_v is not None else memory
    attention = torch.softmax(q @ k.T / math.sqrt(prompt.shape[-1]), dim=-1)
    return prompt + attention @ v


def gate_weights(prompt: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(N,) mixture weights ``softmax(W_g mean_rows(P) + b_g)`` for a (m, d) prompt, W_g (N, d)."""
    return torch.softmax(weight @ prompt.mean(0) + bias, dim=-1)


class EPTPromptGenerator(nn.Module):
    """Fusion + gated multi-space projection of the short prompt (the two modules EPT adds to DePT)."""

    def __init__(self, hidden: int, num_subspaces: int = 2, subspace_rank: int = 16, fusion: bool = True,
                 fusion_projections: bool = False):
        super().__init__()
        self.fusion, self.num_subspaces = fusion, num_subspaces
        if fusion and fusion_projections:
            self.w_q, self.w_k, self.w_v = (nn.Parameter(torch.eye(hidden)) for _ in range(3))
        else:
            self.w_q = self.w_k = self.w_v = None
        if num_subspaces > 0:
            self.U = nn.Parameter(torch.randn(num_subspaces, hidden, subspace_rank) / math.sqrt(hidden))
            self.V = nn.Parameter(torch.zeros(num_subspaces, subspace_rank, hidden))
            self.gate = nn.Linear(hidden, num_subspaces)
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)

    def gate_probs(self, fused: Tensor) -> Tensor:
        return gate_weights(fused, self.gate.weight, self.gate.bias)

    def forward(self, prompt: Tensor, memory: Tensor) -> Tensor:
        """(m, d) reconstructed joint prompt P* from P_s (m, d) and the offset matrix Z (s, d)."""
        fused = fuse_prompt(prompt, memory, self.w_q, self.w_k, self.w_v) if self.fusion else prompt
        if self.num_subspaces == 0:
            return fused
        projected = torch.einsum("md,ndk,nke->nme", fused, self.U, self.V)  # (N, m, d)
        g = self.gate_probs(fused)
        return fused + torch.einsum("n,nme->me", g, projected)


class EPT(DePT):
    """EPT: DePT whose short prompt is fused with the low-rank offset and mixed over gated subspaces."""

    def __init__(
        self,
        num_subspaces: int = 2,
        subspace_rank: int = 16,
        fusion: bool = True,
        fusion_projections: bool = False,
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
            num_subspaces: N, the number of projection subspaces (0: none; unverified default 2).
            subspace_rank: k, the inner width of each projection P U_i V_i.
            fusion: attend from the short prompt to the low-rank offset matrix (prompt fusion).
            fusion_projections: learn W_q, W_k, W_v (d x d each, identity init) in the fusion.
            num_virtual_tokens: short prompt length m (DePT's).
            rank: rank r of the offset A B.
            max_seq_length: s, the rows of A = the longest input (set to the data's max_length).
            lora_alpha: numerator of the offset scaling c = lora_alpha / sqrt(r).
            lowrank_lr: learning rate of A and B; the module's ``lr`` is the prompt's and the EPT modules'.
            strict_length: require every batch to be exactly max_seq_length columns wide.
            prompt_init: ``vocab`` (sampled vocabulary embeddings) or ``random``.
            init_seed: seed of the prompt, offset and EPT-module initialisation.
            init_prompt: a ``prompt.pt`` of an EPT export with the same sizes to start from.
        """
        if num_subspaces < 0 or subspace_rank < 1 or num_virtual_tokens < 1:
            raise ConfigError(f"EPT needs num_subspaces >= 0, subspace_rank >= 1 and num_virtual_tokens >= 1, got "
                              f"{num_subspaces}, {subspace_rank}, {num_virtual_tokens}")
        self._ept_args = dict(num_subspaces=num_subspaces, subspace_rank=subspace_rank, fusion=fusion,
                              fusion_projections=fusion_projections)
        super().__init__(num_virtual_tokens=num_virtual_tokens, rank=rank, max_seq_length=max_seq_length,
                         lora_alpha=lora_alpha, lowrank_lr=lowrank_lr, strict_length=strict_length,
                         prompt_init=prompt_init, init_seed=init_seed, init_prompt=init_prompt)

    def build_prompt(self, model: nn.Module) -> None:
        super().build_prompt(model)
        with torch.random.fork_rng():
            torch.manual_seed(self._prompt_args["init_seed"] + 2)
            self.generator = EPTPromptGenerator(backbone.hidden_size(model), **self._ept_args)

    def prompt_embeddings(self, batch_size: int) -> Tensor | None:
        prompt = self.soft_prompt.weight
        joint = self.generator(prompt, self.offset.matrix())
        return joint.unsqueeze(0).expand(batch_size, -1, -1)


def ept_trainable_count(m: int, r: int, s: int, d: int, num_subspaces: int, k: int,
                        fusion_projections: bool = False) -> int:
    """``m*d + r*(s+d) + [3 d^2] + N*2*d*k + N*(d+1)`` (the last two only when N > 0)."""
    count = m * d + r * (s + d) + (3 * d * d if fusion_projections else 0)
    if num_subspaces > 0:
        count += num_subspaces * 2 * d * k + num_subspaces * (d + 1)
    return count


register(
    name="ept",
    kind="adapter",
    paper="Efficient Prompt Tuning by Multi-Space Projection and Prompt Fusion (2024)",
    spec="06",
    config="configs/ept.yaml",
    target="zoo.modules.prompting.ept:EPT",
    scope="fusion/subspace/gate equations reconstructed (paper text unavailable); no 4-bit backbone",
)
