"""The simulator's response lengths, the equal-token league's accounting and figures, and the length report of
``vipalloc bench predictors`` (small configurations: seconds)."""

from __future__ import annotations

import numpy as np
import pytest

from vipalloc.bench.length_eval import LengthErrors, group_lengths, length_baselines, step_lengths
from vipalloc.bench.sim_lengths import SimLengthModel, expected_length, prompt_length_factors, sample_lengths
from vipalloc.bench.simulator import SimConfig, Simulator
from vipalloc.bench.token_league import parse_token_rows
from vipalloc.bench.token_report import cut_curve, level_ratios
from vipalloc.bench.token_sim import TokenRow, TokenRun, token_run

SMALL = SimConfig(n_prompts=64, n_clusters=4, dim=8)


def test_lengths_grow_with_difficulty_failures_longer_and_cap_respected() -> None:
    sim = Simulator(SimConfig(n_prompts=512), seed=3)
    cfg = SimLengthModel(max_length=1500)
    factors = prompt_length_factors(sim, cfg)
    idx = np.arange(512)
    rewards = sim.rollouts(idx, np.full(512, 16), np.random.default_rng(0), width=16)
    smp = sample_lengths(sim, idx, rewards, np.random.default_rng(1), cfg, factors, 16)
    p = sim.true_p(idx)
    mean_len = np.array([x.mean() for x in smp.lengths])
    # harder prompts (low p) run longer: the correlation of p with log length is strongly negative
    assert np.corrcoef(p, np.log(mean_len))[0, 1] < -0.5
    hard, easy = mean_len[p < 0.2].mean(), mean_len[p > 0.8].mean()
    assert hard > 2.0 * easy
    # failures are longer than successes of the same prompt (mixed groups, uncut rollouts)
    ratios = []
    for r, ln, c in zip(rewards, smp.lengths, smp.cut):
        ok = ~c
        if (r[ok] > 0).any() and (r[ok] == 0).any():
            ratios.append(ln[ok][r[ok] == 0].mean() / ln[ok][r[ok] > 0].mean())
    assert np.median(ratios) > 1.2
    # the cap: nothing above it, whole tokens, every rollout at the cap is cut and scores 0
    allx = np.concatenate(smp.lengths)
    cut = np.concatenate(smp.cut)
    assert allx.max() <= cfg.max_length and np.all(allx == np.rint(allx)) and allx.min() >= 1
    assert cut.any() and np.all(allx[cut] == cfg.max_length)
    assert np.all(np.concatenate(smp.rewards)[cut] == 0.0)
    assert 0 < smp.frac_cut < 0.5
    # uncut rollouts keep their reward
    assert np.array_equal(np.concatenate(smp.rewards)[~cut], np.concatenate(rewards)[~cut])
    # the expected length (before the cap) follows the same model
    e = expected_length(p, factors, cfg)
    assert np.corrcoef(np.log(e), np.log(mean_len))[0, 1] > 0.8


def test_length_noise_is_common_random_numbers() -> None:
    """The same generator state gives a prompt slot the same lengths whatever the other slots' counts."""
    sim = Simulator(SMALL, seed=0)
    cfg = SimLengthModel()
    f = prompt_length_factors(sim, cfg)
    idx = np.arange(4)
    r_a = [np.ones(3), np.zeros(2), np.ones(1), np.zeros(5)]
    r_b = [np.ones(3), np.zeros(7), np.ones(0), np.zeros(5)]
    a = sample_lengths(sim, idx, r_a, np.random.default_rng(9), cfg, f, 8)
    b = sample_lengths(sim, idx, r_b, np.random.default_rng(9), cfg, f, 8)
    assert np.array_equal(a.lengths[0], b.lengths[0]) and np.array_equal(a.lengths[3], b.lengths[3])
    assert np.array_equal(a.lengths[1], b.lengths[1][:2])
    with pytest.raises(ValueError, match="width"):
        sample_lengths(sim, idx, r_b, np.random.default_rng(9), cfg, f, 4)
    with pytest.raises(ValueError, match="max_length"):
        SimLengthModel(max_length=0)


def test_equal_token_rows_end_at_the_same_tokens() -> None:
    kw = {"steps": 5, "batch": 16, "n_mean": 4, "n_min": 2, "n_max": 8}
    uni = token_run(TokenRow("uniform", "uniform", "empirical"), SMALL, SimLengthModel(), 0, **kw)
    total = float(uni.cum_tokens[-1])
    assert uni.steps[-1] == 5 and np.all(uni.rollouts == 64)
    assert total == pytest.approx(uni.tokens.sum())
    for row in (TokenRow("v", "vip", "beta", "tokens"), TokenRow("k", "knapsack", "beta", "rollouts")):
        run = token_run(row, SMALL, SimLengthModel(), 0, token_total=total, max_steps=30, **kw)
        # it stops at the first step past the total: overshoot below that last step's tokens
        assert run.cum_tokens[-1] >= total and run.cum_tokens[-2] < total
        assert run.cum_tokens[-1] - total < run.tokens[-1]
        x, y = cut_curve(run.cum_tokens, run.success, total)
        assert x[-1] == total and np.all(np.diff(x) > 0)
        assert min(run.success[-2], run.success[-1]) - 1e-12 <= y[-1] <= max(run.success[-2], run.success[-1]) + 1e-12
        if row.budget == "tokens":  # first step by rollouts (no length yet), then the token budget held
            assert np.isnan(run.token_budget[0]) and np.all(np.isfinite(run.token_budget[1:]))
            assert np.nanmax(run.gap[1:]) <= 1e-3
    # the record survives its JSON form (the league resumes from it)
    back = TokenRun.from_dict(uni.to_dict())
    assert np.array_equal(back.cum_tokens, uni.cum_tokens) and back.label == "uniform"


def test_level_ratios_on_known_curves() -> None:
    """A row twice as fast as uniform along the token axis needs half the tokens at every level."""
    x = np.linspace(0.0, 100.0, 101)
    seeds = 6
    rng = np.random.default_rng(0)
    uni, fast = [], []
    for _ in range(seeds):
        a = 0.3 + 0.01 * rng.standard_normal()
        uni.append((x, a + 0.4 * (1 - np.exp(-x / 30))))
        fast.append((x, a + 0.4 * (1 - np.exp(-2 * x / 30))))
    rows = level_ratios({"uniform": uni, "fast": fast}, [0.5, 0.9], n_boot=200, final_points=1)
    by = {(r.label, r.level): r for r in rows}
    for lv in (0.5, 0.9):
        assert by[("uniform", lv)].ratio == pytest.approx(1.0)
        assert by[("fast", lv)].ratio == pytest.approx(0.5, abs=0.02)
        assert by[("fast", lv)].ratio_lo <= by[("fast", lv)].ratio <= by[("fast", lv)].ratio_hi
    # a row that never gets there is censored, not given a made-up number
    flat = [(x, np.full_like(x, y[0])) for x, y in uni]
    rows = level_ratios({"uniform": uni, "flat": flat}, [0.5], n_boot=50, final_points=1)
    assert np.isinf([r for r in rows if r.label == "flat"][0].ratio)


def test_parse_token_rows() -> None:
    rows = parse_token_rows("uniform,vip (tokens),knapsack:beta:tokens")
    assert [r.budget for r in rows] == ["rollouts", "tokens", "tokens"]
    with pytest.raises(ValueError, match="first row"):
        parse_token_rows("vip (tokens)")
    with pytest.raises(ValueError, match="budget"):
        parse_token_rows("uniform,vip:beta:seconds")


def test_predictors_length_report_fields() -> None:
    from vipalloc.bench.predictors import replay_predictor, simulator_trace

    trace = simulator_trace(SMALL, 0, steps=6, batch=16, pool=32)
    st = trace.steps[1]
    assert st["tokens"].shape == (4, 16) and np.all(st["tokens"][2] + st["tokens"][3] == st["trials"])
    res = replay_predictor(trace, "beta")
    for sub in ("all", "seen", "never seen"):
        assert res["length"][sub]["count"] > 0 and np.isfinite(res["length"][sub]["mae_log"])
    assert res["length"]["all"]["count"] == res["length"]["seen"]["count"] + res["length"]["never seen"]["count"]
    base = length_baselines(trace.steps)
    assert set(base) == {"global mean", "prompt's last mean", "true expected length (oracle)"}
    # never-seen prompts: the last-mean baseline falls back to the global mean
    assert base["prompt's last mean"]["never seen"]["mae_log"] == base["global mean"]["never seen"]["mae_log"]
    # the truth beats the global mean
    assert base["true expected length (oracle)"]["all"]["mae_log"] < base["global mean"]["all"]["mae_log"]


def test_length_helpers() -> None:
    g = group_lengths(10.0, 3)
    assert g.sum() == 10 and np.all(g == np.rint(g)) and g.max() - g.min() <= 1
    tok = np.array([[30.0, 0.0], [70.0, 40.0], [1.0, 0.0], [2.0, 1.0]])
    lens = step_lengths(np.array([1, 0]), np.array([3, 2]), tok)
    assert lens[0] is not None and lens[0][0] == 30 and lens[0][1:].sum() == 70
    assert lens[1] is None  # one of its rollouts had no length
    e = LengthErrors()
    e.add(np.array([100.0, 100.0]), np.array([100.0 * np.e, np.nan]), np.array([True, False]))
    r = e.result()
    assert r["all"]["count"] == 1 and r["all"]["mae_log"] == pytest.approx(1.0) and r["never seen"]["count"] == 0
