"""The gradient-error model (vipalloc.gradient_error) against Monte Carlo, and the vip_error / coba strategies."""

from __future__ import annotations

import heapq
import itertools

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from vipalloc.gradient_error import (
    beta_moments,
    gradient_error,
    lost_signal,
    scaled_error,
    signal_terms,
)
from vipalloc.strategies import get_strategy
from vipalloc.strategies.base import P_CLIP, AllocationContext
from vipalloc.strategies.coba import coba_shape, coba_value

DIM = 6


def _simulate(p: float, std: float, n: int, estimator: str, rho: float, trials: int, seed: int):
    """Per-trial (g_hat, g) of one prompt under the module's score model, groups Bernoulli (std 0) or
    Beta-Binomial; written from the model, not from the module's formulas."""
    rng = np.random.default_rng(seed)
    if std > 0:
        nu = p * (1 - p) / std**2 - 1
        big_p = rng.beta(p * nu, (1 - p) * nu, trials)
    else:
        big_p = np.full(trials, p)
    delta = np.zeros(DIM)
    delta[0] = np.sqrt(rho)
    r = (rng.random((trials, n)) < big_p[:, None]).astype(float)
    eps = rng.normal(size=(trials, n, DIM)) / np.sqrt(DIM)  # E|eps|^2 = 1
    scores = (r - big_p[:, None])[:, :, None] * delta + eps
    base = r.mean(1, keepdims=True)
    adv = r - base if estimator == "drgrpo" else (r - base) * n / (n - 1)
    g_hat = (adv[:, :, None] * scores).mean(1)
    g = (big_p * (1 - big_p))[:, None] * delta
    return g_hat, g


CASES = [
    (0.3, 0.0, 4, 1.0),
    (0.05, 0.0, 8, 3.0),
    (0.5, 0.0, 2, 0.2),
    (0.3, 0.15, 4, 1.0),
    (0.02, 0.05, 6, 2.0),
    (0.7, 0.2, 3, 0.5),
]


@pytest.mark.parametrize("estimator", ["drgrpo", "rloo"])
@pytest.mark.parametrize(("p", "std", "n", "rho"), CASES)
def test_error_matches_monte_carlo(estimator: str, p: float, std: float, n: int, rho: float) -> None:
    g_hat, g = _simulate(p, std, n, estimator, rho, 120_000, seed=hash((p, std, n, rho, estimator)) % 2**32)
    err = ((g_hat - g) ** 2).sum(1)
    model = gradient_error([p], np.array([n]), estimator, signal_ratio=rho, p_std=[std])[0]
    se = err.std() / np.sqrt(len(err))
    assert abs(err.mean() - model) < 5 * se + 1e-9, (err.mean(), model, se)
    # the two terms separately: N = E[g . g_hat], D = E|g_hat|^2
    n_term, d_term = signal_terms([p], np.array([n]), estimator, signal_ratio=rho, p_std=[std])
    dot, sq = (g * g_hat).sum(1), (g_hat**2).sum(1)
    assert abs(dot.mean() - n_term[0]) < 5 * dot.std() / np.sqrt(len(dot)) + 1e-9
    assert abs(sq.mean() - d_term[0]) < 5 * sq.std() / np.sqrt(len(sq)) + 1e-9
    # a dropped prompt costs the signal it would have carried
    lost = ((g**2).sum(1)).mean()
    assert lost_signal([p], signal_ratio=rho, p_std=[std])[0] == pytest.approx(lost, rel=0.03, abs=1e-6)


def test_scaled_error_matches_monte_carlo_at_best_step_size() -> None:
    """min_c E|c G_hat - G|^2 over a batch, prompts' signals orthogonal (each prompt its own direction)."""
    ps, counts, stds, rho = [0.2, 0.5, 0.0, 0.8], [4, 6, 3, 2], [0.0, 0.1, 0.0, 0.05], 0.7
    sims = [
        _simulate(p, s, n, "drgrpo", rho, 80_000, seed=i) if n else None
        for i, (p, s, n) in enumerate(zip(ps, stds, counts, strict=True))
    ]
    # a prompt's own coordinates: concatenate per-prompt vectors (orthogonal signals)
    g_hat = np.concatenate([s[0] for s in sims if s is not None], axis=1)
    g = np.concatenate([s[1] for s in sims if s is not None], axis=1)
    c_best = (g * g_hat).sum(1).mean() / (g_hat**2).sum(1).mean()
    mc = ((c_best * g_hat - g) ** 2).sum(1).mean()
    model = scaled_error(ps, counts, "drgrpo", signal_ratio=rho, p_std=stds)
    assert model == pytest.approx(mc, rel=0.03)


def test_beta_moments_match_scipy_and_point_masses() -> None:
    mean, std = np.array([0.3, 0.02, 0.9]), np.array([0.1, 0.05, 0.05])
    got = beta_moments(mean, std)
    for i in range(3):
        nu = mean[i] * (1 - mean[i]) / std[i] ** 2 - 1
        dist = stats.beta(mean[i] * nu, (1 - mean[i]) * nu)
        assert got[i] == pytest.approx([dist.moment(r) for r in range(1, 5)], rel=1e-10)
    # exact 0 / 1 stay point masses whatever the std; std 0 is a point mass
    pm = beta_moments([0.0, 1.0, 0.4], [0.3, 0.3, 0.0])
    assert np.allclose(pm, [[0, 0, 0, 0], [1, 1, 1, 1], [0.4, 0.16, 0.064, 0.0256]])


def test_known_hopeless_prompt_carries_nothing() -> None:
    err = gradient_error([0.0, 1.0], np.array([[0, 2, 8, 32]] * 2), "drgrpo", signal_ratio=5.0)
    assert np.all(err == 0.0)
    n_term, d_term = signal_terms([0.0], np.array([[0, 4, 32]]), "rloo")
    assert np.all(n_term == 0) and np.all(d_term == 0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 1e9, "1", True])
def test_signal_ratio_refused_with_range(bad: object) -> None:
    with pytest.raises(ValueError, match=r"signal_ratio must be .*\[0\.0001, 10000\]"):
        gradient_error([0.5], np.array([4]), signal_ratio=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="signal_ratio"):
        get_strategy("vip_error", signal_ratio=bad)


def test_error_input_checks() -> None:
    with pytest.raises(ValueError, match="RLOO needs n >= 2"):
        gradient_error([0.5], np.array([1]), "rloo")
    with pytest.raises(ValueError, match="choose 'drgrpo' or 'rloo'"):
        gradient_error([0.5], np.array([4]), "grpo")
    with pytest.raises(ValueError, match="p_std"):
        beta_moments([0.5], [-0.1])


# ----------------------------------------------------------------------------------------------- vip_error
def _snr(p, counts, estimator, rho, std=None) -> float:
    """``N^2 / D`` of a plan under the library's tie rule: a prediction within ``P_CLIP`` (1e-6) of 0 or 1 counts as
    exactly 0 or 1, as the strategy's own tables do (hypothesis found p = 6e-8 beside p = 0: the strategy treats the
    two alike, an unsnapped oracle does not, by a relative 4e-7)."""
    p = np.asarray(p, np.float64)
    p = np.where(p < P_CLIP, 0.0, np.where(p > 1 - P_CLIP, 1.0, p))
    n_term, d_term = signal_terms(p, np.asarray(counts), estimator, signal_ratio=rho, p_std=std)
    return float(n_term.sum() ** 2 / d_term.sum()) if d_term.sum() > 0 else 0.0


@settings(max_examples=25, deadline=None)
@given(
    p=st.lists(st.floats(0, 1), min_size=2, max_size=5),
    per=st.integers(2, 5),
    rho=st.sampled_from([0.1, 1.0, 10.0]),
    estimator=st.sampled_from(["drgrpo", "rloo"]),
)
@example(p=[0.5, 5.960464477539063e-08, 0.0, 0.0], per=2, rho=0.1, estimator="drgrpo")  # found by CI
def test_vip_error_is_optimal_against_brute_force(p: list[float], per: int, rho: float, estimator: str) -> None:
    arr = np.array(p)
    if np.std(arr) < 1e-6:
        return  # uniform by rule
    n_min, n_max, budget = 2, 6, per * len(p)
    got = get_strategy("vip_error", estimator=estimator, signal_ratio=rho).allocate(arr, budget, n_min, n_max)
    assert got.sum() == budget and np.all((got == 0) | ((got >= n_min) & (got <= n_max)))
    best = max(
        _snr(arr, c, estimator, rho)
        for c in itertools.product([0, *range(n_min, n_max + 1)], repeat=len(p))
        if sum(c) == budget
    )
    assert _snr(arr, got, estimator, rho) >= best * (1 - 1e-9) - 1e-15


def test_vip_error_token_mode_is_optimal_against_brute_force() -> None:
    rng = np.random.default_rng(3)
    strat = get_strategy("vip_error", signal_ratio=1.0)
    for _ in range(15):
        p = rng.uniform(0, 1, 4)
        c = rng.uniform(5, 40, 4)
        t = float(rng.uniform(2 * c.sum(), 5 * c.sum()))
        got = strat.allocate_tokens(p, t, c, 2, 6)
        assert got.counts @ c <= t * (1 + 1e-12)
        best = max(
            _snr(p, cc, "drgrpo", 1.0)
            for cc in itertools.product([0, 2, 3, 4, 5, 6], repeat=4)
            if np.dot(cc, c) <= t and np.dot(cc, c) >= 2 * c.sum() * 0  # any feasible plan
        )
        assert _snr(p, got.counts, "drgrpo", 1.0) >= best * (1 - 1e-6)


def _realistic(rng: np.random.Generator, m: int = 256) -> np.ndarray:
    """The objective issue's batch: 25% p = 0, 15% in (0, 0.02), 10% in (0.97, 1), the rest Beta(2, 2)."""
    k0, k1, k2 = int(0.25 * m), int(0.15 * m), int(0.10 * m)
    return np.concatenate(
        [np.zeros(k0), rng.uniform(0, 0.02, k1), rng.uniform(0.97, 1, k2), rng.beta(2, 2, m - k0 - k1 - k2)]
    )


@pytest.mark.parametrize("estimator", ["drgrpo", "rloo"])
@pytest.mark.parametrize("per", [4, 8])
@pytest.mark.parametrize("n_min", [2, 4])  # the library default, and the issue's
def test_default_never_parks_rollouts_on_exact_hopeless_prompts(estimator: str, per: int, n_min: int) -> None:
    """The objective issue's 'done when', on realistic batches, for the library's default as users get it (an
    ``Allocator`` with no strategy named, exact p)."""
    from vipalloc.allocator import Allocator
    from vipalloc.defaults import DEFAULT_STRATEGY

    assert DEFAULT_STRATEGY == "vip_error"  # the strategy these properties were required of (issue 26)
    rng = np.random.default_rng(per)
    for _ in range(3):
        p = _realistic(rng)
        ids = [f"q{i}" for i in range(len(p))]
        alloc = Allocator(
            predictor="oracle", estimator=estimator, n_min=n_min, predictor_kwargs={"true_p": dict(zip(ids, p))}
        )
        assert alloc.strategy_name == DEFAULT_STRATEGY
        budget = per * len(p)
        counts = alloc.plan(ids, budget=budget, step=0).counts
        exact = (p == 0) | (p == 1)
        mid = (p >= 0.2) & (p <= 0.8)
        assert counts[exact].max() <= counts[mid].min() or counts[exact].max() == 0
        assert not (counts[mid] == 0).any() or counts[exact].sum() == 0
        inner = (p > 0) & (p < 1)
        assert counts[inner].sum() >= per * inner.sum()  # at least uniform's share
        # and it beats uniform on its own objective
        assert _snr(p, counts, estimator, 1.0) > _snr(p, np.full(len(p), per), estimator, 1.0)


def test_vip_error_uses_the_predictors_uncertainty() -> None:
    """A prompt predicted near 0 but uncertain keeps rollouts; the same mean, known, is dropped."""
    p = np.array([0.1, 0.85, 0.9, 0.95])
    strat = get_strategy("vip_error", signal_ratio=1.0)
    known = strat.allocate(p, 24, 2, 12, context=AllocationContext(p_std=np.array([0.0, 0.02, 0.02, 0.02])))
    unsure = strat.allocate(p, 24, 2, 12, context=AllocationContext(p_std=np.array([0.05, 0.02, 0.02, 0.02])))
    assert known[0] == 0 and unsure[0] > 0
    # a spread so wide that P is nearly 0 or 1 (a Beta at its largest variance) carries no signal either
    assert (
        get_strategy("vip_error").allocate(
            p, 24, 2, 12, context=AllocationContext(p_std=np.array([0.3, 0.02, 0.02, 0.02]))
        )[0]
        == 0
    )


def test_vip_error_uniform_without_information_and_options_checked() -> None:
    strat = get_strategy("vip_error")
    assert np.array_equal(strat.allocate(np.full(5, 0.3), 20, 2, 8), [4, 4, 4, 4, 4])
    with pytest.raises(ValueError, match="allow_drop must be True or False"):
        get_strategy("vip_error", allow_drop="yes")
    kept = get_strategy("vip_error", allow_drop=False).allocate(np.array([0, 0.5, 1, 0.3]), 16, 2, 8)
    assert kept.min() >= 2 and kept.sum() == 16


# ------------------------------------------------------------------------------------------------ CoBA-RL
def _coba_heap(p: np.ndarray, budget: int, n_low: int, tau: float, a: float, b: float, n_up: int) -> np.ndarray:
    """CoBA-RL's heap greedy on marginal value, written independently (ties: lower index first)."""
    n = np.full(len(p), n_low)
    heap = [(-(coba_value(p[i], n_low + 1, tau, a, b) - coba_value(p[i], n_low, tau, a, b)), i) for i in range(len(p))]
    heapq.heapify(heap)
    left = budget - n.sum()
    while left > 0 and heap:
        _, i = heapq.heappop(heap)
        n[i] += 1
        left -= 1
        if n[i] < n_up:
            gain = coba_value(p[i], n[i] + 1, tau, a, b) - coba_value(p[i], n[i], tau, a, b)
            heapq.heappush(heap, (-gain, i))
    return n


def test_coba_matches_heap_greedy_on_explored_prompts() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.06, 0.98, 40)
    counts = get_strategy("coba").allocate(p, 40 * 6, 2, 32)
    assert counts.sum() == 240 and counts.min() >= 2 and counts.max() <= 32
    spend = int((240 - 80) * 0.8)
    tau = 3 + 9 * min(np.var(p) / 0.1667, 1)
    a, b = coba_shape(1 - p.mean())
    greedy = _coba_heap(p, 80 + spend, 2, tau, a, b, 32)
    # the rest (240 - 80 - spend) is spread by weight 1 - p (floored), then evenly, the extras to the fewest first
    left = 240 - 80 - spend
    w = 1 - p
    extra = np.floor(left * w / w.sum()).astype(int)
    rem = left - extra.sum()
    fewest_first = np.argsort(greedy + extra, kind="stable")
    extra += rem // len(p)
    extra[fewest_first[: rem % len(p)]] += 1
    assert np.array_equal(counts, greedy + extra)


def test_coba_gives_hard_and_easy_prompts_only_leftovers() -> None:
    p = np.array([0.0, 0.01, 0.3, 0.5, 0.7, 0.995])
    counts = get_strategy("coba").allocate(p, 36, 2, 32)
    assert counts.sum() == 36
    assert counts[[3, 4]].min() > counts[5]  # explored prompts get the exploration budget
    assert counts[5] == 2  # easy: only what is left after hard and explored (here nothing)
    assert coba_shape(0.9) == pytest.approx((5.5, 1.5))
    assert coba_shape(0.2)[0] == pytest.approx(1 + 5 / (1 + np.exp(3)))
    with pytest.raises(ValueError, match="no token form"):
        get_strategy("coba").allocate_tokens(p, 1e4, np.full(6, 10.0), 2, 32)


# ------------------------------------------------------------------------------------------ Plan.error_ratio
def test_plan_error_ratio_counts_the_signal_a_plan_gives_up() -> None:
    """variance_ratio flatters drops; error_ratio does not: vip parks rollouts on p = 0 prompts (worse than
    uniform), vip_error beats uniform, on the objective issue's batch at 8 rollouts a prompt."""
    from vipalloc.allocator import Allocator
    from vipalloc.telemetry import PLAN_METRIC_NAMES

    p = _realistic(np.random.default_rng(11))
    ids = [f"q{i}" for i in range(len(p))]
    ratios = {}
    for name in ("uniform", "vip", "vip_error"):
        alloc = Allocator(strategy=name, predictor="oracle", n_min=4, n_max=32)
        alloc.predictor.set_true_p(ids, p)  # type: ignore[attr-defined]
        plan = alloc.plan(ids, budget=8 * len(p))
        assert plan.uniform_counts is not None and plan.uniform_counts.sum() == plan.counts.sum()
        ratios[name] = plan.error_ratio
        assert plan.metrics()["vip/expected_error_ratio_vs_uniform"] == pytest.approx(plan.error_ratio)
    assert "vip/expected_error_ratio_vs_uniform" in PLAN_METRIC_NAMES
    assert ratios["uniform"] == pytest.approx(1.0)
    assert ratios["vip"] > 1.0 > ratios["vip_error"]
    # a plan that keeps only hopeless prompts: no variance at all, the whole signal lost
    from vipalloc.plan import Plan

    q = np.array([0.0, 0.0, 0.5, 0.5])
    bad = Plan(["a", "b", "c", "d"], np.array([8, 8, 0, 0]), q, np.zeros(4), 16, 0, "x", "drgrpo", 0.0, 1.0)
    assert bad.variance_ratio == 0.0 and bad.error_ratio > 1.0


# ----------------------------------------------------------------------------------------- vip_error_two_phase
def test_error_commit_is_optimal_against_brute_force() -> None:
    """The commit maximises N^2 / D of the final groups under the posteriors (each a Beta-Binomial draw)."""
    from vipalloc.strategies.commit import beta_mean_std, beta_posterior, beta_prior, commit_domain

    rng = np.random.default_rng(5)
    strat = get_strategy("vip_error_two_phase")
    for _ in range(12):
        m, pilot_n, n_min, n_max = 4, 2, 2, 7
        mean, std = rng.uniform(0.02, 0.98, m), rng.uniform(0.02, 0.2, m)
        trials = np.full(m, pilot_n)
        succ = rng.integers(0, pilot_n + 1, m)
        budget = int(rng.integers(2, 12))
        dec = strat.commit(mean, std, trials, succ, trials, budget, n_min, n_max, pilot_n)
        assert dec.extra.sum() == budget
        a, b = beta_posterior(*beta_prior(mean, std), succ, trials)
        pm, ps = beta_mean_std(a, b)
        vals = commit_domain(pilot_n, n_min, n_max, allow_drop=True, min_keep=2)
        best = max(
            _snr(pm, trials + np.array(e), "drgrpo", 1.0, ps)
            for e in itertools.product(vals.tolist(), repeat=m)
            if sum(e) == budget
        )
        assert _snr(pm, trials + dec.extra, "drgrpo", 1.0, ps) >= best * (1 - 1e-9)


@pytest.mark.parametrize("budget", [40, 77, 90])  # the 6 informative prompts can absorb each (6 x 16 = 96)
def test_error_two_phase_cycle_spends_the_budget_and_skips_hopeless_prompts(budget: int) -> None:
    from vipalloc.allocator import Allocator

    ids = [f"q{i}" for i in range(10)]
    p = np.array([0.0, 0.0, 0.3, 0.5, 0.6, 1.0, 0.45, 0.2, 0.7, 0.0])
    rng = np.random.default_rng(budget)
    alloc = Allocator(strategy="vip_error_two_phase", predictor="oracle", n_min=2, n_max=16, seed=1)
    alloc.predictor.set_true_p(ids, p)  # type: ignore[attr-defined]
    pilot = alloc.plan_pilot(ids, budget=budget, step=0, pilot_n=2)
    exact = (p == 0) | (p == 1)
    assert np.all(pilot.counts[exact] == 0) and set(pilot.counts.tolist()) <= {0, 2}
    assert np.array_equal(pilot.counts == 0, alloc_single_drops(ids, p, budget))
    alloc.observe(ids, [(rng.uniform(size=int(c)) < q).astype(float) for c, q in zip(pilot.counts, p)], step=0)
    commit = alloc.plan_commit(step=0)
    assert int(pilot.counts.sum() + commit.counts.sum()) == budget
    assert np.all(commit.group_sizes[exact] == 0) and np.all(commit.group_sizes <= 16)
    assert commit.error_ratio <= 1.0 + 1e-9


def alloc_single_drops(ids: list[str], p: np.ndarray, budget: int) -> np.ndarray:
    """What single-phase vip_error drops on the same (exact) predictions: the pilot's skip rule."""
    from vipalloc.allocator import Allocator

    single = Allocator(strategy="vip_error", predictor="oracle", n_min=2, n_max=16, seed=1)
    single.predictor.set_true_p(ids, p)  # type: ignore[attr-defined]
    return single.plan(ids, budget=budget, step=0).dropped


def test_error_two_phase_token_commit_stays_within_the_tokens() -> None:
    strat = get_strategy("vip_error_two_phase")
    mean, std = np.array([0.3, 0.5, 0.05, 0.8]), np.full(4, 0.1)
    trials = np.full(4, 2)
    c = np.array([10.0, 30.0, 20.0, 15.0])
    dec = strat.commit_tokens(mean, std, trials, np.array([1, 1, 0, 2]), trials, 200.0, c, 2, 8, 2, None)
    assert float(dec.extra @ c) <= 200.0 * (1 + 1e-9) and np.all(trials + dec.extra <= 8)
    assert 0.0 <= dec.gap < 1e-3
