"""Few-shot classification family (issue 14): shared pieces and methods.

Shared pieces (API in each file's docstring):
    :class:`~zoo.modules.classification.verbalizer.Verbalizer` -- label words -> teacher-forced label scores,
    weighted words, contextual calibration, reduced-vocabulary head;
    :class:`~zoo.modules.classification.module.ClassificationModule` -- CE (or multi-label BCE) over label
    scores with any adapter, accuracy / macro-F1 (torchmetrics);
    :class:`~zoo.modules.classification.blackbox.BlackBoxClassifier` -- ``label_logprobs(texts) -> (B, C)``
    without gradients, and :class:`~zoo.modules.classification.blackbox.LocalBlackBox` over any zoo backbone.
Data: :class:`zoo.datamodules.classification.ClassificationDataModule` (few-shot sampling, ``unlabeled``
split, multi-label) and the built-in tasks of :mod:`zoo.datamodules.fewshot_tasks`.
"""

from zoo.modules.classification.module import ClassificationModule
from zoo.modules.classification.verbalizer import Verbalizer

__all__ = ["ClassificationModule", "Verbalizer"]
