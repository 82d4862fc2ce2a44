"""Two-phase allocation: Beta prior/posterior maths, the exact commit (vs brute force), Pilot-Commit's rule, and the
Allocator's plan_pilot / observe / plan_commit cycle (exact budgets, errors that record nothing, save/load)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats

from vipalloc import Allocator
from vipalloc._io import atomic_write_json
from vipalloc.allocator import FORMAT
from vipalloc.strategies import HARDNESS_BONUS, P_CLIP, get_strategy
from vipalloc.strategies.pilot_commit import PilotCommit
from vipalloc.strategies.two_phase import (
    PRIOR_NU_MAX,
    PRIOR_NU_MIN,
    beta_mean_std,
    beta_posterior,
    beta_prior,
    commit_domain,
    expected_variance,
    solve_commit,
)
from vipalloc.variance import gradient_variance

IDS = [f"q{i}" for i in range(10)]


# --------------------------------------------------------------------------------------------- Beta maths
def test_beta_prior_matches_moments_and_clips() -> None:
    mu = np.array([0.2, 0.5, 0.7, 0.05])
    sd = np.array([0.1, 0.2, 0.15, 0.04])
    a, b = beta_prior(mu, sd)
    mean, std = beta_mean_std(a, b)
    np.testing.assert_allclose(mean, mu, rtol=1e-12)
    np.testing.assert_allclose(std, sd, rtol=1e-12)  # all four lie inside [nu_min, nu_max]
    np.testing.assert_allclose(stats.beta(a, b).std(), sd, rtol=1e-10)
    # sigma -> 0 (an oracle): capped at nu_max pseudo-rollouts; sigma^2 >= mu(1-mu) (unseen): floored at nu_min
    a, b = beta_prior(np.array([0.3, 0.3, 0.5]), np.array([0.0, 0.6, 0.5]))
    np.testing.assert_allclose(a + b, [PRIOR_NU_MAX, PRIOR_NU_MIN, PRIOR_NU_MIN])
    np.testing.assert_allclose(a / (a + b), [0.3, 0.3, 0.5])
    a, b = beta_prior(np.array([0.0, 1.0]), np.array([0.0, 0.0]), nu_max=10.0)
    assert np.all(a > 0) and np.all(b > 0)  # the mean is clipped to [1e-3, 1 - 1e-3]
    np.testing.assert_allclose(a / (a + b), [1e-3, 1 - 1e-3])
    with pytest.raises(ValueError, match="p_std"):
        beta_prior(np.array([0.5]), np.array([-0.1]))
    with pytest.raises(ValueError, match="nu_min"):
        beta_prior(np.array([0.5]), np.array([0.1]), nu_min=5.0, nu_max=4.0)


def test_beta_posterior_counts() -> None:
    a, b = beta_posterior([1.0, 2.0], [1.0, 3.0], [2, 0], [2, 3])
    assert a.tolist() == [3.0, 2.0] and b.tolist() == [1.0, 6.0]
    with pytest.raises(ValueError, match="successes <= trials"):
        beta_posterior([1.0], [1.0], [3], [2])


@pytest.mark.parametrize("estimator", ["drgrpo", "rloo"])
def test_expected_variance_matches_monte_carlo(estimator: str) -> None:
    rng = np.random.default_rng(0)
    a = np.array([0.3, 2.0, 5.5, 20.0])
    b = np.array([4.0, 2.0, 1.5, 12.0])
    n = np.array([2, 4, 7, 16])
    draws = rng.beta(a[:, None], b[:, None], size=(4, 400_000))
    mc = gradient_variance(draws, n[:, None], estimator).mean(axis=1)
    se = gradient_variance(draws, n[:, None], estimator).std(axis=1) / np.sqrt(draws.shape[1])
    exact = expected_variance(a, b, n, estimator)
    assert np.all(np.abs(exact - mc) < 5 * se), (exact, mc, se)
    # n = 0 (not generated) contributes nothing
    assert expected_variance(a, b, np.zeros(4, np.int64), estimator).tolist() == [0.0] * 4


# --------------------------------------------------------------------------------------------- exact commit
def _objective(a, b, t, extra, estimator, bonus) -> float:
    """The commit objective written out independently of the solver's table."""
    n = t + extra
    var = 0.0
    for ai, bi, ni in zip(a, b, n):
        if ni >= 2 or (estimator == "drgrpo" and ni >= 1):
            h = (ni - 1) / ni**2 if estimator == "drgrpo" else 1.0 / (ni - 1)
            var += ai * bi / ((ai + bi) * (ai + bi + 1)) * h
    pbar = np.clip(a / (a + b), P_CLIP, 1 - P_CLIP)
    return var + bonus * float(np.sum(np.log(pbar) * n))


def _groups_ok(t: np.ndarray, extra: np.ndarray, n_min: int, n_max: int, allow_drop: bool, vals) -> bool:
    """Every final group of a prompt that gets extra rollouts (every group, without drops) is within
    [max(n_min, 4), n_max] ([n_min, n_max] without drops); prompts that no extra of the domain ``vals`` can bring
    there are exempt."""
    lo = max(n_min, 4) if allow_drop else n_min
    for ti, ei in zip(t, extra):
        # a prompt no value of the domain keeps within the rule (extra 0 counts, with drops) is exempt
        reachable = any((e == 0 and allow_drop) or lo <= ti + e <= n_max for e in vals)
        if not reachable or (allow_drop and ei == 0):
            continue
        if not lo <= ti + ei <= n_max:
            return False
    return True


def test_commit_is_optimal_against_brute_force() -> None:
    rng = np.random.default_rng(1)
    checked = 0
    for trial in range(160):
        m = int(rng.integers(1, 5))
        pilot_n = int(rng.integers(1, 4))
        n_min = int(rng.integers(2, 6))
        n_max = max(pilot_n, n_min) + int(rng.integers(0, 6))
        allow_drop = bool(trial % 2)
        estimator = ("drgrpo", "rloo")[trial % 3 == 0]
        bonus = float(rng.choice([0.0, HARDNESS_BONUS[estimator], 5e-3]))
        a = rng.uniform(0.05, 20, m)
        b = rng.uniform(0.05, 20, m)
        t = np.where(rng.uniform(size=m) < 0.2, pilot_n - 1, pilot_n)  # some failed pilot generations
        if estimator == "rloo":
            t = np.full(m, max(pilot_n, 2))
            pilot_n = int(t[0])
            n_max = max(n_max, pilot_n)
        vals = commit_domain(pilot_n, n_min, n_max, allow_drop=allow_drop, min_keep=4)
        budget = int(rng.integers(0, m * int(vals[-1]) + 1))
        combos = [c for c in itertools.product(vals.tolist(), repeat=m) if sum(c) == budget]
        relaxed_expected = not combos
        if not combos and allow_drop:
            combos = [c for c in itertools.product(range(n_max - pilot_n + 1), repeat=m) if sum(c) == budget]
        if not combos:
            with pytest.raises(ValueError, match="cannot place"):
                solve_commit(
                    a,
                    b,
                    t,
                    budget,
                    pilot_n=pilot_n,
                    n_min=n_min,
                    n_max=n_max,
                    estimator=estimator,
                    hardness_bonus=bonus,
                    allow_drop=allow_drop,
                )
            continue
        extra, relaxed = solve_commit(
            a, b, t, budget, pilot_n=pilot_n, n_min=n_min, n_max=n_max, estimator=estimator,
            hardness_bonus=bonus, allow_drop=allow_drop,
        )  # fmt: skip
        assert extra.dtype == np.int64 and int(extra.sum()) == budget
        # a failed pilot rollout must not leave a kept group below the minimum: only such splits are allowed
        kept_ok = [c for c in combos if _groups_ok(t, np.array(c), n_min, n_max, allow_drop, vals.tolist())]
        assert relaxed == (relaxed_expected or not kept_ok)
        if not kept_ok:
            continue
        combos = kept_ok
        assert _groups_ok(t, extra, n_min, n_max, allow_drop, vals.tolist())
        best = min(_objective(a, b, t, np.array(c), estimator, bonus) for c in combos)
        got = _objective(a, b, t, extra, estimator, bonus)
        assert got <= best + 1e-12 * max(1.0, abs(best)), (trial, got, best)
        assert tuple(extra.tolist()) in combos
        checked += 1
    assert checked > 100


def test_commit_domain_rules() -> None:
    assert commit_domain(2, 4, 8).tolist() == [0, 2, 3, 4, 5, 6]  # kept groups reach max(n_min, min_keep) = 4
    assert commit_domain(2, 4, 8, allow_drop=False).tolist() == [2, 3, 4, 5, 6]
    assert commit_domain(4, 2, 8).tolist() == [0, 1, 2, 3, 4]  # pilot already at the minimum
    assert commit_domain(3, 4, 8).tolist() == [0, 1, 2, 3, 4, 5]
    assert commit_domain(1, 4, 8).tolist() == [3, 4, 5, 6, 7]  # a pilot of 1 trains nothing: no stay-at-pilot
    with pytest.raises(ValueError, match="exceeds n_max"):
        commit_domain(9, 4, 8)


def test_commit_spends_on_informative_prompts_and_may_skip_all_equal_pilots() -> None:
    # Same prior, three pilots: 0/2 (hopeless-looking), 1/2 (informative), 2/2 (solved-looking); low prior std so the
    # pilot moves the posterior, as the predictor said "around 0.1" for the first and third.
    a0, b0 = beta_prior(np.array([0.05, 0.5, 0.95]), np.array([0.03, 0.1, 0.03]))
    a, b = beta_posterior(a0, b0, [0, 1, 2], [2, 2, 2])
    extra, _ = solve_commit(a, b, [2, 2, 2], 6, pilot_n=2, n_min=4, n_max=16, hardness_bonus=0.0)
    assert extra.tolist() == [0, 6, 0]
    # with no drop option every group is at least n_min
    extra, _ = solve_commit(a, b, [2, 2, 2], 6, pilot_n=2, n_min=4, n_max=16, allow_drop=False)
    assert extra.tolist() == [2, 2, 2]


def test_commit_relaxes_minimum_for_a_budget_in_a_hole() -> None:
    a, b = np.full(3, 2.0), np.full(3, 2.0)
    extra, relaxed = solve_commit(a, b, [2, 2, 2], 1, pilot_n=2, n_min=4, n_max=8)
    assert relaxed and extra.sum() == 1
    with pytest.raises(ValueError, match="cannot place"):
        solve_commit(a, b, [2, 2, 2], 1, pilot_n=2, n_min=4, n_max=8, allow_drop=False)


# --------------------------------------------------------------------------------------------- Pilot-Commit
def test_pilot_commit_rule() -> None:
    pc = PilotCommit(pool_factor=3.0)
    trials = np.full(9, 8)
    succ = np.array([0, 1, 4, 6, 7, 8, 3, 2, 5])  # rates 0, .125, .5, .75, .875, 1, .375, .25, .625
    out = pc.commit(np.zeros(9), np.zeros(9), trials, succ, trials, 30, 4, 32, 8)
    in_band = [1, 2, 3, 6, 7, 8]
    kept = in_band[:3]  # batch = 9 / 3 = 3 prompts, earlier candidates first
    assert out.extra.tolist() == [10 if i in kept else 0 for i in range(9)]
    # the kept prompts cannot absorb it all (n_max = 16: 8 extra each): the spare in-band ones come next
    out = pc.commit(np.zeros(9), np.zeros(9), trials, succ, trials, 30, 4, 16, 8)
    assert out.extra[kept].tolist() == [8, 8, 8] and out.extra[[6, 7, 8]].tolist() == [2, 2, 2]
    assert out.extra[[0, 4, 5]].sum() == 0
    # nothing in band: the rollouts go to the candidate nearest the band (13/16 is 0.0625 away, 0 and 1 further)
    out = pc.commit(
        np.zeros(3), np.zeros(3), np.array([8, 16, 8]), np.array([0, 13, 8]), np.array([8, 16, 8]), 5, 4, 32, 8
    )
    assert out.extra.tolist() == [0, 5, 0]
    mean, _ = beta_mean_std(out.post_a, out.post_b)
    np.testing.assert_allclose(mean, [1 / 10, 14 / 18, 9 / 10])
    with pytest.raises(ValueError, match="pool_factor"):
        PilotCommit(pool_factor=0.5)
    with pytest.raises(ValueError, match="band"):
        PilotCommit(band=(0.8, 0.2))


# --------------------------------------------------------------------------------------------- Allocator cycle
def _rewards(rng: np.random.Generator, counts: np.ndarray, p: np.ndarray) -> list[np.ndarray]:
    return [(rng.uniform(size=int(c)) < pi).astype(np.float64) for c, pi in zip(counts, p)]


@pytest.mark.parametrize("strategy", ["vip_two_phase", "pilot_commit"])
@pytest.mark.parametrize("budget", [20, 47, 63, 160])
def test_cycle_spends_the_budget_exactly_and_records_whole_groups(strategy: str, budget: int) -> None:
    rng = np.random.default_rng(budget)
    p = rng.uniform(size=len(IDS))
    alloc = Allocator(strategy=strategy, predictor="beta", n_min=4, n_max=16, seed=3)
    for step in range(3):
        pilot = alloc.plan_pilot(IDS, budget=budget, step=step, pilot_n=2)
        assert pilot.phase == "pilot" and set(pilot.counts.tolist()) <= {0, 2}
        assert pilot.budget == int(pilot.counts.sum()) and (strategy == "vip_two_phase" or pilot.budget == 20)
        if strategy == "vip_two_phase" and budget >= 40:  # skipped = what plain vip drops on the same prediction
            vip = get_strategy("vip").allocate(pilot.p_mean, budget, 4, 16)
            if pilot.p_mean.std() > 1e-6:  # (the permutation only breaks ties)
                assert ((pilot.counts == 0) == (vip == 0)).sum() >= len(IDS) - 1
        r1 = _rewards(rng, pilot.counts, p)
        alloc.observe(IDS[:4], r1[:4], step=step)  # pilot outcomes may come in several calls
        alloc.observe(IDS[4:], r1[4:], step=step)
        commit = alloc.plan_commit(step=step)
        assert commit.phase == "commit" and commit.budget == budget - pilot.budget
        assert int(pilot.counts.sum() + commit.counts.sum()) == budget
        assert commit.group_sizes.tolist() == (pilot.counts + commit.counts).tolist()
        assert np.all(commit.group_sizes <= 16)
        if strategy == "vip_two_phase" and not commit.min_keep_relaxed:
            assert np.all((commit.counts == 0) | (commit.group_sizes >= 4))
        if strategy == "vip_two_phase":  # skipped prompts get nothing and do not train (below 40: none skipped)
            assert budget >= 40 or pilot.budget == 20
            assert np.all(commit.counts[pilot.counts == 0] == 0)
            assert commit.train_mask.tolist() == (commit.group_sizes > 0).tolist()
        else:  # pilot_commit trains on its committed prompts only
            assert commit.train_mask.tolist() == (commit.counts > 0).tolist()
        r2 = _rewards(rng, commit.counts, p)
        alloc.observe(IDS, r2, step=step)
        rows = alloc.history.rows()
        sel = rows["step"] == step
        per_prompt = np.bincount(rows["prompt_index"][sel], weights=rows["trials"][sel], minlength=len(IDS))
        ids_all = alloc.history.prompt_ids
        got = {ids_all[i]: int(n) for i, n in enumerate(per_prompt) if n}
        assert got == {pid: int(n) for pid, n in zip(IDS, commit.group_sizes) if n}
        assert sum(len(x) for x in r1 + r2) == budget


def test_commit_posterior_is_prior_plus_pilot() -> None:
    alloc = Allocator(strategy="vip_two_phase", predictor="oracle", n_min=4, n_max=16, strategy_kwargs={"skip": "none"})
    p = np.linspace(0.05, 0.95, len(IDS))
    alloc.predictor.set_true_p(IDS, p)
    pilot = alloc.plan_pilot(IDS, budget=60, step=0, pilot_n=3)
    rewards = [np.array([1.0, 0.0, 1.0])] * 5 + [np.array([0.0, 0.0, 0.0])] * 5
    alloc.observe(IDS, rewards, step=0)
    commit = alloc.plan_commit(step=0)
    a0, b0 = beta_prior(pilot.p_mean, pilot.p_std)
    a, b = beta_posterior(a0, b0, [2] * 5 + [0] * 5, [3] * 10)
    np.testing.assert_allclose(commit.p_mean, a / (a + b))
    np.testing.assert_allclose(commit.p_std, beta_mean_std(a, b)[1])
    assert commit.pilot_counts.tolist() == [3] * 10
    assert commit.expected_variance <= commit.uniform_variance + 1e-15  # the exact commit beats a uniform one
    assert commit.metrics()["vip/budget"] == 60.0  # the step's groups: 30 pilot + 30 commit rollouts


def test_skip_copies_vips_drops() -> None:
    """skip="vip": the prompts plain vip drops on the prior get nothing in either phase; the others are piloted
    and absorb the whole rest of the budget."""
    p = np.array([0.001, 0.002, 0.3, 0.5, 0.6, 0.999, 0.45, 0.2, 0.7, 0.0005])
    for budget in (40, 52, 77):
        alloc = Allocator(strategy="vip_two_phase", predictor="oracle", n_min=4, n_max=16, seed=1)
        plain = Allocator(strategy="vip", predictor="oracle", n_min=4, n_max=16, seed=1)
        for a in (alloc, plain):
            a.predictor.set_true_p(IDS, p)
        vip = plain.plan(IDS, budget=budget, step=0)
        pilot = alloc.plan_pilot(IDS, budget=budget, step=0)
        assert (pilot.counts == 0).tolist() == vip.dropped.tolist() and vip.dropped.any()
        alloc.observe(IDS, [np.ones(int(c)) for c in pilot.counts], step=0)
        commit = alloc.plan_commit(step=0)
        assert int(commit.counts.sum()) == budget - int(pilot.counts.sum())
        assert np.all(commit.group_sizes[vip.dropped] == 0) and not commit.train_mask[vip.dropped].any()


@pytest.mark.parametrize("predictor", ["beta", "empirical", "gp", "ridge"])
def test_predictor_sees_the_whole_group(predictor: str) -> None:
    """A two-phase step leaves the predictor as one observation of the whole group would (the predictors merge
    several observations of a prompt at one step)."""
    rng = np.random.default_rng(5)
    p = rng.uniform(size=len(IDS))
    texts = [f"prompt number {i} about topic {i % 3}" for i in range(len(IDS))]
    kw = dict(predictor=predictor, n_max=16, embedder="hashing")
    two = Allocator(strategy="vip_two_phase", n_min=4, **kw)
    one = Allocator(strategy="uniform", n_min=2, **kw)
    for step in range(3):
        pilot = two.plan_pilot(IDS, prompts=texts, budget=55, step=step)
        r1 = _rewards(rng, pilot.counts, p)
        two.observe(IDS, r1, step=step)
        commit = two.plan_commit(step=step)
        r2 = _rewards(rng, commit.counts, p)
        two.observe(IDS, r2, step=step)
        one.plan(IDS, prompts=texts, budget=16 * len(IDS), step=step)
        one.observe(IDS, [np.concatenate([x, y]) for x, y in zip(r1, r2)], step=step)
        np.testing.assert_allclose(
            two.predictor.predict(IDS, step + 1)[0], one.predictor.predict(IDS, step + 1)[0], rtol=1e-12, atol=1e-14
        )


def test_errors_record_nothing() -> None:
    alloc = Allocator(strategy="vip_two_phase", predictor="beta", n_min=4, n_max=8)
    with pytest.raises(ValueError, match="plan_pilot"):
        alloc.plan(IDS, budget=40, step=0)
    with pytest.raises(ValueError, match=r"pilot_n \* M = 2 x 10 = 20 pilot rollouts exceed the step budget 19"):
        alloc.plan_pilot(IDS, budget=19, step=0)
    with pytest.raises(ValueError, match="at most 80"):
        alloc.plan_pilot(IDS, budget=81, step=0)
    with pytest.raises(ValueError, match="pilot_n must be"):
        alloc.plan_pilot(IDS, budget=40, step=0, pilot_n=0)
    with pytest.raises(ValueError, match="no pilot is waiting"):
        alloc.plan_commit()
    with pytest.raises(ValueError, match="no pilot was planned at step 0"):
        alloc.plan_commit(step=0)
    assert not alloc._pilots and not alloc._pending
    alloc.plan_pilot(IDS, budget=40, step=0)
    with pytest.raises(ValueError, match="no pilot outcome was observed"):
        alloc.plan_commit(step=0)
    before = alloc.predictor.predict(IDS, 1)
    with pytest.raises(ValueError, match="not planned at step 0"):
        alloc.observe(IDS[:2] + ["stranger"], [[1, 0]] * 3, step=0)
    with pytest.raises(ValueError, match="got 3 rewards"):
        alloc.observe(IDS[:1], [[1, 0, 1]], step=0)
    assert len(alloc.history) == 0 and not alloc._pilots[0].trials.any()
    np.testing.assert_array_equal(alloc.predictor.predict(IDS, 1), before)
    alloc.observe(IDS, [[1, 0]] * 10, step=0)
    with pytest.raises(ValueError, match="already has a pilot with observed outcomes"):
        alloc.plan_pilot(IDS, budget=40, step=0)
    commit = alloc.plan_commit(step=0)
    with pytest.raises(ValueError, match="already committed"):
        alloc.plan_commit(step=0)
    zero = [pid for pid, c in zip(IDS, commit.counts) if c == 0]
    if zero:
        with pytest.raises(ValueError, match="had 0 rollouts"):
            alloc.observe(zero[:1], [[1]], step=0)
    single = Allocator(strategy="vip", predictor="beta")
    with pytest.raises(ValueError, match="two-phase strategy"):
        single.plan_pilot(IDS, budget=80, step=0)
    with pytest.raises(ValueError, match="plan_pilot"):
        get_strategy("pilot_commit").allocate(np.full(3, 0.5), 12, 2, 8)


def test_save_load_keeps_an_outstanding_pilot(tmp_path) -> None:
    rng = np.random.default_rng(7)
    p = rng.uniform(size=len(IDS))
    ref = Allocator(strategy="vip_two_phase", predictor="beta", n_min=4, n_max=16, seed=2)
    alloc = Allocator(strategy="vip_two_phase", predictor="beta", n_min=4, n_max=16, seed=2)
    for a in (ref, alloc):  # one ordinary step of history first
        a.plan_pilot(IDS, budget=70, step=0)
    r0 = _rewards(rng, np.full(len(IDS), 2), p)
    for a in (ref, alloc):
        a.observe(IDS, r0, step=0)
    commits = [a.plan_commit(step=0) for a in (ref, alloc)]
    r0b = _rewards(rng, commits[0].counts, p)
    for a in (ref, alloc):
        a.observe(IDS, r0b, step=0)
    # step 1: pilot planned and half observed, then a checkpoint
    for a in (ref, alloc):
        a.plan_pilot(IDS, budget=70, step=1)
    r1 = _rewards(rng, np.full(len(IDS), 2), p)
    for a in (ref, alloc):
        a.observe(IDS[:5], r1[:5], step=1)
    path = tmp_path / "alloc.json"
    alloc.save(path)
    restored = Allocator.load(path)
    for a in (ref, restored):
        a.observe(IDS[5:], r1[5:], step=1)
    c_ref, c_new = ref.plan_commit(step=1), restored.plan_commit(step=1)
    assert c_new.counts.tolist() == c_ref.counts.tolist()
    np.testing.assert_array_equal(c_new.p_mean, c_ref.p_mean)
    # a committed step survives too: its extra rollouts can still be observed after a reload
    restored.save(path)
    again = Allocator.load(path)
    again.observe(IDS, _rewards(rng, c_new.counts, p), step=1)
    with pytest.raises(ValueError, match="already committed"):
        again.plan_commit(step=1)


def test_version_1_files_still_load(tmp_path) -> None:
    alloc = Allocator(strategy="vip", predictor="beta", n_min=2, n_max=8)
    alloc.plan(IDS, budget=40, step=0)
    alloc.observe(IDS, [[1, 0]] * 10, step=0)
    state = alloc.state_dict()
    del state["pilots"]
    path = tmp_path / "v1.json"
    atomic_write_json(path, FORMAT, 1, state)
    loaded = Allocator.load(path)
    assert loaded._pilots == {}
    assert loaded.plan(IDS, budget=40, step=1).counts.tolist() == alloc.plan(IDS, budget=40, step=1).counts.tolist()


def test_pilot_commit_on_a_pool() -> None:
    rng = np.random.default_rng(11)
    pool = [f"c{i}" for i in range(30)]  # 3 x a batch of 10
    p = rng.uniform(size=30)
    alloc = Allocator(strategy="pilot_commit", predictor="beta", n_min=2, n_max=16, seed=1)
    pilot = alloc.plan_pilot(pool, budget=100, step=0, pilot_n=2)
    assert pilot.budget == 60
    r1 = _rewards(rng, pilot.counts, p)
    alloc.observe(pool, r1, step=0)
    commit = alloc.plan_commit(step=0)
    assert int(commit.counts.sum()) == 40
    rate = np.array([r.mean() for r in r1])
    in_band = (rate >= 0.125) & (rate <= 0.75)  # with 2 pilot rollouts: exactly the 1-of-2 prompts
    k = min(10, int(in_band.sum()))  # at most a batch of 10 is committed to
    assert k * 14 >= 40  # this seed: the kept prompts can absorb the rest within n_max
    kept = commit.counts > 0
    assert kept.sum() == k and np.all(in_band[kept])
    assert sorted(commit.counts[kept].tolist()) == sorted((40 // k + (np.arange(k) < 40 % k)).tolist())
