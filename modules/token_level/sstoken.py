"""ssToken: self-modulated and semantic-aware token selection for LLM fine-tuning.

Paper: ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning (2025, arXiv
2510.18250). Spec: papers/03-sstoken.md. Official code: jianke0604/ssToken.

Implements (spec steps 1-8)
    * retrospective excess loss ``REL_t = L_his(x_t) - L_cur(x_t)`` (large = the current model has
      improved on the token: kept), min-max normalised per example over its response tokens;
      ``L_cur`` is the training forward's detached per-token loss, ``L_his`` a no-grad forward of the
      history model on the same input ids (a frozen copy of the model taken in ``setup``, i.e. before
      any checkpoint is restored = the base model; ``history="ema"`` updates it after every optimizer
      step, ``his = alpha * his + (1 - alpha) * cur``, and saves it in the callback state). The copy is
      taken before the strategy moves and casts the trainee, so ``on_fit_start`` and every use move each
      of its tensors to the device and dtype of the trainee's tensor of the same name;
    * the prompt-attention score from ONE probe layer (default: the last, as the released code): a
      forward pre-hook on that layer's attention module keeps its input hidden states and RoPE
      (cos, sin); ``select`` recomputes q and k (q/k norms if the model has them), applies RoPE, the
      causal + padding mask and a float32 softmax, then averages over heads the attention mass each
      response query puts on the prompt keys. Prompt keys come from the explicit ``segments == 1``
      mask (or ``labels == -100`` inside the attention mask when a batch has no segments), never from
      a count of -100 labels;
    * ``score = gamma * nREL + (1 - gamma) * Attn``; per example the top ``ceil(keep_ratio * |I_r|)``
      response tokens get weight 1, the rest 0; the module's default ``token_mean`` reduction gives the
      paper's mean CE over kept tokens;
    * ``attention_only_steps``: an explicit warm-up (gamma treated as 0) replacing the released code's
      switch on a data-set index threshold.

Alignment (the spec's pitfall): the zoo's losses are target-aligned (``loss[t]`` is the loss of
token ``t``). The attention score of token ``t`` is the attention row of the query AT position ``t``
(the token itself as a query, the paper's ``A[i, j]`` with ``i`` the token's position), which is
what the released code pairs after prepending a zero to its loss vector.

DDP: every quantity is per example (history forward, attention, top-k), so each rank selects on
its own micro-batch with no communication; the EMA copy stays identical on every rank because the
trainee's parameters are. FSDP-sharded trainees are not supported (the copy would be sharded).

Differs from the official code: the static history's losses are computed by a second forward each
step instead of precomputed once over the data set (the same numbers, computed on exactly the
training tokenisation; it costs one no-grad forward, and a copy of the model in memory).

Not implemented: the periodic-checkpoint history variant; lm-eval-harness evaluation and the DS2
data pool (harness scope).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from zoo import backbone
from zoo.datamodules.sft import SEGMENT_PROMPT
from zoo.errors import check_range
from zoo.modules.adapters.base import final_hidden_states
from zoo.modules.base import StepOutputs, target_mask
from zoo.modules.qk import query_key_states
from zoo.registry import register


# ---------------------------------------------------------------------------- pure tensor functions
def minmax_per_example(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """Min-max normalise ``values`` (B, T) over the ``mask``ed positions of each row; 0 outside the mask."""
    big = torch.finfo(values.dtype).max
    low = values.masked_fill(~mask, big).amin(dim=1, keepdim=True)
    high = values.masked_fill(~mask, -big).amax(dim=1, keepdim=True)
    normed = (values - low) / (high - low + eps)
    return torch.where(mask, normed, torch.zeros_like(values))


def prompt_attention(probs: Tensor, prompt_mask: Tensor) -> Tensor:
    """Head-averaged attention mass each query puts on prompt keys: (B, H, T, T), (B, T) -> (B, T)."""
    on_prompt = (probs * prompt_mask[:, None, None, :].to(probs.dtype)).sum(-1)
    return on_prompt.mean(1)


def sstoken_scores(current_loss: Tensor, history_loss: Tensor, attention: Tensor, response_mask: Tensor,
                   gamma: float) -> Tensor:
    """``gamma * minmax(L_his - L_cur) + (1 - gamma) * attention``, all (B, T); 0 outside
    ``response_mask``."""
    rel = history_loss.float() - current_loss.float()
    score = gamma * minmax_per_example(rel, response_mask) + (1.0 - gamma) * attention.float()
    return torch.where(response_mask, score, torch.zeros_like(score))


def keep_count(n: Tensor, keep_ratio: float) -> Tensor:
    """``ceil(keep_ratio * n)`` per row, robust to float noise (0.7 * 10 keeps 7, not 8)."""
    return torch.ceil(torch.round(n.double() * keep_ratio, decimals=9)).long()


def top_ratio_mask(scores: Tensor, response_mask: Tensor, keep_ratio: float) -> Tensor:
    """(B, T) float 0/1: the top ``ceil(keep_ratio * |I_r|)`` response positions of each row by score."""
    masked = scores.float().masked_fill(~response_mask, float("-inf"))
    order = masked.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    k = keep_count(response_mask.sum(1), keep_ratio)
    return ((ranks < k[:, None]) & response_mask).float()


def recompute_attention(attn: nn.Module, hidden: Tensor, cos: Tensor, sin: Tensor,
                        attention_mask: Tensor | None) -> Tensor:
    """Causal softmax attention probabilities (B, H, T, T), float32, of one Llama-style attention module.

    ``hidden`` (B, T, D) is the module's input (after the layer's input norm); ``cos``/``sin`` (B, T, d)
    its rotary embeddings; ``attention_mask`` (B, T) marks real keys. Rows with no visible key are 0.
    """
    length = hidden.shape[1]
    q, k = query_key_states(attn, hidden, (cos.float(), sin.float()))  # float32 RoPE (type promotion)
    q, k = q.float(), k.float()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = (q @ k.transpose(-1, -2)) * attn.scaling
    visible = torch.ones(length, length, dtype=torch.bool, device=hidden.device).tril()[None, None]
    if attention_mask is not None:
        visible = visible & attention_mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.nan_to_num(scores.softmax(-1), nan=0.0)


# ---------------------------------------------------------------------------- the callback
class _HeadOf:
    """Lets :class:`StepOutputs` compute per-token losses with another model's LM head."""

    def __init__(self, model: nn.Module):
        self.model = model

    def lm_head_weight(self) -> tuple[Tensor, Tensor | None]:
        head = self.model.get_output_embeddings()
        return head.weight, getattr(head, "bias", None)


class SSTokenSelectCallback(Callback):
    """ssToken: keep the top-ρ response tokens by history loss gain and prompt attention."""

    def __init__(
        self,
        keep_ratio: float = 0.6,
        gamma: float = 0.5,
        history: Literal["base", "ema"] = "base",
        ema_decay: float = 0.99,
        probe_layer: int = -1,
        attention_only_steps: int = 0,
    ) -> None:
        """
        Args:
            keep_ratio: fraction of response tokens trained on per example (paper ρ, 0.6; 0.8 for 14B).
            gamma: weight of the normalised retrospective excess loss vs the prompt-attention score (paper γ,
                0.5).
            history: ``base`` = frozen copy of the model before training (released code); ``ema`` = paper Eq.
                4.
            ema_decay: EMA smoothing α of the history model (``history="ema"`` only).
            probe_layer: decoder layer whose attention gives the semantic score (-1 = last, released code).
            attention_only_steps: optimizer steps at the start that use the attention score alone (γ treated
                as 0).
        """
        super().__init__()
        check_range("SSTokenSelectCallback keep_ratio", keep_ratio, 0.0, 1.0, "the paper uses 0.6",
                    low_open=True)
        check_range("SSTokenSelectCallback gamma", gamma, 0.0, 1.0, "the paper uses 0.5")
        self.keep_ratio, self.gamma, self.history = keep_ratio, gamma, history
        self.ema_decay, self.probe_layer = ema_decay, probe_layer
        self.attention_only_steps = attention_only_steps
        self.history_model: nn.Module | None = None
        self._probe: dict[str, Any] = {}
        self._handle = None
        self._attn: nn.Module | None = None
        self._last_ema_step = 0

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.attach(pl_module)

    def attach(self, pl_module: L.LightningModule) -> None:
        """Snapshot the history model and hook the probe layer (``setup`` calls this; tests may too)."""
        if self._handle is not None:
            self._handle.remove()
        if self.history_model is None and self.gamma > 0:
            self.history_model = copy.deepcopy(pl_module.model).eval().requires_grad_(False)
        self._attn = backbone.decoder_layers(pl_module.model)[self.probe_layer].self_attn
        self._handle = self._attn.register_forward_pre_hook(self._capture, with_kwargs=True)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.follow(pl_module.model)

    def follow(self, model: nn.Module) -> None:
        """Move/cast each history tensor to the device and dtype of the trainee's tensor of the same name.

        The snapshot is taken in ``setup``, before the strategy moves the module to its device and
        applies a ``*-true`` precision; this keeps the history model where the trainee is (a no-op
        once they agree, so it is cheap to call before every use). An EMA history keeps at least float32:
        under ``bf16-true`` a ``lerp_`` of weight ``1 - ema_decay`` rounds away in bf16 and the EMA would
        freeze.
        """
        if self.history_model is None:
            return
        source = dict(itertools.chain(model.named_parameters(), model.named_buffers()))
        held = itertools.chain(self.history_model.named_parameters(), self.history_model.named_buffers())
        with torch.no_grad():
            for name, tensor in held:
                ref = source.get(name)
                if ref is None:
                    continue
                dtype = ref.dtype if tensor.is_floating_point() and ref.is_floating_point() else tensor.dtype
                if self.history == "ema" and dtype.is_floating_point:  # a 0.01-weight lerp_ vanishes in bf16
                    dtype = torch.promote_types(dtype, torch.float32)
                if tensor.device != ref.device or tensor.dtype != dtype:
                    tensor.data = tensor.data.to(device=ref.device, dtype=dtype)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._probe.clear()

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        rope = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
        if rope is None:
            raise RuntimeError("ssToken's attention probe needs rotary position embeddings "
                               "(Llama-style layers)")
        self._probe = {"hidden": hidden.detach(), "cos": rope[0].detach(), "sin": rope[1].detach()}

    # ------------------------------------------------------------------ scores
    def prompt_attention_scores(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T) head-mean attention of each query on the prompt, at the probe layer of the last forward."""
        if not self._probe:
            raise RuntimeError("ssToken: the probe layer did not run; was attach()/setup called before "
                               "forward?")
        with torch.no_grad():
            probs = recompute_attention(self._attn, self._probe["hidden"], self._probe["cos"],
                                        self._probe["sin"], batch["attention_mask"])
        length = batch["input_ids"].shape[1]
        probs = probs[..., -length:, -length:]  # drop virtual prefix positions, if any
        if "segments" in batch:
            prompt = batch["segments"] == SEGMENT_PROMPT
        else:
            prompt = (batch["labels"] == -100) & batch["attention_mask"].bool()
        return prompt_attention(probs, prompt)

    def history_loss(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, T) target-aligned per-token loss of the history model on the batch's input ids."""
        model = self.history_model
        with torch.no_grad():
            hidden = final_hidden_states(model, batch)
        return StepOutputs(module=_HeadOf(model), hidden=hidden, labels=batch["labels"]).per_token_loss()

    def select(self, module: L.LightningModule, batch: dict[str, Tensor], outputs: StepOutputs) -> Tensor:
        """TokenSelector hook: (B, T) 0/1 weights, the top-ρ response tokens of each example."""
        response = target_mask(batch["labels"]) & batch["attention_mask"].bool()
        step = module.trainer.global_step if module._trainer is not None else 0
        gamma = 0.0 if step < self.attention_only_steps else self.gamma
        attention = self.prompt_attention_scores(batch)
        if gamma > 0:
            self._sync_vocabulary(module.model)
            self.follow(module.model)
            current = outputs.per_token_loss()
            history = self.history_loss(batch)
        else:
            current = history = torch.zeros_like(attention)
        scores = sstoken_scores(current, history, attention, response, gamma)
        return top_ratio_mask(scores, response, self.keep_ratio)

    def _sync_vocabulary(self, model: nn.Module) -> None:
        """If a callback grew the trainee's vocabulary after the snapshot (e.g. MFT's <mask>), copy the new
        rows."""
        rows = model.get_input_embeddings().weight.shape[0]
        old = self.history_model.get_input_embeddings().weight.shape[0]
        if old >= rows:
            return
        self.history_model.resize_token_embeddings(rows, mean_resizing=False)
        with torch.no_grad():
            for get in ("get_input_embeddings", "get_output_embeddings"):
                target, source = getattr(self.history_model, get)(), getattr(model, get)()
                if target is not None and source is not None:
                    target.weight[old:] = source.weight.detach()[old:rows].to(target.weight.dtype)

    # ------------------------------------------------------------------ EMA history
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.history != "ema" or self.history_model is None or trainer.global_step == self._last_ema_step:
            return
        self._last_ema_step = trainer.global_step  # one update per optimizer step (not per micro-batch)
        self.follow(pl_module.model)
        history = dict(self.history_model.named_parameters())
        with torch.no_grad():
            for name, param in pl_module.model.named_parameters():
                if param.requires_grad:
                    history[name].lerp_(param.detach().to(history[name].dtype), 1.0 - self.ema_decay)

    def state_dict(self) -> dict[str, Any]:
        if self.history != "ema" or self.history_model is None:
            return {}
        return {"history": self.history_model.state_dict(), "last_ema_step": self._last_ema_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("history") is not None and self.history_model is not None:
            self.history_model.load_state_dict(state_dict["history"])
            self._last_ema_step = state_dict.get("last_ema_step", 0)


register(
    name="sstoken",
    kind="callback",
    paper="ssToken: Self-modulated and Semantic-aware Token Selection for LLM Fine-tuning (2025)",
    spec="03",
    config="configs/sstoken.yaml",
    target="zoo.modules.token_level.sstoken:SSTokenSelectCallback",
    scope="static (base) and EMA history; no periodic-checkpoint history; FSDP-sharded trainees unsupported",
)

__all__ = ["SSTokenSelectCallback", "keep_count", "minmax_per_example", "prompt_attention",
           "recompute_attention", "sstoken_scores", "top_ratio_mask"]
