"""Expected response length: how many tokens one rollout of a prompt will generate.

For a batch it predicts, per prompt, the expected tokens per rollout ``c_i = p_i L_success,i + (1 - p_i) L_fail,i``
(``p_i`` the success prediction), so a prompt the model is expected to start solving is expected to change length
accordingly (in RLVR failed rollouts of hard prompts run long and are often cut at the maximum length).

A three-level shrinkage (each level pulled toward the one above it, issue 27):

1. **Outcome effect** ``rho``: success length over failure length *within* prompts (weighted geometric mean over
   prompts that have both), so "easy prompts are short" is not mistaken for "successes are short".
2. **The prompt's scale** ``B_i`` (its fail-equivalent length, ``mean = B_i (rho s_i + 1 - s_i)`` at success share
   ``s_i``): its own rollouts, shrunk toward a prior with ``k0`` pseudo-rollouts,
   ``B_i = (n_i own_i + k0 prior_i / mix) / (n_i + k0)``. ``k0`` is estimated (empirical Bayes, log scale): the
   per-rollout variance of a prompt's rows around its own mean over the spread of prompts around the prior, so
   prompts whose visits agree keep their own length (constant lengths are predicted exactly) and noisy ones lean
   on the prior; ``prior_strength`` fixes it instead.
3. **Each outcome's mean**: the prompt's own rollouts of that outcome, shrunk toward its scale with
   ``outcome_strength`` pseudo-rollouts: ``L_s = (tokens_s + k1 rho B_i) / (n_s + k1)``, ``L_f = (tokens_f + k1 B_i)
   / (n_f + k1)``; an outcome never seen is predicted from the prompt's other outcome, not from other prompts.

Rows are weighted by recency, ``2^(-age / half_life)`` with ``age`` the steps before the prompt's own latest row, so
a prompt whose length drifts as the policy learns is followed. ``follow_success`` additionally moves the scale with
the within-prompt slope of log length on success rate (helps with exact ``p``, hurts with a lagging predictor; off
by default).

``prior_i`` is a feature-based prediction of the prompt's mean tokens per rollout: ridge regression of
``log(mean tokens)`` of every prompt in the window on its embedding (the features the GP already uses), when
features are available; otherwise the window's mean of ``log(mean tokens)`` over prompts. Either is brought back
from the log scale with Duan's smearing factor ``mean(exp(residual))``, so the prior estimates a mean, not a
geometric mean (which would under-predict skewed lengths). ``mix = rho s + 1 - s`` (``s`` the window's success
share) turns it into a scale. A never-seen prompt gets the prior alone.

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

    ``prior_strength``: pseudo-rollouts of the prior in the prompt's scale (>= 0; None: estimated from the history,
    2 when it cannot be); ``ridge``: L2 penalty of the feature regression on log length (> 0); ``min_prompts``:
    prompts with lengths needed before the regression is trusted over the global mean; ``outcome_strength``:
    pseudo-rollouts of the prompt's scale in each outcome's mean (>= 0); ``half_life``: steps after which a row of
    the prompt counts half (> 0; None: no decay); ``follow_success``: move the scale with the prompt's success rate.
    """

    prior_strength: float | None = None
    ridge: float = 1.0
    min_prompts: int = 8
    max_fit_prompts: int = 1024  # the regression fits on at most this many prompts (the most recently seen)
    outcome_strength: float = 2.0
    half_life: float | None = 2.0
    follow_success: bool = False

    def __post_init__(self) -> None:
        if self.prior_strength is not None and not (np.isfinite(self.prior_strength) and self.prior_strength >= 0):
            raise ValueError(
                "prior_strength must be a number >= 0 or None (estimated from the history), "
                f"got {self.prior_strength!r}"
            )
        if not (np.isfinite(self.outcome_strength) and self.outcome_strength >= 0):
            raise ValueError(f"outcome_strength must be a number >= 0, got {self.outcome_strength!r}")
        if self.half_life is not None and not (np.isfinite(self.half_life) and self.half_life > 0):
            raise ValueError(f"half_life must be a number of steps > 0 or None (no decay), got {self.half_life!r}")
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
        row_step = np.asarray(rows["step"], np.int64)
        row_ts = np.asarray(rows["tokens_success"], np.float64)
        row_tf = np.asarray(rows["tokens_fail"], np.float64)
        row_ns = np.asarray(rows["token_rollouts_success"], np.float64)
        row_nf = np.asarray(rows["token_rollouts_fail"], np.float64)
        if not (row_ns + row_nf).any():
            return None
        # recency: a row counts 2^(-age / half_life), its age in steps before the prompt's own latest row
        wt = np.ones(pid.size)
        if self.half_life is not None and pid.size:
            last = np.full(n_prompts, np.iinfo(np.int64).min)
            np.maximum.at(last, pid, row_step)
            wt = np.exp2(-(last[pid] - row_step) / float(self.half_life))
        tok_s = np.bincount(pid, weights=wt * row_ts, minlength=n_prompts)
        tok_f = np.bincount(pid, weights=wt * row_tf, minlength=n_prompts)
        n_s = np.bincount(pid, weights=wt * row_ns, minlength=n_prompts)
        n_f = np.bincount(pid, weights=wt * row_nf, minlength=n_prompts)
        n_all = n_s + n_f
        seen = np.flatnonzero(n_all > 0)
        mean_len = (tok_s[seen] + tok_f[seen]) / n_all[seen]
        log_len = np.log(np.maximum(mean_len, 1.0))  # a 0-token rollout counts as 1 (log of 0 is -inf)
        rho = _outcome_ratio(tok_s, tok_f, n_s, n_f)
        # the window's success share s turns a prompt-mean prior into outcome means: L_s = rho L_f, and the mix
        # s L_s + (1 - s) L_f is the mean
        share = float(n_s.sum() / n_all.sum())
        mix = rho * share + (1.0 - share)
        global_log = float(log_len.mean())
        prior_log = np.full(len(p), global_log)
        # exp(E[log L]) is the geometric mean, below the mean that token costs need: Duan's smearing factor
        # mean(exp(residual)) turns a log-scale prediction back into a mean (here the arithmetic mean over prompts)
        resid = log_len - global_log
        fitted_seen = np.full(seen.size, global_log)
        if features is not None and batch_features is not None:
            fit = np.arange(seen.size)
            if seen.size > self.max_fit_prompts:  # the most recently seen prompts
                last_any = np.full(n_prompts, -1, np.int64)
                np.maximum.at(last_any, pid, row_step)
                fit = np.argsort(-last_any[seen], kind="stable")[: self.max_fit_prompts]
            x = np.asarray(features(seen[fit]), np.float64)
            usable = np.all(np.isfinite(x), axis=1)
            ok_b = np.all(np.isfinite(batch_features), axis=1)
            if usable.sum() >= self.min_prompts and ok_b.any():
                w, b = _ridge(x[usable], log_len[fit][usable], self.ridge)
                prior_log[ok_b] = batch_features[ok_b] @ w + b
                resid = log_len[fit][usable] - (x[usable] @ w + b)
                fitted_seen = np.full(seen.size, np.nan)
                fitted_seen[fit[usable]] = x[usable] @ w + b
        smear = float(np.mean(np.exp(resid)))
        prior = np.exp(prior_log) * smear
        at = np.asarray(at, np.int64)
        known = at >= 0
        ts, tf, ns, nf = (np.zeros(len(p)) for _ in range(4))
        ts[known], tf[known], ns[known], nf[known] = tok_s[at[known]], tok_f[at[known]], n_s[at[known]], n_f[at[known]]
        n = ns + nf
        k0 = self.prior_strength
        if k0 is None:  # empirical Bayes: within-prompt noise over between-prompt spread
            # from the raw rows: recency weights below 1 would understate the within-prompt noise
            raw_n = np.bincount(pid, weights=row_ns + row_nf, minlength=n_prompts)
            k0 = _shrinkage(
                pid, np.ones(pid.size), row_ts + row_tf, row_ns * rho + row_nf, seen, raw_n, log_len, fitted_seen
            )
        k1 = float(self.outcome_strength)
        if self.prior_strength is None:  # estimated: an outcome's mean is never trusted more than the scale
            k1 = max(k1, float(k0))
        # the prompt's scale: its fail-equivalent length B (mean = B (rho s_i + 1 - s_i)), shrunk toward the prior's
        pc = np.clip(np.asarray(p, np.float64), 0.0, 1.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            own_b = (ts + tf) / (ns * rho + nf)
            if self.follow_success:  # the prompt's rows were at success rate q_i; now it is predicted at p
                slope, q_mean = _success_slope(pid, wt, row_ts + row_tf, row_ns, row_nf, rho, n_prompts)
                q_i = np.where(known, q_mean[np.maximum(at, 0)], pc)
                own_b = own_b * np.exp(slope * (pc - np.where(np.isfinite(q_i), q_i, pc)))
            prior_b = prior / mix
            base = np.where(n > 0, (n * own_b + k0 * prior_b) / (n + k0), prior_b)
            base = np.where(np.isfinite(base), base, prior_b)
            # each outcome's mean: its own rollouts, shrunk toward the prompt's scale (so an outcome never seen is
            # predicted from the prompt's other outcome, not from the other prompts)
            l_s = np.where(ns + k1 > 0, (ts + k1 * rho * base) / (ns + k1), rho * base)
            l_f = np.where(nf + k1 > 0, (tf + k1 * base) / (nf + k1), base)
        l_s = np.maximum(np.where(np.isfinite(l_s), l_s, rho * base), 1.0)
        l_f = np.maximum(np.where(np.isfinite(l_f), l_f, base), 1.0)
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


def _outcome_ratio(tok_s: np.ndarray, tok_f: np.ndarray, n_s: np.ndarray, n_f: np.ndarray) -> float:
    """Success length over failure length WITHIN prompts: the weighted geometric mean of ``mean_s / mean_f`` over
    prompts with both outcomes (weights ``n_s n_f / (n_s + n_f)``); 1.0 when no prompt has both. Per-prompt arrays
    ``(P,)``. Comparing within prompts keeps "easy prompts are short" out of the outcome effect."""
    both = (n_s > 0) & (n_f > 0) & (tok_s > 0) & (tok_f > 0)
    if not both.any():
        return 1.0
    w = n_s[both] * n_f[both] / (n_s[both] + n_f[both])
    lr = np.log(tok_s[both] / n_s[both]) - np.log(tok_f[both] / n_f[both])
    return float(np.exp((w * lr).sum() / w.sum()))


def _success_slope(
    pid: np.ndarray,
    wt: np.ndarray,
    row_tok: np.ndarray,
    row_ns: np.ndarray,
    row_nf: np.ndarray,
    rho: float,
    n_prompts: int,
) -> tuple[float, np.ndarray]:
    """How a prompt's length moves with its success rate: the within-prompt slope of log fail-equivalent length
    (``tokens / (n_s rho + n_f)``) on the row's success rate ``q = n_s / (n_s + n_f)`` (rows weighted by ``wt`` x
    rollouts, corrected for the binomial noise of ``q``; 0 when no prompt has rows at two rates), and each prompt's
    weighted mean ``q`` (float64 ``(n_prompts,)``, NaN without lengths). Rows ``(R,)``."""
    n = row_ns + row_nf
    ok = (n > 0) & (wt > 0) & (row_tok > 0)
    q_mean = np.full(n_prompts, np.nan)
    if not ok.any():
        return 0.0, q_mean
    w = wt[ok] * n[ok]
    q = row_ns[ok] / n[ok]
    lb = np.log(row_tok[ok] / (row_ns[ok] * rho + row_nf[ok]))
    sw = np.bincount(pid[ok], weights=w, minlength=n_prompts)
    with np.errstate(invalid="ignore", divide="ignore"):
        q_mean = np.bincount(pid[ok], weights=w * q, minlength=n_prompts) / sw
        lb_mean = np.bincount(pid[ok], weights=w * lb, minlength=n_prompts) / sw
    dq = q - q_mean[pid[ok]]
    dl = lb - lb_mean[pid[ok]]
    sxx = float((w * dq * dq).sum())
    if sxx <= 1e-12:
        return 0.0, q_mean
    noise = float((w * q * (1 - q) / np.maximum(n[ok] - 1, 1)).sum())  # E[(q - p)^2] part of sxx
    denom = max(sxx - noise, 0.25 * sxx)
    return float((w * dq * dl).sum() / denom), q_mean


def _shrinkage(
    pid: np.ndarray,
    wt: np.ndarray,
    row_tok: np.ndarray,
    row_eq: np.ndarray,
    seen: np.ndarray,
    n_all: np.ndarray,
    log_len: np.ndarray,
    fitted: np.ndarray,
) -> float:
    """Empirical-Bayes pseudo-rollouts of the prior, ``sigma2 / tau2`` on the log scale (clipped to [0, 50]).

    ``sigma2``: per-rollout variance of log length within prompts, from the scatter of a prompt's rows (steps)
    around its mean (a row of ``n`` rollouts has variance ``sigma2 / n``); ``tau2``: the spread of the prompts'
    means around the prior (``fitted``, log scale, NaN where unknown) less their own noise. Rows: ``pid``, weights
    ``wt``, tokens ``row_tok`` and fail-equivalent rollouts ``row_eq`` (``(R,)``); prompts: ``seen`` indices with
    ``n_all`` weighted rollouts and ``log_len`` ``(S,)``. Falls back to 2 pseudo-rollouts when either is unknown."""
    fallback = 2.0
    ok = (row_eq > 0) & (wt > 0)
    if ok.sum() < 2:
        return fallback
    n_p = n_all.size
    eq = np.bincount(pid[ok], weights=wt[ok] * row_eq[ok], minlength=n_p)
    tk = np.bincount(pid[ok], weights=wt[ok] * row_tok[ok], minlength=n_p)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = np.log(np.maximum(tk / eq, 1.0))
    dev = np.log(np.maximum(row_tok[ok] / row_eq[ok], 1.0)) - centre[pid[ok]]
    rows_per = np.bincount(pid[ok], minlength=n_p)
    dof = float(np.maximum(rows_per - 1, 0).sum())
    if dof < 1:
        return fallback
    sigma2 = float((wt[ok] * row_eq[ok] * dev**2).sum() / dof)
    good = np.isfinite(fitted)
    if good.sum() < 3:
        return fallback
    spread = log_len[good] - fitted[good]
    tau2 = float(np.mean(spread**2) - np.mean(sigma2 / np.maximum(n_all[seen][good], 1e-9)))
    if tau2 <= 0:
        return 50.0
    return float(np.clip(sigma2 / tau2, 0.0, 50.0))


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """Ridge regression ``y ~ x w + b`` (intercept unpenalised): ``(w (d,), b)``."""
    mx, my = x.mean(axis=0), float(y.mean())
    xc = x - mx
    d = x.shape[1]
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(d), xc.T @ (y - my))
    return w, my - float(mx @ w)
