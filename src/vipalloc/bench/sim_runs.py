"""What the simulator loops share (:mod:`vipalloc.bench.simulate` for single-phase rows,
:mod:`vipalloc.bench.two_phase_sim` for two-phase ones, :mod:`vipalloc.bench.token_sim` with response lengths):
one seed's world and its set-up (:class:`SimWorld`: argument checks, simulator, prompt stream, random streams,
allocators, the batch drawn each step), the row spec, one run's record (:class:`SimRun`), the per-step logs that
build it (:class:`StepLog`), and the reference variances of a step's plan.

Imports none of the loops, so they import it and not each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from vipalloc.bench.simulator import PromptStream, SimConfig, Simulator

__all__ = [
    "Draw",
    "RowSpec",
    "SimRun",
    "SimWorld",
    "StepLog",
    "alloc_estimator",
    "mean_telemetry",
    "reference_variances",
]

#: the random streams of a seed, one per purpose, the same for every row (common random numbers)
REWARDS, GRADIENT, DAPO_EXTRA, LENGTHS = 1, 2, 3, 4


class Draw(NamedTuple):
    """One step's batch: pool indices (int64 ``(M,)``), prompt ids and texts, and the TRUE success probabilities
    (float64 ``(M,)``)."""

    idx: np.ndarray
    ids: list[str]
    texts: list[str]
    p_true: np.ndarray


@dataclass
class SimWorld:
    """One seed's simulator world, as every row of the seed sees it: the simulator (its policy, trained by the
    row), the prompt stream (the same order for every row), the reward and gradient-noise streams, and the
    allocators' common options (``estimator``, ``n_min``, ``n_max``, ``seed``, ``embedder``).

    Build it with :meth:`build`, which checks the run's arguments once for every loop."""

    cfg: SimConfig
    seed: int
    sim: Simulator
    stream: PromptStream
    rng_r: np.random.Generator  # reward uniforms of the planned batch
    rng_g: np.random.Generator  # gradient noise
    alloc_kwargs: dict[str, Any]

    @classmethod
    def build(
        cls,
        cfg: SimConfig,
        seed: int,
        *,
        steps: int,
        draw: int,
        n_mean: int,
        n_min: int,
        n_max: int,
        embedder: str,
        draw_name: str = "batch",
    ) -> SimWorld:
        """The world of ``seed``, after checking ``2 <= n_min <= n_mean <= n_max``, ``steps >= 1`` and that a
        step's ``draw`` prompts (``draw_name`` in the message) fit in the pool. Raises ``ValueError`` naming the
        bad value."""
        if not (2 <= n_min <= n_mean <= n_max):
            raise ValueError(f"need 2 <= n_min <= n_mean <= n_max, got {n_min}, {n_mean}, {n_max}")
        if draw > cfg.n_prompts:
            raise ValueError(f"{draw_name} ({draw}) cannot exceed the pool size n_prompts ({cfg.n_prompts})")
        if steps < 1:
            raise ValueError("steps must be >= 1")
        return cls(
            cfg=cfg,
            seed=seed,
            sim=Simulator(cfg, seed),
            stream=PromptStream(cfg.n_prompts, seed),
            rng_r=cls.rng_for(seed, REWARDS),
            rng_g=cls.rng_for(seed, GRADIENT),
            alloc_kwargs={
                "estimator": alloc_estimator(cfg.estimator),
                "n_min": n_min,
                "n_max": n_max,
                "seed": seed,
                "embedder": embedder,
            },
        )

    @staticmethod
    def rng_for(seed: int, stream: int) -> np.random.Generator:
        """The seed's random stream number ``stream`` (:data:`REWARDS`, :data:`GRADIENT`, :data:`DAPO_EXTRA`,
        :data:`LENGTHS`)."""
        return np.random.default_rng([seed, stream])

    def allocator(self, strategy: str, predictor: str, **options: Any) -> Any:
        """An :class:`~vipalloc.Allocator` with the world's common options (``options``: e.g. strategy_kwargs)."""
        from vipalloc import Allocator

        return Allocator.from_settings(self.alloc_kwargs, strategy=strategy, predictor=predictor, **options)

    def shadows(self) -> tuple[Any, Any]:
        """The reference allocators of :func:`reference_variances`: ``uniform``, and ``vip_pure`` with the oracle p."""
        return self.allocator("uniform", "empirical"), self.allocator("vip_pure", "oracle")

    def draw(self, m: int, alloc: Any = None, predictor: str | None = None) -> Draw:
        """The next ``m`` prompts of the stream; an ``oracle`` row's allocator is told their true p."""
        idx = self.stream.next(m)
        ids = [self.sim.ids[i] for i in idx]
        p_true = self.sim.true_p(idx)
        if predictor == "oracle" and alloc is not None:
            alloc.predictor.set_true_p(ids, p_true)
        return Draw(idx, ids, [self.sim.texts[i] for i in idx], p_true)


@dataclass(frozen=True)
class RowSpec:
    """One league-table row: an allocation strategy with a predictor, or DAPO dynamic sampling (``dapo=True``:
    uniform groups, only mixed groups kept, extra batches until the batch is full or ``dapo_max_batches``)."""

    label: str
    strategy: str
    predictor: str
    dapo: bool = False


@dataclass
class SimRun:
    """One (row, seed) run. Curves have one entry per logged point (index 0 = before training); per-step arrays
    one entry per training step. Variances are the allocator estimator's model under the TRUE p, summed over the
    batch (NaN for DAPO, whose kept batch is chosen after seeing rewards)."""

    label: str
    seed: int
    sigma: float
    steps: np.ndarray  # int (T+1,)
    cum_rollouts: np.ndarray  # int (T+1,)
    success: np.ndarray  # float (T+1,), exact mean success over the pool
    var_plan: np.ndarray  # float (T,)
    var_uniform: np.ndarray  # float (T,), the uniform plan of the same batch
    var_oracle: np.ndarray  # float (T,), the exact min-variance plan under the true p (vip_pure + oracle p)
    zero_var_frac: np.ndarray  # float (T,), generated groups with all-equal rewards
    kept_frac: np.ndarray  # float (T,), planned prompts with at least one rollout
    alloc_seconds: np.ndarray  # float (T,), plan + observe wall time
    total_rollouts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def final_success(self) -> float:
        """Mean success at the end of the equal-rollout budget."""
        return float(self.success[-1])

    def auc(self) -> float:
        """Mean success averaged over the cumulative-rollout axis (area under the curve / total rollouts): a
        learning-speed summary that averages out the random walk of a single end point."""
        x = np.asarray(self.cum_rollouts, np.float64)
        if x[-1] <= 0:
            return float(self.success[-1])
        y = np.asarray(self.success, np.float64)
        return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) / x[-1])

    def reach(self, target: float) -> tuple[float, float]:
        """``(steps, cumulative rollouts)`` at which the mean success first reached ``target`` (NaN if never)."""
        hit = np.flatnonzero(self.success >= target)
        if not hit.size:
            return float("nan"), float("nan")
        k = int(hit[0])
        return float(self.steps[k]), float(self.cum_rollouts[k])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "seed": self.seed, "sigma": self.sigma}
        for k in (
            "steps",
            "cum_rollouts",
            "success",
            "var_plan",
            "var_uniform",
            "var_oracle",
            "zero_var_frac",
            "kept_frac",
            "alloc_seconds",
        ):
            out[k] = [None if not np.isfinite(v) else float(v) for v in np.asarray(getattr(self, k), float)]
        out["total_rollouts"] = self.total_rollouts
        out.update(self.extra)
        return out


def alloc_estimator(sim_estimator: str) -> str:
    """The allocator's estimator for a simulator training loss: GRPO is a valid loss but no allocation target, so
    its allocations use Dr.GRPO's variance."""
    return "rloo" if sim_estimator == "rloo" else "drgrpo"


def mean_telemetry(steps: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean over steps of each ``vip/*`` telemetry value (``Plan.metrics`` + ``Allocator.outcome_metrics``);
    NaN entries (e.g. no generated group) are left out of their key's mean."""
    keys = list(steps[0]) if steps else []
    out = {}
    for k in keys:
        vals = np.array([st[k] for st in steps], np.float64)
        out[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
    return out


@dataclass
class StepLog:
    """The per-step logs of one simulator run, appended step by step and turned into a :class:`SimRun` once.

    Curves (``steps``, ``cum``, ``success``) start with the point before training; the other lists get one entry
    per training step. ``telemetry`` holds each step's ``vip/*`` scalars (plan + outcome metrics).
    """

    steps: list[int]
    cum: list[int]
    success: list[float]
    var_plan: list[float] = field(default_factory=list)
    var_uniform: list[float] = field(default_factory=list)
    var_oracle: list[float] = field(default_factory=list)
    zero_var: list[float] = field(default_factory=list)
    kept_frac: list[float] = field(default_factory=list)
    alloc_seconds: list[float] = field(default_factory=list)
    telemetry: list[dict[str, float]] = field(default_factory=list)

    @classmethod
    def start(cls, success: float) -> StepLog:
        """A log whose curves hold the point before training (step 0, 0 rollouts, ``success``)."""
        return cls(steps=[0], cum=[0], success=[float(success)])

    def variances(self, plan: float, uniform: float, oracle: float) -> None:
        """The step's modelled variances under the true p (NaN where the trained groups are chosen after seeing
        rewards, e.g. DAPO or pilot_commit)."""
        self.var_plan.append(float(plan))
        self.var_uniform.append(float(uniform))
        self.var_oracle.append(float(oracle))

    def groups(self, generated: Sequence[np.ndarray], kept_frac: float) -> None:
        """The step's generated groups (non-empty reward arrays): the share whose rewards are all equal."""
        self.zero_var.append(float(np.mean([g.min() == g.max() for g in generated])) if generated else float("nan"))
        self.kept_frac.append(float(kept_frac))

    def point(self, step: int, cum: int, success: float) -> None:
        """The curves' point after a training step."""
        self.steps.append(step)
        self.cum.append(cum)
        self.success.append(float(success))

    def run(self, row: RowSpec, seed: int, sigma: float, estimator: str, total: int, **extra: Any) -> SimRun:
        """The finished :class:`SimRun`; ``extra`` entries follow the estimator and the mean telemetry."""
        return SimRun(
            label=row.label,
            seed=seed,
            sigma=sigma,
            steps=np.asarray(self.steps),
            cum_rollouts=np.asarray(self.cum),
            success=np.asarray(self.success),
            var_plan=np.asarray(self.var_plan),
            var_uniform=np.asarray(self.var_uniform),
            var_oracle=np.asarray(self.var_oracle),
            zero_var_frac=np.asarray(self.zero_var),
            kept_frac=np.asarray(self.kept_frac),
            alloc_seconds=np.asarray(self.alloc_seconds),
            total_rollouts=total,
            extra={"estimator": estimator, "telemetry": mean_telemetry(self.telemetry), **extra},
        )


def reference_variances(
    alloc: Any,
    shadow_uniform: Any,
    shadow_oracle: Any,
    ids: list[str],
    texts: list[str],
    budget: int,
    step: int,
    p_true: np.ndarray,
    groups: np.ndarray,
) -> tuple[float, float, float]:
    """Modelled variances under the TRUE p (``(M,)``) of a step's groups (int64 ``(M,)``), of the uniform plan and
    of the exact min-variance plan (the shadow allocators: ``uniform`` and ``vip_pure`` with oracle p)."""
    uni = shadow_uniform.plan(ids, prompts=texts, budget=budget, step=step).counts
    shadow_oracle.predictor.set_true_p(ids, p_true)
    orc = shadow_oracle.plan(ids, prompts=texts, budget=budget, step=step).counts
    return (
        alloc.expected_variance(p_true, groups),
        alloc.expected_variance(p_true, uni),
        alloc.expected_variance(p_true, orc),
    )
