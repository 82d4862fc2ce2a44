"""verl plug-in on real verl objects, without Ray (CPU): DataProto expansion, uid groups, verl's own advantage and
balancing code, the hydra config group, prompt identity (the same prompt twice in one batch), the group-size check at
feedback, the shared metric names, and the start-up checks and refusals. The trainer loops driven inside a local Ray
cluster are in ``test_verl_loops.py`` (which imports the helpers below).
"""

from __future__ import annotations

import logging
import os
import types
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("verl")

import torch  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402

from vipalloc.integrations import verl as plug  # noqa: E402
from vipalloc.integrations.verl import (  # noqa: E402
    SUPPORTED_VERL,
    PlanNotAppliedError,
    UnsupportedVerlError,
    VIPConfig,
    VIPHook,
    divisible_budget,
    expand_by_counts,
    required_multiple,
    resolve_estimator,
)
from vipalloc.telemetry import OUTCOME_METRIC_NAMES, PLAN_METRIC_NAMES  # noqa: E402

torch.set_num_threads(1)
CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(plug.__file__)), "verl_config")  # next to verl_trainer.py


# ------------------------------------------------------------------------------------------------------ helpers
P_TABLE = [0.0, 0.1, 0.3, 0.5, 0.5, 0.7, 0.9, 1.0]  # hidden success probabilities (some never / always solved)


def true_p(index: int) -> float:
    """Hidden success probability of prompt ``index`` for the stub rollout workers."""
    return P_TABLE[index % len(P_TABLE)]


def make_batch(m: int, seed: int = 0) -> DataProto:
    """A verl training batch as ``fit`` sees it before generation: one row per prompt, uid already assigned."""
    rng = np.random.default_rng(seed)
    raw_prompt = np.empty(m, dtype=object)
    for i in range(m):
        raw_prompt[i] = [{"role": "user", "content": f"What is {i} + {i}?"}]
    return DataProto.from_dict(
        tensors={"dummy_tensor": torch.zeros(m, 1, dtype=torch.uint8)},
        non_tensors={
            "index": np.array([int(i) for i in rng.permutation(m)], dtype=object),
            "uid": np.array([f"uid-{seed}-{i}" for i in range(m)], dtype=object),
            "raw_prompt": raw_prompt,
        },
    )


def oracle_hook(m: int, strategy: str = "vip_pure", n_min: int = 2, n_max: int = 12) -> VIPHook:
    cfg = VIPConfig(strategy=strategy, predictor="oracle", n_min=n_min, n_max=n_max, embedder="hashing")
    hook = VIPHook(cfg, estimator="drgrpo")
    hook.allocator.predictor.set_true_p([str(i) for i in range(m)], np.linspace(0.03, 0.97, m))
    return hook


def plan_batch(hook: VIPHook, batch: DataProto, budget: int, step: int = 0) -> np.ndarray:
    ntb = batch.non_tensor_batch
    ids, texts = hook.prompt_ids(ntb, len(batch)), hook.prompt_texts(ntb, len(batch))
    return hook.plan(ids, texts, ntb["uid"], budget, step).counts


def group_sizes(uids: Any) -> dict[str, int]:
    keys, sizes = np.unique(np.asarray(uids, dtype=str), return_counts=True)
    return dict(zip(keys.tolist(), sizes.tolist()))


def reference_advantage(scores: np.ndarray, uids: np.ndarray, adv: str, norm: bool) -> np.ndarray:
    """Per-group reference from the estimators' definitions (not verl's code)."""
    out = np.zeros_like(scores)
    for u in np.unique(uids):
        sel = uids == u
        r = scores[sel]
        if adv.startswith("rloo"):
            out[sel] = r - (r.sum() - r) / (len(r) - 1)
        elif norm:
            out[sel] = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
        else:
            out[sel] = r - r.mean()
    return out


def compose(overrides: list[str]) -> Any:
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return hcompose(config_name="vip_trainer", overrides=overrides)


# ------------------------------------------------------------------------------- expansion / groups / balance
@pytest.mark.parametrize("ws", [1, 2, 8])
def test_expansion_follows_plan_groups_divisible_and_balanced(ws: int) -> None:
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    m, n, mini = 24, 6, 4  # 24 prompts x 6 rollouts; mini-batch of 4 prompts = 24 rows
    batch = make_batch(m, seed=ws)
    hook = oracle_hook(m)
    multiple = required_multiple(ws, mini * n)
    budget = divisible_budget(m * n, multiple, m, hook.cfg.n_min, hook.cfg.n_max)
    counts = plan_batch(hook, batch, budget)
    assert budget == m * n and int(counts.sum()) == budget and budget % ws == 0
    assert np.all((counts == 0) | (counts >= 2)) and len(set(counts.tolist())) > 2  # non-uniform, no singleton

    out = expand_by_counts(batch, counts)
    assert len(out) == budget
    # rows of a prompt are consecutive, in batch order, dropped prompts absent
    expected = np.repeat(batch.non_tensor_batch["uid"], counts)
    assert list(out.non_tensor_batch["uid"]) == list(expected)
    sizes = group_sizes(out.non_tensor_batch["uid"])
    for uid, c in zip(batch.non_tensor_batch["uid"], counts):
        assert sizes.get(uid, 0) == c
    np.testing.assert_array_equal(out.non_tensor_batch["index"], np.repeat(batch.non_tensor_batch["index"], counts))

    # verl's own balancer (RayPPOTrainer._balance_batch) then verl's dispatch chunking: equal rows per rank,
    # equal mini-batch counts per rank, token workloads balanced
    rng = np.random.default_rng(ws)
    lens = rng.integers(8, 400, budget)
    attn = torch.zeros(budget, 420, dtype=torch.int64)
    for i, length in enumerate(lens):
        attn[i, :length] = 1
    out.batch["attention_mask"] = attn
    stub = types.SimpleNamespace(_get_dp_size=lambda wg, role: ws, actor_rollout_wg=None, use_prefix_grouper=False)
    metrics: dict[str, float] = {}
    RayPPOTrainer._balance_batch(stub, out, metrics)
    assert group_sizes(out.non_tensor_batch["uid"]) == sizes  # reordering keeps the groups
    chunks = out.chunk(ws)
    per_rank_rows = [len(c) for c in chunks]
    assert per_rank_rows == [budget // ws] * ws
    assert all(r % (mini * n // ws) == 0 for r in per_rank_rows) or ws > mini * n
    tokens = np.array([int(c.batch["attention_mask"].sum()) for c in chunks])
    assert tokens.sum() == lens.sum()
    assert tokens.max() - tokens.min() <= lens.max()  # Karmarkar-Karp with equal sizes: within one sequence


@pytest.mark.parametrize(
    ("adv", "norm"),
    # verl 0.9.1's compute_advantage does not pass norm_adv_by_std_in_grpo to grpo_vectorized: it always normalises
    [("grpo", False), ("grpo", True), ("grpo_vectorized", True), ("rloo", False), ("rloo_vectorized", False)],
)
def test_verl_advantages_match_reference_per_group(adv: str, norm: bool) -> None:
    m = 12
    batch = make_batch(m, seed=3)
    hook = oracle_hook(m)
    counts = plan_batch(hook, batch, budget=m * 5)
    out = expand_by_counts(batch, counts)
    rng = np.random.default_rng(1)
    rewards = rng.binomial(1, 0.5, len(out)).astype(np.float32)
    resp_len = rng.integers(1, 6, len(out))
    mask = (torch.arange(6)[None, :] < torch.tensor(resp_len)[:, None]).float()
    scores = torch.zeros(len(out), 6)
    scores[torch.arange(len(out)), torch.tensor(resp_len) - 1] = torch.tensor(rewards)
    out.batch["token_level_rewards"] = scores
    out.batch["response_mask"] = mask
    res = compute_advantage(out, adv_estimator=adv, num_repeat=5, norm_adv_by_std_in_grpo=norm)
    adv_tok = res.batch["advantages"]
    ref = reference_advantage(rewards.astype(np.float64), np.asarray(out.non_tensor_batch["uid"], dtype=str), adv, norm)
    for i in range(len(out)):  # the scalar advantage is broadcast over the response tokens, 0 elsewhere
        np.testing.assert_allclose(adv_tok[i, : resp_len[i]].numpy(), ref[i], atol=1e-5)
        assert torch.all(adv_tok[i, resp_len[i] :] == 0)


def test_one_shot_repeat_expands_exactly_the_marked_batch() -> None:
    batch = make_batch(6)
    counts = np.array([2, 0, 4, 3, 2, 5])
    plug._one_shot_plan(batch, counts)
    rep = batch.repeat(repeat_times=4, interleave=True)
    assert len(rep) == counts.sum()
    assert group_sizes(rep.non_tensor_batch["uid"]) == {
        u: int(c) for u, c in zip(batch.non_tensor_batch["uid"], counts) if c
    }
    assert len(batch.repeat(repeat_times=2, interleave=True)) == 12  # one shot: later calls are verl's own
    other = make_batch(3)
    assert len(other.repeat(repeat_times=3, interleave=True)) == 9  # unmarked batches are untouched
    plug._one_shot_plan(other, np.array([2, 2, 2]))
    with pytest.raises(ValueError, match="interleave=True"):
        other.repeat(repeat_times=2, interleave=False)


# ------------------------------------------------------------------------------------ config and validation
def test_config_group_matches_dataclass_and_validates() -> None:
    import yaml

    with open(os.path.join(CONFIG_DIR, "vip", "default.yaml")) as f:
        default = yaml.safe_load(f)
    # the yaml mirrors the dataclass; its strategy is null: the library default (vipalloc.defaults.DEFAULT_STRATEGY)
    assert default == {**VIPConfig().to_dict(), "strategy": None}
    assert VIPConfig.from_mapping(default) == VIPConfig()

    from vipalloc.integrations.verl_trainer import check_config

    cfg = compose(["vip.n_max=16", "vip.strategy=knapsack", "algorithm.adv_estimator=rloo"])
    vip = check_config(cfg)
    assert (vip.n_max, vip.strategy) == (16, "knapsack")
    assert resolve_estimator(vip, cfg.algorithm.adv_estimator) == "rloo"
    assert resolve_estimator(vip, "grpo") == "drgrpo"
    with pytest.raises(ValueError, match="adv_estimator='gae' is not supported"):
        check_config(compose(["algorithm.adv_estimator=gae"]))
    with pytest.raises(ValueError, match="outside vip.n_min..vip.n_max"):
        check_config(compose(["actor_rollout_ref.rollout.n=2", "vip.n_min=4"]))
    with pytest.raises(ValueError, match=r"unknown vip config key\(s\) \['n_maximum'\]"):
        VIPConfig.from_mapping({"n_maximum": 3})
    with pytest.raises(ValueError, match="n_min must be an integer >= 2"):
        VIPConfig.from_mapping({"n_min": 1})
    with pytest.raises(ValueError, match=r"vip.n_min \(8\) must be <= n_max \(4\)"):
        VIPConfig.from_mapping({"n_min": 8, "n_max": 4})
    with pytest.raises(ValueError, match="estimator must be"):
        VIPConfig.from_mapping({"estimator": "grpo"})
    assert VIPConfig.from_mapping(None) == VIPConfig()


def test_budget_arithmetic_and_expansion_errors() -> None:
    assert required_multiple(8) == 8
    assert required_multiple(8, 4 * 6) == 24
    assert required_multiple(2, 16, 24) == 48
    assert divisible_budget(65, 8, 13, 2, 12) == 64
    assert divisible_budget(4000, 512, 512, 4, 32) == 3584  # rounded down to whole mini-batches
    assert divisible_budget(10_000, 8, 10, 2, 12) == 120  # capped at m * n_max
    with pytest.raises(ValueError, match="multiple of 8"):
        divisible_budget(20, 8, 5, 4, 4)
    with pytest.raises(ValueError, match="dp_size must be a positive integer"):
        required_multiple(0)
    b = make_batch(3)
    with pytest.raises(ValueError, match="singleton"):
        expand_by_counts(b, np.array([1, 3, 2]))
    with pytest.raises(ValueError, match="one entry per row"):
        expand_by_counts(b, np.array([2, 2]))
    with pytest.raises(ValueError, match=">= 0"):
        expand_by_counts(b, np.array([2, -1, 2]))
    with pytest.raises(ValueError, match="all 0"):
        expand_by_counts(b, np.array([0, 0, 0]))


def test_prompt_ids_prefer_index_then_text_hash() -> None:
    hook = VIPHook(VIPConfig(predictor="beta"), "drgrpo")
    b = make_batch(4)
    assert hook.prompt_ids(b.non_tensor_batch, 4) == [str(i) for i in b.non_tensor_batch["index"]]
    b.non_tensor_batch["index"] = np.zeros(4, dtype=object)  # verl fills 0 when extra_info.index is missing
    hashed = hook.prompt_ids(b.non_tensor_batch, 4)
    assert len(set(hashed)) == 4 and all(h.startswith("h") for h in hashed)
    assert hashed == hook.prompt_ids(make_batch(4).non_tensor_batch | {"index": np.ones(4)}, 4)
    assert hook.prompt_texts(b.non_tensor_batch, 4)[0] == "What is 0 + 0?"
    with pytest.raises(ValueError, match="no prompt text column 'raw_prompt' to tell a repeated prompt"):
        hook.prompt_ids({"index": np.zeros(4)}, 4)
    with pytest.raises(ValueError, match="cannot identify prompts"):
        hook.prompt_ids({"other": np.zeros(4)}, 4)


def test_feedback_metrics_and_allocator_file_round_trip(tmp_path) -> None:
    m = 8
    batch = make_batch(m, seed=2)
    cfg = VIPConfig(strategy="vip", predictor="beta", n_min=2, n_max=8, success_key="acc")
    hook = VIPHook(cfg, "drgrpo")
    counts = plan_batch(hook, batch, budget=32, step=1)
    out = expand_by_counts(batch, counts)
    acc = np.random.default_rng(1).binomial(1, 0.4, len(out)).astype(float)
    padding_uid = np.array(["pad-row"], dtype=object)  # rows not planned here (e.g. padding) are ignored
    uids = np.concatenate([out.non_tensor_batch["uid"], padding_uid])
    metrics = hook.observe(uids, np.append(acc, 1.0), exact=True, where="test")
    # exactly the shared names every trainer and plug-in logs (Plan.metrics + Allocator.outcome_metrics)
    assert set(metrics) == set(PLAN_METRIC_NAMES) | set(OUTCOME_METRIC_NAMES)
    assert metrics["vip/mean_n"] == pytest.approx(counts[counts > 0].mean())
    assert metrics["vip/budget"] == 32 == metrics["vip/rollouts_generated"]
    rates = [acc[out.non_tensor_batch["uid"] == u].mean() for u in batch.non_tensor_batch["uid"][counts > 0]]
    assert metrics["vip/prompt_accuracy"] == pytest.approx(np.mean(rates))  # prompt-weighted
    assert metrics["vip/rollout_accuracy"] == pytest.approx(acc.mean())  # what verl's critic/score/mean weighs
    groups = [acc[out.non_tensor_batch["uid"] == u] for u in batch.non_tensor_batch["uid"][counts > 0]]
    assert metrics["vip/frac_zero_var_groups"] == pytest.approx(np.mean([g.min() == g.max() for g in groups]))
    assert metrics["vip/plan_seconds"] > 0
    agg = hook.allocator.history.aggregates()
    assert int(agg.trials.sum()) == len(out) and int(agg.successes.sum()) == int(acc.sum())
    assert hook.observe(out.non_tensor_batch["uid"], acc, exact=True, where="test") == {}  # observed once
    # success column vs summed score
    np.testing.assert_array_equal(hook.successes(np.array([1.0, -1.0, 0.2]), None), [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(hook.successes(np.array([-1.0, -1.0]), [True, False]), [1.0, 0.0])
    with pytest.raises(ValueError, match="non-finite"):
        hook.successes(np.array([np.nan]), None)

    # a second submission in the same training step (v1 refill / async prefetch) gets its own plan step
    a, b = make_batch(4, seed=10), make_batch(4, seed=11)
    pa, pb = (hook.plan(hook.prompt_ids(x.non_tensor_batch, 4), None, x.non_tensor_batch["uid"], 16, 5) for x in (a, b))
    assert (pa.step, pb.step) == (5, 6)
    ea, eb = expand_by_counts(a, pa.counts), expand_by_counts(b, pb.counts)
    hook.observe(eb.non_tensor_batch["uid"], np.ones(len(eb)), exact=True, where="")  # in any order, own plan each
    hook.observe(ea.non_tensor_batch["uid"], np.zeros(len(ea)), exact=True, where="")
    assert int(hook.allocator.history.aggregates().trials.sum()) == len(out) + 32

    hook.save(str(tmp_path))
    other = VIPHook(cfg, "drgrpo")
    assert other.load(str(tmp_path))
    nxt = make_batch(m, seed=3)
    np.testing.assert_array_equal(plan_batch(other, nxt, 32, step=7), plan_batch(hook, nxt, 32, step=7))
    assert other.plan(["x0", "x1"], None, ["u0", "u1"], 8, step=2).step == 8  # steps stay increasing after resume
    assert not VIPHook(cfg, "drgrpo").load(str(tmp_path / "missing"))


def test_launch_script_overrides_compose_and_pass_verl_validation() -> None:
    """The example's 51 overrides are valid verl 0.9 keys and give the paper's budget (512 x 8, whole mini-batches)."""
    import subprocess

    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from vipalloc.integrations.verl_trainer import check_config

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "verl", "run_vip_qwen2.5_math_1.5b_dapo.sh")
    # run the script with python3 replaced by a printer of its arguments
    shim = "python3() { shift 2; printf '%s\\n' \"$@\"; }; export -f python3; "
    out = subprocess.run(["bash", "-c", shim + f"source {script}"], capture_output=True, text=True, check=True)
    overrides = [line for line in out.stdout.splitlines() if line]
    assert len(overrides) > 40 and "vip.strategy=vip" in overrides
    cfg = compose(overrides)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    vip = check_config(cfg)
    assert (vip.n_min, vip.n_max, cfg.algorithm.norm_adv_by_std_in_grpo) == (4, 32, False)
    rows = cfg.actor_rollout_ref.actor.ppo_mini_batch_size * cfg.actor_rollout_ref.rollout.n
    assert divisible_budget(512 * 8, required_multiple(8, rows), 512, 4, 32) == 4096


# ------------------------------------------------------------------ the same prompt twice in one batch (issue 16.7)
def test_same_prompt_twice_in_one_batch_gets_a_group_per_occurrence() -> None:
    """verl's one-prompt fetches (async, filter_groups, sync_refill_failed_groups) can put a prompt twice in one
    submission across an epoch boundary: same index, same text, fresh uid. Each occurrence is its own uid group."""
    m = 8
    batch = make_batch(m, seed=4)
    ntb = batch.non_tensor_batch
    for dst, src in ((6, 0), (7, 1)):  # rows 6 and 7 repeat rows 0 and 1 (the next epoch's shuffle)
        ntb["index"][dst] = ntb["index"][src]
        ntb["raw_prompt"][dst] = ntb["raw_prompt"][src]
    hook = VIPHook(VIPConfig(strategy="vip", predictor="beta", n_min=2, n_max=8, embedder="hashing"), "drgrpo")
    ids = hook.prompt_ids(ntb, m)
    assert ids == [str(i) for i in ntb["index"]] and len(set(ids)) == 6  # ids kept, not a hash fallback
    bp = hook.plan(ids, hook.prompt_texts(ntb, m), ntb["uid"], 32, step=3)
    assert [p.step for p in bp.plans] == [3, 4] and [len(p.prompt_ids) for p in bp.plans] == [6, 2]
    assert bp.budget == 32 and bp.counts.shape == (m,) and np.all((bp.counts == 0) | (bp.counts >= 2))
    assert [p.budget for p in bp.plans] == [24, 8]  # budget split in proportion to the layers
    out = expand_by_counts(batch, bp.counts)
    assert group_sizes(out.non_tensor_batch["uid"]) == {u: int(c) for u, c in zip(ntb["uid"], bp.counts) if c}
    acc = np.random.default_rng(0).binomial(1, 0.5, len(out)).astype(float)
    metrics = hook.observe(out.non_tensor_batch["uid"], acc, exact=True, where="test")
    assert metrics["vip/budget"] == 32 == metrics["vip/rollouts_generated"]  # both plans, merged
    agg = hook.allocator.history.aggregates()
    assert int(agg.trials.sum()) == 32 and int(agg.successes.sum()) == int(acc.sum())
    # a missing index (verl fills 0) with different texts still falls back to text hashes
    ntb2 = make_batch(m, seed=5).non_tensor_batch
    ntb2["index"] = np.zeros(m, dtype=object)
    assert len(set(hook.prompt_ids(ntb2, m))) == m


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=5),
    n_min=st.integers(2, 6),
    extra=st.integers(0, 30),
    frac=st.floats(0, 1),
)
def test_split_budget_over_occurrence_layers(sizes: list[int], n_min: int, extra: int, frac: float) -> None:
    from vipalloc.integrations.verl.layers import split_budget

    n_max = n_min + extra
    total = sum(sizes)
    budget = total * n_min + int(frac * total * (n_max - n_min))
    out = split_budget(budget, np.array(sizes), n_min, n_max)
    assert sum(out) == budget
    for b, s in zip(out, sizes):
        assert s * n_min <= b <= s * n_max  # every layer feasible on its own
        assert abs(b - budget * s / total) < len(sizes) + 1  # in proportion, up to the rounding remainder
    with pytest.raises(ValueError, match="infeasible"):
        split_budget(total * n_max + 1, np.array(sizes), n_min, n_max)


# ------------------------------------------------------------------------ group sizes vs plan (issue 16.8)
def test_group_size_mismatch_fails_loudly_and_records_nothing(caplog) -> None:
    m = 6
    batch = make_batch(m, seed=6)
    hook = oracle_hook(m, strategy="vip")
    counts = plan_batch(hook, batch, budget=24, step=0)
    assert set(counts.tolist()) != {4}  # non-uniform
    uids = batch.non_tensor_batch["uid"]
    # fit() stopped calling .repeat on the marked batches / the agent loop ignores __rollout_n__: uniform groups
    uniform = np.repeat(uids, 4)
    for exact in (True, False):
        with pytest.raises(PlanNotAppliedError, match=rf"verl did not apply the plan \(where\).*{SUPPORTED_VERL}"):
            hook.observe(uniform, np.ones(len(uniform)), exact=exact, where="where")
    assert hook.allocator.history.aggregates().trials.sum() == 0  # nothing recorded
    expanded = np.repeat(uids, counts)
    short = expanded[1:]  # the first kept group lost one session
    with pytest.raises(PlanNotAppliedError, match="asked for"):
        hook.observe(short, np.ones(len(short)), exact=True, where="legacy")
    with caplog.at_level(logging.WARNING, logger="vipalloc.integrations.verl"):
        hook.observe(short, np.ones(len(short)), exact=False, where="v1")  # v1: a failed session, recorded as is
    assert "fewer rollouts than planned" in caplog.text
    assert hook.allocator.history.aggregates().trials.sum() == len(short)


# ------------------------------------------------------------------------------ start-up checks (issue 16.8/9)
def test_start_up_check_names_missing_hooks_and_supported_range(monkeypatch) -> None:
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.trainer.ppo.v1 import agent_loop_tq

    from vipalloc.integrations.verl.checks import check_hook_points, check_verl_version

    check_hook_points.cache_clear()
    check_hook_points(False)  # the installed verl passes
    check_hook_points(True)
    assert check_verl_version("0.9.1") and check_verl_version()
    with pytest.warns(UserWarning, match=r"verl 0.10.0 is outside the range .*>=0.9,<0.10"):
        assert not check_verl_version("0.10.0")

    monkeypatch.delattr(RayPPOTrainer, "_get_gen_batch")
    check_hook_points.cache_clear()
    with pytest.raises(UnsupportedVerlError, match=rf"RayPPOTrainer._get_gen_batch exists.*{SUPPORTED_VERL}"):
        check_hook_points(False)
    monkeypatch.undo()

    def fit(self: Any) -> None:  # a fit that no longer expands the batches through .repeat
        self._get_gen_batch(None)
        self._update_actor(None)

    monkeypatch.setattr(RayPPOTrainer, "fit", fit)
    check_hook_points.cache_clear()
    with pytest.raises(UnsupportedVerlError, match="expands the generation batch with .repeat"):
        check_hook_points(False)

    def fit_without_slice(self: Any) -> None:  # the text checks read the source: these calls are what they look for
        # self._get_gen_batch( gen_batch.repeat( batch.repeat( self._update_actor(
        # self.async_rollout_manager.generate_sequences(
        return None

    monkeypatch.setattr(RayPPOTrainer, "fit", fit_without_slice)
    check_hook_points.cache_clear()
    check_hook_points(False)  # enough for single-phase VIP
    with pytest.raises(UnsupportedVerlError, match=r"keeps the first len\(gen_batch_output\) rows"):
        check_hook_points(False, True)  # two-phase relies on fit keeping len(gen_batch_output) rows

    worker = agent_loop_tq.AgentLoopWorkerTQ.__ray_actor_class__

    async def _run_prompt(self: Any, prompt: dict, *args: Any, **kwargs: Any) -> None:
        return None  # an agent loop that no longer reads the per-prompt count

    monkeypatch.setattr(worker, "_run_prompt", _run_prompt)
    check_hook_points.cache_clear()
    with pytest.raises(UnsupportedVerlError, match="reads the per-prompt __rollout_n__"):
        check_hook_points(True)
    monkeypatch.undo()
    check_hook_points.cache_clear()


def test_refused_and_warned_setups() -> None:
    from vipalloc.integrations.verl.loops import make_hook
    from vipalloc.integrations.verl_trainer import check_config

    paper = ["algorithm.norm_adv_by_std_in_grpo=false"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_config(compose(paper))
    assert not [w for w in caught if "vip" in str(w.message).lower() or "normalis" in str(w.message)]
    for overrides, match in (
        (["algorithm.filter_groups.enable=true"], "filter_groups.enable=true .* refused"),
        (["+async_training.staleness_threshold=0.1"], "verl.experimental trainer"),
        (["vip.two_phase=true", "vip.strategy=vip_two_phase"], "two_phase=true is supported in the legacy loop only"),
    ):
        cfg = compose(paper + overrides)
        with pytest.raises(ValueError, match=match):
            check_config(cfg)
        for use_v1 in (True, False):  # also refused where the trainer builds its hook (trainer process)
            with pytest.raises(ValueError, match=match):
                make_hook(cfg, use_v1)
    assert make_hook(compose(paper + ["algorithm.filter_groups.enable=true", "vip.enable=false"]), True)
    with pytest.warns(UserWarning, match="norm_adv_by_std_in_grpo=true .*Dr.GRPO variance"):
        check_config(compose(["algorithm.norm_adv_by_std_in_grpo=true"]))
    with pytest.warns(UserWarning, match="grpo_vectorized"):
        check_config(compose(["algorithm.adv_estimator=grpo_vectorized"]))


def test_dapo_recipe_and_experimental_trainers_are_refused() -> None:
    from verl.experimental.separation.ray_trainer import SeparateRayPPOTrainer
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    from vipalloc.integrations.verl import vip_trainer_class, vip_v1_trainer_class

    assert issubclass(vip_trainer_class(), RayPPOTrainer) and vip_trainer_class() is plug.RayVIPTrainer
    for cls in TRAINER_REGISTRY.values():  # sync, colocate_async, separate_async keep PPOTrainer's loop
        assert issubclass(vip_v1_trainer_class(cls), cls)
    with pytest.raises(ValueError, match="verl.experimental trainers"):
        vip_trainer_class(SeparateRayPPOTrainer)
    # the DAPO recipe ships outside verl's wheel (recipe/dapo); its trainer subclasses RayPPOTrainer with its own fit
    dapo = type("RayDAPOTrainer", (RayPPOTrainer,), {"fit": lambda self: None, "__module__": "recipe.dapo.dapo_ray"})
    with pytest.raises(ValueError, match=r"overrides \['fit'\].*DAPO recipe's own fit\(\) truncates"):
        vip_trainer_class(dapo)
    sync = TRAINER_REGISTRY["sync"]
    custom = type("MyTrainer", (sync,), {"_step_once": lambda self, *a: None})
    with pytest.raises(ValueError, match="overrides \\['_step_once'\\]"):
        vip_v1_trainer_class(custom)
    with pytest.raises(ValueError, match="not a verl PPOTrainer subclass"):
        vip_v1_trainer_class(RayPPOTrainer)


def test_strategy_names_are_read_from_the_package_at_run_time(monkeypatch) -> None:
    import vipalloc.strategies as strategies
    from vipalloc.strategies import TWO_PHASE_STRATEGIES

    for name in strategies.STRATEGY_NAMES:  # two-phase strategies need vip.two_phase=true, and only they accept it
        two = name in TWO_PHASE_STRATEGIES
        assert VIPConfig.from_mapping({"strategy": name, "two_phase": two}).strategy == name
        with pytest.raises(ValueError, match="vip.two_phase=(True|False) and strategy=.* disagree"):
            VIPConfig.from_mapping({"strategy": name, "two_phase": not two})
    with pytest.raises(ValueError, match=r"vip.strategy must be one of uniform, .*, got 'nope'"):
        VIPConfig.from_mapping({"strategy": "nope"})
    with pytest.raises(ValueError, match="vip.predictor must be one of .*, got 'nope'"):
        VIPConfig.from_mapping({"predictor": "nope"})
    monkeypatch.setattr(strategies, "STRATEGY_NAMES", (*strategies.STRATEGY_NAMES, "added_later"))
    assert VIPConfig.from_mapping({"strategy": "added_later"}).strategy == "added_later"


def test_import_vipalloc_does_not_import_verl_or_ray() -> None:
    import subprocess
    import sys

    code = "import sys, vipalloc; vipalloc.Allocator; print(any(m in sys.modules for m in ('verl', 'ray')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_import_without_verl_names_the_extra() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['verl'] = None\n"  # makes `import verl` fail as if it were not installed
        "try:\n    import vipalloc.integrations.verl\nexcept ImportError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert 'pip install "vipalloc[verl]"' in out.stdout
