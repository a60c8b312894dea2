"""LeMo's Q/K block-pattern predictors (paper §4.3, Eq. 3) and how they learn (artifact
``predictor_trainer.py``).

Per sparse layer, a Q and a K MLP (64*d_h -> 128 -> 64*d_h -> d_h, ReLU, weights shared across heads) map
each block of one head's normed attention input to one d_h vector; the predicted block matrix is
``sum_h Q̂_h K̂_h^T``. :class:`PredictorTrainer` fits them to the oracle target with the LLM frozen:
SmoothL1 (or MSE), AdamW (0.9, 0.95), linear warm-up then constant, optional elastic shrinking, and
gradients averaged over ranks so every process keeps identical predictors. Spec: papers/01-lemo.md.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.modules.sparse.lemo.options import ElasticOptions, PredictorOptions
from zoo.modules.sparse.lemo.scores import column_scores, kept_block_count, topk_recall


class _ReluMLP(nn.Module):
    """in -> w1 -> w2 -> out with ReLU between; tracks how often each hidden neuron is <= 0."""

    def __init__(self, widths: tuple[int, int, int, int]):
        super().__init__()
        self.maps = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.track = False
        self.zero_counts: list[Tensor] = [torch.zeros(w) for w in widths[1:3]]
        self.samples = 0

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.maps[0].in_features, *(m.out_features for m in self.maps))

    def forward(self, x: Tensor) -> Tensor:
        for i, linear in enumerate(self.maps):
            x = linear(x)
            if i < 2:
                if self.track:
                    with torch.no_grad():
                        flat = x.reshape(-1, x.shape[-1])
                        self.zero_counts[i] = self.zero_counts[i].to(x.device) + (flat <= 0).float().sum(0)
                        if i == 0:
                            self.samples += flat.shape[0]
                x = F.relu(x)
        return x

    @torch.no_grad()
    def shrink(self, tau: float) -> None:
        """Drop hidden neurons of the first two maps that were <= 0 in >= tau of the tracked samples (summed
        over ranks under torch.distributed, so that every rank keeps the same neurons and shapes)."""
        self.reduce_counts()
        if self.samples == 0:
            return
        for i in range(2):
            freq = self.zero_counts[i].cpu() / self.samples
            keep = (freq < tau).nonzero().squeeze(-1)
            if keep.numel() == 0:
                keep = freq.argmin().view(1)
            keep = keep.to(self.maps[i].weight.device)
            old_out, old_next = self.maps[i], self.maps[i + 1]
            new_out = nn.Linear(old_out.in_features, keep.numel()).to(old_out.weight)
            new_out.weight.copy_(old_out.weight[keep])
            new_out.bias.copy_(old_out.bias[keep])
            new_next = nn.Linear(keep.numel(), old_next.out_features).to(old_next.weight)
            new_next.weight.copy_(old_next.weight[:, keep])
            new_next.bias.copy_(old_next.bias)
            self.maps[i], self.maps[i + 1] = new_out, new_next
        self.zero_counts = [torch.zeros(self.maps[0].out_features), torch.zeros(self.maps[1].out_features)]
        self.samples = 0

    def reduce_counts(self) -> None:
        """Sum the tracked zero counts and sample count over ranks (a no-op outside torch.distributed)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        device = self.maps[0].weight.device
        sizes = [c.numel() for c in self.zero_counts]
        flat = torch.cat([*(c.to(device).float() for c in self.zero_counts),
                          torch.tensor([float(self.samples)], device=device)])
        torch.distributed.all_reduce(flat)
        self.zero_counts = list(flat[:-1].split(sizes))
        self.samples = int(flat[-1].item())


class BlockPatternPredictor(nn.Module):
    """Per-layer Q/K block-pattern predictor (paper §4.3, Eq. 3).

    Input: the attention input (after the input norm, before RoPE) (B, T, heads * d_h), split per head and per
    block of ``block`` tokens; each (block, head) slice, flattened to ``block * d_h`` features, goes through
    the Q and the K MLP (weights shared across heads) to one d_h vector. Predicted block matrix
    ``sum_h Q̂_h K̂_h^T`` (B, nb, nb)."""

    def __init__(self, head_dim: int, block: int, hidden: int = 128, middle: int | None = None):
        super().__init__()
        self.head_dim, self.block = head_dim, block
        width_in = block * head_dim
        widths = (width_in, hidden, middle or width_in, head_dim)
        self.q_net, self.k_net = _ReluMLP(widths), _ReluMLP(widths)

    def forward(self, hidden: Tensor) -> Tensor:
        bsz, length, width = hidden.shape
        nb = -(-length // self.block)
        if nb * self.block != length:
            hidden = F.pad(hidden, (0, 0, 0, nb * self.block - length))
        heads = width // self.head_dim
        x = hidden.view(bsz, nb, self.block, heads, self.head_dim).permute(0, 3, 1, 2, 4)
        x = x.reshape(bsz, heads, nb, self.block * self.head_dim)
        q_hat, k_hat = self.q_net(x), self.k_net(x)  # (B, heads, nb, d_h)
        return torch.einsum("bhmd,bhnd->bmn", q_hat, k_hat)

    def set_tracking(self, on: bool) -> None:
        self.q_net.track = self.k_net.track = on

    def shrink(self, tau: float) -> None:
        self.q_net.shrink(tau)
        self.k_net.shrink(tau)



class PredictorTrainer:
    """The per-layer predictors with their own AdamW, step count and elastic shrinking; the LLM stays frozen.

    ``predictors`` maps the layer index (as a string) to its :class:`BlockPatternPredictor`; ``step`` counts
    predictor updates (checkpointed by the callback)."""

    def __init__(self, options: PredictorOptions, elastic: ElasticOptions):
        self.options, self.elastic = options, elastic
        self.predictors = nn.ModuleDict()
        self.step = 0
        self.last_recall: float | None = None
        self._optimizer: torch.optim.Optimizer | None = None

    def predictor_for(self, layer_idx: int, head_dim: int, block: int) -> BlockPatternPredictor:
        """The predictor of layer ``layer_idx``, created on first use."""
        if str(layer_idx) not in self.predictors:
            self.predictors[str(layer_idx)] = BlockPatternPredictor(head_dim, block, self.options.hidden)
        return self.predictors[str(layer_idx)]

    @property
    def trained(self) -> bool:
        """True once the first ``options.steps`` predictor steps are done (predictors then select blocks)."""
        return self.step >= self.options.steps

    def wants_step(self, global_step: int) -> bool:
        """Whether fine-tuning step ``global_step`` should also train the predictors."""
        if not self.predictors:
            return False
        if not self.trained:
            return True
        return self.options.refresh_every > 0 and global_step % self.options.refresh_every == 0

    def _get_optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(self.predictors.parameters(), lr=self.options.lr,
                                                betas=(0.9, 0.95))
        return self._optimizer

    def update(self, captured: dict[int, tuple[Tensor, Tensor]],
               fractions: list[float]) -> tuple[float, float]:
        """One predictor step on captured {layer: (attention input (B, T, D), oracle target (B, nb, nb))}.

        ``fractions`` are the layers' keep fractions (for the recall's k). Returns (mean loss, mean top-k
        recall vs the oracle)."""
        optimizer = self._get_optimizer()
        for group in optimizer.param_groups:
            group["lr"] = self.options.lr * min(1.0, (self.step + 1) / max(1, self.options.warmup))
        tracking = self.elastic.enabled and self.step < self.elastic.until
        losses, recalls = [], []
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            for layer, (hidden, target) in captured.items():
                predictor = self.predictors[str(layer)]
                predictor.set_tracking(tracking)
                predicted = predictor(hidden.float())
                loss_fn = F.smooth_l1_loss if self.options.loss == "smooth_l1" else F.mse_loss
                loss = loss_fn(predicted, target.float())
                loss.backward()
                losses.append(loss.item())
                count = kept_block_count(fractions[layer], target.shape[-1])
                recalls.append(topk_recall(column_scores(predicted.detach()), column_scores(target), count))
                predictor.set_tracking(False)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in self.predictors.parameters():  # keep every rank's predictors identical
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        optimizer.step()
        self.step += 1
        if tracking and self.step % self.elastic.every == 0:
            rounds = self.step // self.elastic.every - 1
            for predictor in self.predictors.values():
                predictor.shrink(self.elastic.tau - rounds * self.elastic.tau_step)
            self._optimizer = None  # shapes changed: a fresh optimizer
        self.last_recall = sum(recalls) / max(1, len(recalls))
        return sum(losses) / max(1, len(losses)), self.last_recall

    def state_dict(self) -> dict[str, Any]:
        """Step count and each predictor's weights with its (possibly shrunk) layer widths."""
        return {"predictor_step": self.step,
                "predictors": {name: {"widths": (p.q_net.widths, p.k_net.widths), "state": p.state_dict()}
                               for name, p in self.predictors.items()}}

    def load_predictors(self, state: dict[str, Any]) -> None:
        """Load the predictors of :meth:`state_dict` into the ones already created (resizing shrunk nets)."""
        for name, entry in state.get("predictors", {}).items():
            predictor = self.predictors[name]
            for net, widths in zip((predictor.q_net, predictor.k_net), entry["widths"]):
                if net.widths != tuple(widths):
                    net.maps = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
            predictor.load_state_dict(entry["state"])
        self._optimizer = None
