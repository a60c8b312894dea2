"""The built-in offline RAG corpus: ISO 3166 facts from ``pycountry`` rendered as short encyclopedia-style
passages, with question-answer pairs whose answers are stated in one passage.

How it is built (deterministic, no download): one passage per country in ``pycountry.countries`` (249):
its name, official name (where ISO gives one), alpha-2 / alpha-3 / numeric codes and its first-level
subdivisions from ``pycountry.subdivisions`` (count, type, the first six by code). Questions per country:
alpha-3 code, numeric code, both letter codes (two key facts), official name, number of first-level
subdivisions, and "which country has the subdivision X" for up to two subdivision names that occur in no
other passage. Every answer (and key fact) is a substring of the gold passage (checked by the builder).

Split: countries whose ``sha1(alpha_2)`` is 0 mod 5 hold the test questions, the others the fine-tuning
pool, so no question and no gold passage is shared (asserted).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Passage:
    doc_id: str
    title: str
    text: str


@dataclass(frozen=True)
class QAItem:
    qid: str
    question: str
    answer: str
    facts: tuple[str, ...]
    gold: str  # doc_id of the passage holding the answer
    kind: str = "fact"


@dataclass
class Corpus:
    passages: list[Passage]
    pool: list[QAItem]  # fine-tuning pool
    test: list[QAItem]
    meta: dict = field(default_factory=dict)

    def passage(self, doc_id: str) -> Passage:
        return self._index()[doc_id]

    def _index(self) -> dict[str, Passage]:
        if not hasattr(self, "_by_id"):
            self._by_id = {p.doc_id: p for p in self.passages}
        return self._by_id


def _subdivisions(pycountry, code: str) -> list:
    subs = pycountry.subdivisions.get(country_code=code) or []
    top = [s for s in subs if getattr(s, "parent_code", None) is None] or list(subs)
    return sorted(top, key=lambda s: s.code)


def _passage(country, subs: list) -> str:
    name, official = country.name, getattr(country, "official_name", None)
    head = f"{name}, officially the {official}," if official else f"{name}"
    text = (f"{head} is a country or territory whose ISO 3166-1 codes are {country.alpha_2} (alpha-2) and "
            f"{country.alpha_3} (alpha-3); its ISO numeric code is {country.numeric}.")
    if subs:
        kinds = sorted({s.type for s in subs})
        listed = ", ".join(f"{s.name} ({s.code})" for s in subs[:6])
        text += (f" {name} has {len(subs)} first-level subdivisions ({', '.join(kinds)}), including "
                 f"{listed}.")
    else:
        text += f" ISO 3166-2 lists no subdivisions for {name}."
    return text


def is_test_country(alpha_2: str) -> bool:
    return int(hashlib.sha1(alpha_2.encode()).hexdigest(), 16) % 5 == 0


def build_country_corpus() -> Corpus:
    """The built-in corpus (249 passages) and its pool / test QA split."""
    import pycountry

    countries = sorted(pycountry.countries, key=lambda c: c.alpha_2)
    subs = {c.alpha_2: _subdivisions(pycountry, c.alpha_2) for c in countries}
    listed_names: dict[str, int] = {}
    for c in countries:
        for s in subs[c.alpha_2][:6]:
            listed_names[s.name] = listed_names.get(s.name, 0) + 1
    country_names = {c.name for c in countries}
    passages, pool, test = [], [], []
    for c in countries:
        doc = Passage(c.alpha_2, c.name, _passage(c, subs[c.alpha_2]))
        passages.append(doc)
        items = [
            QAItem(f"{c.alpha_2}-a3", f"What is the ISO 3166-1 alpha-3 code of {c.name}?", c.alpha_3,
                   (c.alpha_3,), c.alpha_2),
            QAItem(f"{c.alpha_2}-num", f"What is the ISO numeric country code of {c.name}?", c.numeric,
                   (c.numeric,), c.alpha_2),
            QAItem(f"{c.alpha_2}-codes", f"Which two-letter and three-letter ISO codes does {c.name} have?",
                   f"{c.alpha_2} and {c.alpha_3}", (c.alpha_2, c.alpha_3), c.alpha_2),
        ]
        official = getattr(c, "official_name", None)
        if official:
            items.append(QAItem(f"{c.alpha_2}-official", f"What is the official name of {c.name}?", official,
                                (official,), c.alpha_2))
        if subs[c.alpha_2]:
            count = str(len(subs[c.alpha_2]))
            items.append(QAItem(f"{c.alpha_2}-nsub", f"How many first-level subdivisions does {c.name} have?",
                                count, (count,), c.alpha_2))
            unique = [s for s in subs[c.alpha_2][:6]
                      if listed_names[s.name] == 1 and s.name not in country_names and len(s.name) > 3]
            for s in unique[:2]:
                question = f"Which country has the subdivision {s.name}?"
                items.append(QAItem(f"{c.alpha_2}-sub-{s.code}", question, c.name, (c.name,), c.alpha_2,
                                    kind="subdivision"))
        for item in items:
            assert all(f in doc.text for f in item.facts), (item, doc.text)
        (test if is_test_country(c.alpha_2) else pool).extend(items)
    pool_questions = {q.question for q in pool}
    assert not any(q.question in pool_questions for q in test), "a test question is in the fine-tuning pool"
    assert not {q.gold for q in pool} & {q.gold for q in test}, "a gold passage serves both splits"
    return Corpus(passages, pool, test, meta={"source": f"pycountry {getattr(pycountry, '__version__', '')}",
                                              "passages": len(passages)})
