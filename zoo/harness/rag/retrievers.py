"""Retrievers for the RAG pipeline: BM25 (``bm25s``) and dense MiniLM embeddings with a ``faiss``
inner-product index. Both index a list of chunk texts and return the top-k chunk indices per query,
deterministically."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from zoo.errors import ConfigError


@runtime_checkable
class Retriever(Protocol):
    name: str

    def index(self, texts: list[str]) -> None: ...

    def retrieve(self, queries: list[str], k: int) -> list[list[int]]: ...


def chunk_words(text: str, size: int = 0, overlap: int = 0) -> list[str]:
    """``text`` cut into windows of ``size`` words overlapping by ``overlap`` (``size`` 0: one chunk)."""
    words = text.split()
    if size <= 0 or len(words) <= size:
        return [text]
    if not 0 <= overlap < size:
        raise ConfigError(f"chunk overlap {overlap} must be in [0, size={size})")
    step = size - overlap
    return [" ".join(words[i:i + size]) for i in range(0, max(len(words) - overlap, 1), step)]


class BM25Retriever:
    """Okapi BM25 over lower-cased word tokens (``bm25s``, English stop words removed)."""

    name = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._model = None
        self._size = 0

    def index(self, texts: list[str]) -> None:
        import bm25s

        self._model = bm25s.BM25(k1=self.k1, b=self.b)
        self._model.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        self._size = len(texts)

    def retrieve(self, queries: list[str], k: int) -> list[list[int]]:
        import bm25s

        if self._model is None:
            raise ConfigError("BM25Retriever.retrieve before index()")
        tokens = bm25s.tokenize(queries, stopwords="en", show_progress=False)
        docs, _ = self._model.retrieve(tokens, k=min(k, self._size), show_progress=False, n_threads=1)
        return [[int(i) for i in row] for row in docs]


class DenseRetriever:
    """all-MiniLM-L6-v2 sentence embeddings (sentence-transformers, normalised) in a faiss
    ``IndexFlatIP`` (exact cosine search)."""

    name = "dense-minilm"

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        self.batch_size, self.device = batch_size, device
        self._encoder = None
        self._index = None

    def _encode(self, texts: list[str]):
        if self._encoder is None:
            from sentence_transformers import SentenceTransformer

            from zoo.modules.analysis.relation_distill import minilm_folder

            self._encoder = SentenceTransformer(str(minilm_folder()), device=self.device)
        return self._encoder.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False).astype("float32")

    def index(self, texts: list[str]) -> None:
        import faiss

        vectors = self._encode(texts)
        self._index = faiss.IndexFlatIP(vectors.shape[1])
        self._index.add(vectors)

    def retrieve(self, queries: list[str], k: int) -> list[list[int]]:
        if self._index is None:
            raise ConfigError("DenseRetriever.retrieve before index()")
        _, ids = self._index.search(self._encode(queries), min(k, self._index.ntotal))
        return [[int(i) for i in row] for row in ids]


RETRIEVERS = {"bm25": BM25Retriever, "dense": DenseRetriever}


def make_retriever(name: str) -> Retriever:
    if name not in RETRIEVERS:
        raise ConfigError(f"unknown retriever {name!r}; choose one of {', '.join(RETRIEVERS)}")
    return RETRIEVERS[name]()
