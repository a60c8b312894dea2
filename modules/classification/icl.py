"""In-context learning baseline: k labelled demonstrations in the prompt, nothing trained.

The reference row of every few-shot classification bench (issue 14; the ICL baseline of specs 08, 24, 34):
the frozen backbone reads ``Examples:`` followed by one ``Text: <input>`` / ``Answer: <label word>`` pair per
demonstration, then the task's own prompt, and the
:class:`~zoo.modules.classification.verbalizer.Verbalizer` scores the labels (optionally calibrated, Zhao et
al. 2021). Demonstrations are the data module's training split (its k-shot draw), at most
``max_demonstrations``, in class-interleaved order (so no label is always nearest the query); they are
recorded in the export, so ``zoo.load`` / ``zoo bench --ckpt`` rebuild the same prompt. Generation
(``generate_text``, the harness's first-word accuracy) sees the same demonstrations.

Nothing trains: ``training_step`` returns None (Lightning skips the step) and there is no optimizer. The
contract matrix's ``trainable`` and ``ckpt`` rows cannot hold (nothing changes; the reload scores what the
base scores) and are declared exempt in the registry scope.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from zoo.modules.base import StepOutputs
from zoo.modules.classification.module import ClassificationModule
from zoo.registry import register_method


@register_method(
    name="icl",
    paper="Language Models are Few-Shot Learners (2020): in-context learning with k demonstrations, "
          "verbalizer scoring (baseline of the few-shot family)",
    spec="",
    scope="no demonstration retrieval or ordering search; contract-exempt: trainable: nothing trains "
          "(k demonstrations in the prompt); contract-exempt: ckpt: nothing trains, so the reload scores "
          "what the untuned base scores",
)
class ICLClassifier(ClassificationModule):
    """Frozen backbone + k demonstrations in the prompt (see the module docstring)."""

    def __init__(self, demonstrations: list[dict[str, str]] | None = None, max_demonstrations: int = 16,
                 **kwargs: Any) -> None:
        """
        Args:
            demonstrations: ``[{text, label}, ...]``; None: the data module's training split at setup.
            max_demonstrations: most demonstrations put in the prompt.
            **kwargs: :class:`ClassificationModule` arguments (model, labels, label_words, calibration, ...).
        """
        super().__init__(**kwargs)
        self.model.requires_grad_(False)
        self.demonstrations = list(demonstrations) if demonstrations is not None else None

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.demonstrations is None and datamodule is not None:
            train = datamodule.records.get("train", [])
            self.demonstrations = interleave([{"text": r.get("text", r["prompt"]), "label": r["response"]}
                                              for r in train], self.hparams.max_demonstrations)

    def context(self) -> str:
        """The demonstration block put before every prompt ('' without demonstrations)."""
        if not self.demonstrations:
            return ""
        pairs = "\n".join(f"Text: {d['text']}\nAnswer: {d['label']}" for d in self.demonstrations)
        return f"Examples:\n{pairs}\n\n"

    def label_scores(self, batch: dict[str, Tensor], outputs: StepOutputs | None = None) -> Tensor:
        prompts = self.render([self.context() + p for p in batch["prompt_text"]])
        return self.verbalizer.score(self.forward_hidden, self.lm_head_weight(), prompts,
                                     self.tokenizer.pad_token_id, hooks=self.prefix_cache_hooks())

    def score_prompts(self, prompts: list[str], calibrated: bool = True, batch_size: int = 16) -> Tensor:
        return super().score_prompts([self.context() + p for p in prompts], calibrated, batch_size)

    def generate_text(self, prompts: list[str], *args: Any, **kwargs: Any) -> list[str]:
        return super().generate_text([self.context() + p for p in prompts], *args, **kwargs)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        """Nothing trains: Lightning skips a step that returns None."""
        return None

    def configure_optimizers(self):
        return None

    def export_init_args(self, merged: bool = False) -> dict[str, Any]:
        args = super().export_init_args(merged)
        args["demonstrations"] = list(self.demonstrations or [])
        return args


def interleave(records: list[dict[str, str]], limit: int) -> list[dict[str, str]]:
    """Up to ``limit`` records, round-robin over their labels (first label first, order kept within one)."""
    by_label: dict[str, list[dict[str, str]]] = {}
    for record in records:
        by_label.setdefault(record["label"], []).append(record)
    out: list[dict[str, str]] = []
    while len(out) < limit and any(by_label.values()):
        for rows in by_label.values():
            if rows and len(out) < limit:
                out.append(rows.pop(0))
    return out
