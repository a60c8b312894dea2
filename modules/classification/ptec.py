"""PTEC: prompt-tuned embedding classification (soft prompt + last-token linear head, multi-label BCE).

Paper: Prompt Tuned Embedding Classification for Multi-Label Industry Sector Allocation (2023, arXiv
2309.12075; NAACL 2024 Industry Track). Spec: papers/22-ptec.md. Official code: EQTPartners/PTEC.

Implements:
``PTECClassifier``: a frozen causal LM with a soft prompt (any
:class:`~zoo.modules.prompting.soft_prompt.SoftPromptAdapter`, default ``PromptTuning`` with p = 100 tokens
initialised from the embedding rows of the label names' tokens, :func:`label_token_init`), and a bias-free
linear head ``z = W h`` on the final hidden state of the LAST REAL token (index from the attention mask,
:func:`last_real_index`, never from ``pad_token_id``: left and right padding give the same logits); loss
``BCEWithLogits(z, y, pos_weight)`` with ``pos_weight_c = max_k n_k / n_c`` from the training targets
(:func:`class_pos_weight`); two learning rates (prompt ``lr``, head ``head_lr``); prediction
``sigmoid(z) > threshold``. The head stays in float32 whatever the backbone dtype.
``TokenTrie`` / :func:`trie_greedy_decode` / ``TrieConstrainedDecoder``: the text-to-text baseline's decoder,
constrained to the label strings of the taxonomy: each label's tokens end in the separator or EOS, at every
step only trie continuations are allowed, and a finished label leaves the trie so labels never repeat. The
zoo's one decoder (:mod:`zoo.decoding`) has no logits hook, so the constraint is applied by scoring: one
teacher-forced forward pass over the prompt followed by every remaining trie sequence gives the next-token
logits at every trie node (rows sharing a prefix share the causal logits there), and the greedy walk picks
the best allowed token at each node. This is exactly token-level trie-constrained greedy decoding, at one
forward per emitted label.
Differs: exponential lr decay and early stopping on dev macro-F1 are trainer settings (not in the module);
the head is a separate ``nn.Linear``, not HF ``*ForSequenceClassification``.
Not implemented: the Bayesian hyper-parameter search; the kNN / frozen-embedding-head baselines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo import backbone
from zoo.chat import render_prompt_ids
from zoo.datamodules.classification import label_text
from zoo.decoding import left_pad
from zoo.errors import ConfigError
from zoo.modules.adapters.base import Adapter
from zoo.modules.base import CausalLMModule, StepOutputs
from zoo.modules.classification.module import ClassificationModule
from zoo.modules.prompting.prompt_tuning import PromptTuning
from zoo.modules.prompting.soft_prompt import SoftPromptAdapter
from zoo.registry import register_method


# ---------------------------------------------------------------------------- pure functions
def last_real_index(attention_mask: Tensor) -> Tensor:
    """(B,) column of the last non-padding token of each row of a (B, T) mask (left or right padding)."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.flip(1).long().argmax(1)


def class_pos_weight(targets: Tensor) -> Tensor:
    """(C,) ``max_k n_k / n_c`` from (N, C) multi-hot targets (n_c positives of class c, at least 1)."""
    counts = targets.float().sum(0).clamp_min(1.0)
    return counts.max() / counts


def ptec_loss(logits: Tensor, targets: Tensor, pos_weight: Tensor | None = None) -> Tensor:
    """Mean BCE-with-logits of (B, C) ``logits`` against (B, C) multi-hot ``targets``, weighted positives."""
    weight = pos_weight.to(logits.dtype) if pos_weight is not None else None
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), pos_weight=weight)


def label_token_init(table: Tensor, label_ids: list[list[int]], length: int, fill_ids: list[int],
                     seed: int = 0) -> Tensor:
    """(length, H) soft-prompt init from embedding ``table`` rows of the label names' tokens (spec step 2):
    a seeded random subset of ``length`` distinct tokens if there are more, padded with ``fill_ids`` rows
    (cycled) if fewer."""
    distinct = list(dict.fromkeys(i for ids in label_ids for i in ids))
    if len(distinct) > length:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(distinct), generator=generator)[:length].tolist()
        distinct = [distinct[i] for i in sorted(order)]
    chosen = distinct + [fill_ids[i % len(fill_ids)] for i in range(length - len(distinct))]
    return table[torch.tensor(chosen, dtype=torch.long, device=table.device)].detach().float().cpu()


# ---------------------------------------------------------------------------- trie-constrained decoding
class TokenTrie:
    """A trie over token sequences: ``children(prefix)`` lists the tokens allowed after ``prefix``."""

    def __init__(self, sequences: list[list[int]]) -> None:
        self.sequences = [list(s) for s in sequences]
        self.root: dict[int, dict] = {}
        for sequence in self.sequences:
            node = self.root
            for token in sequence:
                node = node.setdefault(token, {})

    def _node(self, prefix: list[int]) -> dict[int, dict] | None:
        node = self.root
        for token in prefix:
            if token not in node:
                return None
            node = node[token]
        return node

    def children(self, prefix: list[int]) -> list[int]:
        """Allowed next tokens after ``prefix`` ([] at a leaf or off the trie)."""
        node = self._node(prefix)
        return sorted(node) if node else []

    def is_complete(self, prefix: list[int]) -> bool:
        """Whether ``prefix`` is one of the sequences."""
        return any(prefix == s for s in self.sequences)


Scorer = Callable[[list[int], list[list[int]]], list[Tensor]]


def trie_greedy_decode(score: Scorer, labels: list[list[int]], separator: list[int], eos: int,
                       max_labels: int | None = None) -> tuple[list[int], list[int]]:
    """Trie-constrained greedy decoding of a label list: the indices of the labels emitted (in order) and the
    emitted token ids (labels, separators, the final EOS).

    ``labels``: the token ids of each label string; a label is followed by ``separator`` (then another
    label) or ``eos`` (end). ``score(emitted, continuations) -> list[Tensor]``: for the ids already emitted
    and each candidate continuation c, the (len(c), V) next-token logits whose row j predicts c[j] (one
    teacher-forced forward). Labels leave the trie once emitted, so none repeats; with ``max_labels`` (or
    none left) only EOS may follow a label.
    """
    remaining = list(range(len(labels)))
    emitted: list[int] = []
    chosen: list[int] = []
    limit = max_labels if max_labels is not None else len(labels)
    while remaining:
        last = len(chosen) + 1 >= limit or len(remaining) == 1
        ends = [[eos]] if last else [list(separator), [eos]]
        sequences = [labels[i] + end for i in remaining for end in ends]
        trie = TokenTrie(sequences)
        logits = score(emitted, sequences)
        prefix: list[int] = []
        while not trie.is_complete(prefix):
            allowed = trie.children(prefix)
            row = next(k for k, s in enumerate(sequences)
                       if s[:len(prefix)] == prefix and len(s) > len(prefix))
            step = logits[row][len(prefix)]
            prefix.append(allowed[int(step[torch.tensor(allowed, device=step.device)].argmax())])
        label = next(i for i in remaining for end in ends if labels[i] + end == prefix)
        chosen.append(label)
        remaining.remove(label)
        emitted += prefix
        if prefix[-1] == eos or last:
            break
    return chosen, emitted


# ---------------------------------------------------------------------------- the classifier
@register_method(
    name="ptec",
    paper="Prompt Tuned Embedding Classification for Multi-Label Industry Sector Allocation (2023)",
    spec="22",
    scope="soft prompt + last-token head, pos-weighted BCE, two lrs, trie-constrained text-to-text decoder; "
          "no Bayesian hyper-parameter search, no kNN / frozen-embedding baselines",
)
class PTECClassifier(ClassificationModule):
    """A frozen LM with a soft prompt and a bias-free linear head on the last real token (multi-label BCE)."""

    def __init__(self, head_lr: float = 1e-5, prompt_init: Literal["labels", "adapter"] = "labels",
                 init_seed: int = 0, adapter: Adapter | None = None, **kwargs: Any) -> None:
        """
        Args:
            head_lr: learning rate of the head W (repo default 1e-5; ``lr`` is the soft prompt's, 3e-3).
            prompt_init: ``labels`` (embedding rows of the label names' tokens, filled with vocabulary rows;
                the paper's) or ``adapter`` (the adapter's own initialisation).
            init_seed: seed of the random subset of label tokens when there are more than p.
            adapter: the soft prompt (a :class:`SoftPromptAdapter`); default ``PromptTuning(100)`` (p = 100).
            **kwargs: :class:`ClassificationModule` arguments (``lr`` = prompt lr, model, labels, ...).
        """
        if adapter is None:
            adapter = PromptTuning(num_virtual_tokens=100)
        elif not isinstance(adapter, SoftPromptAdapter):
            raise ConfigError("PTEC needs a soft-prompt adapter (PromptTuning, ...), got "
                              f"{type(adapter).__name__}; "
                              "set model.init_args.adapter to one")
        if prompt_init not in ("labels", "adapter"):
            raise ConfigError(f"prompt_init must be 'labels' or 'adapter', got {prompt_init!r}")
        self.head: nn.Linear | None = None
        super().__init__(adapter=adapter, **kwargs)
        self.register_buffer("class_weight", torch.zeros(0), persistent=False)

    # ------------------------------------------------------------------ construction
    def _build_verbalizer(self, labels: list[str]) -> None:
        super()._build_verbalizer(labels)
        hidden = backbone.hidden_size(self.model)
        reference = self.model.get_input_embeddings().weight
        dtype = torch.promote_types(reference.dtype, torch.float32)  # the head stays at least float32
        self.head = nn.Linear(hidden, len(labels), bias=False).to(reference.device, dtype)
        if self.hparams.prompt_init == "labels" and self.adapter.soft_prompt is not None:
            label_ids = [list(self.tokenizer(label_text(label), add_special_tokens=False)["input_ids"])
                         for label in labels]
            prompt = self.adapter.soft_prompt.weight
            fill = list(range(min(1000, reference.shape[0])))
            init = label_token_init(reference, label_ids, prompt.shape[0], fill, self.hparams.init_seed)
            with torch.no_grad():
                prompt.copy_(init.to(prompt.dtype))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        records = getattr(datamodule, "records", {}) or {}
        if self.multi_label and records.get("train"):
            labels = self.verbalizer.labels
            targets = torch.tensor([[float(label in r.get("labels", [])) for label in labels]
                                    for r in records["train"]])
            self.class_weight = class_pos_weight(targets).to(self.head.weight.device)

    # ------------------------------------------------------------------ scores
    def head_logits(self, prompts: list[list[int]]) -> Tensor:
        """(B, C) ``W h`` at the last real token of each LEFT-padded prompt (with the soft prompt)."""
        device = self.head.weight.device
        ids, mask = left_pad(prompts, self.tokenizer.pad_token_id)
        hidden = self.forward_hidden({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
        last = hidden[torch.arange(len(prompts), device=device), last_real_index(mask).to(device)]
        return self.head(last.to(self.head.weight.dtype))

    def scores_from_logits(self, logits: Tensor) -> Tensor:
        """The family's score convention: log p(label present) (multi-label) or log-softmax (single)."""
        return F.logsigmoid(logits) if self.multi_label else logits.log_softmax(-1)

    def label_scores(self, batch: dict[str, Tensor], outputs: StepOutputs | None = None) -> Tensor:
        return self.scores_from_logits(self.head_logits(self.prompt_ids(batch)))

    def classification_loss(self, scores: Tensor, batch: dict[str, Tensor]) -> Tensor:
        """Multi-label: BCE on the head logits with ``pos_weight_c = max_k n_k / n_c``; single-label: CE."""
        if not self.multi_label:
            return super().classification_loss(scores, batch)
        logits = scores - torch.log(-torch.expm1(scores.clamp(max=-torch.finfo(scores.dtype).tiny)))
        weight = self.class_weight if self.class_weight.numel() else None
        return ptec_loss(logits, batch["targets"], weight)

    @torch.no_grad()
    def score_prompts(self, prompts: list[str], calibrated: bool = True, batch_size: int = 16) -> Tensor:
        """(B, C) scores of raw prompt strings through the head (no calibration: PTEC has none)."""
        return self.score_rendered(prompts, lambda rows: self.scores_from_logits(self.head_logits(rows)),
                                   batch_size)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """AdamW with two groups: the soft prompt at ``lr``, the head at ``head_lr``."""
        head = {id(p) for p in self.head.parameters()} if self.head is not None else set()
        params = self.trainable_parameters().values()
        prompt, head_params = [p for p in params if id(p) not in head], [p for p in params if id(p) in head]
        groups = [{"params": prompt, "lr": self.hparams.lr, "name": "prompt"},
                  {"params": head_params, "lr": self.hparams.head_lr, "name": "head"}]
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=self.hparams.lr,
                                      betas=tuple(self.hparams.betas), weight_decay=self.hparams.weight_decay)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": self._scheduler(optimizer), "interval": "step"}}


class TrieConstrainedDecoder:
    """The text-to-text baseline's decoder: a module's completions constrained to its label strings (spec
    step "Trie search for PT"), labels joined by ``separator`` and ended by EOS, none repeated."""

    def __init__(self, module: CausalLMModule, labels: list[str], separator: str = ", ",
                 max_labels: int | None = None) -> None:
        """
        Args:
            module: any trained module (its adapter is used: prompt tuning for the PT baseline).
            labels: the taxonomy's label strings as the model should write them.
            separator: the text between two labels (must not occur inside a label).
            max_labels: the most labels per answer (None: up to all).
        """
        bad = [label for label in labels if separator.strip() and separator.strip() in label]
        if bad:
            raise ConfigError(f"separator {separator!r} occurs inside label(s) {bad}; choose another "
                              "separator")
        self.module, self.labels, self.max_labels = module, list(labels), max_labels
        tokenizer = module.tokenizer
        self.label_ids = [list(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in labels]
        self.separator = list(tokenizer(separator, add_special_tokens=False)["input_ids"])
        self.eos = tokenizer.eos_token_id

    def _scorer(self, prompt: list[int]):
        module = self.module
        device = module.lm_head_weight()[0].device

        def score(emitted: list[int], continuations: list[list[int]]) -> list[Tensor]:
            rows = [prompt + emitted + c for c in continuations]
            ids, mask = left_pad(rows, module.tokenizer.pad_token_id)
            hidden = module.forward_hidden({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
            weight, bias = module.lm_head_weight()
            out = []
            for k, c in enumerate(continuations):  # left padding: row k's last len(c) + 1 columns
                span = hidden[k, ids.shape[1] - len(c) - 1: ids.shape[1] - 1]
                out.append(F.linear(span, weight, bias))
            return out

        return score

    @torch.no_grad()
    def decode(self, prompts: list[str], system_prompt: str | None = None) -> list[list[str]]:
        """The label lists the module writes for chat-rendered ``prompts`` (eval mode, restored after)."""
        module = self.module
        was_training = module.training
        module.eval()
        try:
            results = []
            for prompt in prompts:
                ids = render_prompt_ids(module.tokenizer, prompt, system_prompt)
                chosen, _ = trie_greedy_decode(self._scorer(ids), self.label_ids, self.separator, self.eos,
                                               self.max_labels)
                results.append([self.labels[i] for i in chosen])
            return results
        finally:
            module.train(was_training)
