"""GP predictor: the authors' algorithm reproduced exactly; what the vipalloc preset adds; numerical robustness."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.special import expit, logit

import vipalloc.predictors.gp_window as gp_window
from vipalloc._io import decode, encode
from vipalloc.predictors import GPPredictor
from vipalloc.predictors.gp import GPNumericsWarning


def unit_rows(rng: np.random.Generator, n: int, d: int = 12) -> np.ndarray:
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ids_of(n: int, prefix: str = "q") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


# ------------------------------------------------------------------------------------------ paper preset
def authors_all_n(x_all: np.ndarray, steps: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Direct transcription of the authors' final GPR (reuse_mean=True, prior -5, l=0.4, noise 1e-4) over ALL
    prompts, from their description: returns the mean vector and the last fit's posterior variance."""
    d = np.sqrt(np.maximum(((x_all[:, None, :] - x_all[None, :, :]) ** 2).sum(-1), 0.0))
    k = np.exp(-0.5 * (d / 0.4) ** 2)
    mu = np.full(len(x_all), -5.0)
    var = np.ones(len(x_all))
    for idx, acc in steps:
        g = logit(np.clip(acc, 1e-6, 1 - 1e-6))
        k_tt = k[np.ix_(idx, idx)] + 1e-4 * np.eye(len(idx))
        alpha = np.linalg.solve(k_tt, g - mu[idx])
        mu = mu + k[:, idx] @ alpha
        mu[idx] = g
        var = np.diag(k - k[:, idx] @ np.linalg.solve(k_tt, k[idx, :]))
    return mu, var


def test_paper_preset_equals_authors_all_n_algorithm_with_late_registration() -> None:
    """Prompts registered after several steps, several observe calls per step and duplicate ids in a call must
    give exactly what the authors' all-N mean vector holds (fitted once per step on the step's merged rates)."""
    rng = np.random.default_rng(0)
    n = 40
    x = unit_rows(rng, n) * 0.5 + unit_rows(rng, 1)  # clustered, so kernel values are far from 0
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ids = ids_of(n)
    gp = GPPredictor(preset="paper")
    gp.set_features(ids[:15], x[:15])
    steps = []
    for step in range(7):
        if step == 3:
            gp.set_features(ids[10:30], x[10:30])  # overlaps the known ones: same features are accepted
        if step == 5:
            gp.set_features(ids, x)
        pool = 15 if step < 3 else (30 if step < 5 else n)
        idx = rng.choice(pool, size=9, replace=False)
        t = rng.integers(2, 9, size=9)
        s = rng.binomial(t, 0.35)
        s[0], s[1] = 0, t[1]  # rates exactly 0 and 1
        # split the step over two calls, the second repeating a prompt of the first
        gp.observe([ids[i] for i in idx[:5]], s[:5], t[:5], step)
        rest = np.r_[idx[5:], idx[0]]
        gp.observe([ids[i] for i in rest], np.r_[s[5:], 0], np.r_[t[5:], 2], step)
        s_all, t_all = s.copy(), t.copy()
        t_all[0] += 2
        steps.append((idx, s_all / t_all))
    mu_ref, var_ref = authors_all_n(x, steps)
    p, std = gp.predict(ids, 7)
    np.testing.assert_allclose(p, expit(mu_ref), rtol=1e-9, atol=1e-15)
    ref_std = expit(mu_ref) * (1 - expit(mu_ref)) * np.sqrt(np.clip(var_ref, 0, 1))
    np.testing.assert_allclose(std, ref_std, rtol=1e-6, atol=1e-12)


def test_paper_preset_newer_data_wins_over_a_late_older_step() -> None:
    gp = GPPredictor(preset="paper")
    gp.set_features(["a", "b"], np.eye(2))
    gp.observe(["a"], np.array([4]), np.array([4]), 5)
    gp.observe(["a", "b"], np.array([0, 1]), np.array([4, 4]), 3)  # step 3 arrives late: a keeps step 5's rate
    p, _ = gp.predict(["a", "b"], 6)
    assert p[0] == pytest.approx(1 - 1e-6) and p[1] == pytest.approx(0.25)


# --------------------------------------------------------------------------------------- vipalloc preset
def clustered(rng: np.random.Generator, per: int = 20, d: int = 12) -> np.ndarray:
    c = unit_rows(rng, 2, d)
    x = np.vstack([c[0] + 0.08 * rng.normal(size=(per, d)), c[1] + 0.08 * rng.normal(size=(per, d))])
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("likelihood", ["laplace", "gaussian"])
def test_never_seen_prompts_borrow_from_similar_prompts(likelihood: str) -> None:
    rng = np.random.default_rng(1)
    x = clustered(rng)
    true = np.r_[np.full(20, 0.85), np.full(20, 0.1)]
    ids = ids_of(40)
    gp = GPPredictor(likelihood=likelihood)
    gp.set_features(ids, x)
    seen = np.r_[0:15, 20:35]  # the last 5 of each cluster are never observed
    for step in range(4):
        gp.observe([ids[i] for i in seen], rng.binomial(8, true[seen]), np.full(len(seen), 8), step)
    p, std = gp.predict(ids, 4)
    assert np.all(p[15:20] > 0.6) and np.all(p[35:40] < 0.3)
    assert np.all(std[15:20] > std[:15].mean())  # never-seen prompts are less certain than observed ones


def test_more_rollouts_weigh_more() -> None:
    """Binomial noise: 3/4 moves the prediction less, and leaves more uncertainty, than 24/32."""
    x = np.eye(3)
    preds = []
    for s, n in ((3, 4), (24, 32)):
        gp = GPPredictor(global_var=0.0)
        gp.set_features(["a", "b", "c"], x)
        gp.observe(["a", "b", "c"], np.array([s, 0, 1]), np.array([n, 4, 4]), 0)
        preds.append(gp.predict(["a"], 1))
    (p_few, s_few), (p_many, s_many) = preds
    assert abs(p_many[0] - 0.75) < abs(p_few[0] - 0.75) and s_many[0] < s_few[0]


def test_stale_observations_count_less() -> None:
    gp = GPPredictor(time_scale=20.0, global_time_scale=20.0)
    gp.set_features(["a", "b"], np.eye(2))
    gp.observe(["a", "b"], np.array([15, 1]), np.array([16, 16]), 0)
    p_soon, s_soon = gp.predict(["a"], 1)
    p_late, s_late = gp.predict(["a"], 200)
    assert p_soon[0] > p_late[0] and s_late[0] > s_soon[0]


def test_own_history_older_than_the_window_still_counts() -> None:
    """With a 16-row window, a prompt's early observations fall out of the window; conditioning on them still
    keeps its prediction (own_history=True), dropping them loses it."""
    rng = np.random.default_rng(3)
    ids = ids_of(60)
    x = unit_rows(rng, 60)
    out = {}
    for own in (True, False):
        gp = GPPredictor(max_points=16, own_history=own)
        gp.set_features(ids, x)
        gp.observe(["q0"], np.array([0]), np.array([16]), 0)  # q0 is very hard
        gp.observe(["q0"], np.array([1]), np.array([16]), 1)
        for step in range(2, 10):  # others fill the window, all around p = 0.6
            b = rng.choice(np.arange(1, 60), size=8, replace=False)
            gp.observe([ids[i] for i in b], rng.binomial(8, 0.6, size=8), np.full(8, 8), step)
        out[own] = gp.predict(["q0"], 10)[0][0]
    assert out[True] < 0.2 < 0.4 < out[False]


def test_several_calls_for_one_step_equal_one_call() -> None:
    rng = np.random.default_rng(4)
    ids = ids_of(10)
    x = unit_rows(rng, 10)
    a, b = GPPredictor(), GPPredictor()
    a.set_features(ids, x)
    b.set_features(ids, x)
    a.observe(ids[:6], np.array([1, 2, 3, 0, 4, 2]), np.full(6, 4), 0)
    a.observe(ids[4:], np.array([1, 1, 0, 3, 2, 0]), np.full(6, 4), 0)  # q4, q5 again: counts add up
    b.observe(ids, np.array([1, 2, 3, 0, 5, 3, 0, 3, 2, 0]), np.array([4] * 4 + [8, 8] + [4] * 4), 0)
    for pa, pb in zip(a.predict(ids, 1), b.predict(ids, 1)):
        np.testing.assert_array_equal(pa, pb)


def test_laplace_warm_one_step_tracks_the_converged_mode() -> None:
    """Predicting every step (warm-started single Newton steps) and replaying the same history before one cold
    fit (iterated to convergence) agree closely."""
    rng = np.random.default_rng(5)
    ids = ids_of(80)
    x = unit_rows(rng, 80)
    true = expit(2.5 * x[:, 0] + 0.5 * x[:, 1])
    warm, cold = GPPredictor(), GPPredictor()
    warm.set_features(ids, x)
    cold.set_features(ids, x)
    for step in range(8):
        b = rng.choice(80, 20, replace=False)
        n = rng.choice([2, 4, 8, 16], size=20)
        s = rng.binomial(n, true[b])
        warm.predict(ids, step)
        warm.observe([ids[i] for i in b], s, n, step)
        cold.observe([ids[i] for i in b], s, n, step)
    np.testing.assert_allclose(warm.predict(ids, 8)[0], cold.predict(ids, 8)[0], atol=0.02)


def test_hyperparameter_fit_improves_fit_and_runs_on_schedule() -> None:
    rng = np.random.default_rng(6)
    ids = ids_of(60)
    x = unit_rows(rng, 60, 6)
    true = expit(3.0 * x[:, 0])
    gp = GPPredictor(length_scale=4.0, signal_var=0.05, prompt_var=0.05, global_var=0.05)
    gp.set_features(ids, x)
    for step in range(8):
        b = rng.choice(60, 25, replace=False)
        gp.observe([ids[i] for i in b], rng.binomial(16, true[b]), np.full(25, 16), step)
    before = np.abs(gp.predict(ids, 8)[0] - true).mean()
    fitted = gp.fit_hyperparameters()
    after = np.abs(gp.predict(ids, 8)[0] - true).mean()
    assert fitted["signal_var"] > 0.05 and after < before
    sched = GPPredictor(fit_every=3, length_scale=4.0)
    sched.set_features(ids, x)
    changed = []
    for step in range(4):
        b = rng.choice(60, 25, replace=False)
        sched.observe([ids[i] for i in b], rng.binomial(16, true[b]), np.full(25, 16), step)
        changed.append(sched.params["length_scale"] != 4.0)
    assert changed == [False, False, False, True]  # refitted after 3 new steps
    with pytest.raises(ValueError, match="vipalloc. only"):
        GPPredictor("paper").fit_hyperparameters()


# ----------------------------------------------------------------------------------------------- state
@pytest.mark.parametrize("preset", ["paper", "vipalloc"])
def test_state_round_trip_mid_step_is_exact(preset: str) -> None:
    rng = np.random.default_rng(7)
    ids = ids_of(30)
    x = unit_rows(rng, 30)
    gp = GPPredictor(preset=preset)
    gp.set_features(ids[:20], x[:20])
    for step in range(4):
        b = rng.choice(20, 8, replace=False)
        gp.predict(ids[:20], step)
        gp.observe([ids[i] for i in b], rng.binomial(6, 0.4, size=8), np.full(8, 6), step)
    twin = GPPredictor(preset=preset)
    twin.load_state_dict(decode(encode(gp.state_dict())))
    for g in (gp, twin):  # continue identically: late registration, then a second call for the open step
        g.set_features(ids, x)
        g.observe(ids[18:22], np.array([1, 2, 3, 4]), np.full(4, 6), 3)
        g.observe(ids[:5], np.array([0, 1, 2, 3, 4]), np.full(5, 4), 4)
    for a, b in zip(gp.predict(ids, 5), twin.predict(ids, 5)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="preset"):
        GPPredictor(preset="paper" if preset == "vipalloc" else "vipalloc").load_state_dict(gp.state_dict())


# ------------------------------------------------------------------------------------------ robustness
def assert_valid(p: np.ndarray, s: np.ndarray, m: int) -> None:
    assert p.shape == s.shape == (m,) and p.dtype == s.dtype == np.float64
    assert np.all(np.isfinite(p)) and np.all((p >= 0) & (p <= 1))
    assert np.all(np.isfinite(s)) and np.all((s >= 0) & (s <= 0.5))


@pytest.mark.parametrize("preset", ["paper", "vipalloc"])
def test_degenerate_data_never_crashes(preset: str) -> None:
    gp = GPPredictor(preset=preset)
    ids = ids_of(6, "d")
    gp.set_features(ids, np.tile(np.eye(4)[0], (6, 1)))  # identical embeddings: K is rank one
    p, s = gp.predict(ids, 0)  # before any observation: the prior
    assert_valid(p, s, 6)
    assert np.ptp(p) == 0
    gp.observe(ids, np.array([0, 8, 0, 8, 4, 4]), np.full(6, 8), 0)  # rates 0 and 1 on identical prompts
    gp.observe(["d0"], np.array([1]), np.array([1]), 1)  # a single rollout
    for step in range(2, 30):  # thousands of observations of one prompt
        gp.observe(["d1"], np.array([5000]), np.array([10000]), step)
    assert_valid(*gp.predict(ids + ids, 30), 12)


def test_ill_conditioned_kernel_escalates_jitter(caplog: pytest.LogCaptureFixture) -> None:
    """No noise floor, identical embeddings at one step with huge, contradicting counts: K + noise is nearly
    singular; jitter escalation keeps it factorisable (and logs it)."""
    gp = GPPredictor(noise_floor=0.0, global_var=0.0, prompt_var=0.0, signal_var=50.0)
    ids = ids_of(40, "c")
    gp.set_features(ids, np.tile(np.eye(3)[1], (40, 1)))
    s = np.where(np.arange(40) % 2 == 0, 999_999, 1)
    with caplog.at_level(logging.WARNING, logger="vipalloc.predictors.gp"):
        gp.observe(ids, s, np.full(40, 1_000_000), 0)
        assert_valid(*gp.predict(ids, 1), 40)


def test_factorisation_failure_falls_back_to_per_prompt_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    gp = GPPredictor()
    gp.set_features(["a", "b", "c"], np.eye(3))
    gp.observe(["a", "b"], np.array([3, 0]), np.array([4, 4]), 0)
    monkeypatch.setattr(gp_window, "chol", lambda k, what: None)
    with pytest.warns(GPNumericsWarning, match="smoothed rates"):
        p, s = gp.predict(["a", "b", "c"], 1)
    assert_valid(p, s, 3)
    np.testing.assert_allclose(p, [3.5 / 5, 0.5 / 5, 3.5 / 9])  # own (s+1/2)/(n+1); unseen: pooled


def test_large_window_and_history_cap() -> None:
    rng = np.random.default_rng(8)
    ids = ids_of(50)
    gp = GPPredictor(max_points=100_000, max_history=100_000)
    gp.set_features(ids, unit_rows(rng, 50))
    capped = GPPredictor(max_points=64, max_history=100)
    capped.set_features(ids, unit_rows(rng, 50))
    for step in range(12):
        b = rng.choice(50, 20, replace=False)
        for g in (gp, capped):
            g.observe([ids[i] for i in b], rng.binomial(4, 0.5, size=20), np.full(20, 4), step)
    assert_valid(*gp.predict(ids, 12), 50)
    assert_valid(*capped.predict(ids, 12), 50)
    assert capped.state_dict()["engine"]["rows"].shape[0] <= 100


def test_bad_options_and_inputs() -> None:
    with pytest.raises(ValueError, match="unknown GP preset"):
        GPPredictor(preset="nope")
    with pytest.raises(ValueError, match="unknown options"):
        GPPredictor(preset="paper", time_scale=3.0)
    for kw, msg in (
        ({"length_scale": -1.0}, "length_scale"),
        ({"max_points": 0}, "max_points"),
        ({"likelihood": "probit"}, "likelihood"),
        ({"calibrate": "yes"}, "calibrate"),
        ({"signal_var": 0.0, "prompt_var": 0.0, "global_var": 0.0}, "at least one"),
        ({"max_points": 5000, "max_history": 1000}, "max_history"),
    ):
        with pytest.raises(ValueError, match=msg):
            GPPredictor(**kw)
    gp = GPPredictor()
    with pytest.raises(ValueError, match="set_features"):
        gp.predict(["unknown"], 0)
    gp.set_features(["a"], np.ones((1, 3)) / np.sqrt(3))
    with pytest.raises(ValueError, match="different features"):
        gp.set_features(["a"], np.eye(3)[:1])
    with pytest.raises(ValueError, match="dimension"):
        gp.set_features(["b"], np.ones((1, 4)))
    with pytest.raises(ValueError, match="set_features"):
        gp.observe(["a", "zzz"], np.array([1, 1]), np.array([2, 2]), 0)
    assert gp.state_dict()["engine"]["rows"].shape == (0, 4)  # the failed call recorded nothing
