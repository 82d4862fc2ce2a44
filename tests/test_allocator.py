"""The Allocator facade: plan/observe semantics, bad input, exact save/load, determinism."""

from __future__ import annotations

import numpy as np
import pytest

from vipalloc import Allocator
from vipalloc._io import StateFileError
from vipalloc.allocator import VERSION

IDS = [f"q{i}" for i in range(12)]
TEXTS = [f"What is {i} + {2 * i}?" for i in range(12)]


def run_steps(alloc: Allocator, steps: int, rng: np.random.Generator, true_p: np.ndarray, budget: int = 96):
    plans = []
    for step in range(steps):
        plan = alloc.plan(IDS, prompts=TEXTS, budget=budget, step=step)
        rewards = [rng.binomial(1, p, size=n).astype(float) for p, n in zip(true_p, plan.counts)]
        alloc.observe(IDS, rewards, step=step)
        plans.append(plan)
    return plans


@pytest.fixture
def true_p() -> np.ndarray:
    return np.linspace(0.02, 0.98, len(IDS))


@pytest.mark.parametrize("strategy", ["uniform", "vip", "vip_pure", "inverse_acc", "inverse_var", "knapsack", "gvm"])
@pytest.mark.parametrize("predictor", ["gp", "beta", "empirical", "ridge"])
def test_every_strategy_and_predictor_respects_budget(strategy, predictor, true_p) -> None:
    alloc = Allocator(strategy=strategy, predictor=predictor, embedder="hashing", n_min=2, n_max=16)
    plans = run_steps(alloc, 3, np.random.default_rng(0), true_p)
    for plan in plans:
        assert plan.counts.dtype == np.int64
        assert int(plan.counts.sum()) == 96
        kept = plan.counts[plan.counts > 0]
        assert kept.min() >= 2 and kept.max() <= 16
        assert np.all((plan.p_mean >= 0) & (plan.p_mean <= 1)) and np.all(np.isfinite(plan.p_std))
        assert plan.expected_variance >= 0 and plan.uniform_variance >= 0
        assert set(plan.kept_ids) == {pid for pid, c in zip(IDS, plan.counts) if c > 0}
    assert len(alloc.history) > 0


def test_first_step_is_uniform_then_vip_adapts(true_p) -> None:
    alloc = Allocator(strategy="vip", predictor="beta", n_min=4, n_max=32)
    plans = run_steps(alloc, 6, np.random.default_rng(1), true_p)
    assert sorted(plans[0].counts.tolist()) == [8] * 12  # no information yet: uniform
    assert len(set(plans[-1].counts.tolist())) > 1  # adapted
    # The objective the solver minimised is never worse than uniform under the predicted p.
    assert plans[-1].expected_variance <= plans[-1].uniform_variance + 1e-12 or plans[-1].dropped.any()


def test_vip_pure_beats_uniform_in_expected_variance(true_p) -> None:
    alloc = Allocator(strategy="vip_pure", predictor="oracle", n_min=2, n_max=32)
    alloc.predictor.set_true_p(IDS, true_p)
    plan = alloc.plan(IDS, prompts=TEXTS, budget=96, step=0)
    assert plan.expected_variance < plan.uniform_variance
    assert plan.variance_ratio < 1.0
    # The extreme prompts (p ~ 0, p ~ 1) get the fewest rollouts, mid prompts the most.
    mid = np.argmin(np.abs(true_p - 0.5))
    assert plan.counts[mid] > plan.counts[0] and plan.counts[mid] > plan.counts[-1]


def test_save_load_exact_and_deterministic(tmp_path, true_p) -> None:
    a = Allocator(strategy="vip", predictor="gp", embedder="hashing", seed=3)
    run_steps(a, 4, np.random.default_rng(2), true_p)
    path = tmp_path / "alloc.json"
    a.save(path)
    b = Allocator.load(path)
    pa = a.plan(IDS, prompts=TEXTS, budget=96, step=4)
    pb = b.plan(IDS, prompts=TEXTS, budget=96, step=4)
    np.testing.assert_array_equal(pa.counts, pb.counts)
    np.testing.assert_array_equal(pa.p_mean, pb.p_mean)  # bit-identical
    np.testing.assert_array_equal(pa.p_std, pb.p_std)
    # Same seed, same inputs -> same plans from a fresh allocator.
    c = Allocator(strategy="vip", predictor="gp", embedder="hashing", seed=3)
    run_steps(c, 4, np.random.default_rng(2), true_p)
    pc = c.plan(IDS, prompts=TEXTS, budget=96, step=4)
    np.testing.assert_array_equal(pa.counts, pc.counts)
    np.testing.assert_array_equal(pa.p_mean, pc.p_mean)
    # An outstanding plan survives save/load: observe works on the loaded copy.
    b.save(path)
    d = Allocator.load(path)
    d.observe(IDS, [np.ones(n) for n in pb.counts], step=4)


def test_uniform_remainder_is_seeded_not_first_prompts() -> None:
    alloc = Allocator(strategy="uniform", predictor="beta", n_min=2, n_max=8, seed=0)
    got = {tuple(alloc.plan(IDS, budget=12 * 4 + 5, step=s).counts.tolist()) for s in range(6)}
    assert all(sum(c) == 53 for c in got)
    assert len(got) > 1  # the +1 remainder moves between prompts across steps


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"estimator": "grpo"}, "not monotone"),
        ({"n_min": 1}, "n_min must be an integer >= 2"),
        ({"n_min": 9, "n_max": 8}, "n_min"),
        ({"strategy": "nope"}, "nope"),
        ({"predictor": "nope"}, "nope"),
    ],
)
def test_bad_configuration(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        Allocator(**kwargs)


def test_bad_plan_inputs() -> None:
    alloc = Allocator(strategy="vip", predictor="beta", n_min=4, n_max=8)
    with pytest.raises(ValueError, match="empty batch"):
        alloc.plan([], budget=0)
    with pytest.raises(ValueError, match="duplicate prompt ids"):
        alloc.plan(["a", "b", "a"], budget=24)
    with pytest.raises(ValueError, match="budget is required"):
        alloc.plan(["a"])
    with pytest.raises(ValueError, match="at most 16"):
        alloc.plan(["a", "b"], budget=17)
    with pytest.raises(ValueError, match="budget must be an integer"):
        alloc.plan(["a", "b"], budget=10.5)
    with pytest.raises(ValueError, match=">= 0"):
        alloc.plan(["a", "b"], budget=-1)
    with pytest.raises(ValueError, match=r"budget 0 is infeasible .* feasible budgets lie in \[8, 16\]"):
        alloc.plan(["a", "b"], budget=0)  # a step with no budget left after failures: skip the step, not a plan
    gp = Allocator(predictor="gp", embedder="hashing")
    with pytest.raises(ValueError, match="pass prompts="):
        gp.plan(["a", "b"], budget=16)


def test_bad_observe_inputs_record_nothing() -> None:
    alloc = Allocator(strategy="uniform", predictor="beta", n_min=2, n_max=8)
    alloc.plan(["a", "b"], budget=8, step=0)
    before = alloc.predictor.predict(["a", "b"], 1)
    cases = [
        ((["a", "zzz"], [[1, 0], [1]], 0), "not planned at step 0"),
        ((["a", "b"], [[1, 0], [1, float("nan")]], 0), "NaN"),
        ((["a", "b"], [[1, 0], [3]], 0), "outside"),
        ((["a", "b"], [[1, 0, 1, 1, 1], [1]], 0), "had 4 rollouts"),
        ((["a"], [[1], [1]], 0), "one array per prompt"),
        ((["a"], [[1]], 5), "no plan was made at step 5"),
    ]
    for (ids, rewards, step), match in cases:
        with pytest.raises(ValueError, match=match):
            alloc.observe(ids, rewards, step=step)
        assert len(alloc.history) == 0
    after = alloc.predictor.predict(["a", "b"], 1)
    np.testing.assert_array_equal(before[0], after[0])
    # Fewer rewards than planned (failed generations) are accepted and counted as they are.
    alloc.observe(["a", "b"], [[1, 0, 1], []], step=0)
    agg = alloc.history.aggregates()
    assert agg.prompt_ids == ["a"] and agg.trials.tolist() == [3] and agg.successes.tolist() == [2]
    with pytest.raises(ValueError, match="not planned"):  # a prompt is observed once per plan
        alloc.observe(["a"], [[1]], step=0)


def test_dropped_prompt_cannot_receive_rewards() -> None:
    alloc = Allocator(strategy="vip", predictor="oracle", n_min=4, n_max=8)
    ids = ["easy", "mid1", "mid2", "mid3"]
    alloc.predictor.set_true_p(ids, np.array([0.999999, 0.5, 0.5, 0.45]))
    plan = alloc.plan(ids, budget=24, step=0)
    assert plan.dropped.any()
    dropped = [pid for pid, d in zip(ids, plan.dropped) if d][0]
    with pytest.raises(ValueError, match="had 0 rollouts"):
        alloc.observe([dropped], [[1]], step=0)
    alloc.observe([dropped], [[]], step=0)  # empty is fine


def test_load_rejects_damaged_files(tmp_path) -> None:
    alloc = Allocator(predictor="beta")
    path = tmp_path / "a.json"
    alloc.save(path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(StateFileError, match="corrupt or truncated"):
        Allocator.load(path)
    path.write_text(text.replace('"n_max":32', '"n_max":31'))
    with pytest.raises(StateFileError, match="checksum"):
        Allocator.load(path)
    path.write_text(text.replace(f'"version":{VERSION}', '"version":7'))
    with pytest.raises(StateFileError, match="newer vipalloc"):
        Allocator.load(path)
    with pytest.raises(StateFileError, match="no such state file"):
        Allocator.load(tmp_path / "missing.json")


def test_ingest_history_replays_into_predictor(tmp_path) -> None:
    from vipalloc.history import RolloutHistory

    h = RolloutHistory()
    h.extend(0, ["a", "b"], [[1, 1, 1, 1], [0, 0, 0, 0]], prompts=["1+1", "99*99"])
    h.extend(1, ["a", "b"], [[1, 1, 1, 0], [0, 0, 0, 1]])
    alloc = Allocator(strategy="vip", predictor="beta", n_min=2, n_max=8)
    alloc.ingest_history(h)
    assert len(alloc.history) == 4
    plan = alloc.plan(["a", "b"], budget=8)
    assert plan.step == 2
    assert plan.p_mean[0] > plan.p_mean[1]


def test_from_settings_reads_attributes_or_mappings_with_renames() -> None:
    """The one config-to-Allocator constructor: parameter names read from any settings object or mapping,
    surface-specific names mapped, overrides winning, absent or None values leaving the defaults."""
    from dataclasses import dataclass

    @dataclass
    class Surface:  # a front-end's config with its own names for two parameters
        allocation_strategy: str = "knapsack"
        allocator_seed: int = 7
        n_min: int = 3
        n_max: int = 12
        predictor: str = "beta"
        embedder: str | None = None  # None: keep the constructor's default
        unrelated: str = "ignored"

    alloc = Allocator.from_settings(
        Surface(), names={"strategy": "allocation_strategy", "seed": "allocator_seed"}, estimator="rloo"
    )
    expected = Allocator(strategy="knapsack", predictor="beta", estimator="rloo", n_min=3, n_max=12, seed=7)
    assert alloc.config() == expected.config()
    mapped = Allocator.from_settings({"strategy": "uniform", "n_min": 2, "n_max": 4, "history_window": None})
    assert (mapped.strategy_name, mapped.n_max, mapped.history_window, mapped.seed) == ("uniform", 4, None, 0)
    with pytest.raises(ValueError, match="unknown Allocator parameter"):
        Allocator.from_settings({}, names={"strategies": "x"})
