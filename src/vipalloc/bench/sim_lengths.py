"""Response lengths for the policy-gradient simulator (:mod:`vipalloc.bench.simulator`): what a rollout costs.

Model (documented in ``docs/benchmarks.md``, section "Token budgets")
-------------------------------------------------------------------
A rollout of prompt ``i`` with outcome ``r`` (1 success, 0 failure) under the current policy generates::

    L = round(L0 * s_i * (1 + a * (1 - p_i)) * (f if r == 0 else 1) * exp(eta * z - eta^2 / 2))   tokens, >= 1

* ``p_i``: the prompt's current true success probability, so hard prompts run long and a prompt shortens as the
  policy learns it (responses of solved problems are short in RLVR);
* ``s_i = exp(tau * u_i - tau^2 / 2)``, ``u_i ~ N(0, 1)`` fixed per prompt: some prompts need long answers
  whatever their difficulty;
* ``f``: failures are longer than successes (``fail_factor``);
* ``z ~ N(0, 1)`` per rollout: lognormal noise (``eta`` = ``noise``), mean 1 so ``L0`` keeps its meaning.

A rollout that reaches ``max_length`` is cut there and **counts as a failure** (its answer is never written, so a
verifier scores it 0, as TRL and verl do with a truncated completion): its reward is set to 0. The evaluation metric
(mean true ``p`` over the pool) is the policy's success probability without the cap, the same for every row.

Random numbers: the per-prompt factors come from their own generator (``[seed, 0x1E57]``), the per-rollout noise
from a generator the caller passes, drawn as a fixed ``(M, width)`` block whatever the counts (common random
numbers, as :meth:`Simulator.rollouts` does for rewards): the simulator's existing streams are untouched, so rows
without lengths give the same numbers as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from vipalloc.bench.simulator import Simulator

__all__ = ["SimLengthModel", "SampledLengths", "prompt_length_factors", "sample_lengths"]


@dataclass(frozen=True)
class SimLengthModel:
    """The simulator's model that draws response lengths (its parameters in tokens). Defaults: a 5x spread from
    easy successes (~256 tokens) to hard failures (~1.5k), a 2,048-token cap that cuts the long tail of hard
    prompts' failures."""

    base: float = 256.0  # L0: tokens of a success on a solved (p = 1) prompt with s_i = 1
    difficulty: float = 3.0  # a: a p = 0 prompt's rollouts are 1 + a times longer than a p = 1 prompt's
    fail_factor: float = 1.5  # f: a failure is f times longer than a success of the same prompt
    prompt_spread: float = 0.3  # tau: per-prompt lognormal factor
    noise: float = 0.3  # eta: per-rollout lognormal noise
    max_length: int = 2048  # the cap; a rollout reaching it is cut and scored 0

    def __post_init__(self) -> None:
        for name in ("base", "difficulty", "prompt_spread", "noise"):
            val = float(getattr(self, name))
            if not (np.isfinite(val) and val >= 0):
                raise ValueError(f"SimLengthModel.{name} must be a finite number >= 0, got {val!r}")
        if not self.base > 0:
            raise ValueError("SimLengthModel.base must be > 0")
        if not (np.isfinite(self.fail_factor) and self.fail_factor > 0):
            raise ValueError(f"SimLengthModel.fail_factor must be > 0, got {self.fail_factor!r}")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, (int, np.integer)):
            raise ValueError(f"SimLengthModel.max_length must be an integer, got {self.max_length!r}")
        if self.max_length < 1:
            raise ValueError(f"SimLengthModel.max_length must be >= 1, got {self.max_length}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SampledLengths:
    """One step's sampled lengths: per prompt, ``lengths`` (float64, whole tokens, ``(n_i,)``), ``rewards`` after
    the cap (a cut rollout scores 0) and ``cut`` (bool ``(n_i,)``)."""

    lengths: list[np.ndarray]
    rewards: list[np.ndarray]
    cut: list[np.ndarray]

    @property
    def tokens(self) -> float:
        """Generated tokens of the step (all prompts)."""
        return float(sum(float(x.sum()) for x in self.lengths))

    @property
    def frac_cut(self) -> float:
        """Share of the step's rollouts cut at the cap (NaN when none was generated)."""
        n = sum(x.size for x in self.cut)
        return float(sum(int(x.sum()) for x in self.cut) / n) if n else float("nan")


def prompt_length_factors(sim: Simulator, cfg: SimLengthModel) -> np.ndarray:
    """``s_i`` for every prompt of ``sim``'s pool (float64 ``(N,)``, mean 1), from the seed's own generator."""
    rng = np.random.default_rng([sim.seed, 0x1E57])
    tau = float(cfg.prompt_spread)
    return np.exp(tau * rng.standard_normal(sim.config.n_prompts) - 0.5 * tau * tau)


def expected_length(p: np.ndarray, factor: np.ndarray, cfg: SimLengthModel) -> np.ndarray:
    """Expected tokens per rollout before the cap, ``L0 s (1 + a (1 - p)) (p + (1 - p) f)``, float64 like ``p``."""
    p = np.asarray(p, np.float64)
    return cfg.base * factor * (1.0 + cfg.difficulty * (1.0 - p)) * (p + (1.0 - p) * cfg.fail_factor)


def sample_lengths(
    sim: Simulator,
    idx: Sequence[int] | np.ndarray,
    rewards: Sequence[np.ndarray],
    rng: np.random.Generator,
    cfg: SimLengthModel,
    factors: np.ndarray,
    width: int,
) -> SampledLengths:
    """Lengths of the rollouts ``rewards[i]`` (0/1, as :meth:`Simulator.rollouts` drew them) of prompts ``idx``.

    Draws one ``(len(idx), width)`` block of standard normals and uses the first ``len(rewards[i])`` of row ``i``
    (common random numbers). ``factors``: :func:`prompt_length_factors` of the pool.
    """
    idx_a = np.asarray(idx, np.int64)
    if len(rewards) != len(idx_a):
        raise ValueError(f"got {len(idx_a)} prompts but {len(rewards)} reward arrays")
    counts = np.array([len(r) for r in rewards], np.int64)
    if int(counts.max(initial=0)) > width:
        raise ValueError(f"width {width} is smaller than the largest group {int(counts.max())}")
    z = rng.standard_normal((len(idx_a), width))
    p = sim.true_p(idx_a)
    base = cfg.base * factors[idx_a] * (1.0 + cfg.difficulty * (1.0 - p))
    eta = float(cfg.noise)
    lens, rws, cuts = [], [], []
    for i, r in enumerate(rewards):
        r = np.asarray(r, np.float64)
        raw = base[i] * np.where(r > 0, 1.0, cfg.fail_factor) * np.exp(eta * z[i, : r.size] - 0.5 * eta * eta)
        raw = np.maximum(np.rint(raw), 1.0)
        cut = raw >= cfg.max_length
        lens.append(np.minimum(raw, float(cfg.max_length)))
        rws.append(np.where(cut, 0.0, r))
        cuts.append(cut)
    return SampledLengths(lens, rws, cuts)
