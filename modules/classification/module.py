"""``ClassificationModule``: train a causal LM (any adapter) on cross-entropy over verbalizer label scores.

The shared objective of the few-shot classification family (issue 14; specs 08, 22, 24, 25, 27, 35): the
batch's prompt (every token before the first supervised one, as :class:`ClassificationDataModule` renders it)
is scored against every label word by the :class:`~zoo.modules.classification.verbalizer.Verbalizer`, and
the loss is CE over the C label scores (not free generation of the response).

Multi-label data (batches with ``targets`` (B, C)): a label's logit is the log-odds of its word,
``log p(w_c) - log(1 - p(w_c))``, trained with BCE and per-class ``pos_weight`` ((N - n_c) / n_c over the
training split); prediction is ``p(w_c) > 0.5``.

Validation / test log ``{stage}/loss`` (the response NLL of :class:`CausalLMModule`, what the harness also
reports) plus, through torchmetrics, ``{stage}/accuracy`` and ``{stage}/macro_f1`` (single-label) or
``{stage}/micro_f1``, ``{stage}/macro_f1`` and per-class ``{stage}/f1/<label>`` (multi-label), and
``{stage}/label_ce``. With ``calibration`` the label prior is measured at the start of each evaluation epoch
on the data module's content-free prompts (``content_free``) or its ``unlabeled`` split (``unlabeled``).

API for the rest of the family:
    ``ClassificationModule(labels=None, label_words=None, aggregate="logsumexp", length_norm=False,
    max_word_tokens=None, head="lm_head", calibration="none", multi_label=None, use_pos_weight=True,
    **CausalLMModule args)``. ``labels=None`` adopts the data module's ``labels`` at setup (recorded in the
    export, so ``zoo.load`` rebuilds it). ``label_scores(batch) -> (B, C)`` (differentiable, uncalibrated)
    and ``prompt_ids(batch)``; ``score_prompts(prompts: list[str], calibrated=True) -> (B, C)`` for raw
    prompt strings (chat-rendered as the data is); ``predict_labels(prompts) -> list[str]`` (multi-label:
    ``list[list[str]]``); ``calibrate(prompts)`` sets the prior; ``classification_loss(scores, batch)``.
    Subclasses (CPT, PTEC, LiST, ...) override ``label_scores`` or ``classification_loss``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.chat import render_prompt_ids
from zoo.errors import ConfigError
from zoo.kernels.selected_ce import IGNORE_INDEX
from zoo.labels import target_mask
from zoo.modules.base import CausalLMModule, DeferredStepOutputs, StepOutputs
from zoo.modules.classification.verbalizer import CacheHooks, Verbalizer, Words, pad_prompts


def first_supervised(labels: Tensor) -> Tensor:
    """(B,) index of each row's first supervised token (the prompt length); T where a row has none."""
    supervised = labels != IGNORE_INDEX
    index = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return torch.where(supervised, index, labels.shape[1]).min(dim=1).values


def log_odds(scores: Tensor) -> Tensor:
    """``log p - log(1 - p)`` for log-probabilities ``scores`` (<= 0), stable near 0."""
    scores = scores.clamp(max=-1e-6)
    return scores - torch.log(-torch.expm1(scores))


class ClassificationModule(CausalLMModule):
    """CE over verbalizer label scores, any adapter (see the module docstring)."""

    def __init__(self, labels: list[str] | None = None, label_words: Words | None = None,
                 aggregate: Literal["logsumexp", "mean"] = "logsumexp", length_norm: bool = False,
                 max_word_tokens: int | None = None, head: Literal["lm_head", "reduced_vocab"] = "lm_head",
                 calibration: Literal["none", "content_free", "unlabeled"] = "none",
                 multi_label: bool | None = None, use_pos_weight: bool = True, **kwargs: Any) -> None:
        """
        Args:
            labels: class names in class-index order; None: the data module's ``labels`` at setup.
            label_words: per label, its words (list) or ``{word: weight}``; default: the label itself.
            aggregate: how a label's words combine (``logsumexp`` mixture or weighted ``mean`` of log-probs).
            length_norm: divide a word's log-probability by its token count.
            max_word_tokens: cut label words to m tokens (PET's m mask slots).
            head: ``lm_head`` (PET) or ``reduced_vocab`` (PETapter's new head over the label tokens).
            calibration: contextual calibration at evaluation: ``none``, ``content_free`` or ``unlabeled``.
            multi_label: BCE over per-label log-odds; None: the data module's ``multi_label``.
            use_pos_weight: multi-label: weight positives by the data module's ``pos_weight()``.
            **kwargs: :class:`CausalLMModule` arguments (model, lr, adapter, ...).
        """
        super().__init__(**kwargs)
        self.verbalizer: Verbalizer | None = None
        self.multi_label = multi_label
        self.register_buffer("pos_weight", torch.zeros(0), persistent=False)
        self.eval_metrics: nn.ModuleDict | None = None
        if labels is not None:
            self._build_verbalizer(labels)

    # ------------------------------------------------------------------ construction
    def _build_verbalizer(self, labels: list[str]) -> None:
        hp = self.hparams
        verbalizer = Verbalizer(labels, hp.label_words, aggregate=hp.aggregate, length_norm=hp.length_norm,
                                max_tokens=hp.max_word_tokens, head=hp.head)
        self.verbalizer = verbalizer.bind(self.tokenizer, self.model.config.hidden_size)
        dtype = self.model.get_input_embeddings().weight.dtype
        self.verbalizer.to(device=self.model.get_input_embeddings().weight.device, dtype=dtype)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.verbalizer is None:
            labels = getattr(datamodule, "labels", None)
            if datamodule is not None and hasattr(datamodule, "setup"):
                datamodule.setup(stage)
                labels = datamodule.labels
            if not labels:
                raise ConfigError(f"{type(self).__name__} has no labels: set model.init_args.labels or use a "
                                  "data module with `labels` (ClassificationDataModule)")
            self._build_verbalizer(list(labels))
        elif getattr(datamodule, "labels", None) not in (None, self.verbalizer.labels):
            raise ConfigError(f"model labels {self.verbalizer.labels} differ from the data's "
                              f"{datamodule.labels}: drop model.init_args.labels or make them equal")
        if self.multi_label is None:
            self.multi_label = bool(getattr(datamodule, "multi_label", False))
        if self.multi_label and self.hparams.use_pos_weight and hasattr(datamodule, "pos_weight"):
            self.pos_weight = torch.tensor(datamodule.pos_weight(), device=self.verbalizer.prior.device)
        if self.eval_metrics is None:
            self.eval_metrics = nn.ModuleDict({s: self._metrics() for s in ("val", "test")})

    def _metrics(self) -> nn.ModuleDict:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MultilabelF1Score

        n = self.verbalizer.num_labels
        if self.multi_label:
            return nn.ModuleDict({"micro_f1": MultilabelF1Score(n, average="micro"),
                                  "macro_f1": MultilabelF1Score(n, average="macro"),
                                  "per_class_f1": MultilabelF1Score(n, average="none")})
        return nn.ModuleDict({"accuracy": MulticlassAccuracy(n, average="micro", ignore_index=-1),
                              "macro_f1": MulticlassF1Score(n, average="macro", ignore_index=-1)})

    def export_init_args(self, merged: bool = False) -> dict[str, Any]:
        args = super().export_init_args(merged)
        if self.verbalizer is not None:
            args["labels"] = list(self.verbalizer.labels)
            args["multi_label"] = self.multi_label
        return args

    def forward(self, batch: dict[str, Tensor]) -> StepOutputs:
        """The step's outputs with the sequence forward deferred until ``hidden`` is read: a loss over label
        scores of multi-token words (prompt cache) or of a module's own inputs (CPT) never runs it."""
        return DeferredStepOutputs(self, batch)

    # ------------------------------------------------------------------ scores
    def prompt_ids(self, batch: dict[str, Tensor]) -> list[list[int]]:
        """Each row's prompt: the tokens before its first supervised token."""
        ends = first_supervised(batch["labels"]).tolist()
        return [row[:end] for row, end in zip(batch["input_ids"].tolist(), ends)]

    def label_scores(self, batch: dict[str, Tensor], outputs: StepOutputs | None = None) -> Tensor:
        """(B, C) uncalibrated label scores of the batch's prompts (with gradient). With ``outputs`` of the
        same batch and single-token words, the hidden state at each prompt's last token is reused."""
        prompts = self.prompt_ids(batch)
        reuse = outputs is not None and self.verbalizer.single_token
        prompt_hidden = self.prompt_end_hidden(prompts, outputs.hidden) if reuse else None
        return self.verbalizer.score(self.forward_hidden, self.lm_head_weight(), prompts,
                                     self.tokenizer.pad_token_id, prompt_hidden, self.prefix_cache_hooks())

    def prompt_end_hidden(self, prompts: list[list[int]], hidden: Tensor | None = None) -> Tensor:
        """(B, H) the hidden state at each prompt's last token: read from ``hidden`` (B, T, H), the output of
        a right-padded forward whose rows start with these prompts, else from one ``forward_hidden``."""
        if hidden is None:
            hidden = self.forward_hidden(pad_prompts(prompts, self.tokenizer.pad_token_id, self.device))
        ends = torch.tensor([len(p) - 1 for p in prompts], device=hidden.device)
        return hidden[torch.arange(len(prompts), device=hidden.device), ends]

    def prefix_cache_hooks(self) -> CacheHooks | None:
        """The adapter, as decoding hooks, when ``forward_hidden`` is its own forward: multi-token label words
        then reuse each prompt's KV cache, the adapter's virtual tokens or prefix included (its ``prefill``
        builds the same inputs as its forward, tested for every adapter family); None when a subclass has its
        own forward."""
        return self.adapter if type(self).forward_hidden is ClassificationModule.forward_hidden else None

    def classification_loss(self, scores: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """CE over label scores (single-label; rows with class_index -1 ignored) or BCE over log-odds."""
        if self.multi_label:
            pos_weight = self.pos_weight.to(scores.dtype) if self.pos_weight.numel() else None
            return F.binary_cross_entropy_with_logits(log_odds(scores), batch["targets"].to(scores.dtype),
                                                      pos_weight=pos_weight)
        if "class_index" not in batch:
            raise ConfigError(f"{type(self).__name__} needs batches with class_index: use "
                              "zoo.datamodules.classification.ClassificationDataModule")
        target = batch["class_index"]
        if not (target >= 0).any():
            return scores.sum() * 0.0
        return F.cross_entropy(scores, target, ignore_index=-1)

    def compute_loss(self, batch: dict[str, Tensor], outputs: StepOutputs, weights: Tensor) -> Tensor:
        return self.classification_loss(self.label_scores(batch, outputs), batch)

    # ------------------------------------------------------------------ evaluation
    def evaluation_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        outputs = self(batch)
        loss = self._response_nll(batch, outputs, stage)
        with torch.no_grad():
            scores = self.label_scores(batch, outputs)
            self.log(f"{stage}/label_ce", self.classification_loss(scores, batch), batch_size=len(scores),
                     sync_dist=True)
            metrics = self.eval_metrics[stage] if self.eval_metrics is not None else {}
            if self.multi_label:
                predicted = (log_odds(scores) > 0).long()
                for metric in metrics.values():
                    metric.update(predicted, batch["targets"].long())
            else:
                predicted = self.verbalizer.calibrate(scores).argmax(-1)
                for metric in metrics.values():
                    metric.update(predicted, batch["class_index"])
        return loss

    def _response_nll(self, batch: dict[str, Tensor], outputs: StepOutputs, stage: str) -> Tensor:
        weights = target_mask(batch["labels"]).float()
        count = weights.sum()
        loss = self.weighted_token_loss(outputs, weights).sum() / count.clamp_min(1.0)
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=int(count.item()), sync_dist=True)
        return loss

    def _epoch_metrics(self, stage: str) -> None:
        if self.eval_metrics is None:
            return
        logged: dict[str, Tensor] = {}
        for name, metric in self.eval_metrics[stage].items():
            if not metric.update_count:
                continue
            value = metric.compute()
            if name == "per_class_f1":
                logged.update({f"{stage}/f1/{label}": v for label, v in zip(self.verbalizer.labels, value)})
            else:
                logged[f"{stage}/{name}"] = value
            metric.reset()
        if logged:
            self.log_dict(logged, sync_dist=True)

    def _calibrate_from_data(self) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None:
            self.calibrate_from(datamodule)

    def calibrate_from(self, datamodule) -> None:
        """Set the label prior as ``calibration`` says, from ``datamodule``'s content-free prompts or its
        ``unlabeled`` split: what each validation / test epoch does first, and the bench before predicting."""
        kind = self.hparams.calibration
        if kind == "none":
            return
        if kind == "content_free":
            prompts = datamodule.content_free_prompts()
        else:
            prompts = [r["prompt"] for r in datamodule.records.get("unlabeled", [])]
            if not prompts:
                raise ConfigError("calibration: unlabeled needs data.init_args.num_unlabeled > 0")
        self.calibrate(prompts)

    def on_validation_epoch_start(self) -> None:
        self._calibrate_from_data()

    def on_test_epoch_start(self) -> None:
        self._calibrate_from_data()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._epoch_metrics("test")

    # ------------------------------------------------------------------ raw prompts
    def render(self, prompts: list[str]) -> list[list[int]]:
        """Chat-render prompt strings as the data module does (assistant turn open)."""
        return [render_prompt_ids(self.tokenizer, p, None) for p in prompts]

    @torch.no_grad()
    def score_rendered(self, prompts: list[str], score_batch: Callable[[list[list[int]]], Tensor],
                       batch_size: int = 16) -> Tensor:
        """(B, C): ``score_batch`` over the rendered ``prompts`` in slices of ``batch_size``, in eval mode
        (the training flag is restored afterwards); the prompt-scoring batch loop of every family."""
        was_training = self.training
        self.eval()
        try:
            rendered = self.render(prompts)
            return torch.cat([score_batch(rendered[i: i + batch_size])
                              for i in range(0, len(rendered), batch_size)])
        finally:
            self.train(was_training)

    @torch.no_grad()
    def score_prompts(self, prompts: list[str], calibrated: bool = True, batch_size: int = 16) -> Tensor:
        """(B, C) label scores of raw prompt strings in eval mode (calibrated unless told not to)."""
        if self.verbalizer is None:
            raise ConfigError(f"{type(self).__name__} has no labels yet: pass labels or fit with data")
        pad, lm_head = self.tokenizer.pad_token_id, self.lm_head_weight()
        scores = self.score_rendered(
            prompts, lambda rows: self.verbalizer.score(self.forward_hidden, lm_head, rows, pad,
                                                        hooks=self.prefix_cache_hooks()), batch_size)
        return self.verbalizer.calibrate(scores) if calibrated and not self.multi_label else scores

    def calibrate(self, prompts: list[str]) -> None:
        """Contextual calibration: the label prior is the mean label distribution on ``prompts``."""
        self.verbalizer.set_prior(self.score_prompts(prompts, calibrated=False))

    def predict_labels(self, prompts: list[str]) -> list[str] | list[list[str]]:
        """The argmax label of each prompt (multi-label: every label with p(word) > 0.5)."""
        scores = self.score_prompts(prompts)
        labels = self.verbalizer.labels
        if self.multi_label:
            return [[labels[c] for c in (row > 0).nonzero().flatten().tolist()] for row in log_odds(scores)]
        return [labels[c] for c in scores.argmax(-1).tolist()]
