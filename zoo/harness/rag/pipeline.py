"""The RAG evaluation pipeline (spec 29): corpus -> retriever -> prompt -> generate -> judge.

Retrieval is run once and frozen (:meth:`RAGTask.prepare`): every model sees byte-identical prompts (each
item carries the prompt's SHA-1), decoding is greedy with a fixed ``max_new_tokens``; each answer gets
every judge's accuracy and completeness, its length, and the retrieval hit (gold passage in the top k).
:func:`compare` turns per-model records into mean ± bootstrap CI per metric and paired deltas vs the base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from zoo.errors import ConfigError
from zoo.harness.rag.corpus import Corpus, QAItem
from zoo.harness.rag.judges import JUDGES, Judge
from zoo.harness.rag.retrievers import Retriever, chunk_words, make_retriever
from zoo.harness.rag.stats import bootstrap_ci, paired_delta

SYSTEM = "Answer the question with the shortest exact answer, using the context."
TEMPLATE = "Context:\n{context}\n\nQuestion: {question}\nAnswer:"
METRICS = ("accuracy", "completeness")


def prompt_for(question: str, chunks: Sequence[str], template: str = TEMPLATE) -> str:
    context = "\n".join(f"[{i + 1}] {text}" for i, text in enumerate(chunks))
    return template.format(context=context, question=question)


def clean_answer(text: str) -> str:
    """The first non-empty line of a completion, stripped (models continue past the answer)."""
    return next((line.strip() for line in text.strip().splitlines() if line.strip()), "")


@dataclass
class RAGTask:
    """A fixed RAG evaluation: the corpus's chunks indexed once, top-``k`` per question cached in
    :meth:`prepare`, one prompt template and decoder setting for every model."""

    corpus: Corpus
    retriever: Retriever | str = "bm25"
    k: int = 3
    chunk_size: int = 0
    chunk_overlap: int = 0
    template: str = TEMPLATE
    system_prompt: str | None = SYSTEM
    max_new_tokens: int = 24
    judges: Sequence[Judge] = field(default_factory=lambda: [cls() for cls in JUDGES.values()])
    _prepared: list[dict[str, Any]] | None = None

    def prepare(self, items: Sequence[QAItem] | None = None) -> list[dict[str, Any]]:
        """The frozen evaluation items: question, reference, facts, retrieved chunk ids, hit, prompt."""
        if self._prepared is not None and items is None:
            return self._prepared
        from_corpus = items is None
        items = list(self.corpus.test if items is None else items)
        if self.k < 1:
            raise ConfigError(f"k={self.k}: retrieve at least one chunk")
        chunks, owner = [], []
        for passage in self.corpus.passages:
            for text in chunk_words(passage.text, self.chunk_size, self.chunk_overlap):
                chunks.append(text)
                owner.append(passage.doc_id)
        retriever = make_retriever(self.retriever) if isinstance(self.retriever, str) else self.retriever
        retriever.index(chunks)
        ranked = retriever.retrieve([item.question for item in items], self.k)
        prepared = []
        for item, ids in zip(items, ranked):
            prompt = prompt_for(item.question, [chunks[i] for i in ids], self.template)
            prepared.append({"qid": item.qid, "question": item.question, "reference": item.answer,
                             "facts": list(item.facts), "gold": item.gold, "chunks": ids,
                             "context": "\n".join(chunks[i] for i in ids),
                             "hit": item.gold in {owner[i] for i in ids}, "prompt": prompt,
                             "prompt_sha1": hashlib.sha1(prompt.encode()).hexdigest()})
        self.retriever_name = getattr(retriever, "name", type(retriever).__name__)
        if from_corpus:
            self._prepared = prepared
        return prepared

    def run(self, generate: Callable[..., list[str]] | Any, items: list[dict[str, Any]] | None = None,
            batch_size: int = 16) -> list[dict[str, Any]]:
        """Per-item records for one model: ``generate`` is a zoo module (its ``generate_text``) or a callable
        ``prompts -> completions``."""
        items = self.prepare() if items is None else items
        prompts = [item["prompt"] for item in items]
        if hasattr(generate, "generate_text"):
            completions = generate.generate_text(prompts, max_new_tokens=self.max_new_tokens,
                                                 system_prompt=self.system_prompt, batch_size=batch_size)
        else:
            completions = generate(prompts)
        records = []
        for item, completion in zip(items, completions):
            answer = clean_answer(completion)
            record = {"qid": item["qid"], "prompt_sha1": item["prompt_sha1"], "hit": item["hit"],
                      "answer": answer, "completion": completion, "answer_tokens": len(answer.split())}
            for judge in self.judges:
                verdict = judge.judge(answer, item["reference"], tuple(item["facts"]), item["context"])
                record[f"{judge.name}/accuracy"] = verdict.accuracy
                record[f"{judge.name}/completeness"] = verdict.completeness
            records.append(record)
        return records


def metric_names(records: list[dict[str, Any]]) -> list[str]:
    return [k for k in records[0] if "/" in k] if records else []


def compare(runs: dict[str, list[dict[str, Any]]], base: str = "base", resamples: int = 1000,
            seed: int = 0) -> list[dict[str, Any]]:
    """One row per (model, metric): mean with a bootstrap CI over items and, for every model but the base,
    the paired delta vs the base on the same items (paired bootstrap CI, sign test). Refuses runs whose
    prompts differ from the base's (the pipeline must be identical)."""
    if base not in runs:
        raise ConfigError(f"compare needs the base run {base!r} among {sorted(runs)}")
    reference = [r["prompt_sha1"] for r in runs[base]]
    rows = []
    for name, records in runs.items():
        if [r["prompt_sha1"] for r in records] != reference:
            raise ConfigError(f"{name}: its prompts differ from the base's; run every model through one "
                              "RAGTask")
        for metric in metric_names(records):
            values = [float(r[metric]) for r in records]
            mean, low, high = bootstrap_ci(values, resamples, seed=seed)
            row = {"model": name, "metric": metric, "mean": mean, "low": low, "high": high, "n": len(values)}
            if name != base:
                delta = paired_delta(values, [float(r[metric]) for r in runs[base]], resamples, seed=seed)
                row.update({f"delta_{k}": v for k, v in delta.items() if k != "n"})
            rows.append(row)
    return rows


def hit_rate(items: list[dict[str, Any]]) -> float:
    return sum(bool(i["hit"]) for i in items) / max(len(items), 1)
