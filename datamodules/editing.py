"""Knowledge-editing data: edit requests (prompt, new target, rephrasings, locality prompts with answers), a
built-in offline edit set from ``pycountry``, the "already known" filter, and the editing metrics.

Built-in facts (``dataset: pycountry``). pycountry holds ISO 3166 / 4217 / 639 data; it has no capitals and no
official languages, so the relations are the ones it does hold:
    ``currency``     country -> its currency (ISO 4217 numeric code = the country's ISO 3166 numeric code, the
                     standard's rule for national currencies: 118 countries, shared currencies such as EUR
                     left out);
    ``subdivision``  a top-level state / province / prefecture -> its country;
    ``language``     an ISO 639-1 two-letter code -> the language's name.
Each fact has a question prompt and two rephrasings. An edit request replaces the answer by another answer of
the same relation (seeded); its locality prompts are other facts (not edited) with their true answers.

Records (also the shape of a local ``.json``/``.jsonl`` edit file, as ZsRE/CounterFact converted): ``prompt``,
``target_new``, optional ``ground_truth``, ``rephrase`` (list of prompts), ``locality`` (list of
``{prompt, answer}``). Training rows are chat-rendered ``prompt -> target_new + EOS`` (the response opens
a new assistant turn, so the paper's leading-space rule has no seam to protect; EOS is a supervised label,
padding is masked by length, never by id). val/test are the edits themselves: editing is evaluated on what
it edited.

Metrics (:func:`edit_metrics`, as the editing literature defines them; the LocFT repo's normalisation):
efficacy (reliability) = exact match of the greedy answer to ``prompt`` with ``target_new``; generalisation =
the same on the rephrasings; locality = the answer to each unrelated prompt is unchanged by the edit;
fluency = ROME's weighted bi-/tri-gram entropy of free generations from the edit prompts.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from zoo import backbone
from zoo.datamodules.sft import DataError, SFTDataModule, read_local

RELATIONS = ("currency", "subdivision", "language")
TEMPLATES = {
    "currency": ("What is the currency of {s}? Answer with its name only.",
                 "Which currency is used in {s}? Answer with its name only.",
                 "Name the official currency of {s}, nothing else."),
    "subdivision": ("{s} is a {kind} of which country? Answer with the country's name only.",
                    "In which country is the {kind} {s}? Answer with the country's name only.",
                    "Name the country that the {kind} {s} belongs to, nothing else."),
    "language": ("Which language has the ISO 639-1 code '{s}'? Answer with its name only.",
                 "The two-letter language code '{s}' stands for which language? Answer with its name only.",
                 "Name the language whose ISO 639-1 code is '{s}', nothing else."),
}
ANSWER_STOP = (".", "\n")


class Generator(Protocol):
    """Anything that answers prompts: a :class:`zoo.modules.CausalLMModule`, or a stub in tests."""

    def generate_text(self, prompts: list[str], max_new_tokens: int = ..., **kwargs: Any) -> list[str]: ...


# ---------------------------------------------------------------------------- facts
def _plain(name: str) -> bool:
    return "," not in name and "(" not in name


def _country_name(country) -> str:
    return getattr(country, "common_name", None) or country.name


def builtin_facts(relations: Sequence[str] = RELATIONS, per_relation: int = 150, seed: int = 0) -> list[dict]:
    """Facts ``{relation, subject, prompt, rephrase, answer}`` from pycountry, ``per_relation`` each."""
    import pycountry

    unknown = set(relations) - set(RELATIONS)
    if unknown:
        raise DataError(f"unknown relations {sorted(unknown)}; use some of {list(RELATIONS)}")
    raw: dict[str, list[tuple[str, str, str]]] = {r: [] for r in RELATIONS}
    currencies = {c.numeric: c for c in pycountry.currencies}
    for country in pycountry.countries:
        currency = currencies.get(country.numeric)
        if currency is not None and _plain(_country_name(country)) and _plain(currency.name):
            raw["currency"].append((_country_name(country), "", currency.name))
    for sub in pycountry.subdivisions:
        country = pycountry.countries.get(alpha_2=sub.country_code)
        if (sub.parent_code is None and sub.type in ("State", "Province", "Prefecture") and _plain(sub.name)
                and country is not None and _plain(_country_name(country))):
            raw["subdivision"].append((sub.name, sub.type.lower(), _country_name(country)))
    for language in pycountry.languages:
        code = getattr(language, "alpha_2", None)
        if code and _plain(language.name):
            raw["language"].append((code, "", language.name))
    facts = []
    for relation in relations:
        items = sorted(set(raw[relation]))
        random.Random(f"{seed}-{relation}").shuffle(items)
        for subject, kind, answer in items[:per_relation]:
            prompts = [t.format(s=subject, kind=kind) for t in TEMPLATES[relation]]
            facts.append({"relation": relation, "subject": subject, "prompt": prompts[0],
                          "rephrase": prompts[1:], "answer": answer})
    return facts


def make_edits(facts: list[dict], num_edits: int, num_locality: int = 2, seed: int = 0) -> list[dict]:
    """Edit requests from ``facts``: the first ``num_edits`` (seeded order) get a new target (another answer
    of their relation); each gets ``num_locality`` locality prompts drawn from the facts not edited."""
    rng = random.Random(seed)
    order = list(facts)
    rng.shuffle(order)
    edited, rest = order[:num_edits], order[num_edits:] or order[:0]
    answers: dict[str, list[str]] = {}
    for fact in facts:
        answers.setdefault(fact["relation"], []).append(fact["answer"])
    records = []
    for fact in edited:
        choices = sorted({a for a in answers[fact["relation"]] if a != fact["answer"]})
        if not choices:
            raise DataError(f"relation {fact['relation']!r} has one answer only; cannot build a new target")
        local = rng.sample(rest, min(num_locality, len(rest)))
        records.append({"prompt": fact["prompt"], "target_new": rng.choice(choices),
                        "ground_truth": fact["answer"], "rephrase": list(fact["rephrase"]),
                        "locality": [{"prompt": f["prompt"], "answer": f["answer"]} for f in local],
                        "relation": fact["relation"], "subject": fact["subject"]})
    return records


# ---------------------------------------------------------------------------- answers and metrics
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (the LocFT repo's EM)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, target: str) -> float:
    """1.0 when ``prediction`` cut at the first '.' or newline equals ``target`` after normalisation."""
    cut = min((i for i in (prediction.find(s) for s in ANSWER_STOP) if i >= 0), default=len(prediction))
    return float(normalize_answer(prediction[:cut]) == normalize_answer(target))


def mentions(prediction: str, answer: str) -> bool:
    """Whether the normalised ``answer`` appears as whole words in the normalised ``prediction`` (an
    instruct model states a known fact in a sentence: "The currency of Japan is the yen.")."""
    needle, hay = normalize_answer(answer), normalize_answer(prediction)
    return bool(needle) and f" {needle} " in f" {hay} "


def keep_known_facts(facts: list[dict], model: Generator, max_new_tokens: int = 24,
                     batch_size: int = 16) -> list[dict]:
    """The facts whose true ``answer`` the ``model``'s greedy reply to ``prompt`` mentions."""
    replies = model.generate_text([f["prompt"] for f in facts], max_new_tokens=max_new_tokens,
                                  batch_size=batch_size)
    return [fact for fact, reply in zip(facts, replies) if mentions(reply, fact["answer"])]


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency of one text: the mean over n of weight_n x the entropy (bits) of its n-gram
    frequencies (word tokens)."""
    tokens = re.findall(r"\w+|[^\w\s]", text)
    values = []
    for n, weight in zip(ns, weights):
        grams = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(weight * entropy)
    return sum(values) / len(values)


def answer(model: Generator, prompts: list[str], max_new_tokens: int = 16, batch_size: int = 16) -> list[str]:
    return model.generate_text(prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def locality_prompts(records: list[dict]) -> list[str]:
    return [item["prompt"] for r in records for item in r.get("locality", [])]


def edit_metrics(model: Generator, records: list[dict], locality_before: list[str] | None,
                 max_new_tokens: int = 16, fluency_tokens: int = 48, batch_size: int = 16
                 ) -> dict[str, float]:
    """Efficacy, generalisation, locality and fluency of an edited ``model`` over ``records``.

    ``locality_before``: the unedited model's answers to :func:`locality_prompts` (same order); locality is
    the share of them the edited model repeats (exact match after normalisation); None leaves it out."""
    metrics: dict[str, float] = {}
    direct = answer(model, [r["prompt"] for r in records], max_new_tokens, batch_size)
    metrics["efficacy"] = sum(exact_match(p, r["target_new"]) for p, r in zip(direct, records)) / len(records)
    pairs = [(q, r["target_new"]) for r in records for q in r.get("rephrase", [])]
    if pairs:
        replies = answer(model, [q for q, _ in pairs], max_new_tokens, batch_size)
        metrics["generalization"] = sum(exact_match(p, t) for p, (_, t) in zip(replies, pairs)) / len(pairs)
    loc = locality_prompts(records)
    if loc and locality_before is not None:
        after = answer(model, loc, max_new_tokens, batch_size)
        metrics["locality"] = sum(normalize_answer(a) == normalize_answer(b)
                                  for a, b in zip(after, locality_before)) / len(loc)
    if fluency_tokens > 0:
        free = model.generate_text([r["prompt"] for r in records], max_new_tokens=fluency_tokens,
                                   batch_size=batch_size)
        metrics["fluency"] = sum(ngram_entropy(t) for t in free) / len(free)
    return metrics


class _BackboneGenerator:
    """``generate_text`` over a bare backbone, through the one decoder (for the known-facts filter)."""

    def __init__(self, name: str) -> None:
        self.model, self.tokenizer = backbone.load(name)
        self.model.eval()

    def generate_text(self, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 16,
                      **kwargs: Any) -> list[str]:
        from zoo import decoding

        return decoding.generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, **kwargs)


# ---------------------------------------------------------------------------- DataModule
class EditingDataModule(SFTDataModule):
    """Edit requests as prompt -> new-target rows; val/test are the edits themselves."""

    def __init__(self, *args: Any, dataset: str = "pycountry", relations: list[str] | None = None,
                 facts_per_relation: int = 150, known_only: bool = True, known_by: str | None = None,
                 num_locality: int = 2, **kwargs: Any) -> None:
        """
        Args:
            dataset: ``pycountry`` (the built-in facts), a local .json/.jsonl edit file (records with prompt,
                target_new, rephrase, locality), or any SFT source (prompt -> response as the new target,
                no rephrasings or locality prompts).
            relations: built-in relations used (default all: currency, subdivision, language).
            facts_per_relation: built-in candidate facts per relation, before the known-facts filter.
            known_only: keep only facts the model ``known_by`` already answers correctly (built-in set only).
            known_by: the backbone that must know the facts (default: ``tokenizer``'s backbone, which the CLI
                links to the model); its verdicts are cached in ``$ZOO_CACHE/editing``.
            num_locality: locality prompts per edit.
            *args, **kwargs: :class:`~zoo.datamodules.sft.SFTDataModule`'s (``num_train`` = edits, ``seed``).
        """
        super().__init__(*args, dataset=dataset, **kwargs)

    def builtin_records(self) -> list[dict]:
        hp = self.hparams
        facts = builtin_facts(hp.relations or RELATIONS, hp.facts_per_relation, hp.seed)
        if hp.known_only:
            facts = self.known_facts(facts, hp.known_by or hp.tokenizer)
        if len(facts) <= hp.num_train:
            raise DataError(f"only {len(facts)} built-in facts left (known_only={hp.known_only}) for "
                            f"{hp.num_train} edits plus locality prompts; lower num_train or raise "
                            "facts_per_relation")
        return make_edits(facts, hp.num_train, hp.num_locality, hp.seed)

    def known_facts(self, facts: list[dict], model_name: str) -> list[dict]:
        key = hashlib.sha256(json.dumps([model_name, facts], sort_keys=True).encode()).hexdigest()[:20]
        path = backbone.cache_dir() / "editing" / f"known-{key}.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
        known = keep_known_facts(facts, _BackboneGenerator(model_name))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known), encoding="utf-8")
        print(f"[zoo] editing: {model_name} knows {len(known)} of {len(facts)} built-in facts")
        return known

    def load_records(self) -> dict[str, list[dict[str, Any]]]:
        hp = self.hparams
        if hp.dataset == "pycountry":
            edits = self.builtin_records()
        elif Path(hp.dataset).suffix.lower() in (".json", ".jsonl") and _is_edit_file(Path(hp.dataset)):
            edits = read_local(Path(hp.dataset).expanduser())[: hp.num_train or None]
        else:  # any SFT source: its responses are the new targets
            edits = [{"prompt": r["prompt"], "target_new": r["response"], "rephrase": [], "locality": []}
                     for r in super().load_records()["train"]]
        records = [{**e, "response": e["target_new"], "answer": e["target_new"]} for e in edits]
        return {"train": records, "val": records[: hp.num_val], "test": records[: hp.num_test]}

    @property
    def edit_records(self) -> list[dict]:
        self.setup("fit")
        return self.records["train"]

    def score_completion(self, record: dict[str, Any], completion: str) -> dict[str, float]:
        return {"exact_match": exact_match(completion, record["target_new"])}


def _is_edit_file(path: Path) -> bool:
    rows = read_local(path.expanduser())
    return bool(rows) and "target_new" in rows[0]
