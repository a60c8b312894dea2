"""RAG evaluation (spec 29): a built-in offline corpus, BM25 / dense retrievers, offline and model judges,
the frozen pipeline with paired CIs, and the fine-tune-size study driver (``zoo analyze rag``)."""

from zoo.harness.rag.corpus import Corpus, Passage, QAItem, build_country_corpus
from zoo.harness.rag.judges import Judge, Judgement, KeyFactJudge, ModelJudge, ReferenceOverlapJudge
from zoo.harness.rag.pipeline import RAGTask, compare, hit_rate
from zoo.harness.rag.retrievers import BM25Retriever, DenseRetriever, Retriever
from zoo.harness.rag.stats import bootstrap_ci, paired_delta

__all__ = ["BM25Retriever", "Corpus", "DenseRetriever", "Judge", "Judgement", "KeyFactJudge", "ModelJudge",
           "Passage", "QAItem", "RAGTask", "ReferenceOverlapJudge", "Retriever", "bootstrap_ci",
           "build_country_corpus", "compare", "hit_rate", "paired_delta"]
