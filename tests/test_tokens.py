"""Token budgets: the program against brute force, its certified gap, every strategy's token mode, the length model,
lengths through observe / history / state files, two-phase steps under a token budget, and the open two-phase
edges (late pilot rewards, failed pilots, refused plans that must record nothing)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vipalloc import Allocator
from vipalloc._io import atomic_write_json, read_json_checked
from vipalloc.allocation import domain
from vipalloc.allocation_tokens import solve_tokens
from vipalloc.history import RolloutHistory
from vipalloc.predictors.length import LengthModel
from vipalloc.strategies import STRATEGY_NAMES, TWO_PHASE_STRATEGIES, get_strategy
from vipalloc.telemetry import OUTCOME_TOKEN_METRIC_NAMES, PLAN_TOKEN_METRIC_NAMES
from vipalloc.variance import gradient_variance


# ------------------------------------------------------------------------------------------- the program itself
def _random_instance(rng: np.random.Generator):
    m = int(rng.integers(1, 6))
    vals = np.sort(rng.choice(np.arange(0, 9), size=int(rng.integers(2, 6)), replace=False))
    cost = rng.normal(size=(m, len(vals)))
    if rng.random() < 0.5:  # decreasing in n, like a variance
        cost = np.sort(cost, axis=1)[:, ::-1].copy()
    cost[rng.random(cost.shape) < 0.15] = np.inf
    cost[~np.isfinite(cost).any(axis=1), 0] = 0.0
    c = rng.uniform(0.5, 5, size=m)
    if rng.random() < 0.3:
        c = np.round(c)  # equal lengths: ties
    first = np.argmax(np.isfinite(cost), axis=1)
    t_min = float(vals[first] @ c)
    t = t_min + rng.uniform(0, 1) * (vals[-1] * c.sum() - t_min)
    cap = None if rng.random() < 0.6 else int(vals[first].sum() + rng.integers(0, m * vals[-1] + 1))
    return cost, vals, c, t, cap


def test_solve_tokens_matches_brute_force() -> None:
    """2,000 random small instances (non-convex costs, forbidden counts, equal lengths, rollout caps): the plan is
    feasible, optimal, flagged exact, and its bound never exceeds the optimum."""
    rng = np.random.default_rng(0)
    for trial in range(2000):
        cost, vals, c, t, cap = _random_instance(rng)
        m = len(c)
        best = np.inf
        for combo in itertools.product(range(len(vals)), repeat=m):
            k = np.array(combo)
            obj = cost[np.arange(m), k].sum()
            if np.isfinite(obj) and vals[k] @ c <= t + 1e-9 and (cap is None or vals[k].sum() <= cap):
                best = min(best, obj)
        sol = solve_tokens(cost, vals, c, t, max_rollouts=cap)
        n = vals[sol.idx]
        assert n @ c <= t * (1 + 1e-12) + 1e-9 and (cap is None or n.sum() <= cap), trial
        assert sol.exact and sol.gap == 0.0, trial
        assert sol.objective == pytest.approx(best, abs=1e-9), trial
        assert sol.bound <= best + 1e-9, trial


def test_large_batch_has_a_small_certified_gap() -> None:
    """M = 2,048 VIP-like prompts: no exact program, but a feasible plan whose certified gap is far below 0.1%."""
    rng = np.random.default_rng(3)
    p = np.clip(rng.beta(0.6, 0.6, 2048), 1e-6, 1 - 1e-6)
    c = 100 + 700 * (1 - p) * rng.uniform(0.5, 1.5, p.size)
    vals = domain(2, 32)
    cost = gradient_variance(p[:, None], vals[None, :], "drgrpo") + 4e-4 * np.log(p)[:, None] * vals[None, :]
    t = 8 * float(c.sum())
    sol = solve_tokens(cost, vals, c, t)
    assert vals[sol.idx] @ c <= t * (1 + 1e-12)
    assert sol.bound <= sol.objective
    assert 0.0 <= sol.gap < 1e-3
    # the dual bound is a bound: no feasible random perturbation of the plan beats it
    for _ in range(20):
        k = np.clip(sol.idx + rng.integers(-1, 2, p.size), 0, len(vals) - 1)
        if vals[k] @ c <= t:
            assert cost[np.arange(p.size), k].sum() >= sol.bound - 1e-12


def test_token_budget_below_the_minimum_names_it() -> None:
    with pytest.raises(ValueError, match="below the 40 tokens"):
        solve_tokens(np.zeros((2, 3)), np.array([2, 3, 4]), np.array([10.0, 10.0]), 39.0)


# ------------------------------------------------------------------------------------------- strategies
# single-phase strategies with a token mode (vip_authors and coba refuse, each with its reason)
TOKEN_STRATEGIES = [n for n in STRATEGY_NAMES if n not in TWO_PHASE_STRATEGIES and n not in ("vip_authors", "coba")]


@pytest.mark.parametrize("name", TOKEN_STRATEGIES)
@pytest.mark.parametrize("cap", [None, 300])
def test_every_strategy_plans_within_the_token_budget(name: str, cap: int | None) -> None:
    rng = np.random.default_rng(1)
    p = rng.beta(0.6, 0.6, 48)
    c = 50 + 500 * (1 - p)
    t = 6 * float(c.sum())
    res = get_strategy(name).allocate_tokens(p, t, c, 2, 16, max_rollouts=cap)
    n = res.counts
    assert n.dtype == np.int64 and n.shape == p.shape
    assert n @ c <= t * (1 + 1e-9)
    assert cap is None or n.sum() <= cap
    kept = n[n > 0]
    assert kept.min() >= 2 and kept.max() <= 16
    if name not in ("vip", "vip_error"):  # only these may drop
        assert (n > 0).all()
    assert np.isnan(res.gap) or 0.0 <= res.gap < 1e-3


def test_vip_authors_refuses_a_token_budget_with_its_reason() -> None:
    s = get_strategy("vip_authors")
    assert s.token_refusal and "rollout-count" in s.token_refusal
    with pytest.raises(ValueError, match="cannot plan under a token budget"):
        s.allocate_tokens(np.full(4, 0.5), 1000.0, np.full(4, 10.0), 2, 8)


def test_uniform_token_plan_is_the_largest_common_n_plus_a_fair_remainder() -> None:
    c = np.array([10.0, 20.0, 30.0, 40.0])
    counts = get_strategy("uniform").allocate_tokens(np.full(4, 0.5), 5 * 100.0 + 35.0, c, 2, 16).counts
    # 5 each = 500 tokens; 35 left: +1 to the first (10) and second (20) prompts, not the third (30 > 5 left)
    assert counts.tolist() == [6, 6, 5, 5]


def test_vip_pure_token_mode_is_exact_on_small_batches() -> None:
    rng = np.random.default_rng(7)
    for _ in range(40):
        m = int(rng.integers(2, 5))
        p = rng.uniform(0.05, 0.95, m)
        c = rng.uniform(1, 6, m)
        t = float(rng.uniform(2 * c.sum(), 6 * c.sum()))
        got = get_strategy("vip_pure").allocate_tokens(p, t, c, 2, 6).counts
        best = min(
            gradient_variance(p, np.array(n), "drgrpo").sum()
            for n in itertools.product(range(2, 7), repeat=m)
            if np.array(n) @ c <= t + 1e-9
        )
        assert gradient_variance(p, got, "drgrpo").sum() == pytest.approx(best, rel=1e-12)


def test_vip_drops_more_under_tokens_when_hopeless_prompts_run_long() -> None:
    """The reason to plan by tokens: a never-solved prompt that generates long failures costs its tokens many times
    over, so at equal tokens the plan keeps more of the cheap mid-p prompts' rollouts."""
    p = np.array([1e-4] * 8 + [0.5] * 8)
    c = np.array([800.0] * 8 + [100.0] * 8)
    t = 4 * float(c.sum())
    res = get_strategy("vip").allocate_tokens(p, t, c, 2, 64)
    assert res.counts[:8].sum() == 0  # the long hopeless prompts are dropped
    assert (res.counts[8:] > 4 * 4).all()  # their tokens buy many more rollouts on the informative prompts
    assert res.counts @ c <= t
    by_rollouts = get_strategy("vip").allocate(p, 4 * 16, 2, 64)  # the same rollouts: 8 each on the mid prompts
    assert res.counts[8:].sum() > 2 * by_rollouts[8:].sum()


# ------------------------------------------------------------------------------------------- the length model
def _rows(pid, tok_s, tok_f, n_s, n_f, step=None):
    n = len(pid)
    return {
        "prompt_index": np.asarray(pid, np.int64),
        "tokens_success": np.asarray(tok_s, float),
        "tokens_fail": np.asarray(tok_f, float),
        "token_rollouts_success": np.asarray(n_s, np.int64),
        "token_rollouts_fail": np.asarray(n_f, np.int64),
        "step": np.zeros(n, np.int64) if step is None else np.asarray(step, np.int64),
    }


def test_length_model_follows_the_success_prediction_and_shrinks_new_prompts() -> None:
    # prompt 0: 10 successes of 100 tokens, 10 failures of 500; prompt 1: unseen
    rows = _rows([0], [1000.0], [5000.0], [10], [10])
    model = LengthModel(prior_strength=0.0)
    pred = model.predict(np.array([0.25, 0.25]), np.array([0, -1]), rows, n_prompts=1)
    assert pred is not None
    assert pred.success[0] == pytest.approx(100.0) and pred.fail[0] == pytest.approx(500.0)
    assert pred.expected[0] == pytest.approx(0.25 * 100 + 0.75 * 500)
    # an unseen prompt gets the prior (here the window's only prompt, 300 tokens a rollout), scaled by outcome
    assert pred.prior[1] == pytest.approx(300.0)
    assert pred.success[1] == pytest.approx(300.0 * 100 / 300) and pred.fail[1] == pytest.approx(300.0 * 500 / 300)
    # shrinkage: a second prompt with long failures raises the window's prior; prompt 0's few rollouts move toward it
    rows2 = _rows([0, 1], [1000.0, 0.0], [5000.0, 20000.0], [10, 0], [10, 10])
    own = LengthModel(prior_strength=0.0).predict(np.array([0.5]), np.array([0]), rows2, n_prompts=2)
    shrunk = LengthModel(prior_strength=10.0).predict(np.array([0.5]), np.array([0]), rows2, n_prompts=2)
    assert own is not None and shrunk is not None
    assert own.success[0] == pytest.approx(100.0)
    target = shrunk.prior[0] * (1000.0 / 10) / ((26000.0) / 30)  # r_success * prior
    assert min(100.0, target) < shrunk.success[0] < max(100.0, target)


def test_length_model_prior_learns_lengths_from_features() -> None:
    rng = np.random.default_rng(0)
    n = 200
    x = rng.normal(size=(n, 5))
    true_log = 5.0 + x @ np.array([0.8, -0.5, 0.0, 0.3, 0.0])
    tok = np.exp(true_log) * 4  # 4 rollouts each, all failures
    rows = _rows(np.arange(n), np.zeros(n), tok, np.zeros(n), np.full(n, 4))
    new = rng.normal(size=(10, 5))
    pred = LengthModel(ridge=1e-3).predict(
        np.zeros(10), np.full(10, -1), rows, n, features=lambda idx: x[idx], batch_features=new
    )
    assert pred is not None
    want = np.exp(5.0 + new @ np.array([0.8, -0.5, 0.0, 0.3, 0.0]))
    np.testing.assert_allclose(pred.prior, want, rtol=1e-3)


def test_allocator_length_prior_uses_the_gp_features() -> None:
    """Through the Allocator with the GP (hashing features): a never-seen prompt that shares its text pattern with
    long prompts is predicted longer than one that shares it with short prompts."""
    alloc = Allocator(strategy="vip", predictor="gp", embedder="hashing", n_min=2, n_max=8)
    ids = [f"q{i}" for i in range(40)]
    texts = [("short question about apples" if i % 2 else "very long derivation of the integral") for i in range(40)]
    plan = alloc.plan(ids, prompts=texts, budget=4 * 40, step=0)
    lens = [np.full(n, 40 if i % 2 else 900) for i, n in enumerate(plan.counts)]
    alloc.observe(ids, [np.zeros(n) for n in plan.counts], step=0, lengths=lens)
    new = ["n0", "n1"]
    p2 = alloc.plan(new, prompts=["short question about pears", "very long derivation of the sum"], budget=8, step=1)
    assert p2.expected_lengths is not None and p2.expected_lengths[1] > 3 * p2.expected_lengths[0]


# ------------------------------------------------------------------------------------------- the Allocator
def _step(alloc: Allocator, ids, plan, p, lens, rng, t):
    rewards = [(rng.random(n) < q).astype(float) for n, q in zip(plan.counts, p)]
    lengths = [np.full(n, int(x)) for n, x in zip(plan.counts, lens)]
    alloc.observe(ids, rewards, step=t, lengths=lengths)
    return rewards, lengths


def test_plan_under_a_token_budget_end_to_end(tmp_path) -> None:
    rng = np.random.default_rng(0)
    m = 24
    ids = [f"q{i}" for i in range(m)]
    p = rng.beta(0.6, 0.6, m)
    lens = (80 + 600 * (1 - p)).astype(int)
    alloc = Allocator(strategy="vip", predictor="beta", n_min=2, n_max=16)
    with pytest.raises(ValueError, match="needs the expected tokens per rollout"):
        alloc.plan(ids, step=0, token_budget=1e5)
    plan = alloc.plan(ids, budget=4 * m, step=0)
    assert plan.expected_lengths is None and plan.token_budget is None
    _step(alloc, ids, plan, p, lens, rng, 0)
    t_budget = alloc.uniform_tokens(ids, 4, step=1)
    assert t_budget is not None and t_budget > 0
    plan = alloc.plan(ids, step=1, token_budget=t_budget)
    assert plan.token_budget == t_budget
    assert plan.expected_tokens is not None and plan.expected_tokens <= t_budget * (1 + 1e-9)
    assert plan.expected_tokens == pytest.approx(float(plan.counts @ plan.expected_lengths))
    assert 0.0 <= plan.optimality_gap < 1e-3
    metrics = plan.metrics()
    assert set(PLAN_TOKEN_METRIC_NAMES) <= set(metrics)
    rewards, lengths = _step(alloc, ids, plan, p, lens, rng, 1)
    out = alloc.outcome_metrics(rewards, plan, lengths=lengths, max_length=500)
    assert set(OUTCOME_TOKEN_METRIC_NAMES) <= set(out)
    assert out["vip/tokens_generated"] == sum(int(x.sum()) for x in lengths)
    long_share = sum(int(n) for n, x in zip(plan.counts, lens) if x >= 500) / plan.counts.sum()
    assert out["vip/frac_truncated"] == pytest.approx(long_share)
    # the rollout cap next to a token budget
    capped = alloc.plan(ids, budget=3 * m, step=2, token_budget=t_budget)
    assert capped.counts.sum() <= 3 * m
    # save / load keeps the lengths: the loaded allocator plans the same token plan
    alloc.save(tmp_path / "a.json")
    again = Allocator.load(tmp_path / "a.json")
    p1 = alloc.plan(ids, step=3, token_budget=t_budget)
    p2 = again.plan(ids, step=3, token_budget=t_budget)
    np.testing.assert_array_equal(p1.counts, p2.counts)
    np.testing.assert_array_equal(p1.expected_lengths, p2.expected_lengths)


def test_observe_rejects_misaligned_lengths_and_records_nothing() -> None:
    alloc = Allocator(strategy="uniform", predictor="beta", n_min=2, n_max=8)
    alloc.plan(["a", "b"], budget=8, step=0)
    with pytest.raises(ValueError, match="has 4 rewards but 3 lengths"):
        alloc.observe(["a", "b"], [np.ones(4), np.zeros(4)], step=0, lengths=[[1, 2, 3], [1, 2, 3, 4]])
    with pytest.raises(ValueError, match="whole numbers of tokens"):
        alloc.observe(["a", "b"], [np.ones(4), np.zeros(4)], step=0, lengths=[[1, 2, 3, -4], None])
    assert len(alloc.history) == 0 and not alloc.history.has_lengths
    alloc.observe(["a", "b"], [np.ones(4), np.zeros(4)], step=0, lengths=[[1, 2, 3, 4], None])
    rows = alloc.history.rows()
    assert rows["tokens_success"].tolist() == [10.0, 0.0] and rows["token_rollouts_fail"].tolist() == [0, 0]


def test_old_state_files_without_lengths_still_load(tmp_path) -> None:
    """A state file written before token budgets (no token columns, no length_kwargs) loads and plans by rollouts;
    token planning then asks for lengths."""
    alloc = Allocator(strategy="vip", predictor="beta", n_min=2, n_max=8)
    plan = alloc.plan(["a", "b", "c"], budget=12, step=0)
    alloc.observe(["a", "b", "c"], [np.ones(n) for n in plan.counts], step=0)
    path = tmp_path / "old.json"
    alloc.save(path)
    _, body = read_json_checked(path, "vipalloc.allocator", 3)
    body["config"].pop("length_kwargs", None)
    for k in ("tokens_success", "tokens_fail", "token_rollouts_success", "token_rollouts_fail"):
        body["history"].pop(k, None)
    atomic_write_json(path, "vipalloc.allocator", 2, body)
    loaded = Allocator.load(path)
    assert len(loaded.history) == 3 and not loaded.history.has_lengths
    assert loaded.plan(["a", "b", "c"], budget=12, step=1).counts.sum() == 12
    with pytest.raises(ValueError, match="expected tokens per rollout"):
        loaded.plan(["a", "b", "c"], step=2, token_budget=1000.0)


def test_history_file_keeps_lengths(tmp_path) -> None:
    h = RolloutHistory()
    h.append(0, "a", [1, 0, 1], lengths=[10, 200, 30])
    h.append(0, "b", [0, 0])
    h.save(tmp_path / "h.jsonl")
    back = RolloutHistory.load(tmp_path / "h.jsonl")
    for k in ("tokens_success", "tokens_fail", "token_rollouts_success", "token_rollouts_fail"):
        np.testing.assert_array_equal(back.rows()[k], h.rows()[k])
    assert back.rows()["tokens_success"].tolist() == [40.0, 0.0]
    # a hand-written row with per-rollout lengths, as the CLI's history.jsonl accepts
    (tmp_path / "hand.jsonl").write_text('{"step": 0, "prompt_id": "x", "rewards": [1, 0], "lengths": [5, 7]}\n')
    hand = RolloutHistory.load(tmp_path / "hand.jsonl")
    assert hand.rows()["tokens_fail"].tolist() == [7.0]
    (tmp_path / "bad.jsonl").write_text('{"step": 0, "prompt_id": "x", "rewards": [1, 0], "lengths": [5]}\n')
    with pytest.raises(ValueError, match="line 1: prompt 'x' has 2 rewards but 1 lengths"):
        RolloutHistory.load(tmp_path / "bad.jsonl")


_TOKEN_COLS = ("tokens_success", "tokens_fail", "token_rollouts_success", "token_rollouts_fail")


def _history_with_lengths() -> RolloutHistory:
    h = RolloutHistory()
    h.extend(0, ["a", "b"], [[1, 0, 1], [0, 0]], prompts=["A", None], lengths=[[10, 200, 30], None])
    h.extend(1, ["a", "b"], [[0, 1], [1, 0, 0]], lengths=[[70, 5], [3, 40, 50]])
    return h


def _same_history(a: RolloutHistory, b: RolloutHistory) -> None:
    assert a.prompt_ids == b.prompt_ids and a.success_threshold == b.success_threshold
    ra, rb = a.rows(), b.rows()
    assert ra.keys() == rb.keys()
    for k in ra:
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)
        assert ra[k].dtype == rb[k].dtype, k
    assert [a.prompt_text(p) for p in a.prompt_ids] == [b.prompt_text(p) for p in b.prompt_ids]


def _as_version_2(path, out) -> None:
    """Rewrite a history file as version 2 wrote it: the counts named lengths_*, a version-2 header over them."""
    import hashlib
    import json

    lines = path.read_text().splitlines(keepends=True)
    body = "".join(
        ln.replace('"token_rollouts_success":', '"lengths_success":').replace(
            '"token_rollouts_fail":', '"lengths_fail":'
        )
        for ln in lines[1:]
    )
    header = json.loads(lines[0])
    header.update(version=2, sha256=hashlib.sha256(body.encode()).hexdigest())
    out.write_text(json.dumps(header, separators=(",", ":")) + "\n" + body)


def test_history_counts_written_under_their_old_names_still_load(tmp_path) -> None:
    """Version-2 history files, headerless rows and state dicts that name the counts lengths_success / lengths_fail
    load to the same history as the current names; saving again writes only the new names (version 3)."""
    import json

    h = _history_with_lengths()
    h.save(tmp_path / "new.jsonl")
    text = (tmp_path / "new.jsonl").read_text()
    assert json.loads(text.splitlines()[0])["version"] == 3
    assert '"token_rollouts_success":2' in text and "lengths_" not in text
    _as_version_2(tmp_path / "new.jsonl", tmp_path / "v2.jsonl")
    assert '"lengths_success":2' in (tmp_path / "v2.jsonl").read_text()
    old = RolloutHistory.load(tmp_path / "v2.jsonl")
    _same_history(old, h)
    assert old.has_lengths and old.rows()["token_rollouts_fail"].tolist() == [1, 0, 1, 2]
    old.save(tmp_path / "again.jsonl")  # a round trip writes the new names
    assert (tmp_path / "again.jsonl").read_text() == text
    # a hand-written row without a header, old names
    row = {"step": 0, "prompt_id": "x", "trials": 3, "successes": 1, "tokens_success": 9, "tokens_fail": 30}
    (tmp_path / "hand_old.jsonl").write_text(json.dumps({**row, "lengths_success": 1, "lengths_fail": 2}) + "\n")
    (tmp_path / "hand_new.jsonl").write_text(
        json.dumps({**row, "token_rollouts_success": 1, "token_rollouts_fail": 2}) + "\n"
    )
    hand = RolloutHistory.load(tmp_path / "hand_old.jsonl")
    _same_history(hand, RolloutHistory.load(tmp_path / "hand_new.jsonl"))
    assert hand.rows()["token_rollouts_fail"].tolist() == [2]
    # both names, disagreeing: refused with the line, nothing guessed
    (tmp_path / "both.jsonl").write_text(
        json.dumps({**row, "lengths_success": 1, "token_rollouts_success": 0, "token_rollouts_fail": 2}) + "\n"
    )
    with pytest.raises(ValueError, match="line 1: 'token_rollouts_success' and its old name 'lengths_success'"):
        RolloutHistory.load(tmp_path / "both.jsonl")
    # a state dict (the allocator checkpoint's history) from before the rename
    state = h.state_dict()
    assert "lengths_success" not in state and "token_rollouts_success" in state
    old_state = {
        {"token_rollouts_success": "lengths_success", "token_rollouts_fail": "lengths_fail"}.get(k, k): v
        for k, v in state.items()
    }
    _same_history(RolloutHistory.from_state_dict(old_state), h)


def test_old_allocator_checkpoint_with_old_count_names_loads(tmp_path) -> None:
    """An allocator file whose history names the counts lengths_* (before the rename) keeps every length."""
    alloc = Allocator(strategy="vip", predictor="beta", n_min=2, n_max=8)
    plan = alloc.plan(["a", "b"], budget=8, step=0)
    alloc.observe(["a", "b"], [np.ones(n) for n in plan.counts], step=0, lengths=[[5] * n for n in plan.counts])
    path = tmp_path / "new.json"
    alloc.save(path)
    version, body = read_json_checked(path, "vipalloc.allocator", 99)
    assert version == 3  # new files say so: a version-2 reader would drop every length
    hist = body["history"]
    hist["lengths_success"] = hist.pop("token_rollouts_success")
    hist["lengths_fail"] = hist.pop("token_rollouts_fail")
    atomic_write_json(tmp_path / "old.json", "vipalloc.allocator", 2, body)
    _same_history(Allocator.load(tmp_path / "old.json").history, alloc.history)


def test_replay_reads_the_counts_under_either_name(tmp_path) -> None:
    from vipalloc.replay.cli import run_replay

    h = RolloutHistory()
    h.extend(0, ["a", "b"], [[1, 0, 1], [0, 0]], lengths=[[10, 200, 30], [8, 9]])
    h.extend(1, ["a", "b"], [[0, 1], [1, 0, 0]], lengths=[[70, 5], [3, 40, 50]])
    h.save(tmp_path / "new.jsonl")
    _as_version_2(tmp_path / "new.jsonl", tmp_path / "v2.jsonl")
    new = run_replay([tmp_path / "new.jsonl"], tmp_path / "o_new", strategies=[], predictors=["empirical"])
    old = run_replay([tmp_path / "v2.jsonl"], tmp_path / "o_old", strategies=[], predictors=["empirical"])
    assert new["tokens"] == old["tokens"] == 10 + 200 + 30 + 8 + 9 + 70 + 5 + 3 + 40 + 50


@settings(max_examples=60, deadline=None)
@given(
    m=st.integers(2, 12),
    seed=st.integers(0, 10_000),
    frac=st.floats(0.0, 1.0),
    strategy=st.sampled_from(["vip", "vip_pure", "knapsack", "hora", "dynamo", "gvm", "uniform"]),
)
def test_token_plans_never_exceed_the_budget(m: int, seed: int, frac: float, strategy: str) -> None:
    rng = np.random.default_rng(seed)
    ids = [f"q{i}" for i in range(m)]
    c = rng.integers(1, 400, m).astype(float)
    lo, hi = 2 * c.sum(), 16 * c.sum()
    alloc = Allocator(strategy=strategy, predictor="beta", n_min=2, n_max=16, seed=seed)
    plan = alloc.plan(ids, step=0, token_budget=lo + frac * (hi - lo), expected_lengths=c)
    assert plan.counts @ c <= plan.token_budget * (1 + 1e-9)
    assert ((plan.counts == 0) | ((plan.counts >= 2) & (plan.counts <= 16))).all()


# ------------------------------------------------------------------------------------------- two-phase steps
@pytest.mark.parametrize("strategy", ["vip_two_phase", "pilot_commit"])
def test_two_phase_step_under_a_token_budget(strategy: str) -> None:
    rng = np.random.default_rng(5)
    m = 18
    ids = [f"q{i}" for i in range(m)]
    p = rng.beta(0.6, 0.6, m)
    lens = (60 + 400 * (1 - p)).astype(int)
    kw = {"pool_factor": 1.5} if strategy == "pilot_commit" else {}
    alloc = Allocator(strategy=strategy, predictor="beta", n_min=2, n_max=16, strategy_kwargs=kw)
    budget = float(6 * lens.sum())
    pilot = alloc.plan_pilot(ids, step=0, pilot_n=2, token_budget=budget, expected_lengths=lens.astype(float))
    assert pilot.token_budget == budget and pilot.expected_tokens == pytest.approx(float(pilot.counts @ lens))
    # the pilot's real lengths run 20% over the prediction: the commit spends only what is left
    real = (lens * 1.2).astype(int)
    r1 = [(rng.random(n) < q).astype(float) for n, q in zip(pilot.counts, p)]
    alloc.observe(ids, r1, step=0, lengths=[np.full(n, x) for n, x in zip(pilot.counts, real)])
    commit = alloc.plan_commit(step=0)
    spent = float(pilot.counts @ real)
    assert spent + float(commit.counts @ lens) <= budget * (1 + 1e-9)
    assert commit.token_budget == budget
    # the step's tokens: the pilot as spent (its real lengths), the commit as predicted; within the budget
    assert commit.expected_tokens == pytest.approx(spent + float(commit.counts @ lens))
    assert commit.metrics()["vip/tokens_planned"] <= budget * (1 + 1e-9)


def test_late_pilot_rewards_are_not_counted_as_commit_rewards() -> None:
    """Reproduces the open edge: a pilot reward that arrives after plan_commit. With phase="pilot" it is recorded
    as pilot evidence (predictor and history), and the commit's rollouts of that prompt are still accepted."""
    alloc = Allocator(strategy="vip_two_phase", predictor="beta", n_min=2, n_max=8,
                      strategy_kwargs={"skip": "none"})  # fmt: skip
    ids = ["a", "b", "c"]
    pilot = alloc.plan_pilot(ids, budget=18, step=0, pilot_n=2)
    alloc.observe(["a", "b"], [np.ones(2), np.zeros(2)], step=0)  # "c"'s pilot is late
    commit = alloc.plan_commit(step=0)
    assert commit.pilot_counts.tolist() == [2, 2, 0]
    alloc.observe(["c"], [np.array([1.0, 0.0])], step=0, phase="pilot")  # late, but marked
    assert alloc.history.rows()["trials"].tolist() == [2, 2, 2]
    # the commit's own rollouts of "c" are still owed in full
    extra_c = int(commit.counts[2])
    if extra_c:
        alloc.observe(["c"], [np.ones(extra_c)], step=0)
    with pytest.raises(ValueError, match="already observed|not planned|got 3 rewards"):
        alloc.observe(["c"], [np.ones(3)], step=0, phase="pilot")  # more pilot rewards than were planned
    assert int(pilot.counts.sum()) == 6


def test_failed_pilot_does_not_leave_a_kept_group_below_the_minimum() -> None:
    """Reproduces the open edge: one of two pilot rollouts fails; the commit gives that prompt either nothing or
    enough for a full group (>= max(n_min, 4) in all)."""
    alloc = Allocator(strategy="vip_two_phase", predictor="beta", n_min=4, n_max=10,
                      strategy_kwargs={"skip": "none"})  # fmt: skip
    ids = [f"q{i}" for i in range(4)]
    alloc.plan_pilot(ids, budget=24, step=0, pilot_n=2)
    alloc.observe(ids, [np.array([1.0]), np.array([1.0, 0.0]), np.array([0.0, 1.0]), np.array([1.0, 0.0])], step=0)
    commit = alloc.plan_commit(step=0)
    g = commit.group_sizes
    assert g[0] == 1 or g[0] >= 4
    assert ((commit.counts == 0) | (g >= 4)).all()


def test_refused_plans_register_no_features() -> None:
    """Reproduces the open edge: a refused single-phase plan must not embed (the feature cache keeps the first text
    given for an id, so a refused call would pin it)."""
    alloc = Allocator(strategy="vip_authors", predictor="gp", embedder="hashing", n_min=4, n_max=8)
    with pytest.raises(ValueError, match="infeasible"):
        alloc.plan(["a", "b"], prompts=["x", "y"], budget=3, step=0)
    with pytest.raises(ValueError, match="cannot plan under a token budget"):
        alloc.plan(["a", "b"], prompts=["x", "y"], step=0, token_budget=100.0, expected_lengths=[5.0, 5.0])
    assert alloc._cache is None or not alloc._cache.has("a")


def test_length_prior_estimates_the_mean_not_the_geometric_mean() -> None:
    """Token costs add up linearly, so an unseen prompt's prior is the mean over prompts (here 500), not
    exp(mean log) (300): the smearing factor corrects the log-scale estimate."""
    rows = _rows([0, 1], [0.0, 0.0], [1000.0, 9000.0], [0, 0], [10, 10])
    pred = LengthModel().predict(np.array([0.0]), np.array([-1]), rows, n_prompts=2)
    assert pred is not None and pred.prior[0] == pytest.approx(500.0)


# ------------------------------------------------------------------- a looser token budget (plug-ins issue item 4)
def _own_objective(name: str, p: np.ndarray, counts: np.ndarray) -> float:
    """The strategy's own objective (lower is better) of a plan."""
    from vipalloc.allocation import objective
    from vipalloc.gradient_error import signal_terms
    from vipalloc.strategies.peers import knapsack_value

    if name == "knapsack":
        q = np.where(p < 1e-6, 0.0, np.where(p > 1 - 1e-6, 1.0, p))
        return -float(knapsack_value(q, counts.astype(float)).sum())
    if name == "vip_error":
        n_t, d_t = signal_terms(np.where(p < 1e-6, 0.0, np.where(p > 1 - 1e-6, 1.0, p)), counts)
        return -(float(n_t.sum()) ** 2 / float(d_t.sum())) if d_t.sum() > 0 else 0.0
    q = np.clip(p, 1e-6, 1 - 1e-6)
    return objective(q, counts, hardness_bonus=4e-4 if name == "vip" else 0.0)


@settings(max_examples=40, deadline=None)
@given(
    p=st.lists(st.floats(0.0, 1.0), min_size=3, max_size=8),
    lengths=st.lists(st.floats(5.0, 60.0), min_size=8, max_size=8),
    per=st.integers(2, 6),
    name=st.sampled_from(["vip", "vip_pure", "knapsack", "vip_error"]),
    equal=st.booleans(),
)
def test_loosening_a_token_budget_that_does_not_bind_never_changes_the_plan(
    p: list[float], lengths: list[float], per: int, name: str, equal: bool
) -> None:
    arr = np.array(p)
    m = len(arr)
    c = np.full(m, 20.0) if equal else np.array(lengths[:m])
    cap = per * m
    strat = get_strategy(name)
    tight = strat.allocate_tokens(arr, float(8 * c.sum()), c, 2, 8, max_rollouts=cap)
    for looser in (1.5, 4.0, 100.0):
        loose = strat.allocate_tokens(arr, float(8 * c.sum() * looser), c, 2, 8, max_rollouts=cap)
        assert _own_objective(name, arr, loose.counts) == pytest.approx(
            _own_objective(name, arr, tight.counts), abs=1e-12
        )
    if equal:  # the cap binds (8 x 20 tokens a prompt could take more): the rollout-mode plan at budget = cap
        rollouts = strat.allocate(arr, cap, 2, 8)
        if name == "vip_error":  # it need not spend the cap under tokens (parking is never forced): never worse
            assert _own_objective(name, arr, tight.counts) <= _own_objective(name, arr, rollouts) + 1e-12
            return
        # The rollout-mode plan is feasible here, so the token plan is never worse. It can be slightly better: the
        # rollout mode's even split of equal prompts is not always optimal below n = 4, where the Dr.GRPO variance
        # is not convex (found by hypothesis: 1.1e-6 relative on p = [0, 0, 0, 0.94]); hence rel 1e-5.
        own_tight, own_rollouts = _own_objective(name, arr, tight.counts), _own_objective(name, arr, rollouts)
        assert own_tight <= own_rollouts + 1e-12
        assert own_tight == pytest.approx(own_rollouts, rel=1e-5, abs=1e-9)
