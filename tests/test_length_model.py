"""The length model on seen prompts: constant lengths are predicted (nearly) exactly, an outcome never seen is
predicted from the prompt's other outcome, recency follows a drifting prompt, and the shrinkage toward the prior is
estimated from the history (issue 27 item 3)."""

from __future__ import annotations

import numpy as np
import pytest

from vipalloc import Allocator
from vipalloc.predictors.length import LengthModel


def _rows(pid, tok_s, tok_f, n_s, n_f, step):
    return {
        "prompt_index": np.asarray(pid, np.int64),
        "tokens_success": np.asarray(tok_s, float),
        "tokens_fail": np.asarray(tok_f, float),
        "token_rollouts_success": np.asarray(n_s, np.int64),
        "token_rollouts_fail": np.asarray(n_f, np.int64),
        "step": np.asarray(step, np.int64),
    }


@pytest.mark.parametrize("batch_seed", range(40))
def test_constant_lengths_over_three_steps_are_predicted_within_10_percent(batch_seed: int) -> None:
    """As a new user would: 16 prompts, each with its own constant length (5 to 200 tokens) and success rate, 4
    rollouts a step for 3 steps through ``observe(lengths=)``; then every prompt's expected length (and the plan's
    under a token budget) is within 10% of its constant."""
    rng = np.random.default_rng(batch_seed)
    m = 16
    ids = [f"b{batch_seed}-q{i}" for i in range(m)]
    texts = [f"question {i} of batch {batch_seed}" for i in range(m)]
    length = rng.integers(5, 201, m).astype(float)
    p = rng.uniform(0, 1, m)
    alloc = Allocator(strategy="uniform", predictor="beta", embedder="hashing", n_min=2, n_max=8, seed=batch_seed)
    for step in range(3):
        alloc.plan(ids, prompts=texts, budget=4 * m, step=step)
        rewards = [(rng.uniform(size=4) < pi).astype(float) for pi in p]
        alloc.observe(ids, rewards, step=step, lengths=[np.full(4, li) for li in length])
    pred = alloc.expected_lengths(ids, step=3, prompts=texts)
    assert pred is not None
    np.testing.assert_allclose(pred.expected, length, rtol=0.10)
    np.testing.assert_allclose(pred.success, length, rtol=0.10)
    np.testing.assert_allclose(pred.fail, length, rtol=0.10)
    plan = alloc.plan(ids, prompts=texts, step=3, token_budget=float(4 * length.sum()))
    assert plan.expected_lengths is not None
    np.testing.assert_allclose(plan.expected_lengths, length, rtol=0.10)


def test_an_outcome_never_seen_comes_from_the_prompts_other_outcome() -> None:
    """Prompt 0 only ever failed (10 rollouts of 20 tokens); the other prompts are long (500) and their successes
    as long as their failures: prompt 0's success length is its own scale (about 20), not the other prompts'."""
    rows = _rows(
        [0, 0, 1, 2, 3],
        [0.0, 0.0, 2500.0, 2500.0, 2500.0],
        [100.0, 100.0, 2500.0, 2500.0, 2500.0],
        [0, 0, 5, 5, 5],
        [5, 5, 5, 5, 5],
        [0, 1, 1, 1, 1],
    )
    pred = LengthModel().predict(np.array([0.5]), np.array([0]), rows, n_prompts=4)
    assert pred is not None
    assert pred.success[0] == pytest.approx(20.0, rel=0.25)
    assert pred.fail[0] == pytest.approx(20.0, rel=0.25)


def test_recency_follows_a_drifting_prompt() -> None:
    """A prompt whose length halved at each of its last visits: with a half-life the prediction is nearer the last
    visit than the all-history mean is."""
    rows = _rows(
        [0, 0, 0, 1, 1, 1], [0] * 6, [3200.0, 1600.0, 800.0, 400.0, 400.0, 400.0], [0] * 6, [8] * 6, [0, 1, 2, 0, 1, 2]
    )
    recent = LengthModel(half_life=1.0, prior_strength=0.0).predict(np.zeros(1), np.array([0]), rows, n_prompts=2)
    flat = LengthModel(half_life=None, prior_strength=0.0).predict(np.zeros(1), np.array([0]), rows, n_prompts=2)
    assert recent is not None and flat is not None
    assert flat.expected[0] == pytest.approx(5600.0 / 24)
    assert abs(recent.expected[0] - 100.0) < abs(flat.expected[0] - 100.0)
    assert recent.expected[0] == pytest.approx(300.0 / 1.75)  # weights 1, 1/2, 1/4 on 100, 200, 400


def test_shrinkage_is_estimated_noisy_prompts_are_pulled_more() -> None:
    """With noisy rows (a prompt's visits disagree) the estimated prior strength is larger than with exact ones, so
    a prompt's prediction moves toward the prior."""
    rng = np.random.default_rng(0)
    n = 30
    scale = rng.uniform(50, 150, n)
    pid = np.repeat(np.arange(n), 3)
    step = np.tile(np.arange(3), n)
    exact = _rows(pid, np.zeros(3 * n), np.repeat(scale, 3) * 4, np.zeros(3 * n), np.full(3 * n, 4), step)
    noisy_tok = np.repeat(scale, 3) * 4 * np.exp(rng.normal(0, 0.8, 3 * n))
    noisy = _rows(pid, np.zeros(3 * n), noisy_tok, np.zeros(3 * n), np.full(3 * n, 4), step)
    model = LengthModel(half_life=None)
    a = model.predict(np.zeros(n), np.arange(n), exact, n_prompts=n)
    b = model.predict(np.zeros(n), np.arange(n), noisy, n_prompts=n)
    assert a is not None and b is not None
    np.testing.assert_allclose(a.expected, scale, rtol=1e-6)  # no noise: no shrinkage
    own = np.bincount(pid, weights=noisy_tok) / 12
    pull = np.abs(b.expected - own) / np.abs(b.prior - own)
    assert float(np.median(pull)) > 0.05


def test_bad_length_options_are_refused_with_their_range() -> None:
    with pytest.raises(ValueError, match="half_life"):
        LengthModel(half_life=0.0)
    with pytest.raises(ValueError, match="outcome_strength"):
        LengthModel(outcome_strength=-1.0)
    with pytest.raises(ValueError, match="prior_strength"):
        LengthModel(prior_strength=float("nan"))
