"""Thinking-then-translating data: the four target formats of CoTFT vs IOFT for machine translation.

Paper: LLM Reasoning for Machine Translation: Synthetic Data Generation over Thinking Tokens (2025).
Spec: papers/33-cotft-mt.md. The training module is plain SFT (``CausalLMModule``, LoRA through an adapter).

From a parallel set of (source ``x``, reference ``y``) pairs with an intermediate trace ``r`` (and the
candidate translations found in it) every row gets one of four targets (``target_format``):

``ioft``       ``y``
``cotft``      ``"<think>\\n" + r + "\\n</think>\\n\\nFinal Translation\\n" + y``
``ioft_max``   ``y*`` = argmax of a reference-free QE score over ``{y} + candidates`` (``y`` wins ties)
``cotft_max``  ``cotft`` with ``y*`` in place of ``y``

The prompt (one template, the same at train and test time) is masked; ``segments`` mark the prompt
(``SEGMENT_PROMPT``), the thinking block up to and including the ``Final Translation`` line
(``SEGMENT_REASONING``) and the translation plus EOS (``SEGMENT_ANSWER``); thinking and answer are
tokenized separately, so the segments are exactly the two target parts. A row whose target does not fit
``max_length`` is dropped, never cut (the ``Final Translation`` line is never lost); drops are counted in
``stats``.

Sources (``dataset``)
    * ``pycountry`` (built in, offline): English sentences from 4 hand-written frames around a country
      name, and their translations (frames written for German, French and Spanish; country names from
      pycountry's ISO 3166 translation catalogs; only names the catalog translates). Sizes: de 612 pairs
      (153 names), fr 728 (182), es 664 (166). Splits are disjoint by country name (seeded shuffle).
      Traces: ``partial`` (CompTra-style: the phrase pairs and a draft translation with the name left in
      English; the draft is the Max variants' candidate) or ``generic`` (an explanation without
      target-language words, no candidate).
    * a local .json/.jsonl/.parquet/.csv file, or a hub data set (``datasets.load_dataset``): columns
      mapped by ``fields`` onto ``source``, ``target``, ``trace`` (optional for IOFT) and ``candidates``
      (optional: a list of strings, or one string with one candidate a line).
    * a built-in reasoning task (``chain_sum``, ...): plain SFT rows (the zoo's tiny smoke data).

Scores: BLEU and chrF++ (sacrebleu) of the extracted translation (:func:`extract_translation`: the text
after the last ``Final Translation`` line, else after ``</think>``, else the whole output).
Not implemented: teacher trace generation (a stub: the built-in traces are procedural), BLASER/MetricX
scorers (``qe`` is a reference-free stub), the augmentation variant, GRPO.
"""

from __future__ import annotations

import gettext
import random
import re
from collections.abc import Callable
from typing import Any, Literal

from zoo import backbone, tasks
from zoo.datamodules.sft import (
    SEGMENT_ANSWER,
    SEGMENT_PROMPT,
    SEGMENT_REASONING,
    DataError,
    EncodedDataset,
    SFTDataModule,
    render_prompt_ids,
)
from zoo.errors import ConfigError
from zoo.kernels.selected_ce import IGNORE_INDEX
from zoo.registry import register_method

FORMATS = ("ioft", "cotft", "ioft_max", "cotft_max")
BUILTIN = "pycountry"
FINAL_HEADER = "Final Translation"
PROMPT_TEMPLATE = "Translate the following text from {source_language} into {target_language}.\n\n{text}"

# English frame, then its translation per language ("{}" = the country name)
FRAMES: dict[str, list[str]] = {
    "en": ["The name of this country is {}.", "Please write {} on the form.",
           "The next country on the list is {}.", "She asked me how to spell {}."],
    "de": ["Der Name dieses Landes ist {}.", "Bitte schreiben Sie {} auf das Formular.",
           "Das nächste Land auf der Liste ist {}.", "Sie fragte mich, wie man {} schreibt."],
    "fr": ["Le nom de ce pays est {}.", "Veuillez écrire {} sur le formulaire.",
           "Le pays suivant sur la liste est {}.", "Elle m'a demandé comment on écrit {}."],
    "es": ["El nombre de este país es {}.", "Por favor, escriba {} en el formulario.",
           "El siguiente país de la lista es {}.", "Me preguntó cómo se escribe {}."],
}


# ---------------------------------------------------------------------------- target formats
def cot_parts(trace: str, translation: str) -> tuple[str, str]:
    """(thinking, answer) of a CoTFT target: ``"<think>\\n" + r + "\\n</think>\\n\\nFinal Translation\\n"``
    and ``y``."""
    return f"<think>\n{trace}\n</think>\n\n{FINAL_HEADER}\n", translation


def copy_penalty_qe(source: str, candidate: str) -> float:
    """A reference-free QE stub: the fraction of the candidate's words that are NOT copied from the source
    (an untranslated name or phrase lowers it). In [0, 1]; 0 for an empty candidate."""
    words = re.findall(r"\w+", candidate.lower())
    if not words:
        return 0.0
    source_words = set(re.findall(r"\w+", source.lower()))
    return sum(w not in source_words for w in words) / len(words)


QE_SCORERS: dict[str, Callable[[str, str], float] | None] = {"copy_penalty": copy_penalty_qe, "none": None}


def best_translation(source: str, reference: str, candidates: list[str],
                     qe: Callable[[str, str], float] | None) -> str:
    """``y*``: the highest-QE string of ``[reference, *candidates]``; the reference wins ties (and without
    a scorer)."""
    if qe is None:
        return reference
    best, best_score = reference, qe(source, reference)
    for candidate in candidates:
        score = qe(source, candidate)
        if candidate.strip() and score > best_score:
            best, best_score = candidate, score
    return best


def build_target(target_format: str, source: str, reference: str, trace: str, candidates: list[str],
                 qe: Callable[[str, str], float] | None) -> tuple[str, str]:
    """(thinking, answer) of one row in ``target_format``; thinking is "" for the IO formats."""
    if target_format not in FORMATS:
        raise ConfigError(f"unknown target_format {target_format!r}; use one of {', '.join(FORMATS)}")
    maximise = target_format.endswith("_max")
    answer = best_translation(source, reference, candidates, qe) if maximise else reference
    if target_format.startswith("cotft"):
        return cot_parts(trace, answer)
    return "", answer


def extract_translation(output: str) -> str:
    """The translation in a generated ``output``: the text after the last ``Final Translation`` line, else
    after the last ``</think>``, else the whole output (stripped)."""
    lines = output.split("\n")
    headers = [i for i, line in enumerate(lines) if line.strip() == FINAL_HEADER]
    if headers:
        return "\n".join(lines[headers[-1] + 1:]).strip()
    if "</think>" in output:
        return output.rsplit("</think>", 1)[1].strip()
    return output.strip()


# ---------------------------------------------------------------------------- the built-in parallel set
def language_name(code: str) -> str:
    language = __import__("pycountry").languages.get(alpha_2=code)
    return language.name if language is not None else code


def builtin_pairs(language: str = "de",
                  trace: Literal["partial", "generic"] = "partial") -> list[dict[str, Any]]:
    """The ``pycountry`` parallel set for English -> ``language``: one row per (frame, country), grouped by
    ``name`` (the English country name), with its trace and candidates."""
    import pycountry

    if language not in FRAMES or language == "en":
        known = ", ".join(sorted(set(FRAMES) - {"en"}))
        raise ConfigError(f"the built-in parallel set has frames for {known}, not {language!r}; pass a local "
                          "or hub parallel set as dataset")
    catalog = gettext.translation("iso3166-1", pycountry.LOCALES_DIR, languages=[language])
    rows = []
    for country in pycountry.countries:
        translated = catalog.gettext(country.name)
        if translated == country.name:
            continue
        for en_frame, frame in zip(FRAMES["en"], FRAMES[language]):
            source, target = en_frame.format(country.name), frame.format(translated)
            draft = frame.format(country.name)
            if trace == "partial":
                text = (f'Phrases:\n"{en_frame.format("X")}" -> "{frame.format("X")}"\n'
                        f'"{country.name}" -> "{translated}"\nDraft: {draft}')
                candidates = [draft]
            else:
                text = ("The sentence is a fixed phrase around the name of a country. Translate the phrase, "
                        "then the name, and put the name where the phrase of the target language needs it.")
                candidates = []
            rows.append({"source": source, "target": target, "trace": text, "candidates": candidates,
                         "name": country.name})
    return rows


def split_by_name(rows: list[dict[str, Any]], sizes: dict[str, int], seed: int) -> dict[str, list[dict]]:
    """Train / val / test with disjoint names: names are shuffled (seeded) and dealt to test, then val
    (until each holds its size), the rest to train (capped at its size; 0 = all)."""
    names = sorted({r["name"] for r in rows})
    random.Random(f"zoo-translation-{seed}").shuffle(names)
    by_name: dict[str, list[dict]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)
    out: dict[str, list[dict]] = {"test": [], "val": [], "train": []}
    for name in names:
        split = next((s for s in ("test", "val") if len(out[s]) < sizes[s]), "train")
        out[split].extend(by_name[name])
    out["test"], out["val"] = out["test"][: sizes["test"]], out["val"][: sizes["val"]]
    if sizes["train"] > 0:
        out["train"] = out["train"][: sizes["train"]]
    return out


# ---------------------------------------------------------------------------- the DataModule
@register_method(
    "cot_translation",
    paper="LLM Reasoning for Machine Translation: Synthetic Data Generation over Thinking Tokens (2025)",
    spec="33", kind="datamodule",
    scope="four target formats (IOFT, CoTFT, IOFT-Max, CoTFT-Max) over procedural traces of a built-in "
          "pycountry parallel set (en->de/fr/es) or local/hub data; no teacher generation, QE is a stub "
          "(copy penalty), no augmentation variant or GRPO")
class TranslationDataModule(SFTDataModule):
    """Parallel data (+ traces) in one of the four CoTFT / IOFT target formats, segments marked."""

    def __init__(
        self,
        dataset: str = BUILTIN,
        target_format: Literal["ioft", "cotft", "ioft_max", "cotft_max"] = "cotft",
        language: str = "de",
        trace: Literal["partial", "generic"] = "partial",
        qe: Literal["copy_penalty", "none"] = "copy_penalty",
        source_language: str = "English",
        target_language: str | None = None,
        tokenizer: str = backbone.SMOLLM2,
        fields: dict[str, str] | None = None,
        hub_config: str | None = None,
        splits: dict[str, str] | None = None,
        num_train: int = 0,
        num_val: int = 32,
        num_test: int = 64,
        max_length: int = 512,
        on_malformed: Literal["error", "skip"] = "error",
        system_prompt: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_seed: int | None = None,
    ) -> None:
        """
        Args:
            dataset: ``pycountry`` (built-in English -> ``language`` set), a local file or hub id with
                source / target (/ trace / candidates) columns, or a built-in reasoning task (plain SFT rows).
            target_format: ``ioft``, ``cotft``, ``ioft_max`` or ``cotft_max`` (see the module docstring).
            language: target language of the built-in set (``de``, ``fr``, ``es``).
            trace: built-in traces: ``partial`` (phrase translations and a draft) or ``generic`` (an
                explanation without target-language words).
            qe: reference-free quality score choosing ``y*`` for the Max formats (``none``: ``y* = y``).
            source_language: source language name in the prompt.
            target_language: target language name in the prompt (default: the name of ``language``).
            tokenizer: the backbone whose tokenizer renders the data.
            fields: source columns for ``source``, ``target``, ``trace``, ``candidates``.
            hub_config: config name of a hub data set.
            splits: split names (hub) or files (local) for train / val / test, as in SFTDataModule.
            num_train: training pairs (0 = every pair not held out).
            num_val: held-out pairs for validation loss.
            num_test: held-out pairs the harness translates.
            max_length: longest row in tokens; longer rows are dropped (a target is never cut).
            on_malformed: ``error`` on a missing source/target/trace, or ``skip`` and count it.
            system_prompt: optional system message.
            batch_size: training micro-batch size.
            eval_batch_size: validation / test batch size.
            num_workers: DataLoader workers.
            seed: seed of the built-in split.
            shuffle_seed: seed of the training order (None: the run's global seed).
        """
        plain = dataset != BUILTIN and tasks.is_builtin_task(dataset)
        super().__init__(dataset=dataset, tokenizer=tokenizer, fields=fields, hub_config=hub_config,
                         splits=splits, num_train=num_train, num_val=num_val, num_test=num_test,
                         max_length=max_length, overlong="truncate" if plain else "drop",
                         on_malformed=on_malformed, system_prompt=system_prompt, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed,
                         shuffle_seed=shuffle_seed)
        self.columns = {"source": "source", "target": "target", "trace": "trace", "candidates": "candidates",
                        **(fields or {})}
        self.qe = QE_SCORERS[qe]
        self.plain = plain
        self.hparams["overlong"] = "truncate" if plain else "drop"  # fixed by the source, not an argument

    def prompt_for(self, source: str) -> str:
        hp = self.hparams
        return PROMPT_TEMPLATE.format(source_language=hp.source_language,
                                      target_language=hp.target_language or language_name(hp.language),
                                      text=source)

    def make_record(self, source: str, target: str, trace: str, candidates: list[str]) -> dict[str, Any]:
        hp = self.hparams
        thinking, answer = build_target(hp.target_format, source, target, trace, candidates, self.qe)
        return {"prompt": self.prompt_for(source), "response": thinking + answer, "thinking": thinking,
                "answer": answer, "source": source, "reference": target, "trace": trace,
                "candidates": candidates}

    # ------------------------------------------------------------------ loading
    def load_records(self) -> dict[str, list[dict[str, Any]]]:
        hp = self.hparams
        if hp.dataset != BUILTIN:
            return super().load_records()  # local / hub rows come through _map_fields below
        sizes = {"train": hp.num_train, "val": hp.num_val, "test": hp.num_test}
        splits = split_by_name(builtin_pairs(hp.language, hp.trace), sizes, hp.seed)
        return {split: [self.make_record(r["source"], r["target"], r["trace"], r["candidates"]) for r in rows]
                for split, rows in splits.items()}

    def _map_fields(self, rows, origin: str) -> list[dict[str, Any]]:
        if self.plain:
            return super()._map_fields(rows, origin)
        out, skipped = [], 0
        needs_trace = self.hparams.target_format.startswith("cotft")
        for number, row in enumerate(rows, start=1):
            values = {key: row.get(column) for key, column in self.columns.items()}
            required = ["source", "target"] + (["trace"] if needs_trace else [])
            problem = next((k for k in required
                            if not isinstance(values[k], str) or not values[k].strip()), None)
            if problem is not None:
                if self.hparams.on_malformed == "skip":
                    skipped += 1
                    continue
                raise DataError(f"{origin}: row {number}: field {self.columns[problem]!r} ({problem}) is "
                                f"missing or empty; map the right column with `fields: {{{problem}: ...}}` "
                                "or set on_malformed: skip")
            candidates = values["candidates"] or []
            if isinstance(candidates, str):
                candidates = [c for c in candidates.split("\n") if c.strip()]
            out.append(self.make_record(values["source"].strip(), values["target"].strip(),
                                        (values["trace"] or "").strip(), [str(c) for c in candidates]))
        if skipped:
            self.stats[f"skipped_malformed:{origin}"] = skipped
        return out

    # ------------------------------------------------------------------ encoding
    def encode_record(self, record: dict[str, Any]) -> dict[str, list[int]]:
        """Prompt (masked) + thinking + answer + EOS, thinking and answer tokenized apart."""
        tok = self.tokenizer
        prompt = render_prompt_ids(tok, record["prompt"], self.hparams.system_prompt)
        thinking = (tok(record["thinking"], add_special_tokens=False)["input_ids"]
                    if record["thinking"] else [])
        answer = list(tok(record["answer"], add_special_tokens=False)["input_ids"]) + [tok.eos_token_id]
        target = list(thinking) + answer
        return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target,
                "segments": [SEGMENT_PROMPT] * len(prompt) + [SEGMENT_REASONING] * len(thinking)
                + [SEGMENT_ANSWER] * len(answer)}

    def encode_split(self, records: list[dict[str, Any]], split: str) -> EncodedDataset:
        if self.plain:
            return super().encode_split(records, split)
        rows, dropped = [], 0
        for index, record in enumerate(records):
            row = self.encode_record(record)
            if len(row["input_ids"]) > self.hparams.max_length:
                dropped += 1
                continue
            row["index"] = index
            rows.append(row)
        self.stats[f"{split}_truncated"], self.stats[f"{split}_dropped"] = 0, dropped
        if dropped:
            print(f"[zoo] data/{split}: {dropped} rows dropped (target longer than max_length="
                  f"{self.hparams.max_length}; never cut)")
        if not rows:
            raise DataError(f"no {split} rows left: all {dropped} exceed max_length="
                            f"{self.hparams.max_length}; raise max_length")
        return EncodedDataset(rows)

    # ------------------------------------------------------------------ scores
    def score_completion(self, record: dict[str, Any], completion: str) -> dict[str, float]:
        if self.plain:
            return super().score_completion(record, completion)
        from sacrebleu.metrics import BLEU, CHRF

        hypothesis = extract_translation(completion)
        return {"bleu": BLEU(effective_order=True).sentence_score(hypothesis, [record["reference"]]).score,
                "chrf": CHRF(word_order=2).sentence_score(hypothesis, [record["reference"]]).score}

    def evaluation_metrics(self, records: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
        """Corpus BLEU and chrF++ (sacrebleu) of the extracted translations."""
        if self.plain or not records:
            return super().evaluation_metrics(records, completions)
        return corpus_scores([extract_translation(c) for c in completions], [r["reference"] for r in records])


def corpus_scores(hypotheses: list[str], references: list[str]) -> dict[str, float]:
    """{"bleu", "chrf"}: sacrebleu corpus BLEU and chrF++ (character n-grams + word bigrams), 0..100."""
    from sacrebleu.metrics import BLEU, CHRF

    return {"bleu": BLEU().corpus_score(hypotheses, [references]).score,
            "chrf": CHRF(word_order=2).corpus_score(hypotheses, [references]).score}
