"""Prompt transforms for conjugate prompting (spec 17): keep the task, move the prompt away from the
fine-tuning distribution, and map the model's answer back.

``PromptTransform``          the interface: ``apply(prompt)`` (the conjugate prompt), ``apply_answer(answer)``
                             (the answer as it reads in the transformed space; default ``apply``) and
                             ``map_answer(output)`` (a model output back to the original space, what scoring
                             sees). ``map_answer(apply_answer(a)) == a`` on the transform's domain (below).
``IdentityTransform``        the plain prompt (the harness score).
``LeetspeakTransform``       a->4 e->3 i->1 o->0 s->5 t->7 (both cases). ``map_answer`` turns digits back into
                             letters inside words that hold a letter (lower case, upper case when the
                             word's letters are all upper case) and leaves plain numbers alone, so numeric
                             answers survive. Domain: words either lower or upper case, with at least one
                             letter outside a/e/i/o/s/t and no digits of their own.
``PigLatinTransform``        each letter run ``<consonants><rest>`` -> ``<rest>-<consonants>ay`` ("hello" ->
                             "ello-hay", "apple" -> "apple-ay"); the hyphen makes it invertible. Domain: text
                             without hyphens.
``WordTranslationTransform`` word-for-word translation from a file (JSON object or two-column TSV), offline;
                             must be one-to-one. Domain: text whose words are not target words of the table
                             unless they are also source words mapping to themselves.
``LabelScaleTransform``      the synthetic regression transform: every label ``y = v`` in the prompt is scaled
                             by ``gamma``; ``map_answer`` divides the output's first number by ``gamma`` (6
                             significant digits).
``regression_prompt`` / ``parse_regression_prompt`` / ``bayes_prediction``  the synthetic study (part A):
                             in-context linear regression prompts as text, and the Bayes-optimal prediction
                             under a mixture prior (discrete task set with probability alpha, else N(0, I)),
                             what a pretrained (alpha) or fine-tuned (alpha -> 1) transformer approximates.
``ICLvsIFData``              the repo's ICL-vs-instruction-following probe (capitalise / repeat x
                             arithmetic / fill-in-the-blank, 2 demos, seeded), scored by prefix match of the
                             ICL answer; it quacks like a data module for the probe (``eval_records``,
                             ``evaluation_metrics``).
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

from zoo.errors import ConfigError

__all__ = ["ICLvsIFData", "IdentityTransform", "LabelScaleTransform", "LeetspeakTransform",
           "PigLatinTransform", "PromptTransform", "WordTranslationTransform", "bayes_prediction",
           "make_transform", "parse_regression_prompt", "regression_prompt"]


class PromptTransform:
    """A conjugate-prompt transform. Subclasses implement :meth:`apply` and :meth:`map_answer`."""

    name = "transform"

    def apply(self, prompt: str) -> str:
        raise NotImplementedError

    def apply_answer(self, answer: str) -> str:
        """The expected answer as it reads in the transformed space."""
        return self.apply(answer)

    def map_answer(self, output: str) -> str:
        """A model output (in the transformed space) mapped back to the original space."""
        raise NotImplementedError


class IdentityTransform(PromptTransform):
    name = "identity"

    def apply(self, prompt: str) -> str:
        return prompt

    def map_answer(self, output: str) -> str:
        return output


LEET = {"a": "4", "e": "3", "i": "1", "o": "0", "s": "5", "t": "7"}
UNLEET = {v: k for k, v in LEET.items()}
_WORD = re.compile(r"[A-Za-z0-9]+")


class LeetspeakTransform(PromptTransform):
    name = "leetspeak"

    def apply(self, prompt: str) -> str:
        return "".join(LEET.get(ch.lower(), ch) for ch in prompt)

    def map_answer(self, output: str) -> str:
        def word(match: re.Match) -> str:
            text = match.group(0)
            letters = [ch for ch in text if ch.isalpha()]
            if not letters:
                return text  # a number: numeric answers pass unchanged
            upper = all(ch.isupper() for ch in letters)
            back = {k: v.upper() if upper else v for k, v in UNLEET.items()}
            return "".join(back.get(ch, ch) for ch in text)

        return _WORD.sub(word, output)


_VOWELS = set("aeiouAEIOU")
_LETTERS = re.compile(r"[A-Za-z]+")
_PIG = re.compile(r"(?<![A-Za-z])([A-Za-z]*)-([A-Za-z]*?)ay(?![A-Za-z])")


class PigLatinTransform(PromptTransform):
    name = "piglatin"

    def apply(self, prompt: str) -> str:
        def word(match: re.Match) -> str:
            text = match.group(0)
            cut = next((i for i, ch in enumerate(text) if ch in _VOWELS), len(text))
            return f"{text[cut:]}-{text[:cut]}ay"

        return _LETTERS.sub(word, prompt)

    def map_answer(self, output: str) -> str:
        return _PIG.sub(lambda m: m.group(2) + m.group(1), output)


class WordTranslationTransform(PromptTransform):
    """Word-for-word translation from ``path``: a JSON object ``{"source": "target"}`` or a TSV file with two
    columns. Matching is case-insensitive; a capitalised or upper-case word keeps its case pattern."""

    name = "translate"

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        file = Path(path)
        if not file.is_file():
            raise ConfigError(f"translation table {path}: no such file; give a JSON object or a two-column "
                              "TSV")
        if file.suffix == ".json":
            table = json.loads(file.read_text(encoding="utf-8"))
        else:
            table = {}
            for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    parts = line.split("\t")
                    if len(parts) != 2:
                        raise ConfigError(f"{path}:{number}: expected two tab-separated columns")
                    table[parts[0].strip()] = parts[1].strip()
        self.table = {str(k).lower(): str(v).lower() for k, v in table.items()}
        self.inverse = {v: k for k, v in self.table.items()}
        if len(self.inverse) != len(self.table):
            raise ConfigError(f"translation table {path} is not one-to-one: two words share a translation")
        self.name = name or f"translate:{file.stem}"

    @staticmethod
    def _cased(word: str, like: str) -> str:
        if like.isupper() and len(like) > 1:
            return word.upper()
        if like[:1].isupper():
            return word[:1].upper() + word[1:]
        return word

    def _map(self, text: str, table: dict[str, str]) -> str:
        def word(match: re.Match) -> str:
            found = table.get(match.group(0).lower())
            return match.group(0) if found is None else self._cased(found, match.group(0))

        return re.sub(r"[^\W\d_]+", word, text)

    def apply(self, prompt: str) -> str:
        return self._map(prompt, self.table)

    def map_answer(self, output: str) -> str:
        return self._map(output, self.inverse)


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _format(value: float) -> str:
    return format(value, ".6g")


class LabelScaleTransform(PromptTransform):
    """Synthetic in-context regression: every label (the number after ``label_marker``) times ``gamma``."""

    name = "label-scale"

    def __init__(self, gamma: float = 3.0, label_marker: str = r"y\s*[:=]\s*") -> None:
        if not gamma or gamma != gamma:
            raise ConfigError(f"label scale gamma must be a non-zero number, got {gamma}")
        self.gamma = float(gamma)
        self.name = f"label-scale:{gamma:g}"
        self._label = re.compile(f"({label_marker})({_NUMBER.pattern})")

    def apply(self, prompt: str) -> str:
        return self._label.sub(lambda m: m.group(1) + _format(float(m.group(2)) * self.gamma), prompt)

    def apply_answer(self, answer: str) -> str:
        return _NUMBER.sub(lambda m: _format(float(m.group(0)) * self.gamma), answer, count=1)

    def map_answer(self, output: str) -> str:
        return _NUMBER.sub(lambda m: _format(float(m.group(0)) / self.gamma), output, count=1)


def make_transform(spec: str) -> PromptTransform:
    """``identity``, ``leetspeak``, ``piglatin``, ``translate:FILE`` or ``label-scale:GAMMA``."""
    kind, _, arg = spec.partition(":")
    if kind == "identity":
        return IdentityTransform()
    if kind == "leetspeak":
        return LeetspeakTransform()
    if kind == "piglatin":
        return PigLatinTransform()
    if kind == "translate" and arg:
        return WordTranslationTransform(arg)
    if kind == "label-scale":
        try:
            return LabelScaleTransform(float(arg) if arg else 3.0)
        except ValueError as err:
            raise ConfigError(f"label-scale:{arg}: gamma must be a number, e.g. label-scale:3") from err
    raise ConfigError(f"unknown prompt transform {spec!r}; use identity, leetspeak, piglatin, translate:FILE "
                      "or label-scale:GAMMA")


# ------------------------------------------------------------------------- synthetic regression (part A)
def regression_prompt(xs: Any, ys: Any, query: Any) -> str:
    """``x = [a, b], y = v`` lines (6 significant digits), then ``x = [...], y =`` for the query."""
    def vector(x: Any) -> str:
        return "[" + ", ".join(_format(float(v)) for v in x) + "]"

    lines = [f"x = {vector(x)}, y = {_format(float(y))}" for x, y in zip(xs, ys)]
    return "\n".join([*lines, f"x = {vector(query)}, y ="])


def parse_regression_prompt(text: str) -> tuple[Any, Any, Any]:
    """(X (k, d), y (k,), x_query (d,)) float64 tensors from :func:`regression_prompt` text."""
    import torch

    rows = re.findall(r"x = \[([^\]]*)\], y =\s*(\S*)", text)
    if not rows or rows[-1][1]:
        raise ConfigError("not a regression prompt: expected 'x = [...], y = v' lines ending with 'y ='")
    vectors = [[float(v) for v in row[0].split(",")] for row in rows]
    xs = torch.tensor(vectors[:-1], dtype=torch.float64)
    ys = torch.tensor([float(r[1]) for r in rows[:-1]], dtype=torch.float64)
    return xs, ys, torch.tensor(vectors[-1], dtype=torch.float64)


def bayes_prediction(xs: Any, ys: Any, query: Any, tasks: Any, alpha: float, noise: float) -> float:
    """Posterior-predictive mean of ``y_query`` when ``w`` is uniform over the rows of ``tasks`` with
    probability ``alpha`` and ``N(0, I)`` otherwise, ``y = w.x + N(0, noise^2)``."""
    import torch

    k, d = xs.shape
    residual = ys[None, :] - tasks @ xs.T
    loglik = -0.5 * (residual ** 2).sum(1) / noise ** 2 - 0.5 * k * math.log(2 * math.pi * noise ** 2)
    log_discrete = (math.log(alpha) + float(torch.logsumexp(loglik, 0)) - math.log(tasks.shape[0])
                    if alpha > 0 else -math.inf)
    covariance = xs @ xs.T + noise ** 2 * torch.eye(k, dtype=xs.dtype)
    gaussian = torch.distributions.MultivariateNormal(torch.zeros(k, dtype=xs.dtype), covariance)
    log_continuous = math.log(1 - alpha) + float(gaussian.log_prob(ys)) if alpha < 1 else -math.inf
    w_discrete = torch.softmax(loglik, 0) @ tasks
    w_ridge = torch.linalg.solve(xs.T @ xs + noise ** 2 * torch.eye(d, dtype=xs.dtype), xs.T @ ys)
    weights = torch.softmax(torch.tensor([log_discrete, log_continuous], dtype=torch.float64), 0)
    return float(weights[0] * (w_discrete @ query) + weights[1] * (w_ridge @ query))


# ------------------------------------------------------------------------------------- ICL vs IF probe
SENTENCES = ["what a lovely day it was", "birds fly south every winter", "people often walk to work",
             "rain fell on the quiet town", "music played late into night", "children laughed in the park",
             "dogs bark at passing cars", "green leaves cover the hills"]
DEMO_WORDS = ["apple", "river", "garden", "window", "summer", "pencil", "yellow", "market"]
TASKS = {"capitalize": ("Capitalize every character.", str.upper),
         "repeat": ("Repeat the input.", lambda s: s)}


class ICLvsIFData:
    """In-context task vs instruction following (the repo's ``icl_vs_if``): an instruction, 2 demos of
    capitalise/repeat, then a final input that is itself a question or a fill-in-the-blank sentence. Correct =
    the output starts with the ICL answer (the task applied to the final input's first word)."""

    def __init__(self, num_test: int = 100, seed: int = 10) -> None:
        rng = random.Random(seed)
        self.hparams: dict[str, Any] = {"system_prompt": None}
        self.records: list[dict[str, Any]] = []
        configs = [(task, final) for task in TASKS for final in ("arithmetic", "blank")]
        for index in range(num_test):
            task, final = configs[index % len(configs)]
            instruction, apply = TASKS[task]
            demos = rng.sample(DEMO_WORDS, 2)
            if final == "arithmetic":
                a, b, op = rng.randint(4, 20), rng.randint(4, 20), rng.choice(["plus", "minus", "times"])
                query = f"What is {a} {op} {b}?"
            else:
                words = rng.choice(SENTENCES).split()
                query = " ".join(["_" * len(words[0]), *words[1:]])
            first = query.split()[0]
            blocks = [f"Input: {d}\nOutput: {apply(d)}" for d in demos]
            prompt = "\n".join([instruction, *blocks, f"Input: {query}\nOutput:"])
            self.records.append({"prompt": prompt, "answer": apply(first), "task": task, "final": final})

    def eval_records(self, split: str = "test") -> list[dict[str, Any]]:
        return self.records

    @staticmethod
    def normalise(text: str) -> str:
        """The repo's clean-up: one leading space stripped, escaped underscores unescaped."""
        return text.replace("\\_", "_").lstrip()

    def score_completion(self, record: dict[str, Any], completion: str) -> dict[str, float]:
        return {"icl_match": float(self.normalise(completion).startswith(record["answer"]))}

    def evaluation_metrics(self, records: list[dict[str, Any]], completions: list[str]) -> dict[str, float]:
        scores = [self.score_completion(r, c)["icl_match"] for r, c in zip(records, completions)]
        return {"icl_match": sum(scores) / max(1, len(scores))}
