"""Adversarial review of the two-phase API (``Allocator.plan_pilot`` / ``observe`` / ``plan_commit``, issue 15).

Property tests of the exact budget over random batches, bounds, strategies and degraded pilots (failed generations,
several observe calls, observe twice); save/load at every point of the cycle with bit-identical continuation; errors
that leave the whole state unchanged; the history and its readers seeing one whole group per (step, prompt); the
commit against brute force through the Allocator; the commit plan's expected variance against Monte Carlo.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vipalloc import Allocator
from vipalloc._io import encode
from vipalloc.strategies import HARDNESS_BONUS, P_CLIP, AllocationContext
from vipalloc.strategies.two_phase import beta_posterior, beta_prior
from vipalloc.variance import gradient_variance

HYP = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _state(alloc: Allocator) -> str:
    """The allocator's whole state, canonically (arrays bit-exact): equal strings = identical state."""
    return json.dumps(encode(alloc.state_dict()), sort_keys=True)


def _draw(rng: np.random.Generator, counts: np.ndarray, p: np.ndarray, fail: float = 0.0) -> list[np.ndarray]:
    """0/1 rewards per prompt; with ``fail`` > 0 some prompts get fewer rewards than planned (failed generations)."""
    out = []
    for c, pi in zip(counts, p):
        k = int(rng.integers(0, c + 1)) if fail and rng.uniform() < fail else int(c)
        out.append((rng.uniform(size=k) < pi).astype(np.float64))
    return out


def _spec_domain(pilot_n: int, n_min: int, n_max: int, allow_drop: bool, min_keep: int) -> list[int]:
    """Allowed extra rollouts, written from docs/two_phase.md (not from the solver's code)."""
    hi = n_max - pilot_n
    if not allow_drop:
        return list(range(max(n_min, pilot_n) - pilot_n, hi + 1))
    lo = max(n_min, min_keep, pilot_n) - pilot_n
    kept = list(range(min(lo, hi) if pilot_n == 1 else lo, hi + 1))
    return kept if pilot_n == 1 else sorted({0, *kept})


# --------------------------------------------------------------------------------------------- exact budget
@st.composite
def _cycles(draw: st.DrawFn) -> dict:
    m = draw(st.integers(1, 10))
    n_min = draw(st.integers(2, 5))
    n_max = draw(st.integers(n_min, 12))
    pilot_n = draw(st.integers(1, min(n_max, 4)))
    strategy = draw(st.sampled_from(["vip_two_phase", "pilot_commit"]))
    if strategy == "vip_two_phase":
        kwargs = {
            "skip": draw(st.sampled_from(["vip", "none"])),
            "allow_drop": draw(st.booleans()),
            "min_keep": draw(st.integers(2, 5)),
            "hardness_bonus": draw(st.sampled_from([None, 0.0, 1e-2])),
        }
    else:
        kwargs = {"pool_factor": draw(st.sampled_from([1.0, 2.0, 3.0]))}
    return {
        "m": m,
        "n_min": n_min,
        "n_max": n_max,
        "pilot_n": pilot_n,
        "strategy": strategy,
        "kwargs": kwargs,
        "estimator": draw(st.sampled_from(["drgrpo", "rloo"])),
        "budget": draw(st.integers(pilot_n * m, m * n_max)),
        "fail": draw(st.sampled_from([0.0, 0.3, 1.0])),
        "splits": draw(st.integers(1, 3)),
        "seed": draw(st.integers(0, 2**16)),
    }


@HYP
@given(case=_cycles())
def test_every_cycle_spends_exactly_the_budget(case: dict) -> None:
    """pilot + commit == B for every feasible request; groups = pilot that came back + extra, within n_max; the
    history ends each step with the whole group per prompt; mistakes along the way change nothing."""
    m, pilot_n, budget, n_min, n_max = case["m"], case["pilot_n"], case["budget"], case["n_min"], case["n_max"]
    kw = {k: v for k, v in case["kwargs"].items() if v is not None}
    rng = np.random.default_rng(case["seed"])
    ids = [f"p{i}" for i in range(m)]
    p = rng.uniform(size=m)
    alloc = Allocator(
        strategy=case["strategy"], predictor="beta", estimator=case["estimator"], n_min=n_min, n_max=n_max,
        seed=case["seed"], strategy_kwargs=kw,
    )  # fmt: skip
    for step in range(2):
        if not kw.get("allow_drop", True) and budget < m * max(n_min, pilot_n):
            before = _state(alloc)
            with pytest.raises(ValueError, match="without drops"):
                alloc.plan_pilot(ids, budget=budget, step=step, pilot_n=pilot_n)
            assert _state(alloc) == before
            return
        pilot = alloc.plan_pilot(ids, budget=budget, step=step, pilot_n=pilot_n)
        assert set(pilot.counts.tolist()) <= {0, pilot_n} and pilot.budget == int(pilot.counts.sum())
        r1 = _draw(rng, pilot.counts, p, case["fail"])
        if not any(len(r) for r in r1):  # nothing came back: no commit is possible, and asking changes nothing
            alloc.observe(ids, r1, step=step)
            before = _state(alloc)
            with pytest.raises(ValueError, match="no pilot outcome was observed"):
                alloc.plan_commit(step=step)
            assert _state(alloc) == before
            r1 = _draw(rng, pilot.counts, p)
        cuts = sorted(rng.choice(np.arange(1, m), size=min(case["splits"] - 1, m - 1), replace=False).tolist())
        for lo, hi in itertools.pairwise([0, *cuts, m]):  # the pilot's outcomes in several calls
            alloc.observe(ids[lo:hi], r1[lo:hi], step=step)
        seen = [i for i in range(m) if len(r1[i])]
        before = _state(alloc)  # observing the same pilot rewards again is refused and records nothing
        with pytest.raises(ValueError, match="already observed"):
            alloc.observe([ids[i] for i in seen], [r1[i] for i in seen], step=step)
        assert _state(alloc) == before
        commit = alloc.plan_commit(step=step)
        came_back = np.array([len(r) for r in r1])
        assert int(pilot.counts.sum() + commit.counts.sum()) == budget
        assert commit.pilot_counts.tolist() == came_back.tolist()
        assert commit.group_sizes.tolist() == (came_back + commit.counts).tolist()
        assert np.all(commit.group_sizes <= n_max) and np.all(commit.counts >= 0)
        assert np.all(commit.counts[pilot.counts == 0] == 0)  # skipped prompts get nothing in either phase
        if case["strategy"] == "vip_two_phase" and not commit.min_keep_relaxed and case["fail"] == 0.0:
            dom = _spec_domain(pilot_n, n_min, n_max, kw.get("allow_drop", True), kw.get("min_keep", 4))
            assert set(commit.counts[pilot.counts > 0].tolist()) <= set(dom)
        r2 = _draw(rng, commit.counts, p, case["fail"])
        alloc.observe(ids, r2, step=step)
        rows = alloc.history.rows()
        sel = rows["step"] == step
        hist = dict.fromkeys(ids, 0)
        for i, t in zip(rows["prompt_index"][sel], rows["trials"][sel]):
            hist[alloc.history.prompt_ids[i]] += int(t)
        assert [hist[pid] for pid in ids] == [len(x) + len(y) for x, y in zip(r1, r2)]


def test_rloo_pilot_of_one_plans_and_records_nothing_on_error() -> None:
    """RLOO with pilot_n = 1: the pilot (groups of one, which carry no RLOO gradient) used to raise after the pilot
    was recorded; it plans, its variance counts a group of one as 0 (as the commit's does), and the cycle works."""
    ids = [f"q{i}" for i in range(6)]
    for strategy in ("vip_two_phase", "pilot_commit"):
        alloc = Allocator(strategy=strategy, predictor="beta", estimator="rloo", n_min=2, n_max=8)
        pilot = alloc.plan_pilot(ids, budget=30, step=0, pilot_n=1)
        assert pilot.counts.tolist() == [1] * 6 and pilot.expected_variance == 0.0
        alloc.observe(ids, [[1.0]] * 3 + [[0.0]] * 3, step=0)
        commit = alloc.plan_commit(step=0)
        assert int(commit.counts.sum()) == 24 and np.isfinite(commit.expected_variance)


# --------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("predictor", ["gp", "ridge", "beta"])
def test_refused_pilots_change_nothing(predictor: str) -> None:
    """Every refused plan_pilot leaves the whole state as it was, including the feature caches of predictors that
    embed prompts (a refused call used to embed and cache its texts, so the first texts given for an id stuck)."""
    ids = [f"q{i}" for i in range(10)]
    texts = [f"what is {i} + {i}?" for i in range(10)]
    alloc = Allocator(strategy="vip_two_phase", predictor=predictor, embedder="hashing", n_min=4, n_max=8)
    nodrop = Allocator(
        strategy="vip_two_phase", predictor=predictor, embedder="hashing", n_min=4, n_max=8,
        strategy_kwargs={"allow_drop": False},
    )  # fmt: skip
    cases = [
        (alloc, {"budget": 19}, r"pilot_n \* M"),
        (alloc, {"budget": 81}, "at most 80"),
        (alloc, {"budget": 40, "pilot_n": 0}, "pilot_n must be"),
        (alloc, {"budget": 40, "pilot_n": 9}, "exceeds n_max"),
        (nodrop, {"budget": 30}, "without drops"),
    ]
    for a, kw, msg in cases:
        before = _state(a)
        with pytest.raises(ValueError, match=msg):
            a.plan_pilot(ids, prompts=texts, step=0, **kw)
        assert _state(a) == before, kw
    # the same allocator then plans normally
    assert int(alloc.plan_pilot(ids, prompts=texts, budget=40, step=0).counts.sum()) == 20


def test_refused_observe_and_commit_change_nothing() -> None:
    ids = [f"q{i}" for i in range(8)]
    alloc = Allocator(strategy="vip_two_phase", predictor="gp", embedder="hashing", n_min=2, n_max=8)
    texts = [f"prompt {i}" for i in range(8)]
    alloc.plan_pilot(ids, prompts=texts, budget=40, step=0, pilot_n=2)
    bad = [
        (lambda: alloc.plan_commit(step=0), "no pilot outcome was observed"),
        (lambda: alloc.plan_commit(step=3), "no pilot was planned at step 3"),
        (lambda: alloc.observe(ids[:2] + ["stranger"], [[1, 0]] * 3, step=0), "not planned at step 0"),
        (lambda: alloc.observe(ids[:2], [[1, 0], [1, 0, 1]], step=0), "got 3 rewards"),
        (lambda: alloc.observe(ids[:2], [[1, 0], [np.nan, 1]], step=0), "NaN|finite"),
        (lambda: alloc.observe(ids[:2], [[1, 0]] * 2, step=1), "no plan was made at step 1"),
        (lambda: alloc.plan_pilot(ids, prompts=texts, budget=15, step=1), r"pilot_n \* M"),
    ]
    for call, msg in bad:
        before = _state(alloc)
        with pytest.raises(ValueError, match=msg):
            call()
        assert _state(alloc) == before, msg
    alloc.observe(ids[:4], [[1, 0]] * 4, step=0)
    before = _state(alloc)
    with pytest.raises(ValueError, match="already observed"):
        alloc.observe(ids[2:6], [[1, 1]] * 4, step=0)  # overlaps the first call
    assert _state(alloc) == before
    alloc.observe(ids[4:], [[0, 0]] * 4, step=0)
    commit = alloc.plan_commit(step=0)
    for call, msg in [
        (lambda: alloc.plan_commit(step=0), "already committed"),
        (lambda: alloc.plan_pilot(ids, prompts=texts, budget=40, step=0), "already has a pilot"),
        (lambda: alloc.observe(ids, [np.ones(int(c) + 1) for c in commit.counts], step=0), "rewards but its plan"),
    ]:
        before = _state(alloc)
        with pytest.raises(ValueError, match=msg):
            call()
        assert _state(alloc) == before, msg


# --------------------------------------------------------------------------------------------- save / load
def _trajectory(strategy: str, predictor: str, cut: int, path) -> tuple[list, str]:
    """Two two-phase steps with one failed pilot generation and split observe calls; saved and reloaded at
    checkpoint ``cut`` (0..7: before the pilot plan, before, between and after the pilot observes, after the
    commit plan, ...); returns everything planned and the final state."""
    ids = [f"q{i}" for i in range(8)]
    texts = [f"prompt {i} topic {i % 3}" for i in range(8)]
    p = np.linspace(0.05, 0.95, 8)
    rng = np.random.default_rng(1)
    alloc = Allocator(strategy=strategy, predictor=predictor, embedder="hashing", n_min=2, n_max=8, seed=4)
    log: list = []
    point = 0

    def checkpoint() -> None:
        nonlocal alloc, point
        if point == cut:
            alloc.save(path)
            alloc = Allocator.load(path)
        point += 1

    for step in range(2):
        pilot = alloc.plan_pilot(ids, prompts=texts, budget=40, step=step, pilot_n=2)
        log += [pilot.counts.tolist(), pilot.p_mean.tobytes(), pilot.p_std.tobytes()]
        checkpoint()
        r1 = _draw(rng, pilot.counts, p)
        r1[3] = r1[3][:1]  # one failed generation
        alloc.observe(ids[:5], r1[:5], step=step)
        checkpoint()
        alloc.observe(ids[5:], r1[5:], step=step)
        checkpoint()
        commit = alloc.plan_commit(step=step)
        log += [commit.counts.tolist(), commit.p_mean.tobytes(), commit.expected_variance, commit.uniform_variance]
        checkpoint()
        alloc.observe(ids, _draw(rng, commit.counts, p), step=step)
    log.append(alloc.predictor.predict(ids, 2)[0].tobytes())
    return log, _state(alloc)


@pytest.mark.parametrize(("strategy", "predictor"), [("vip_two_phase", "gp"), ("pilot_commit", "beta")])
def test_save_load_anywhere_in_the_cycle_continues_bit_identically(strategy: str, predictor: str, tmp_path) -> None:
    ref_log, ref_state = _trajectory(strategy, predictor, -1, tmp_path / "unused.json")
    for cut in range(8):
        log, state = _trajectory(strategy, predictor, cut, tmp_path / f"cut{cut}.json")
        assert log == ref_log, cut
        assert state == ref_state, cut


# --------------------------------------------------------------------------------------------- the history
def test_history_readers_see_one_whole_group_per_step_and_prompt() -> None:
    """After a two-phase step the history's readers see each prompt's whole group (pilot + commit) as ONE group:
    the per-group success-rate variance dynamo and hora read (AllocationContext.from_history) is the whole group's,
    as a single-phase step with the same rewards gives."""
    ids = [f"q{i}" for i in range(6)]
    rng = np.random.default_rng(3)
    p = np.linspace(0.2, 0.8, 6)
    two = Allocator(strategy="vip_two_phase", predictor="beta", n_min=2, n_max=10, strategy_kwargs={"skip": "none"})
    one = Allocator(strategy="uniform", predictor="beta", n_min=2, n_max=10)
    for step in range(2):
        pilot = two.plan_pilot(ids, budget=36, step=step, pilot_n=2)
        r1 = _draw(rng, pilot.counts, p)
        two.observe(ids, r1, step=step)
        commit = two.plan_commit(step=step)
        r2 = _draw(rng, commit.counts, p)
        two.observe(ids, r2, step=step)
        one.plan(ids, budget=60, step=step)
        one.observe(ids, [np.concatenate([x, y]) for x, y in zip(r1, r2)], step=step)
    ctx_two = AllocationContext.from_history(ids, None, two.history.prompt_ids, two.history.rows())
    ctx_one = AllocationContext.from_history(ids, None, one.history.prompt_ids, one.history.rows())
    assert ctx_two.trials.tolist() == ctx_one.trials.tolist()
    assert ctx_two.successes.tolist() == ctx_one.successes.tolist()
    np.testing.assert_allclose(ctx_two.group_sigma, ctx_one.group_sigma, rtol=1e-12)
    # and a single-phase allocator that ingests the two-phase history plans as from the one-row history
    for name in ("dynamo", "hora"):
        a, b = Allocator(strategy=name, predictor="beta"), Allocator(strategy=name, predictor="beta")
        a.ingest_history(two.history)
        b.ingest_history(one.history)
        assert a.plan(ids, budget=36, step=2).counts.tolist() == b.plan(ids, budget=36, step=2).counts.tolist()


# --------------------------------------------------------------------------------------------- the commit's maths
def _objective(a, b, groups, estimator: str, bonus: float) -> float:
    """sum_i E_Beta[Var(p, n_i)] + gamma log(clip(pbar_i)) n_i, written out (a group of 0 or 1 carries nothing)."""
    total = 0.0
    for ai, bi, n in zip(a, b, groups):
        if n >= 2:
            h = (n - 1) / n**2 if estimator == "drgrpo" else 1.0 / (n - 1)
            total += ai * bi / ((ai + bi) * (ai + bi + 1)) * h
        total += bonus * np.log(np.clip(ai / (ai + bi), P_CLIP, 1 - P_CLIP)) * n
    return float(total)


@HYP
@given(
    m=st.integers(1, 4),
    n_min=st.integers(2, 5),
    extra_room=st.integers(0, 5),
    pilot_n=st.integers(1, 3),
    allow_drop=st.booleans(),
    estimator=st.sampled_from(["drgrpo", "rloo"]),
    budget_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_allocator_commit_is_the_brute_force_optimum(
    m: int, n_min: int, extra_room: int, pilot_n: int, allow_drop: bool, estimator: str, budget_frac: float, seed: int
) -> None:
    """Through the Allocator (its permutation and bookkeeping included), the commit minimises the posterior
    objective over every split allowed by the documented domain; the posterior is the pilot plan's prediction as a
    Beta prior plus the pilot counts that came back."""
    n_max = max(n_min, pilot_n) + extra_room
    rng = np.random.default_rng(seed)
    ids = [f"q{i}" for i in range(m)]
    alloc = Allocator(
        strategy="vip_two_phase", predictor="oracle", estimator=estimator, n_min=n_min, n_max=n_max, seed=seed,
        strategy_kwargs={"skip": "none", "allow_drop": allow_drop},
    )  # fmt: skip
    alloc.predictor.set_true_p(ids, rng.uniform(0.02, 0.98, m))
    lo_b = m * max(pilot_n, n_min) if not allow_drop else m * pilot_n
    budget = lo_b + int(round(budget_frac * (m * n_max - lo_b)))
    pilot = alloc.plan_pilot(ids, budget=budget, step=0, pilot_n=pilot_n)
    r1 = _draw(rng, pilot.counts, rng.uniform(size=m), fail=0.3)
    if not any(len(r) for r in r1):
        r1[0] = np.ones(pilot_n)
    alloc.observe(ids, r1, step=0)
    commit = alloc.plan_commit(step=0)
    t = np.array([len(r) for r in r1])
    k = np.array([int(np.sum(r >= 0.5)) for r in r1])
    a, b = beta_posterior(*beta_prior(pilot.p_mean, pilot.p_std), k, t)
    np.testing.assert_allclose(commit.p_mean, a / (a + b), rtol=1e-12)
    left = budget - int(pilot.counts.sum())
    dom = _spec_domain(pilot_n, n_min, n_max, allow_drop, 4)
    combos = [c for c in itertools.product(dom, repeat=m) if sum(c) == left]
    # failed pilot rollouts: a kept group must still reach the minimum (extra 0 = stay at the pilot, with drops)
    lo = max(n_min, 4) if allow_drop else n_min
    exempt = [not any((e == 0 and allow_drop) or lo <= ti + e <= n_max for e in dom) for ti in t]
    ok = [
        c
        for c in combos
        if all(x or (e == 0 and allow_drop) or lo <= ti + e <= n_max for ti, e, x in zip(t, c, exempt))
    ]
    assert commit.min_keep_relaxed == (not ok)
    if not ok:  # a budget in a hole of the reachable sums: the minimum is relaxed; the plan still spends it
        assert int(commit.counts.sum()) == left
        return
    combos = ok
    bonus = HARDNESS_BONUS[estimator]
    best = min(_objective(a, b, t + np.array(c), estimator, bonus) for c in combos)
    got = _objective(a, b, t + commit.counts, estimator, bonus)
    assert tuple(commit.counts.tolist()) in combos
    assert got <= best + 1e-12 * max(1.0, abs(best))


@pytest.mark.parametrize("estimator", ["drgrpo", "rloo"])
def test_commit_expected_variance_matches_monte_carlo(estimator: str) -> None:
    """commit.expected_variance is E over the posterior of the summed variance of the final groups."""
    ids = [f"q{i}" for i in range(6)]
    alloc = Allocator(strategy="vip_two_phase", predictor="beta", estimator=estimator, n_min=4, n_max=16)
    pilot = alloc.plan_pilot(ids, budget=60, step=0, pilot_n=3)
    r1 = [np.array(x, np.float64) for x in ([1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0], [0, 1, 0], [1, 0, 0])]
    alloc.observe(ids, r1, step=0)
    commit = alloc.plan_commit(step=0)
    t = np.array([len(r) for r in r1])
    a, b = beta_posterior(*beta_prior(pilot.p_mean, pilot.p_std), [int(r.sum()) for r in r1], t)
    draws = np.random.default_rng(0).beta(a[:, None], b[:, None], size=(6, 200_000))
    groups = commit.group_sizes
    assert np.all(groups >= 2)
    per = gradient_variance(draws, groups[:, None], estimator).sum(axis=0)
    se = per.std() / np.sqrt(per.size)
    assert abs(per.mean() - commit.expected_variance) < 5 * se, (per.mean(), commit.expected_variance, se)


def test_plans_do_not_alias_the_outstanding_pilot() -> None:
    """Editing a returned plan's arrays in place (a trainer zeroing counts it could not generate, clipping p_mean)
    must not change the stored pilot: the commit, the budget split and the saved state stay as planned."""
    ids = [f"q{i}" for i in range(6)]

    def cycle(mutate: bool) -> tuple[list[int], bytes, str]:
        alloc = Allocator(
            strategy="vip_two_phase", predictor="beta", n_min=2, n_max=8, strategy_kwargs={"skip": "none"}
        )
        pilot = alloc.plan_pilot(ids, budget=30, step=0, pilot_n=2)
        if mutate:
            pilot.counts[:3] = 0
            pilot.p_mean[:] = 0.9
            pilot.p_std[:] = 0.01
        alloc.observe(ids, [[1.0, 0.0]] * 6, step=0)
        commit = alloc.plan_commit(step=0)
        planned = commit.counts.tolist()
        if mutate:
            commit.counts[:] = 0
        return planned, commit.p_mean.tobytes(), _state(alloc)

    ref, edited = cycle(False), cycle(True)
    assert sum(ref[0]) == 18 and edited == ref
