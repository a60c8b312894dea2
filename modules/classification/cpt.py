"""CPT: tune the embeddings of in-context demonstrations (never their labels) by projected gradient descent.

Paper: Context-aware Prompt Tuning: Advancing In-Context Learning with Adversarial Methods (2024, arXiv
2410.17222). Spec: papers/08-cpt.md. Reference implementation: peft's ``CPTEmbedding`` (tuners/cpt), which
the tests cross-check on the same tensors.

Implements (spec steps 1-8):
1. the context is built span by span from the k-shot training examples (at most ``max_context``,
   class-interleaved): input template (type 4(i-1)+1), input text (+2), output template (+3), label word
   (+4) (:func:`build_example`);
2. ``E_c`` (frozen copy of the context embeddings, fp32 buffer) + ``Δ`` (zero-initialised parameter): the
   :class:`CPTContext` adapter prepends ``E_c + Δ`` to every input (training, scoring and generation, through
   the shared soft-prompt machinery);
3. a gradient hook zeroes ``Δ``'s label rows (type mod 4 == 0) and unused rows;
4. after every optimizer step ``Δ_j <- Δ_j ε_j / max(||Δ_j||, ε_j)`` with ``ε = ε_fmt sqrt(d/2048)`` on
   template rows, ``ε_in sqrt(d/2048)`` on input rows, 1e-10 on label rows (peft ``get_epsilon`` /
   ``get_projection``, :func:`cpt_epsilon`, :func:`project_deltas`);
5. the training query is a batch example formatted with the same templates, its type ids offset by max(τ);
6. loss: CE on every label token of the context and of the query, weighted 1, λ, λ², ... from the last label
   group backwards (``loss_type="decay"``), mean over label tokens of weight × CE (peft ``calculate_loss``,
   :func:`cpt_loss`; the module computes the LM head only at label positions, the same value);
7. only ``Δ`` trains (AdamW, the module's ``lr``);
8. evaluation scores the labels with the verbalizer after ``[E_c + Δ ; template(x) ; output template]``.

Differs from peft: the projection runs after each optimizer step (peft projects inside every forward; the
results coincide because Δ starts at zero and changes only at steps); the context is tokenized span by span
and the spans are concatenated (peft's notebook does the same; joint tokenization may merge across spans);
label words carry a leading space (the verbalizer's ``prefix``) so "Output: positive" tokenizes naturally.
``E_c`` / ``Δ`` follow the module's dtype (the zoo's placement contract), so under ``bf16-true`` they are
bf16, not fp32 as in peft (spec pitfall): use ``precision: 32-true`` or ``bf16-mixed`` to keep small deltas.
Not implemented: ``query_pool="separate"`` (queries are the context examples themselves, the paper's
setting); the Δ buffer is allocated for ``max_context_tokens`` rows at construction so the parameter exists
before the data (rows past the context never enter the forward and stay zero).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.errors import ConfigError
from zoo.modules.base import StepOutputs
from zoo.modules.classification.icl import interleave
from zoo.modules.classification.module import ClassificationModule
from zoo.modules.classification.verbalizer import right_pad
from zoo.modules.prompting.soft_prompt import SoftPromptAdapter
from zoo.registry import register_method

MIN_EPSILON = 1e-10


# ---------------------------------------------------------------------------- pure functions
def build_example(tokenizer, text: str, label_ids: list[int] | None, index: int, input_template: str,
                  output_template: str, separator: str = "") -> tuple[list[int], list[int]]:
    """Token ids and CPT type ids of example ``index`` (1-based): ``separator + input_template`` (4(i-1)+1),
    ``text`` (+2), ``output_template`` (+3), ``label_ids`` (+4; omitted when None)."""
    base = 4 * (index - 1)
    spans = [(separator + input_template, 1), (text, 2), (output_template, 3)]
    ids: list[int] = []
    types: list[int] = []
    for span, kind in spans:
        tokens = list(tokenizer(span, add_special_tokens=False)["input_ids"]) if span else []
        ids += tokens
        types += [base + kind] * len(tokens)
    if label_ids is not None:
        ids += list(label_ids)
        types += [base + 4] * len(label_ids)
    return ids, types


def cpt_epsilon(types: Tensor, epsilon: float, format_epsilon: float, dim: int) -> Tensor:
    """(N,) projection radii: ε_fmt·sqrt(d/2048) on template rows (type mod 4 in {1, 3}), ε_in·sqrt(d/2048) on
    input rows (mod 4 == 2), 1e-10 on label rows and rows of type 0 (peft ``CPTEmbedding.get_epsilon``)."""
    scale = math.sqrt(dim / 2048)
    out = torch.full(types.shape, MIN_EPSILON, dtype=torch.float32, device=types.device)
    kind = torch.remainder(types, 4)
    out[(types > 0) & ((kind == 1) | (kind == 3))] = format_epsilon * scale
    out[(types > 0) & (kind == 2)] = epsilon * scale
    return out


def project_deltas(delta: Tensor, eps: Tensor) -> Tensor:
    """``Δ_j * ε_j / max(||Δ_j||_2, ε_j)`` for rows with a non-zero norm (peft ``get_projection``)."""
    norm = delta.norm(p=2, dim=-1)
    eps = eps.to(delta.dtype)
    factor = torch.where(norm > 0, eps / torch.maximum(norm, eps), torch.ones_like(norm))
    return delta * factor[:, None]


def label_rows(types: Tensor) -> Tensor:
    """Bool mask of label tokens (type > 0 and type mod 4 == 0)."""
    return (types > 0) & (torch.remainder(types, 4) == 0)


def decay_weights(types: Tensor, decay: float) -> Tensor:
    """(B, T) weights of label tokens: 1 for the last label group of a row, λ for the one before, ...; 1
    elsewhere (peft ``calculate_loss``)."""
    weights = torch.ones(types.shape, dtype=torch.float32, device=types.device)
    for row in range(types.shape[0]):
        groups = types[row][label_rows(types[row])].unique()
        value = 1.0
        for group in torch.flip(groups, [0]):
            weights[row][types[row] == group] = value
            value *= decay
    return weights


def cpt_loss(logits: Tensor, labels: Tensor, types: Tensor, decay: float = 1.0,
             loss_type: Literal["none", "decay"] = "decay") -> Tensor:
    """peft's CPT loss from full (B, T, V) logits: shifted CE at tokens with ``labels != -100``, weighted by
    :func:`decay_weights` of the shifted ``types`` when ``loss_type == "decay"``, mean over those tokens."""
    shift_logits, shift_labels, shift_types = logits[:, :-1], labels[:, 1:], types[:, 1:]
    ce = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]).float(), shift_labels.reshape(-1),
                         reduction="none", ignore_index=-100).view(shift_labels.shape)
    keep = shift_labels != -100
    weights = decay_weights(shift_types, decay) if loss_type == "decay" else torch.ones_like(ce)
    return (ce[keep] * weights[keep]).mean()


# ---------------------------------------------------------------------------- the context adapter
class CPTContext(SoftPromptAdapter):
    """``E_c + Δ`` prepended to every input; Δ's label rows never train (see the module docstring).

    Built by :class:`CPTModule` (not from YAML): ``set_context(ids, types)`` fills the context."""

    min_virtual_tokens = 1

    def __init__(self, max_tokens: int = 1024, epsilon: float = 0.1, format_epsilon: float = 0.1) -> None:
        super().__init__(num_virtual_tokens=max_tokens, prompt_init="random")
        self.max_tokens, self.epsilon, self.format_epsilon = max_tokens, epsilon, format_epsilon

    def build_prompt(self, model: nn.Module) -> None:
        dim = model.get_input_embeddings().weight.shape[1]
        # E_c is derived from the (persistent) ids, so it is rebuilt on load and never counts as state
        self.register_buffer("base", torch.zeros(self.max_tokens, dim), persistent=False)
        self.register_buffer("types", torch.zeros(self.max_tokens, dtype=torch.long))
        self.register_buffer("ids", torch.zeros(self.max_tokens, dtype=torch.long))
        self.register_buffer("length", torch.zeros((), dtype=torch.long))
        self.delta = nn.Parameter(torch.zeros(self.max_tokens, dim))
        self.delta.register_hook(self._mask_gradient)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._refresh_base())

    def _mask_gradient(self, grad: Tensor) -> Tensor:
        trainable = (self.types > 0) & ~label_rows(self.types)
        return grad * trainable.to(grad.dtype)[:, None]

    def set_context(self, ids: list[int], types: list[int]) -> None:
        if len(ids) > self.max_tokens:
            raise ConfigError(f"the CPT context has {len(ids)} tokens, more than max_context_tokens="
                              f"{self.max_tokens}: raise it or lower max_context")
        with torch.no_grad():
            n = len(ids)
            ids_t = torch.tensor(ids, dtype=torch.long, device=self.base.device)
            self.ids.zero_()
            self.ids[:n] = ids_t
            self.types.zero_()
            self.types[:n] = torch.tensor(types, dtype=torch.long, device=self.base.device)
            self.length.fill_(n)
        self._refresh_base()

    @torch.no_grad()
    def _refresh_base(self) -> None:
        """``E_c``: the frozen embeddings of the context ids (zero past the context)."""
        n = int(self.length)
        self.base.zero_()
        if n:
            self.base[:n] = self.model.get_input_embeddings()(self.ids[:n]).to(self.base.dtype)

    def prompt_embeddings(self, batch_size: int) -> Tensor | None:
        n = int(self.length)
        if n == 0:
            return None
        return (self.base[:n] + self.delta[:n]).unsqueeze(0).expand(batch_size, -1, -1)

    def radii(self) -> Tensor:
        return cpt_epsilon(self.types, self.epsilon, self.format_epsilon, self.base.shape[1])

    @torch.no_grad()
    def project(self) -> None:
        """PGD step: every Δ row back into its L2 ball."""
        self.delta.copy_(project_deltas(self.delta, self.radii().to(self.delta.device)))

    def trainable_count(self) -> int:
        """Template and input rows of the context (label rows never train)."""
        trainable = (self.types > 0) & ~label_rows(self.types)
        return int(trainable.sum()) * self.base.shape[1]


# ---------------------------------------------------------------------------- the module
@register_method(
    name="cpt",
    paper="Context-aware Prompt Tuning: Advancing In-Context Learning with Adversarial Methods (2024)",
    spec="08",
    scope="queries are the context examples (no separate query pool); projection after each step (peft: "
          "before each forward, same values); E_c/Δ follow the module dtype",
)
class CPTModule(ClassificationModule):
    """Context-aware prompt tuning (see the module docstring)."""

    def __init__(self, context: list[dict[str, str]] | None = None, max_context: int = 8,
                 max_context_tokens: int = 1024, input_template: str = "Input: ",
                 output_template: str = "\nOutput:", separator: str = "\n\n", epsilon: float = 0.1,
                 format_epsilon: float = 0.1, decay: float = 0.95,
                 loss_type: Literal["none", "decay"] = "decay", **kwargs: Any) -> None:
        """
        Args:
            context: ``[{text, label}, ...]`` demonstrations; None: the data module's k-shot training split
                (at most ``max_context``, class-interleaved) at setup.
            max_context: most demonstrations in the context (k).
            max_context_tokens: rows of Δ allocated (the longest context).
            input_template: text before each input (type 4(i-1)+1).
            output_template: text between input and label (type 4(i-1)+3).
            separator: text between examples (part of the next input template).
            epsilon: ε_in, L2 radius of input-token deltas (scaled by sqrt(d/2048); peft default 0.1).
            format_epsilon: ε_fmt, L2 radius of template-token deltas.
            decay: λ, recency decay of label-group loss weights (peft notebook 0.95).
            loss_type: ``decay`` (weights 1, λ, λ², ...) or ``none``.
            **kwargs: :class:`ClassificationModule` arguments (model, lr, labels, ...); no ``adapter``.
        """
        if kwargs.get("adapter") is not None:
            raise ConfigError("CPTModule builds its own context adapter: remove model.init_args.adapter")
        super().__init__(**kwargs)
        self.adapter = CPTContext(max_context_tokens, epsilon, format_epsilon)
        self.model = self.adapter.attach(self.model, self.tokenizer)
        self.context = list(context) if context is not None else None
        if self.context is not None and self.verbalizer is not None:
            self._install_context()

    def _build_verbalizer(self, labels: list[str]) -> None:
        super()._build_verbalizer(labels)
        self.verbalizer.prefix = " "
        self.verbalizer.bind(self.tokenizer, self.model.config.hidden_size)
        self.verbalizer.to(self.model.get_input_embeddings().weight.device)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if self.context is None and datamodule is not None:
            train = datamodule.records.get("train", [])
            rows = [{"text": r.get("text", r["prompt"]), "label": r["label"]} for r in train
                    if r["label"] in self.verbalizer.labels]
            self.context = interleave(rows, self.hparams.max_context)
        if self.context is not None and int(self.adapter.length) == 0:
            self._install_context()

    def label_ids(self, label: str) -> list[int]:
        """Token ids of ``label``'s first verbalizer word (what the context and the query carry)."""
        return self.verbalizer.word_ids[self.verbalizer.word_label.index(self.verbalizer.labels.index(label))]

    def _install_context(self) -> None:
        hp = self.hparams
        ids: list[int] = []
        types: list[int] = []
        for i, example in enumerate(self.context, start=1):
            label_ids = self.label_ids(example["label"])
            span_ids, span_types = build_example(self.tokenizer, example["text"], label_ids, i,
                                                 hp.input_template, hp.output_template,
                                                 hp.separator if i > 1 else "")
            ids += span_ids
            types += span_types
        self.adapter.set_context(ids, types)

    def query(self, text: str, label: str | None) -> tuple[list[int], list[int]]:
        """A query formatted like the context, as example number (context size + 1)."""
        hp = self.hparams
        index = len(self.context or []) + 1
        label_ids = self.label_ids(label) if label is not None else None
        return build_example(self.tokenizer, text, label_ids, index, hp.input_template, hp.output_template,
                             hp.separator if index > 1 else "")

    # ------------------------------------------------------------------ objective
    def compute_loss(self, batch: dict[str, Tensor], outputs: StepOutputs, weights: Tensor) -> Tensor:
        labels = self.verbalizer.labels
        rows = [self.query(text, labels[c]) for text, c in zip(batch["text"], batch["class_index"].tolist())
                if c >= 0]
        if not rows:
            return self.adapter.delta.sum() * 0.0
        device = self.adapter.delta.device
        query = right_pad([r[0] for r in rows], self.tokenizer.pad_token_id, device)
        query_types = right_pad([r[1] for r in rows], 0, device)["input_ids"]
        inputs = self.adapter.build_inputs(query)
        hidden = self.adapter.run_decoder(inputs)
        n = int(self.adapter.length)
        types = torch.cat([self.adapter.types[:n].expand(len(rows), -1), query_types], dim=1)
        ids = torch.cat([self.adapter.ids[:n].expand(len(rows), -1), query["input_ids"]], dim=1)
        targets = torch.where(label_rows(types), ids, torch.full_like(ids, -100))
        return label_position_loss(hidden, targets, types, self.lm_head_weight(), self.hparams.decay,
                                   self.hparams.loss_type)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.adapter.project()

    def label_scores(self, batch: dict[str, Tensor], outputs: StepOutputs | None = None) -> Tensor:
        prompts = [self.query(text, None)[0] for text in batch["text"]]
        return self.verbalizer.score(self.forward_hidden, self.lm_head_weight(), prompts,
                                     self.tokenizer.pad_token_id)

    def render(self, prompts: list[str]) -> list[list[int]]:
        """CPT reads raw input texts in its own template: score_prompts and predict_labels take texts."""
        return [self.query(text, None)[0] for text in prompts]

    def export_init_args(self, merged: bool = False) -> dict[str, Any]:
        args = super().export_init_args(merged)
        args["context"] = list(self.context or [])
        args.pop("adapter", None)
        return args


def label_position_loss(hidden: Tensor, targets: Tensor, types: Tensor, lm_head: tuple[Tensor, Tensor | None],
                        decay: float, loss_type: str) -> Tensor:
    """:func:`cpt_loss` computed with the LM head only at the positions that predict a label token."""
    shift_targets, shift_types = targets[:, 1:], types[:, 1:]
    keep = shift_targets != -100
    logits = F.linear(hidden[:, :-1][keep], *lm_head)
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), shift_targets[keep],
                         reduction="none")
    weights = decay_weights(shift_types, decay)[keep] if loss_type == "decay" else torch.ones_like(ce)
    return (ce * weights.to(ce.dtype)).mean()
