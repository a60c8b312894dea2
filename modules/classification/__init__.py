"""Few-shot classification family (issue 14): shared pieces and methods.

Shared pieces (API in each file's docstring):
    :class:`~zoo.modules.classification.verbalizer.Verbalizer` -- label words -> teacher-forced label scores,
    weighted words, contextual calibration, reduced-vocabulary head;
    :class:`~zoo.modules.classification.module.ClassificationModule` -- CE (or multi-label BCE) over label
    scores with any adapter, accuracy / macro-F1 (torchmetrics);
    :class:`~zoo.modules.classification.blackbox.BlackBoxClassifier` -- ``label_logprobs(texts) -> (B, C)``
    without gradients, and :class:`~zoo.modules.classification.blackbox.LocalBlackBox` over any zoo backbone.
Methods (part B): :class:`CPTModule` (spec 08), :class:`PTECClassifier` and its text-to-text baseline
(:class:`TrieConstrainedDecoder`, :class:`TrieTextToTextClassifier`; spec 22),
:class:`UnsupervisedPromptLearner` (``UBPL``, spec 24), :class:`SciPromptModule` (spec 25),
:class:`LiSTModule` + :class:`SelfTrainingLoop`
(spec 27), :class:`PETClassifier` (spec 35) and the in-context-learning baseline :class:`ICLClassifier`.
Data: :class:`zoo.datamodules.classification.ClassificationDataModule` (few-shot sampling, ``unlabeled``
split, multi-label) and the built-in tasks of :mod:`zoo.datamodules.fewshot_tasks`.
``zoo bench`` scores these modules by their label scores (``predict_labels``), not by generation.
"""

from zoo.modules.classification.blackbox import BlackBoxClassifier, LocalBlackBox
from zoo.modules.classification.blackbox_prompt import UnsupervisedPromptLearner
from zoo.modules.classification.cpt import CPTModule
from zoo.modules.classification.icl import ICLClassifier
from zoo.modules.classification.list import LiSTModule, SelfTrainingLoop
from zoo.modules.classification.module import ClassificationModule
from zoo.modules.classification.pet import PETClassifier
from zoo.modules.classification.ptec import PTECClassifier, TrieConstrainedDecoder
from zoo.modules.classification.sciprompt import SciPromptModule
from zoo.modules.classification.text_to_text import TrieTextToTextClassifier
from zoo.modules.classification.verbalizer import Verbalizer

CPT, PTEC, ICL, PET, LiST, SciPrompt = CPTModule, PTECClassifier, ICLClassifier, PETClassifier, LiSTModule, \
    SciPromptModule
UBPL = UnsupervisedPromptLearner

__all__ = [
    "CPT", "ICL", "PET", "PTEC", "UBPL", "BlackBoxClassifier", "CPTModule", "ClassificationModule",
    "ICLClassifier", "LiST", "LiSTModule", "LocalBlackBox", "PETClassifier", "PTECClassifier", "SciPrompt",
    "SciPromptModule", "SelfTrainingLoop", "TrieConstrainedDecoder", "TrieTextToTextClassifier",
    "UnsupervisedPromptLearner", "Verbalizer",
]
