"""Per-prompt Beta-Bernoulli predictor with discount (MoPPS, arXiv 2507.04632)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from vipalloc.predictors.base import (
    BasePredictor,
    PromptTable,
    check_ids,
    check_observation,
    check_params,
    check_step,
    clean_std,
)

__all__ = ["BetaPredictor"]


class BetaPredictor(BasePredictor):
    """Independent ``Beta(alpha, beta)`` posterior per prompt; no sharing between prompts.

    When prompt ``i`` is observed with ``s`` successes of ``n`` rollouts at a new step::

        alpha_i <- lam * alpha_i + (1 - lam) * alpha0 + s
        beta_i  <- lam * beta_i  + (1 - lam) * beta0  + (n - s)

    as in MoPPS' ``PosteriorSampler.train`` (only observed prompts are updated; ``lam = 1`` never forgets, smaller
    ``lam`` tracks a policy that improves). Several ``observe`` calls for the same prompt and step, or a call for an
    older step than the prompt's latest, add their counts without discounting again (the discount is applied once
    per prompt per new step).

    ``predict`` returns the posterior mean ``alpha / (alpha + beta)`` and standard deviation
    ``sqrt(alpha beta / ((alpha + beta)^2 (alpha + beta + 1)))``; unseen prompts get the prior ``Beta(alpha0, beta0)``
    (mean 0.5 and std 0.289 for the default ``Beta(1, 1)``).
    """

    name = "beta"

    def __init__(self, alpha0: float = 1.0, beta0: float = 1.0, lam: float = 1.0) -> None:
        for key, val in (("alpha0", alpha0), ("beta0", beta0)):
            if not (isinstance(val, (int, float)) and np.isfinite(val) and val > 0):
                raise ValueError(f"{key} must be a finite number > 0, got {val!r}")
        if not (isinstance(lam, (int, float)) and 0.0 < lam <= 1.0):
            raise ValueError(f"lam (discount) must be in (0, 1], got {lam!r}; 1.0 keeps all evidence")
        self.alpha0, self.beta0, self.lam = float(alpha0), float(beta0), float(lam)
        self._table = PromptTable(("alpha", "beta"))

    def _params(self) -> dict[str, float]:
        return {"alpha0": self.alpha0, "beta0": self.beta0, "lam": self.lam}

    def observe(self, prompt_ids: Sequence[str], successes: np.ndarray, trials: np.ndarray, step: int) -> None:
        """Update the observed prompts' posteriors (duplicate ids in one call are aggregated)."""
        ids, s, t, step = check_observation(prompt_ids, successes, trials, step)
        tab = self._table
        idx = tab.slots(ids, {"alpha": self.alpha0, "beta": self.beta0})
        a, b = tab.data["alpha"], tab.data["beta"]
        fresh = tab.last_step[idx] < step  # discount once per prompt per new step
        lam = np.where(fresh, self.lam, 1.0)
        a[idx] = lam * a[idx] + np.where(fresh, (1.0 - self.lam) * self.alpha0, 0.0) + s
        b[idx] = lam * b[idx] + np.where(fresh, (1.0 - self.lam) * self.beta0, 0.0) + (t - s)
        tab.last_step[idx] = np.maximum(tab.last_step[idx], step)

    def predict(self, prompt_ids: Sequence[str], step: int) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and std per prompt; ``step`` is unused (the posterior does not move between updates)."""
        ids = check_ids(prompt_ids)
        check_step(step)
        cols, _ = self._table.gather(ids, {"alpha": self.alpha0, "beta": self.beta0})
        a, b = cols["alpha"], cols["beta"]
        tot = a + b
        mean = a / tot
        std = np.sqrt(a * b / (tot * tot * (tot + 1.0)))
        return np.clip(mean, 0.0, 1.0), clean_std(std)

    def state_dict(self) -> dict[str, Any]:
        return {"params": self._params(), **self._table.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_params(state, self._params(), "beta")
        self._table.load_state_dict(state)
