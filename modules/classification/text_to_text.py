"""The text-to-text prompt-tuning baseline of PTEC (spec 22) as a module the bench can score.

``TrieTextToTextClassifier`` trains like :class:`~zoo.modules.base.CausalLMModule` (any adapter; the PTEC
bench uses ``PromptTuning``): next-token loss on the data's response, which for multi-label
:class:`~zoo.datamodules.classification.ClassificationDataModule` data is the present labels joined by
``", "``. It predicts with :class:`~zoo.modules.classification.ptec.TrieConstrainedDecoder` (greedy decoding
constrained to the label strings, none repeated), so ``predict_labels(prompts)`` returns label lists and
``score_prompts(prompts)`` the (B, C) multi-hot of those lists (0/1; there is no graded score). Labels come
from the data module at setup (or ``labels``). Not registered as a method: a baseline for benches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from zoo.datamodules.classification import label_text
from zoo.errors import ConfigError
from zoo.modules.base import CausalLMModule
from zoo.modules.classification.ptec import TrieConstrainedDecoder


class TrieTextToTextClassifier(CausalLMModule):
    """Text-to-text classification (SFT on the label text), trie-constrained greedy decoding at prediction."""

    def __init__(self, labels: list[str] | None = None, separator: str = ", ", max_labels: int | None = None,
                 **kwargs: Any) -> None:
        """
        Args:
            labels: class names in class-index order; None: the data module's ``labels`` at setup.
            separator: text between two labels in the response (the data's ``", "``).
            max_labels: most labels per answer (None: up to all).
            **kwargs: :class:`CausalLMModule` arguments (model, lr, adapter, ...).
        """
        super().__init__(**kwargs)
        self.labels = list(labels) if labels is not None else None
        self.multi_label = True

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.labels is None:
            self.labels = list(getattr(datamodule, "labels", None) or [])
        if not self.labels:
            raise ConfigError("TrieTextToTextClassifier has no labels: set model.init_args.labels or use "
                              "ClassificationDataModule data")

    def export_init_args(self, merged: bool = False) -> dict[str, Any]:
        args = super().export_init_args(merged)
        args["labels"] = list(self.labels or [])
        return args

    def predict_labels(self, prompts: list[str]) -> list[list[str]]:
        """The label list the module writes for each prompt under the trie constraint."""
        if not self.labels:
            raise ConfigError("TrieTextToTextClassifier has no labels yet: pass labels or fit with data")
        texts = [label_text(label) for label in self.labels]
        decoder = TrieConstrainedDecoder(self, texts, self.hparams.separator, self.hparams.max_labels)
        by_text = dict(zip(texts, self.labels))
        return [[by_text[t] for t in row] for row in decoder.decode(prompts)]

    @torch.no_grad()
    def score_prompts(self, prompts: list[str], calibrated: bool = True, batch_size: int = 16) -> Tensor:
        """(B, C) multi-hot of the decoded label lists."""
        predicted = self.predict_labels(prompts)
        return torch.tensor([[float(label in row) for label in self.labels] for row in predicted])
