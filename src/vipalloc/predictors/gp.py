"""Gaussian-process success predictors over prompt embeddings (two presets of :class:`GPPredictor`).

``preset="paper"``: the VIP authors' final code (``src/vip/success_rate_prediction/gaussian_process.py``, class
``GPR`` with ``reuse_mean=True``), reproduced exactly:

* kernel ``k(x, x') = exp(-0.5 (|x - x'| / 0.4)^2)`` on Euclidean distances of unit-norm all-MiniLM-L6-v2 embeddings;
* at each step, targets ``y_T = logit(clip(rate_T, 1e-6, 1 - 1e-6))`` of the step's observed prompts ``T``;
* ``alpha = (K_TT + 1e-4 I)^-1 (y_T - mu_T)``, then ``mu <- mu + K_{:,T} alpha`` for every prompt and
  ``mu_T <- y_T`` (observed prompts pinned to their observed logit); ``mu`` starts at the prior ``-5``;
* ``p = sigmoid(mu)``.

The authors hold ``mu`` for all N training prompts (a precomputed N x N distance matrix). We hold it for every
registered prompt, and a prompt registered later gets exactly what the authors' all-N vector would hold: a
never-observed prompt's mean is ``prior + sum_t k(x, T_t) alpha_t``, so we keep ``A_j = sum_t alpha_{t,j}`` (the
summed coefficients of prompt ``j`` as a training point, an O(N) sufficient statistic) and set
``mu(x) = prior + sum_j k(x, x_j) A_j`` at registration. ``p_std`` maps the authors' posterior variance of the
latest update (``v = 1 - k_T (K_TT + 1e-4 I)^-1 k_T``, logit space, covariance reset every step) through the delta
method: ``p_std = p (1 - p) sqrt(v)``.

``preset="vipalloc"`` goes beyond the authors (details and the measured gains in ``docs/predictors.md``):

* latent logit ``f(x, t) = m + h(t) + g(x, t)`` with kernel
  ``k = s_g exp(-|dt| / tau_g) + (s_p exp(-|x - x'|^2 / (2 l^2)) + s_id [same prompt]) exp(-|dt| / tau_p)``:
  a policy-wide trend ``h`` (everyone improves), a semantic component shared by similar prompts, and a persistent
  prompt-specific component; ``dt`` is the step gap, so stale observations count less;
* one row per observed (prompt, step), binomial observation noise: ``y = logit(q)``, ``q = (s + 1/2) / (n + 1)``,
  noise variance ``1 / ((n + 1) q (1 - q)) + noise_floor`` (2 rollouts weigh less than 32);
* exact GP on the most recent ``max_points`` rows (the window; ``window_steps`` can shorten it); older rows of a
  predicted prompt still count: they are pooled into one summary observation (precision-weighted, noise inflated by
  the kernel's drift over the gap) and conditioned on exactly, per prompt, on top of the window posterior;
* constant mean ``m`` by generalised least squares (or a fixed ``prior_mean``);
* never-seen prompts get the posterior mean and variance at their embedding, and the probability is calibrated:
  ``p = E[sigmoid(f)] ~ sigmoid(mu / sqrt(1 + pi v / 8))``; ``p_std = p (1 - p) sqrt(v)`` (delta method);
* optional marginal-likelihood fitting of ``l, s_p, s_id, tau_p, s_g, tau_g`` (L-BFGS-B with analytic gradients,
  log-space bounds, warm-started, kept only if the likelihood improves), every ``fit_every`` new steps;
* robust numerics: Cholesky with escalating jitter; if that fails, a logged fallback to per-prompt smoothed rates.
  Predictions are always finite and in ``[0, 1]``.

The code: this module holds the presets' parameters, their validation and the :class:`GPPredictor` facade; the
paper preset is :mod:`vipalloc.predictors.gp_paper`, the vipalloc preset (window, history archive, Laplace fit)
:mod:`vipalloc.predictors.gp_window`, and the shared kernel numerics and hyper-parameter fitting
:mod:`vipalloc.predictors.gp_kernel`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vipalloc.predictors.base import FeatureStore, check_features, check_ids, check_observation, check_step
from vipalloc.predictors.gp_kernel import GPNumericsWarning
from vipalloc.predictors.gp_paper import PaperGP
from vipalloc.predictors.gp_window import WindowGP

__all__ = ["DEFAULT_PRESET", "GPPredictor", "PRESETS", "GPNumericsWarning"]

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"length_scale": 0.4, "noise": 1e-4, "prior_mean": -5.0},
    "vipalloc": {
        "length_scale": 0.7,  # embedding RBF length-scale (unit-norm embeddings: distances in [0, 2])
        "signal_var": 1.0,  # s_p: variance of the semantic (similar prompts) component, logit^2
        "prompt_var": 1.0,  # s_id: variance of the prompt-specific component
        "time_scale": 200.0,  # tau_p: steps over which a prompt's own difficulty decorrelates
        "global_var": 1.0,  # s_g: variance of the policy-wide trend h(t); 0 disables it
        "global_time_scale": 30.0,  # tau_g: steps over which the trend decorrelates
        "noise_floor": 0.01,  # added to every binomial noise variance (model error), logit^2
        "prior_mean": None,  # None: constant mean by GLS; a float fixes it (logit)
        "max_points": 1024,  # rows in the exact GP (most recent (prompt, step) rows); cost ~ max_points^2 x M
        "window_steps": 0,  # >0: only rows from the last `window_steps` observed steps enter the window
        "own_history": True,  # condition each predicted prompt on its own rows older than the window
        "calibrate": False,  # True: p = E[sigmoid(f)] (probit approximation) instead of sigmoid(E[f])
        "likelihood": "laplace",  # binomial likelihood (Laplace, Newton) or "gaussian" smoothed-logit targets
        "newton_iters": 1,  # Newton steps per Laplace fit when warm-started from the previous mode
        "fit_every": 0,  # >0: refit hyper-parameters by marginal likelihood every k new steps
        "fit_points": 512,  # rows used by a hyper-parameter fit (most recent)
        "max_history": 200_000,  # rows kept in memory/state (oldest steps dropped beyond this)
    },
}
DEFAULT_PRESET = "vipalloc"


def _check_params(preset: str, params: dict[str, Any]) -> None:
    for key, val in params.items():
        if key in ("max_points", "fit_every", "fit_points", "max_history", "window_steps"):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {val!r}")
            if key in ("max_points", "max_history", "fit_points") and val < 1:
                raise ValueError(f"{key} must be >= 1, got {val!r}")
        elif key == "likelihood":
            if val not in ("laplace", "gaussian"):
                raise ValueError(f"likelihood must be 'laplace' or 'gaussian', got {val!r}")
        elif key == "newton_iters":
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < 1:
                raise ValueError(f"newton_iters must be an integer >= 1, got {val!r}")
        elif key in ("own_history", "calibrate"):
            if not isinstance(val, bool):
                raise ValueError(f"{key} must be True or False, got {val!r}")
        elif key == "prior_mean":
            if val is None and preset == "vipalloc":
                continue
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not np.isfinite(val):
                raise ValueError(f"prior_mean must be a finite number (logit){' or None' * (preset == 'vipalloc')}")
        elif key in ("signal_var", "prompt_var", "global_var", "noise_floor"):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not (np.isfinite(val) and val >= 0):
                raise ValueError(f"{key} must be a finite number >= 0, got {val!r}")
        elif isinstance(val, bool) or not isinstance(val, (int, float)) or not (np.isfinite(val) and val > 0):
            raise ValueError(f"{key} must be a finite number > 0, got {val!r}")
    if preset == "vipalloc":
        if params["signal_var"] + params["prompt_var"] + params["global_var"] <= 0:
            raise ValueError("at least one of signal_var, prompt_var, global_var must be > 0")
        if params["max_history"] < params["max_points"]:
            raise ValueError("max_history must be >= max_points (the window is drawn from the kept history)")


class GPPredictor:
    """Gaussian-process success predictor over prompt embeddings (see the module docstring for both presets).

    Parameters
    ----------
    preset:
        ``"paper"`` (the authors' code, exactly) or ``"vipalloc"`` (ours, the default).
    **overrides:
        Any key of ``PRESETS[preset]`` (e.g. ``GPPredictor("vipalloc", max_points=1024, fit_every=10)``).

    Features (``set_features``) must be registered for every prompt before it is observed or predicted; with the
    :class:`~vipalloc.allocator.Allocator` this happens automatically from the prompt texts.
    """

    name = "gp"
    needs_features = True

    def __init__(self, preset: str = DEFAULT_PRESET, **overrides: Any) -> None:
        if preset not in PRESETS:
            raise ValueError(f"unknown GP preset {preset!r}; choose one of: {', '.join(PRESETS)}")
        params = dict(PRESETS[preset])
        unknown = sorted(set(overrides) - set(params))
        if unknown:
            raise ValueError(f"unknown options for GP preset {preset!r}: {unknown}; valid: {sorted(params)}")
        params.update(overrides)
        _check_params(preset, params)
        self.preset = preset
        self.params = params
        self._feats = FeatureStore()
        self._engine: PaperGP | WindowGP = (
            PaperGP(params, self._feats) if preset == "paper" else WindowGP(params, self._feats)
        )

    def set_features(self, prompt_ids: Sequence[str], features: np.ndarray) -> None:
        """Register prompt embeddings ``(N, d)`` (unit-norm rows expected: the length-scales assume it).

        Known prompts must come with the same features (checked to 1e-6); new ones are appended.
        """
        ids, x = check_features(prompt_ids, features)
        new_ids, new_x = self._feats.new_rows(ids, x)
        if not new_ids:
            return
        rows = self._feats.add(new_ids, new_x)
        if isinstance(self._engine, PaperGP):
            self._engine.register(rows)
        # (the window GP's cached factorisation depends only on observed prompts: new features leave it valid)

    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None:
        """Record one step's per-prompt outcomes (duplicate ids aggregated; several calls for one step merged).

        ``paper``: consecutive calls for the same step are refitted together (the authors fit once per step);
        a call for another step is a new update; prompts already observed at a newer step are skipped.
        ``vipalloc``: one row per (prompt, step), counts added across calls; order does not matter.
        """
        ids, s, t, step = check_observation(prompt_ids, successes, trials, step)
        idx = self._feats.lookup(ids, "gp")
        if not len(idx):
            return
        self._engine.observe(idx, s, t, step)
        eng = self._engine
        if isinstance(eng, WindowGP) and self.params["fit_every"] and eng.steps_since_fit >= self.params["fit_every"]:
            eng.fit_hyperparameters(int(self.params["fit_points"]))

    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]:
        """``(p_mean, p_std)`` float64 ``(M,)`` for the prompts at training ``step`` (the step being planned)."""
        ids = check_ids(prompt_ids)
        step = check_step(step)
        idx = self._feats.lookup(ids, "gp")
        if not len(idx):
            return np.zeros(0), np.zeros(0)
        if isinstance(self._engine, PaperGP):
            return self._engine.predict(idx)
        return self._engine.predict(idx, step)

    def fit_hyperparameters(self, max_points: int | None = None, maxiter: int = 50) -> dict[str, float]:
        """Refit ``length_scale, signal_var, prompt_var, time_scale, global_var, global_time_scale`` (components
        set to 0 stay off) by maximising the log marginal likelihood of the most recent ``max_points`` window rows
        (default ``fit_points``); the constant mean is profiled out (GLS). Bounded in log space, warm-started at the
        current values, and kept only if the likelihood improves. Returns the (possibly unchanged) values.
        """
        if not isinstance(self._engine, WindowGP):
            raise ValueError("hyper-parameter fitting applies to preset='vipalloc' only (the paper fixes them)")
        n = int(self.params["fit_points"] if max_points is None else max_points)
        if n < 8:
            raise ValueError(f"max_points must be >= 8 for a hyper-parameter fit, got {n}")
        return self._engine.fit_hyperparameters(n, maxiter)

    def state_dict(self) -> dict[str, Any]:
        """Preset, parameters (fitted values included), features and observations: enough to predict identically."""
        return {
            "preset": self.preset,
            "params": dict(self.params),
            "features": self._feats.state_dict(),
            "engine": self._engine.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the preset must match; fitted hyper-parameters are restored too)."""
        if state.get("preset") != self.preset:
            raise ValueError(
                f"GP state has preset {state.get('preset')!r}, this predictor {self.preset!r}; "
                f"construct GPPredictor(preset={state.get('preset')!r})"
            )
        params = dict(state["params"])
        if set(params) != set(PRESETS[self.preset]):
            raise ValueError(f"GP state parameters {sorted(params)} do not match preset {self.preset!r}")
        _check_params(self.preset, params)
        feats = FeatureStore()
        feats.load_state_dict(state["features"])
        engine: PaperGP | WindowGP = PaperGP(params, feats) if self.preset == "paper" else WindowGP(params, feats)
        engine.load_state_dict(state["engine"])
        self.params, self._feats, self._engine = params, feats, engine
