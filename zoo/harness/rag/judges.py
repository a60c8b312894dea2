"""Judges of a RAG answer against its reference (spec 29): two scores in [0, 1] and a rationale.

``ReferenceOverlapJudge``  accuracy: 1 if the normalised reference occurs in the answer, else token F1;
                           completeness: share of the reference's tokens found in the answer.
``KeyFactJudge``           completeness: share of the item's key facts found in the normalised answer;
                           accuracy: share of the answer's tokens supported by the reference or the
                           retrieved context (an unsupported answer is penalised), 0 when empty.
``ModelJudge``             a model judge behind the same protocol: a fixed rubric prompt, a ``generate``
                           callable (any zoo module's ``generate_text``, an API client), parsed 1-5 scores
                           mapped to [0, 1]; temperature 0 is the caller's decoder setting.
All offline judges are deterministic and invariant to case, punctuation and whitespace.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower-case, punctuation to spaces, whitespace collapsed."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def tokens(text: str) -> list[str]:
    return normalize(text).split()


def contains(haystack: str, needle: str) -> bool:
    """Whole-token containment of normalised ``needle`` in normalised ``haystack``."""
    n = normalize(needle)
    return bool(n) and f" {n} " in f" {normalize(haystack)} "


def token_f1(answer: str, reference: str) -> float:
    a, r = tokens(answer), tokens(reference)
    common = sum((Counter(a) & Counter(r)).values())
    if not a or not r or common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Judgement:
    accuracy: float
    completeness: float
    rationale: str = ""


@runtime_checkable
class Judge(Protocol):
    name: str

    def judge(self, answer: str, reference: str, facts: tuple[str, ...] = (), context: str = "") -> Judgement:
        ...


class ReferenceOverlapJudge:
    name = "overlap"

    def judge(self, answer: str, reference: str, facts: tuple[str, ...] = (), context: str = "") -> Judgement:
        if contains(answer, reference):
            accuracy = 1.0
        else:
            accuracy = token_f1(answer, reference)
        ref = tokens(reference)
        found = Counter(tokens(answer)) & Counter(ref)
        completeness = sum(found.values()) / len(ref) if ref else 0.0
        return Judgement(accuracy, completeness, f"token F1 {token_f1(answer, reference):.2f}")


class KeyFactJudge:
    name = "keyfact"

    def judge(self, answer: str, reference: str, facts: tuple[str, ...] = (), context: str = "") -> Judgement:
        facts = tuple(facts) or (reference,)
        hit = [f for f in facts if contains(answer, f)]
        completeness = len(hit) / len(facts)
        said = tokens(answer)
        support = set(tokens(reference)) | set(tokens(context))
        accuracy = sum(t in support for t in said) / len(said) if said else 0.0
        return Judgement(accuracy, completeness, f"facts {len(hit)}/{len(facts)}; supported tokens "
                                                 f"{accuracy:.2f}")


RUBRIC = ("You grade an answer against a reference answer.\nQuestion: {question}\nReference: {reference}\n"
          "Answer: {answer}\nRate ACCURACY (is the answer consistent with the reference?) and COMPLETENESS "
          "(how much of the reference does it cover?), each from 1 to 5.\nReply exactly as:\n"
          "accuracy: <1-5>\ncompleteness: <1-5>\nrationale: <one sentence>")


class ModelJudge:
    """A model judge: ``generate(prompts) -> texts``; unparsable replies score the minimum (and say so)."""

    name = "model"

    def __init__(self, generate: Callable[[list[str]], list[str]], rubric: str = RUBRIC, scale: int = 5,
                 judge_id: str = "unspecified") -> None:
        self.generate, self.rubric, self.scale, self.judge_id = generate, rubric, scale, judge_id

    def _score(self, reply: str, key: str) -> float | None:
        match = re.search(rf"{key}\s*[:=]\s*([0-9]+)", reply.lower())
        if not match:
            return None
        value = min(max(int(match.group(1)), 1), self.scale)
        return (value - 1) / (self.scale - 1)

    def judge(self, answer: str, reference: str, facts: tuple[str, ...] = (), context: str = "",
              question: str = "") -> Judgement:
        return self.judge_many([(answer, reference, question)])[0]

    def judge_many(self, rows: list[tuple[str, str, str]]) -> list[Judgement]:
        replies = self.generate([self.rubric.format(answer=a, reference=r, question=q) for a, r, q in rows])
        out = []
        for reply in replies:
            accuracy, completeness = self._score(reply, "accuracy"), self._score(reply, "completeness")
            why = re.search(r"rationale\s*:\s*(.*)", reply, re.IGNORECASE)
            note = why.group(1).strip() if why else reply.strip()[:200]
            if accuracy is None or completeness is None:
                note = f"unparsable judge reply: {reply.strip()[:120]!r}"
            out.append(Judgement(accuracy or 0.0, completeness or 0.0, note))
        return out


JUDGES = {"overlap": ReferenceOverlapJudge, "keyfact": KeyFactJudge}
