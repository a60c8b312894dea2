"""LeMo's optional saved-activation channel sparsity of the SwiGLU MLP (paper §4.2 "extend to MLP").

The forward is exact; the backward goes only through the top ``1 - rho`` intermediate channels ranked by
``||SiLU(gate)[:, c]|| + ||up[:, c]||`` over all tokens, so autograd saves only those channels'
activations (artifact: rho = 0.8 in the Llama end-to-end runs). Spec: papers/01-lemo.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import ConfigError


class _ExactForward(torch.autograd.Function):
    """Returns ``exact`` in forward; sends the whole gradient to ``surrogate`` in backward."""

    @staticmethod
    def forward(ctx, exact: Tensor, surrogate: Tensor) -> Tensor:
        return exact.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        return None, grad


def channel_scores(activated_gate: Tensor, up: Tensor) -> Tensor:
    """||SiLU(gate)[:, c]||_2 + ||up[:, c]||_2 over all tokens: (B, T, C), (B, T, C) -> (C,)."""
    return activated_gate.flatten(0, -2).norm(dim=0) + up.flatten(0, -2).norm(dim=0)


class ChannelSparseMLP(nn.Module):
    """SwiGLU MLP whose backward uses (and whose autograd saves) only the top ``1 - drop_ratio`` channels."""

    def __init__(self, mlp: nn.Module, drop_ratio: float):
        super().__init__()
        if not isinstance(getattr(mlp, "down_proj", None), nn.Linear) or type(mlp.down_proj) is not nn.Linear:
            raise ConfigError("mlp.drop_ratio needs a SwiGLU MLP with a plain nn.Linear down_proj (full "
                              "fine-tuning or LoRA on attention only); set mlp.drop_ratio: 0")
        object.__setattr__(self, "inner", mlp)
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.drop_ratio = drop_ratio

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or not torch.is_grad_enabled():
            return self.inner(x)
        act = self.inner.act_fn
        gate, up = self.gate_proj(x), self.up_proj(x)
        with torch.no_grad():
            activated = act(gate)
            exact = self.down_proj(activated * up)
            channels = gate.shape[-1]
            count = max(1, channels - math.floor(self.drop_ratio * channels))
            keep = channel_scores(activated, up).topk(count).indices.sort().values
        gate_k, up_k = gate.index_select(-1, keep), up.index_select(-1, keep)
        weight = self.down_proj.weight.index_select(1, keep)
        surrogate = F.linear(act(gate_k) * up_k, weight, self.down_proj.bias)
        return _ExactForward.apply(exact, surrogate)
