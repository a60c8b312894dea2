"""PET with adapters: a pattern-verbalizer classifier whose only trainable body is an adapter.

Paper: Few-shot learning for automated content analysis: Efficient coding of arguments and claims in the
debate on arms deliveries to Ukraine (2023). Spec: papers/35-pet-adapter.md. No official code; the authors'
follow-up is PETapter (JonasRieger/petapter).

Implements (causal variant, spec step 8): the pattern is the data module's prompt, ending where the answer
starts; ``s(l | x) = Σ_i log p(v_i(l) | x, v_<i(l))`` by teacher forcing (the
:class:`~zoo.modules.classification.verbalizer.Verbalizer`, ``max_word_tokens`` = PET's m), ``q = softmax_l
s``, loss CE(q, y) (:class:`~zoo.modules.classification.module.ClassificationModule`). The body is frozen by
the adapter: a bottleneck adapter at every FFN (``zoo.modules.sparse.unified_adapters.ParallelAdapters``,
r = d/16, scale 1), LoRA (r 8, alpha 16) or IA3 (``zoo.modules.adapters.LoRA`` / ``IA3``), chosen in YAML
(configs/pet_adapter.yaml, pet_lora.yaml, pet_ia3.yaml). ``head``: ``lm_head`` (PET: the pretrained head,
verbalizer rows) or ``reduced_vocab`` (PETapter: a new head over the verbalizer sub-vocabulary, random init).
Pre-fine-tuning (spec step 5): stage one trains the same classifier on a near-domain labelled task
(configs/pet_adapter_prefinetune.yaml, the built-in ``topics``); stage two starts from its export with
``init_from: <stage-one export>`` (every adapter / head tensor whose name and shape match is copied).

Differs: the bottleneck adapter is the zoo's parallel adapter at the FFN (He et al. 2021, spec 36), not
Pfeiffer's sequential one after the FFN (same bottleneck, ReLU and zero-initialised up-projection); scores are
causal log-probabilities, not MLM logits at independent mask slots. Not implemented: PET's auxiliary MLM loss
(alpha 1e-4, off in the spec too), the article-level split (the built-in tasks have no articles), majority
vote over runs (a harness concern), iPET.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from zoo.errors import ConfigError
from zoo.modules.classification.module import ClassificationModule
from zoo.registry import register_method

SKIP_ON_INIT = ("verbalizer.prior",)  # measured per task, never transferred


@register_method(
    name="pet_adapter",
    paper="Few-shot learning for automated content analysis: Efficient coding of arguments and claims in the "
          "debate on arms deliveries to Ukraine (2023) -- PET + adapters",
    spec="35",
    scope="causal teacher-forced verbalizer (no MLM slots); zoo parallel FFN adapter instead of Pfeiffer's "
          "sequential one; no auxiliary MLM loss, article-level split or run majority vote",
)
class PETClassifier(ClassificationModule):
    """PET's pattern-verbalizer classifier over an adapter-wrapped frozen backbone (module docstring)."""

    def __init__(self, init_from: str | None = None, **kwargs: Any) -> None:
        """
        Args:
            init_from: pre-fine-tuning: an export folder of a stage-one run (``zoo_state.safetensors``) whose
                matching adapter / head tensors initialise this run; None starts fresh.
            **kwargs: :class:`ClassificationModule` arguments (labels, label_words, head, adapter, ...).
        """
        super().__init__(**kwargs)
        self.init_from = init_from

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.init_from and stage == "fit" and not getattr(self, "_initialised_from", False):
            copied = load_matching(self, self.init_from)
            print(f"[zoo] pet_adapter: {len(copied)} tensors initialised from {self.init_from}")
            self._initialised_from = True

    def export_init_args(self, merged: bool = False) -> dict[str, Any]:
        args = super().export_init_args(merged)
        args["init_from"] = None  # the export holds the trained tensors themselves
        return args


def load_matching(module: torch.nn.Module, export_dir: str | Path) -> list[str]:
    """Copy every tensor of ``export_dir/zoo_state.safetensors`` whose name and shape match one of
    ``module``'s trainable tensors (verbalizer prior excluded); error when none matches."""
    from safetensors.torch import load_file

    path = Path(export_dir) / "zoo_state.safetensors"
    if not path.is_file():
        raise ConfigError(f"init_from {str(export_dir)!r} has no zoo_state.safetensors: point it at the "
                          "export/ folder of a stage-one run with the same adapter")
    saved = load_file(str(path))
    own = dict(module.named_parameters())
    copied = []
    with torch.no_grad():
        for name, value in saved.items():
            if name in own and own[name].shape == value.shape and not name.startswith(SKIP_ON_INIT):
                own[name].copy_(value.to(own[name].dtype))
                copied.append(name)
    if not copied:
        raise ConfigError(f"init_from {str(export_dir)!r}: no tensor matches this module's trainable tensors "
                          "(use the same adapter and sizes as the stage-one run)")
    return copied
