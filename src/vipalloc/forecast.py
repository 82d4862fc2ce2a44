"""One forecast per (batch, step): prompt features, the success prediction and the expected lengths of a batch.

A front-end often asks the :class:`~vipalloc.allocator.Allocator` several questions about the same batch and step
before generating: the tokens the uniform plan would spend (:meth:`~vipalloc.allocator.Allocator.uniform_tokens`,
the default token budget), the expected lengths, then the plan itself. Each needs the predictor's ``(p_mean,
p_std)`` and, under a token budget, the length model's expected tokens per rollout. :class:`Forecaster` computes
them once and hands the same arrays to every later call for that batch and step, until something changes what a
prediction would return (:meth:`Forecaster.invalidate`: new rewards, an ingested history, a loaded state, or any
outside access to the predictor, which may change it, e.g. the oracle's ``set_true_p``).

The forecast is a pure cache: a plan made from it is bit-identical to one made from a fresh prediction, because a
prediction is a deterministic function of the predictor's state, the batch and the step, and the key below changes
whenever any of them can.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from vipalloc.history import RolloutHistory
from vipalloc.predictors.length import LengthModel, LengthPrediction

__all__ = ["Forecast", "Forecaster"]

# Forecasts kept at once: a verl step plans several occurrence layers (one batch and step each) and asks for each
# layer's uniform tokens before planning any of them.
_MAX_FORECASTS = 8


@dataclass
class Forecast:
    """The success prediction of one batch at one step, and its expected lengths once asked for.

    ``p_mean``, ``p_std``: float64 ``(M,)`` in ``[0, 1]``; ``timings``: seconds spent embedding (``"embed"``) and
    predicting (``"predict"``) when it was computed; ``lengths``: the length model's prediction (tokens per
    rollout, each field float64 ``(M,)``), None before any length was observed; filled on first use.
    """

    p_mean: np.ndarray
    p_std: np.ndarray
    timings: dict[str, float]
    lengths: LengthPrediction | None = None
    lengths_known: bool = field(default=False, repr=False)  # whether ``lengths`` was computed (None is a value)


class Forecaster:
    """Prompt features, predictor and length model behind an :class:`~vipalloc.allocator.Allocator`, with the
    (batch, step) cache of their forecasts.

    ``predictor``: a built predictor (:func:`vipalloc.predictors.make_predictor`); ``embedder_name``: ``auto``,
    ``minilm`` or ``hashing`` (built on first use: loading MiniLM costs seconds); ``length_model``: the response-
    length model; ``history_window``: steps of history the length model reads (None: all).
    """

    def __init__(
        self,
        predictor: Any,
        predictor_name: str,
        embedder_name: str,
        length_model: LengthModel,
        history_window: int | None,
    ) -> None:
        self.predictor = predictor
        self.predictor_name = predictor_name
        self.embedder_name = embedder_name
        self.length_model = length_model
        self.history_window = history_window
        self.embedder: Any = None
        self.cache: Any = None  # the EmbeddingCache, once a feature-based predictor needed one
        self._memo: dict[tuple[Any, ...], Forecast] = {}
        self.computed = 0  # predictions made (not served from the cache): what a test or a benchmark counts

    # ------------------------------------------------------------------ features
    def embedding_cache(self) -> Any:
        """The prompt-embedding cache, built on first use."""
        if self.cache is None:
            from vipalloc.embeddings import EmbeddingCache, get_embedder

            self.embedder = get_embedder(self.embedder_name)
            self.cache = EmbeddingCache(self.embedder)
        return self.cache

    def register_features(self, ids: list[str], prompts: Sequence[str] | None, history: RolloutHistory) -> None:
        """Embed the batch's prompts (texts from ``prompts``, else the history's) and hand them to the predictor.
        A no-op for predictors without features. Raises ``ValueError`` when a new prompt has no text."""
        if not getattr(self.predictor, "needs_features", False):
            return
        cache = self.embedding_cache()
        if prompts is None:
            missing = [pid for pid in ids if not cache.has(pid) and history.prompt_text(pid) is None]
            if missing:
                raise ValueError(
                    f"the {self.predictor_name!r} predictor needs prompt texts to embed {len(missing)} new prompt(s) "
                    f"(e.g. {missing[:3]}); pass prompts=[...] aligned with prompt_ids"
                )
            texts = [history.prompt_text(pid) or "" for pid in ids]
        else:
            if len(prompts) != len(ids):
                raise ValueError(f"got {len(ids)} prompt ids but {len(prompts)} prompts; they must align")
            texts = [str(t) for t in prompts]
        grew = sum(not cache.has(pid) for pid in ids)
        feats = cache.get(ids, texts)
        self.predictor.set_features(ids, feats)
        if grew:  # features of new prompts: the length prior's regression may now see them
            self._memo.clear()

    # ------------------------------------------------------------------ forecasts
    def invalidate(self) -> None:
        """Forget every forecast: the predictor's state may have changed."""
        self._memo.clear()

    def _key(self, ids: list[str], step: int, history: RolloutHistory) -> tuple[Any, ...]:
        # the history only grows (observe, merge): its row count changes whenever the length model's input does
        return (tuple(ids), step, len(history), id(history))

    def forecast(self, ids: list[str], prompts: Sequence[str] | None, step: int, history: RolloutHistory) -> Forecast:
        """The batch's success prediction at ``step``: from the cache when this batch and step were forecast since
        the last change of the predictor's state, else features + ``predictor.predict`` (then cached)."""
        key = self._key(ids, step, history)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        self.register_features(ids, prompts, history)
        t1 = time.perf_counter()
        p_mean, p_std = self.predictor.predict(ids, step)
        t2 = time.perf_counter()
        self.computed += 1
        fc = Forecast(
            np.asarray(p_mean, np.float64), np.asarray(p_std, np.float64), {"embed": t1 - t0, "predict": t2 - t1}
        )
        # read-only: every caller shares these arrays (a plan copies what it hands out)
        fc.p_mean.flags.writeable = False
        fc.p_std.flags.writeable = False
        self._memo[self._key(ids, step, history)] = fc
        while len(self._memo) > _MAX_FORECASTS:
            self._memo.pop(next(iter(self._memo)))
        return fc

    def lengths(self, fc: Forecast, ids: list[str], step: int, history: RolloutHistory) -> LengthPrediction | None:
        """The forecast's expected tokens per rollout (:meth:`LengthModel.predict_batch` at its ``p_mean``), computed
        once per forecast; None before any length was observed."""
        if not fc.lengths_known:
            fc.lengths = self.length_model.predict_batch(history, self.history_window, self.cache, ids, fc.p_mean, step)
            fc.lengths_known = True
        return fc.lengths
