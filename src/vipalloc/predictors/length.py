"""Expected response length: how many tokens one rollout of a prompt will generate.

For a batch it predicts, per prompt, the expected tokens per rollout ``c_i = p_i L_success,i + (1 - p_i) L_fail,i``
(``p_i`` the success prediction), so a prompt the model is expected to start solving is expected to change length
accordingly (in RLVR failed rollouts of hard prompts run long and are often cut at the maximum length).

``L_success,i`` / ``L_fail,i`` come from the prompt's own history (its mean tokens over successful / failed rollouts
in the window), shrunk toward a prior with ``prior_strength`` pseudo-rollouts (James-Stein style: a prompt seen
with two rollouts is mostly prior, one seen with fifty mostly itself)::

    L_success,i = (tokens_success,i + k0 * r_success * prior_i) / (n_success,i + k0)

``prior_i`` is a feature-based prediction of the prompt's mean tokens per rollout: ridge regression of
``log(mean tokens)`` of every prompt in the window on its embedding (the features the GP already uses), when
features are available; otherwise the window's mean of ``log(mean tokens)`` over prompts. Either is brought back
from the log scale with Duan's smearing factor ``mean(exp(residual))``, so the prior estimates a mean, not a
geometric mean (which would under-predict skewed lengths). ``r_success`` /
``r_fail`` scale it to the outcome (the window's mean success length over its mean length, and the same for
failures; 1 when an outcome has no lengths). A never-seen prompt gets the prior alone.

Stateless: the history (which the allocator saves) holds everything it learns from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: the model reads a history and a cache, it imports neither at run time
    from vipalloc.embeddings import EmbeddingCache
    from vipalloc.history import RolloutHistory

__all__ = ["LengthModel", "LengthPrediction"]


@dataclass(frozen=True)
class LengthPrediction:
    """Per-prompt expectations, float64 ``(M,)`` each, in tokens per rollout."""

    expected: np.ndarray  # p L_success + (1 - p) L_fail
    success: np.ndarray  # L_success
    fail: np.ndarray  # L_fail
    prior: np.ndarray  # the feature-based (or global) prior of the prompt's mean length


@dataclass
class LengthModel:
    """Predict tokens per rollout from the history's token columns (see the module docstring).

    ``prior_strength``: pseudo-rollouts of the prior in each outcome's mean (>= 0); ``ridge``: L2 penalty of the
    feature regression on log length (> 0); ``min_prompts``: prompts with lengths needed before the regression is
    trusted over the global mean.
    """

    prior_strength: float = 2.0
    ridge: float = 1.0
    min_prompts: int = 8
    max_fit_prompts: int = 1024  # the regression fits on at most this many prompts (the most recently seen)

    def __post_init__(self) -> None:
        if not (np.isfinite(self.prior_strength) and self.prior_strength >= 0):
            raise ValueError(f"prior_strength must be a number >= 0, got {self.prior_strength!r}")
        if not (np.isfinite(self.ridge) and self.ridge > 0):
            raise ValueError(f"ridge must be a number > 0, got {self.ridge!r}")

    def predict(
        self,
        p: np.ndarray,
        at: np.ndarray,
        rows: dict[str, np.ndarray],
        n_prompts: int,
        features: Callable[[np.ndarray], np.ndarray] | None = None,
        batch_features: np.ndarray | None = None,
    ) -> LengthPrediction | None:
        """Expected tokens per rollout of the batch, or None when the rows hold no lengths at all.

        ``p``: success predictions ``(M,)``; ``at``: each batch prompt's index into the history's prompt ids
        (int64 ``(M,)``, -1 = never seen); ``rows``: the history's rows in the window (``RolloutHistory.rows``);
        ``n_prompts``: the history's prompt count. ``features`` (history prompt indices ``(k,)`` -> ``(k, d)``,
        NaN rows for prompts without a feature) and ``batch_features`` (``(M, d)``) enable the regression prior.
        """
        pid = np.asarray(rows["prompt_index"], np.int64)
        tok_s = np.bincount(pid, weights=rows["tokens_success"], minlength=n_prompts)
        tok_f = np.bincount(pid, weights=rows["tokens_fail"], minlength=n_prompts)
        n_s = np.bincount(pid, weights=rows["lengths_success"], minlength=n_prompts)
        n_f = np.bincount(pid, weights=rows["lengths_fail"], minlength=n_prompts)
        n_all = n_s + n_f
        if not n_all.any():
            return None
        seen = np.flatnonzero(n_all > 0)
        mean_len = (tok_s[seen] + tok_f[seen]) / n_all[seen]
        log_len = np.log(np.maximum(mean_len, 1.0))  # a 0-token rollout counts as 1 (log of 0 is -inf)
        global_log = float(log_len.mean())
        overall = (tok_s.sum() + tok_f.sum()) / n_all.sum()
        r_s = (tok_s.sum() / n_s.sum()) / overall if n_s.sum() else 1.0
        r_f = (tok_f.sum() / n_f.sum()) / overall if n_f.sum() else 1.0
        prior_log = np.full(len(p), global_log)
        # exp(E[log L]) is the geometric mean, below the mean that token costs need: Duan's smearing factor
        # mean(exp(residual)) turns a log-scale prediction back into a mean (here the arithmetic mean over prompts)
        smear = float(np.mean(np.exp(log_len - global_log)))
        if features is not None and batch_features is not None:
            fit = np.arange(seen.size)
            if seen.size > self.max_fit_prompts:  # the most recently seen prompts
                last = np.full(n_prompts, -1, np.int64)
                np.maximum.at(last, pid, np.asarray(rows["step"], np.int64))
                fit = np.argsort(-last[seen], kind="stable")[: self.max_fit_prompts]
            x = np.asarray(features(seen[fit]), np.float64)
            usable = np.all(np.isfinite(x), axis=1)
            ok_b = np.all(np.isfinite(batch_features), axis=1)
            if usable.sum() >= self.min_prompts and ok_b.any():
                w, b = _ridge(x[usable], log_len[fit][usable], self.ridge)
                prior_log[ok_b] = batch_features[ok_b] @ w + b
                resid = log_len[fit][usable] - (x[usable] @ w + b)
                smear = float(np.mean(np.exp(resid)))
        prior = np.exp(prior_log) * smear
        k0 = float(self.prior_strength)
        at = np.asarray(at, np.int64)
        known = at >= 0
        ts, tf, ns, nf = (np.zeros(len(p)) for _ in range(4))
        ts[known], tf[known], ns[known], nf[known] = tok_s[at[known]], tok_f[at[known]], n_s[at[known]], n_f[at[known]]
        with np.errstate(invalid="ignore", divide="ignore"):
            l_s = np.where(ns + k0 > 0, (ts + k0 * r_s * prior) / (ns + k0), r_s * prior)
            l_f = np.where(nf + k0 > 0, (tf + k0 * r_f * prior) / (nf + k0), r_f * prior)
        # with prior_strength 0 an outcome never seen falls back to the prompt's other outcome, then the prior
        l_s = np.where(np.isfinite(l_s), l_s, np.where(ns + nf > 0, (ts + tf) / np.maximum(ns + nf, 1), prior))
        l_f = np.where(np.isfinite(l_f), l_f, np.where(ns + nf > 0, (ts + tf) / np.maximum(ns + nf, 1), prior))
        l_s = np.maximum(l_s, 1.0)
        l_f = np.maximum(l_f, 1.0)
        pc = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
        return LengthPrediction(pc * l_s + (1.0 - pc) * l_f, l_s, l_f, prior)

    def predict_batch(
        self,
        history: RolloutHistory,
        window: int | None,
        cache: EmbeddingCache | None,
        ids: list[str],
        p_mean: np.ndarray,
        step: int,
    ) -> LengthPrediction | None:
        """:meth:`predict` for a batch of prompt ids from a history's rows in ``window`` steps before ``step``;
        ``cache`` (the predictor's embeddings, when it has them) gives the feature-based prior."""
        if not history.has_lengths:
            return None
        rows = history.rows(window, before_step=step)
        hist_ids = history.prompt_ids
        at = history.positions(ids)
        features = batch = None
        if cache is not None:
            batch = cache.lookup(ids)

            def features(idx: np.ndarray) -> np.ndarray:
                return np.asarray(cache.lookup([hist_ids[i] for i in idx]), np.float64)

        return self.predict(p_mean, at, rows, len(hist_ids), features=features, batch_features=batch)


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge regression ``y ~ x w + b`` (intercept unpenalised): ``(w (d,), b)``."""
    mx, my = x.mean(axis=0), float(y.mean())
    xc = x - mx
    d = x.shape[1]
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(d), xc.T @ (y - my))
    return w, my - float(mx @ w)
