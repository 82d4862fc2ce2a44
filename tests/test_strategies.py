"""Every named strategy: valid plans, its defining rule, exact knapsack, fallbacks, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipalloc.allocation import objective, solve
from vipalloc.strategies import (
    HARDNESS_BONUS,
    STRATEGY_NAMES,
    balance_ties,
    get_strategy,
    knapsack_value,
    proportional_counts,
    tie_classes,
)

# Two-phase strategies are planned by Allocator.plan_pilot/plan_commit (tests/test_two_phase.py), not allocate().
SINGLE_PHASE = tuple(n for n in STRATEGY_NAMES if not getattr(get_strategy(n), "two_phase", False))


DROPPING = ("vip", "vip_authors")  # the strategies that may return 0, kept prompts at >= max(n_min, min_keep = 4)
DROPPING_AT_N_MIN = ("vip_error",)  # may return 0, kept prompts at >= n_min


def all_counts(m: int, n_min: int, n_max: int, budget: int) -> np.ndarray:
    grid = np.array(list(itertools.product(range(n_min, n_max + 1), repeat=m)))
    return grid[grid.sum(axis=1) == budget]


def test_names_and_interface() -> None:
    assert STRATEGY_NAMES[:7] == ("uniform", "vip", "vip_pure", "inverse_acc", "inverse_var", "knapsack", "gvm")
    assert {"vip_authors", "dynamo", "hora"} <= set(STRATEGY_NAMES)
    assert {"vip_two_phase", "pilot_commit"} <= set(STRATEGY_NAMES)  # two-phase: tests/test_two_phase.py
    for name in STRATEGY_NAMES:
        strategy = get_strategy(name, estimator="rloo")
        assert strategy.name == name and callable(strategy.allocate)
        assert strategy.__doc__ and ("arXiv" in strategy.__doc__ or name == "uniform")


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(SINGLE_PHASE),
    p=st.lists(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 0.5])), min_size=1, max_size=40),
    n_min=st.integers(2, 6),
    span=st.integers(0, 20),
    frac=st.floats(0, 1),
    estimator=st.sampled_from(["drgrpo", "rloo"]),
)
def test_valid_plan(name, p, n_min, span, frac, estimator) -> None:
    p = np.array(p)
    n_max = n_min + span
    m = len(p)
    budget = int(m * n_min + round(frac * m * (n_max - n_min)))
    counts = get_strategy(name, estimator=estimator).allocate(p, budget, n_min, n_max)
    assert counts.dtype == np.int64 and counts.shape == (m,)
    assert int(counts.sum()) == budget
    kept = counts[counts > 0]
    assert np.all(kept <= n_max)
    if name in DROPPING and np.any(counts == 0):  # drops only with kept prompts at >= max(n_min, min_keep)
        assert np.all(kept >= min(max(n_min, 4), n_max))
    elif name in DROPPING_AT_N_MIN:
        assert np.all(kept >= n_min)
    else:
        assert np.all(counts >= n_min)


def test_uniform_rule_and_vip_fallback() -> None:
    p = np.full(5, 0.3)
    for name in ("uniform", "vip", "vip_pure"):  # equal predictions (the first step): uniform
        assert get_strategy(name).allocate(p, 42, 2, 16).tolist() == [9, 9, 8, 8, 8]
    p[0] += 1e-7  # still no information (std < 1e-6)
    assert get_strategy("vip").allocate(p, 42, 2, 16).tolist() == [9, 9, 8, 8, 8]
    assert get_strategy("uniform").allocate(np.array([0.1, 0.9]), 7, 2, 8).tolist() == [4, 3]


def test_vip_behaviour() -> None:
    p = np.array([0.0, 0.02, 0.3, 0.5, 0.7, 0.98, 1.0, 0.5])
    counts = get_strategy("vip", estimator="rloo").allocate(p, 64, 2, 32)
    assert counts[6] == 0  # solved prompt dropped
    assert counts[3] >= 4 and counts[7] >= 4  # informative prompts kept
    assert counts[0] == counts.max()  # never-solved prompt explored: the authors' hardness bonus
    pure = get_strategy("vip_pure").allocate(p, 64, 2, 32)
    assert pure[3] == pure.max() and pure[0] == 2 and pure[6] == 2


@pytest.mark.parametrize("estimator", ["drgrpo", "rloo"])
def test_vip_two_stages_are_each_exact(estimator) -> None:
    rng = np.random.default_rng(0)
    p = rng.beta(0.6, 0.6, 200)
    gamma = HARDNESS_BONUS[estimator]
    counts = get_strategy("vip", estimator=estimator).allocate(p, 1600, 4, 32)
    stage1 = solve(p, 1600, n_min=2, n_max=32, estimator=estimator, hardness_bonus=gamma)
    kept = counts > 0
    assert np.array_equal(kept, stage1 >= 4)  # dropped exactly the prompts stage 1 gave fewer than 4
    stage2 = solve(p[kept], 1600, n_min=4, n_max=32, estimator=estimator, hardness_bonus=gamma)
    np.testing.assert_array_equal(counts[kept], stage2)
    # no drop: one exact solve with the bonus on [n_min, n_max]
    nodrop = get_strategy("vip", estimator=estimator, allow_drop=False).allocate(p, 1600, 4, 32)
    np.testing.assert_array_equal(nodrop, solve(p, 1600, estimator=estimator, hardness_bonus=gamma))


def test_vip_options() -> None:
    p = np.array([0.05, 0.5, 0.5, 0.97, 0.999, 0.3])
    c = get_strategy("vip", min_keep=6, hardness_bonus=0.0).allocate(p, 48, 2, 16)
    assert c.sum() == 48 and np.all((c == 0) | (c >= 6))
    with pytest.raises(ValueError, match="min_keep"):
        get_strategy("vip", min_keep=1)
    with pytest.raises(ValueError, match="hardness_bonus"):
        get_strategy("vip", hardness_bonus=float("nan"))


@settings(max_examples=60, deadline=None)
@given(
    p=st.lists(st.floats(0, 1), min_size=1, max_size=4),
    n_min=st.integers(2, 4),
    span=st.integers(0, 4),
    frac=st.floats(0, 1),
)
def test_linear_rules_are_exact(p, n_min, span, frac) -> None:
    p = np.array(p)
    n_max = n_min + span
    budget = int(len(p) * n_min + round(frac * len(p) * span))
    pc = np.clip(p, 1e-6, 1 - 1e-6)
    grid = all_counts(len(p), n_min, n_max, budget)
    for name, score in (("inverse_acc", np.log(pc)), ("inverse_var", np.log(pc * (1 - pc)))):
        got = get_strategy(name).allocate(p, budget, n_min, n_max)
        assert float(score @ got) <= float((grid @ score).min()) + 1e-9


def test_inverse_rules() -> None:
    p = np.array([0.1, 0.5, 0.9, 0.99])
    assert get_strategy("inverse_acc").allocate(p, 20, 2, 10).tolist() == [10, 6, 2, 2]
    assert get_strategy("inverse_var").allocate(p, 20, 2, 10).tolist() == [2, 2, 6, 10]


def test_knapsack_exact_vs_brute_force() -> None:
    rng = np.random.default_rng(5)
    for _ in range(80):
        m = int(rng.integers(1, 5))
        p = rng.random(m)
        p[rng.random(m) < 0.25] = rng.choice([0.0, 1.0])
        n_min, n_max = int(rng.integers(2, 4)), int(rng.integers(4, 9))
        budget = int(rng.integers(m * n_min, m * n_max + 1))
        got = get_strategy("knapsack").allocate(p, budget, n_min, n_max)
        assert got.sum() == budget and np.all((got >= n_min) & (got <= n_max))
        grid = all_counts(m, n_min, n_max, budget)
        best = knapsack_value(p[None, :], grid).sum(axis=1).max()
        assert knapsack_value(p, got).sum() >= best - 1e-12


def test_knapsack_zero_value_prompts() -> None:
    p = np.array([0.0, 1.0, 0.3, 0.0])
    low = get_strategy("knapsack").allocate(p, 20, 2, 32)  # the valuable prompt absorbs everything it can
    assert low.tolist() == [2, 2, 14, 2]
    high = get_strategy("knapsack").allocate(p, 41, 2, 16)  # p = 0.3 saturates: leftovers to p = 0, evenly
    assert high.tolist() == [12, 2, 16, 11]
    full = get_strategy("knapsack").allocate(p, 60, 2, 16)  # p = 0 prompts full: then the solved prompt
    assert full.tolist() == [16, 12, 16, 16]


def test_gvm_proportional() -> None:
    p = np.array([0.01, 0.25, 1.0])
    counts = get_strategy("gvm").allocate(p, 30, 2, 20)
    assert counts[0] > counts[1] > counts[2]
    w = 1 / np.sqrt(p + 1e-3 / p)
    assert np.all(np.abs(counts - 30 * w / w.sum()) < 1)


@settings(max_examples=100, deadline=None)
@given(
    w=st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=30),
    n_min=st.integers(2, 5),
    span=st.integers(0, 30),
    frac=st.floats(0, 1),
)
def test_proportional_counts_water_filling(w, n_min, span, frac) -> None:
    w = np.array(w)
    n_max = n_min + span
    budget = int(len(w) * n_min + round(frac * len(w) * span))
    counts = proportional_counts(w, budget, n_min, n_max)
    assert counts.sum() == budget and np.all((counts >= n_min) & (counts <= n_max))
    # the clipped proportional target, found independently by a fine scan of the scale
    scales = np.geomspace(1e-6, 1e9, 20001)
    sums = np.clip(scales[:, None] * w[None, :], n_min, n_max).sum(axis=1)
    s = scales[min(np.searchsorted(sums, budget), len(scales) - 1)]
    target = np.clip(s * w, n_min, n_max)
    assert np.all(np.abs(counts - target) < 1 + 1e-3 * (1 + target))
    order = np.argsort(w, kind="stable")
    assert np.all(np.diff(counts[order]) >= -1)  # more weight never means fewer rollouts (up to rounding)


def test_vip_beats_uniform_on_its_objective() -> None:
    rng = np.random.default_rng(1)
    p = rng.beta(0.6, 0.6, 256)
    pure = get_strategy("vip_pure", estimator="rloo").allocate(p, 2048, 4, 32)
    uniform = get_strategy("uniform").allocate(p, 2048, 4, 32)
    assert objective(p, pure, estimator="rloo") < 0.95 * objective(p, uniform, estimator="rloo")


def test_errors() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'x'.*uniform, vip, vip_pure"):
        get_strategy("x")
    with pytest.raises(ValueError, match="bad options"):
        get_strategy("uniform", foo=1)
    with pytest.raises(ValueError, match="for GRPO training allocate with 'drgrpo'"):
        get_strategy("vip", estimator="grpo")
    with pytest.raises(ValueError, match=r"infeasible.*\[4, 16\]"):
        get_strategy("uniform").allocate(np.array([0.5, 0.5]), 3, 2, 8)
    with pytest.raises(ValueError, match="empty batch"):
        get_strategy("vip").allocate(np.array([]), 0, 2, 8)
    with pytest.raises(ValueError, match="n_min must be an integer"):
        get_strategy("gvm").allocate(np.array([0.5]), 4, 2.0, 8)
    with pytest.raises(ValueError, match="2 <= n_min <= n_max"):
        get_strategy("knapsack").allocate(np.array([0.5]), 4, 1, 8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        get_strategy("inverse_acc").allocate(np.array([1.5]), 4, 2, 8)


# ---------------------------------------------------------------------------------------- ties (issue 13, item 1)
TIE_POOL = [0.0, 1.0, 1e-12, 1e-9, 5e-10, 1 - 1e-9, 0.5, 0.3, 0.02, 0.9]


def check_alike(name: str, p: np.ndarray, counts: np.ndarray, budget: int, n_min: int, n_max: int) -> None:
    """Equal predictions (equal after the clip to [1e-6, 1-1e-6]) are treated alike: counts within one, except a
    group split by dropping into zeros and kept members (within one, each >= the minimum) that could not keep one
    more member with its rollouts, or that the budget forced (the kept total at one of its bounds)."""
    classes = tie_classes(p)
    lo = min(max(n_min, 4), n_max)
    n_kept = int((counts > 0).sum())
    forced = n_kept in (-(-budget // n_max), min(len(p), budget // lo))
    for c in np.unique(classes):
        g = counts[classes == c]
        if g.max() - g.min() <= 1:
            continue
        assert name in DROPPING + DROPPING_AT_N_MIN and g.min() == 0, (name, p[classes == c], g)
        kept = g[g > 0]
        if name in DROPPING_AT_N_MIN:  # its objective may prefer fewer members with more rollouts, never uneven
            assert kept.max() - kept.min() <= 1 and kept.min() >= n_min, (name, g)
            continue
        assert kept.max() - kept.min() <= 1 and kept.min() >= lo, (name, g)
        assert forced or g.sum() < (len(kept) + 1) * lo, (name, g, budget)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(SINGLE_PHASE),
    p=st.lists(st.sampled_from(TIE_POOL), min_size=1, max_size=30),
    n_min=st.integers(2, 5),
    span=st.integers(0, 28),
    frac=st.floats(0, 1),
    estimator=st.sampled_from(["drgrpo", "rloo"]),
)
def test_equal_predictions_are_treated_alike(name, p, n_min, span, frac, estimator) -> None:
    p = np.array(p)
    n_max = n_min + span
    budget = int(len(p) * n_min + round(frac * len(p) * span))
    counts = get_strategy(name, estimator=estimator).allocate(p, budget, n_min, n_max)
    assert counts.sum() == budget
    check_alike(name, p, counts, budget, n_min, n_max)


def test_issue_examples_of_ties() -> None:
    p = np.array([0, 0, 0, 0, 0.5, 0.5, 1, 1.0])
    assert get_strategy("vip", estimator="drgrpo").allocate(p, 64, 4, 32).tolist() == [13, 13, 13, 13, 6, 6, 0, 0]
    assert get_strategy("vip_authors", estimator="drgrpo").allocate(p, 64, 4, 32).tolist() == [12] * 4 + [8, 8, 0, 0]
    rng = np.random.default_rng(0)  # 25 never-solved prompts at p in [1e-12, 1e-9]: one group
    q = np.r_[rng.uniform(1e-12, 1e-9, 25), rng.uniform(0, 1, 50)]
    for name in SINGLE_PHASE:
        for est in ("drgrpo", "rloo"):
            c = get_strategy(name, estimator=est).allocate(q, 600, 4, 32)
            assert c[:25].max() - c[:25].min() <= 1, (name, est, c[:25])
    # inverse_acc: the hardest group shares what it gets instead of one prompt taking n_max
    assert get_strategy("inverse_acc").allocate(np.array([0.0, 0.0, 0.5]), 30, 2, 32).tolist() == [14, 14, 2]


def test_balance_ties_keeps_exact_optimum() -> None:
    rng = np.random.default_rng(3)
    for _ in range(40):  # convex rows (n_min >= 3): the even split of equal prompts is an exact optimum
        m = int(rng.integers(2, 5))
        p = rng.choice([0.1, 0.5, 0.8], m)
        n_min, n_max = 3, int(rng.integers(3, 8))
        budget = int(rng.integers(m * n_min, m * n_max + 1))
        grid = all_counts(m, n_min, n_max, budget)
        best = min(objective(p, g, estimator="drgrpo") for g in grid)
        got = get_strategy("vip_pure").allocate(p, budget, n_min, n_max)
        assert objective(p, got, estimator="drgrpo") <= best + 1e-12
        assert balance_ties(got, tie_classes(p)).tolist() == got.tolist()


# ---------------------------------------------------------------------------------------- min_keep (item 3)
@pytest.mark.parametrize("name", DROPPING)
def test_min_keep_relaxation_is_flagged(name) -> None:
    strategy = get_strategy(name)
    p = np.array([0.1, 0.5, 0.9])
    # 6 rollouts, n_max = 4: no plan keeps every kept prompt at >= 4 (one prompt cannot take 6, two need 8)
    assert strategy.allocate(p, 6, 2, 4).tolist() == [2, 2, 2]
    assert strategy.last_min_keep_relaxed is True
    counts = strategy.allocate(p, 12, 2, 4)  # feasible again: the flag is cleared
    assert strategy.last_min_keep_relaxed is False and counts.sum() == 12 and np.all((counts == 0) | (counts >= 4))
    from vipalloc.allocator import Allocator

    ids = ["a", "b", "c"]
    alloc = Allocator(
        strategy=name, predictor="oracle", n_min=2, n_max=4, predictor_kwargs={"true_p": dict(zip(ids, p))}
    )
    plan = alloc.plan(ids, budget=6, step=0)
    assert plan.min_keep_relaxed is True and plan.metrics()["vip/min_keep_relaxed"] == 1.0
    assert alloc.plan(ids, budget=12, step=1).min_keep_relaxed is False


def test_every_single_phase_strategy_is_selectable_everywhere(tmp_path) -> None:
    """The trainer's config, the simulator's rows and the CLI accept every name (no stale whitelist)."""
    import json

    from typer.testing import CliRunner

    from vipalloc.bench.simulate import parse_rows
    from vipalloc.cli import app
    from vipalloc.history import RolloutHistory
    from vipalloc.training.config import STRATEGIES, TrainConfig

    for name in SINGLE_PHASE:
        assert name in STRATEGIES and TrainConfig(strategy=name).strategy == name
    rows = parse_rows(",".join(f"{name}:beta" for name in SINGLE_PHASE))
    assert [r.strategy for r in rows] == list(SINGLE_PHASE)
    hist = RolloutHistory()
    ids = [f"q{i}" for i in range(6)]
    rewards = [np.array([1.0, 0, 1, 0]), np.ones(4), np.zeros(4), np.array([1.0, 0, 0, 0]), np.ones(4), np.ones(4)]
    hist.extend(0, ids, rewards)
    hist.save(tmp_path / "hist.jsonl")
    (tmp_path / "batch.jsonl").write_text("".join(json.dumps({"prompt_id": i}) + "\n" for i in ids))
    for name in ("vip_authors", "dynamo", "hora"):
        out = tmp_path / f"{name}.jsonl"
        args = ["allocate", "--batch", str(tmp_path / "batch.jsonl"), "--history", str(tmp_path / "hist.jsonl")]
        args += ["--budget", "36", "--out", str(out), "--strategy", name, "--predictor", "beta", "--n-min", "2", "-q"]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, res.output
        counts = [json.loads(line)["n"] for line in out.read_text().splitlines()]
        assert sum(counts) == 36
        if name == "dynamo":  # the varied groups (q0, q3) get more than the constant ones
            assert min(counts[0], counts[3]) > max(counts[1], counts[2], counts[4], counts[5])
