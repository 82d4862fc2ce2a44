"""Token mode of the verl plug-in (``vip.token_budget``), through verl's own trainer loops (CPU, stub workers).

* legacy ``RayPPOTrainer.fit`` (verl's real loop) with ``vip.token_budget=uniform``: response lengths differ per
  prompt (hard prompts run long and hit ``response_length``), the first step is planned by rollouts, later steps
  under the tokens uniform ``rollout.n`` would have spent (equal to ``Allocator.uniform_tokens`` when planned), rows
  a multiple of DP x mini-batch rows (the token plan rounded down, never up), lengths reaching ``observe`` equal to
  the ``response_mask`` counts, ``vip/tokens_*`` in verl's logged metrics;
* the v1 (TransferQueue) ``fit`` with an absolute cap (the first step priced at ``response_length`` a rollout, the
  engine's budget policy): uneven rows per step that verl pads for its two DP ranks
  (``_balance_batch``), a prompt twice in one batch (one token budget per occurrence layer), a failed session (its
  group one short, lengths aligned with its rewards);
* the rounding rule (``trim_to_multiple``, brute force) and the hook's re-plan / cut path, deterministically;
* refusals before the first step (``vip_authors``, two-phase), config validation.

What the harness supports: one process; "two DP ranks" are the stub actor group's dispatch info, which verl's own
``_balance_batch`` / padding / mini-batch arithmetic acts on (no second worker process exists).
"""

from __future__ import annotations

import itertools
import warnings
from collections import defaultdict
from typing import Any

import numpy as np
import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from test_verl import compose, group_sizes, reference_advantage, true_p  # noqa: E402
from test_verl_loops import (  # noqa: E402
    R_LEN,
    TQ_OVERRIDES,
    VIP_METRICS,
    build_v1_trainer,
    legacy_overrides,
    legacy_trainer,
    rollout_tensors,
    v1_config,
)
from verl import DataProto  # noqa: E402

from vipalloc.integrations import verl as plug  # noqa: E402
from vipalloc.integrations.verl.core import trim_to_multiple  # noqa: E402
from vipalloc.telemetry import OUTCOME_TOKEN_METRIC_NAMES, PLAN_TOKEN_METRIC_NAMES  # noqa: E402

torch.set_num_threads(1)
TOKEN_OUTCOME = set(OUTCOME_TOKEN_METRIC_NAMES)
TOKEN_PLAN = set(PLAN_TOKEN_METRIC_NAMES)


def length_of(index: int, rng: np.random.Generator) -> int:
    """Generated tokens of one rollout of prompt ``index``: grows with difficulty (p=0 prompts always hit the
    response length ``R_LEN``, p=1 prompts stop after 1-2 tokens), +-1 of noise."""
    mean = 1 + (1 - true_p(index)) * (R_LEN - 1)
    return int(np.clip(round(mean) + rng.integers(-1, 2), 1, R_LEN))


def spy(hook: Any, rollout_n: int) -> dict[str, list[Any]]:
    """Wrap the hook's allocator: every ``plan`` call (with ``uniform_tokens`` at that moment when it carries a token
    budget) and every ``observe`` call is recorded."""
    alloc = hook.allocator
    calls: dict[str, list[Any]] = {"plan": [], "observe": []}
    plan, observe = alloc.plan, alloc.observe

    def plan_spy(ids: Any, prompts: Any = None, budget: Any = None, step: Any = None, **kw: Any) -> Any:
        tb = kw.get("token_budget")
        uniform = None if tb is None else alloc.uniform_tokens(ids, rollout_n, step)
        out = plan(ids, prompts=prompts, budget=budget, step=step, **kw)
        calls["plan"].append({"step": step, "cap": budget, "token_budget": tb, "uniform": uniform, "plan": out})
        return out

    def observe_spy(ids: Any, rewards: Any, step: int, lengths: Any = None) -> Any:
        calls["observe"].append({"step": step, "ids": list(ids), "rewards": [np.asarray(r) for r in rewards],
                                 "lengths": None if lengths is None else [np.asarray(x) for x in lengths]})  # fmt: skip
        return observe(ids, rewards, step, lengths=lengths)

    alloc.plan, alloc.observe = plan_spy, observe_spy
    return calls


def observed_lengths(calls: dict[str, list[Any]], step: int) -> dict[str, list[int]]:
    """Sorted lengths given to ``observe`` per prompt id at plan ``step`` (several calls merged)."""
    out: dict[str, list[int]] = defaultdict(list)
    for c in calls["observe"]:
        if c["step"] == step:
            assert c["lengths"] is not None, "lengths did not reach Allocator.observe"
            for pid, r, ln in zip(c["ids"], c["rewards"], c["lengths"]):
                assert len(ln) == len(r)  # aligned with the rewards, also for a short group
                out[pid].extend(int(x) for x in ln)
    return {k: sorted(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------- legacy loop
class LengthRollout:
    """verl's ``AgentLoopManager.generate_sequences`` on the legacy loop: per row a 0/1 reward ~ Bernoulli(p(index))
    and a response of :func:`length_of` tokens (``response_mask`` 1 on them)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.seen: list[dict[str, int]] = []
        self.rows: list[list[tuple[str, int, int]]] = []  # per call: (uid, index, generated tokens) per row

    def generate_sequences(self, gen_batch: DataProto) -> DataProto:
        uids = [str(u) for u in gen_batch.non_tensor_batch["uid"]]
        index = [int(i) for i in gen_batch.non_tensor_batch["index"]]
        reward = np.array([self.rng.random() < true_p(i) for i in index], dtype=np.float32)
        lens = np.array([length_of(i, self.rng) for i in index])
        self.seen.append(group_sizes(uids))
        self.rows.append(list(zip(uids, index, lens.tolist())))
        return DataProto.from_dict(
            tensors=rollout_tensors(lens, reward),
            non_tensors={
                "acc": reward.astype(bool),
                "multi_modal_inputs": np.array([{} for _ in uids], dtype=object),
                "gen_uid": np.array(uids, dtype=object),
            },
            meta_info={"timing": {}, "reward_extra_keys": ["acc"]},
        )


def test_legacy_fit_uniform_token_budget(tmp_path, monkeypatch) -> None:
    """verl's legacy ``fit``, 4 steps of 8 prompts, ``vip.token_budget=uniform`` (rollout cap 32, DP 2, mini-batch
    rows 4 x 4: rows must be a multiple of 16)."""
    from verl.utils.tracking import Tracking

    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(Tracking, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Tracking, "log", lambda self, data, step, **k: logged.append((step, dict(data))))
    extra = ["trainer.save_freq=-1", "trainer.total_training_steps=4", "vip.token_budget=uniform",
             f"actor_rollout_ref.rollout.response_length={R_LEN}"]  # fmt: skip
    config = compose(legacy_overrides(str(tmp_path / "ckpt"), extra))
    seen: list[dict[str, Any]] = []
    trainer = legacy_trainer(config, seen)
    calls = spy(trainer._vip(), rollout_n=4)
    rollout = LengthRollout(seed=2)
    trainer.async_rollout_manager = rollout
    trainer.fit()

    hook = trainer._vip_hook
    assert len(seen) == 4 == len(rollout.seen)
    for gen, upd in zip(rollout.seen, seen):
        rows = sum(gen.values())
        assert rows % 16 == 0 and 16 <= rows <= 32  # the DP x mini-batch invariant, the rollout cap
        assert group_sizes(upd["uid"]) == gen and all(n >= 2 for n in gen.values())
        np.testing.assert_array_equal(upd["uid"], upd["gen_uid"])
        ref = reference_advantage(upd["scores"], upd["uid"], "grpo", norm=False)
        first = upd["mask"].argmax(-1)
        np.testing.assert_allclose(upd["adv"][torch.arange(len(ref)), first].numpy(), ref, atol=1e-6)
    # uneven lengths: per-prompt means differ, the hardest prompts hit the response length
    per_prompt: dict[int, list[int]] = defaultdict(list)
    for call in rollout.rows:
        for _, idx, n_tok in call:
            per_prompt[idx].append(n_tok)
    means = [np.mean(v) for v in per_prompt.values()]
    assert max(means) - min(means) >= 3 and any(n == R_LEN for v in per_prompt.values() for n in v)

    # lengths reaching Allocator.observe = response_mask counts of the trained rows, per prompt and plan step
    for step, upd in enumerate(seen, start=1):
        index_of = {u: i for u, i, _ in rollout.rows[step - 1]}
        mask_len: dict[str, list[int]] = defaultdict(list)
        for u, n_tok in zip(upd["uid"], upd["mask"].sum(-1).tolist()):
            mask_len[str(index_of[str(u)])].append(int(n_tok))
        assert observed_lengths(calls, step) == {k: sorted(v) for k, v in mask_len.items()}

    # step 1: no length known, planned by rollouts (exact 32); later steps: token plans at uniform's tokens
    assert all(c["token_budget"] is None for c in calls["plan"] if c["step"] == 1)
    token_calls = [c for c in calls["plan"] if c["token_budget"] is not None]
    assert {c["step"] for c in token_calls} == {2, 3, 4}
    for c in token_calls:
        assert c["token_budget"] == pytest.approx(c["uniform"], rel=1e-12)  # the "uniform" default
        assert c["plan"].expected_tokens <= c["token_budget"] * (1 + 1e-9) and c["plan"].counts.sum() <= c["cap"]
    for step in (2, 3, 4):
        plan = hook._plans[step]
        assert plan.token_budget is not None and plan.expected_tokens <= plan.token_budget * (1 + 1e-9)
        assert int(plan.counts.sum()) == sum(rollout.seen[step - 1].values())
    # verl's logged step metrics carry the shared names, token ones included
    vip_logs = {s: d for s, d in logged if "vip/budget" in d}
    assert sorted(vip_logs) == [1, 2, 3, 4]
    for step, d in vip_logs.items():
        upd = seen[step - 1]
        n_tok = upd["mask"].sum(-1).numpy()
        assert VIP_METRICS | TOKEN_OUTCOME <= set(d)
        assert d["vip/tokens_generated"] == pytest.approx(float(n_tok.sum()))
        assert d["vip/frac_truncated"] == pytest.approx(float(np.mean(n_tok >= R_LEN)))
        if step == 1:
            assert not TOKEN_PLAN & set(d)  # planned before any length was known
        else:
            assert TOKEN_PLAN <= set(d)
            assert d["vip/token_budget"] == pytest.approx(hook._plans[step].token_budget)
            assert d["vip/tokens_planned"] == pytest.approx(hook._plans[step].expected_tokens)
            assert d["vip/tokens_planned"] <= d["vip/token_budget"] * (1 + 1e-9)


def test_one_step_off_policy_token_mode_observes_lengths_late(tmp_path, monkeypatch) -> None:
    """verl's real ``OneStepOffRayTrainer.fit`` (async: batch t+1 planned before batch t is observed) with
    ``vip.token_budget=uniform``: the first two batches are planned by rollouts (no length known when they are
    dispatched), later ones under uniform's tokens; each batch's lengths reach ``observe`` at its own plan step."""
    import asyncio
    import types

    from test_verl_async import AsyncRollout
    from test_verl_loops import PromptDataset, StubActorGroup
    from verl.trainer.ppo.ray_trainer import Role
    from verl.utils.dataset.rl_dataset import collate_fn
    from verl.utils.tracking import Tracking

    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(Tracking, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Tracking, "log", lambda self, data, step, **k: logged.append((step, dict(data))))
    extra = ["trainer.save_freq=-1", "trainer.total_training_steps=4", "actor_rollout_ref.hybrid_engine=false",
             "vip.token_budget=uniform", f"actor_rollout_ref.rollout.response_length={R_LEN}"]  # fmt: skip
    config = compose(legacy_overrides(str(tmp_path / "ckpt"), extra))
    seen: list[Any] = []

    class Recording(plug.vip_one_step_off_trainer_class()):  # type: ignore[misc]
        def _update_actor(self, batch: Any) -> Any:
            seen.append((np.asarray(batch.non_tensor_batch["uid"], dtype=str), batch.batch["response_mask"].sum(-1)))
            return super()._update_actor(batch)

    t = Recording(config=config, tokenizer=None, role_worker_mapping={Role.Actor: object},
                  resource_pool_manager=types.SimpleNamespace(get_n_gpus=lambda: 2), train_dataset=PromptDataset(8),
                  val_dataset=PromptDataset(8), collate_fn=collate_fn)  # fmt: skip
    t.actor_rollout_wg = t.actor_wg = StubActorGroup(dp=2)
    t.checkpoint_manager = types.SimpleNamespace(update_weights=lambda step: None, sleep_replicas=lambda: None)
    calls = spy(t._vip(), rollout_n=4)
    rollout = LengthRollout(seed=4)
    t.async_rollout_manager = AsyncRollout(rollout, [], seed=1)  # type: ignore[arg-type]
    asyncio.run(t.fit())

    assert len(seen) == 4 == len(rollout.seen)
    assert [c["step"] for c in calls["plan"] if c["token_budget"] is not None][:1] == [3]  # 1, 2: by rollouts
    for step, (uids, mask_len) in enumerate(seen, start=1):
        index_of = {u: i for u, i, _ in rollout.rows[step - 1]}
        by_pid: dict[str, list[int]] = defaultdict(list)
        for u, n_tok in zip(uids, mask_len.tolist()):
            by_pid[str(index_of[str(u)])].append(int(n_tok))
        assert observed_lengths(calls, step) == {k: sorted(v) for k, v in by_pid.items()}
        assert sum(rollout.seen[step - 1].values()) % 16 == 0
    for c in calls["plan"]:
        if c["token_budget"] is not None:
            assert c["token_budget"] == pytest.approx(c["uniform"], rel=1e-12)
            assert c["plan"].expected_tokens <= c["token_budget"] * (1 + 1e-9)
    vip_logs = [d for _, d in logged if "vip/budget" in d]
    assert len(vip_logs) == 4 and all(TOKEN_OUTCOME <= set(d) for d in vip_logs)
    assert all(TOKEN_PLAN <= set(d) for d in vip_logs[2:])


# ------------------------------------------------------------------------------------------------ v1 loop
@pytest.fixture(scope="module")
def transfer_queue():
    ray = pytest.importorskip("ray")
    tq = pytest.importorskip("transfer_queue")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    tq.init(compose(TQ_OVERRIDES).transfer_queue)
    try:
        yield tq
    finally:
        tq.close()
        ray.shutdown()


class LengthAgentLoop:
    """verl's ``AgentLoopWorkerTQ`` per prompt, as ``test_verl_loops.StubAgentLoop`` but with :func:`length_of`
    lengths; ``fail``: (submission, prompt index) pairs whose session 0 fails (no trajectory: its group one short)."""

    def __init__(self, tq: Any, fail: set[tuple[int, int]], seed: int = 0) -> None:
        self.tq, self.fail = tq, fail
        self.rng = np.random.default_rng(seed)
        self.submissions: list[list[tuple[str, int, int]]] = []
        self.rows: dict[str, list[int]] = defaultdict(list)  # uid -> generated tokens of each written session

    def generate_sequences(self, batch: Any) -> None:
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        sub = []
        for i in range(len(batch)):
            uid, idx, n = batch["uid"][i], int(batch["index"][i]), int(batch["__rollout_n__"][i])
            sub.append((uid, idx, n))
            fields, keys, tags = [], [], []
            for s in range(n):
                if s == 0 and (len(self.submissions), idx) in self.fail:
                    continue  # a failed session: nothing written
                reward = float(self.rng.random() < true_p(idx))
                rl = length_of(idx, self.rng)
                row = {k: v[0, : (rl if v.shape[1] == R_LEN else None)] for k, v in
                       rollout_tensors(np.array([rl]), np.array([reward])).items()}  # fmt: skip
                row.update(uid=uid, num_turns=torch.tensor(2), extra_fields={"reward_extra_info": {"acc": reward}})
                row["old_log_probs"] = row["rollout_log_probs"]
                fields.append(row)
                keys.append(f"{uid}_{s}_0")
                self.rows[uid].append(rl)
                step = int(batch["global_steps"]) if "global_steps" in batch.keys() else 1
                tags.append({"status": "success", "seq_len": 4 + rl, "global_steps": step,
                             "min_global_steps": step, "max_global_steps": step})  # fmt: skip
            if keys:
                self.tq.kv_batch_put(
                    keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(fields), tags=tags
                )
            self.tq.kv_put(key=uid, partition_id="train", tag={"status": "finished"})
        self.submissions.append(sub)


def test_v1_fit_absolute_token_cap_uneven_rows_padded_by_verl(transfer_queue, tmp_path, monkeypatch) -> None:
    """verl's real v1 ``fit`` for 3 steps, ``vip.token_budget=100`` tokens per step, 12 prompts fetched one at a time
    (step 2 holds a prompt twice, seed 5), one failed session in step 1."""
    from verl.utils.tracking import Tracking

    tq = transfer_queue
    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(Tracking, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Tracking, "log", lambda self, data, step, **k: logged.append((step, dict(data))))
    extra = ["trainer.save_freq=-1", "vip.token_budget=100", f"actor_rollout_ref.rollout.response_length={R_LEN}"]
    config = v1_config(str(tmp_path / "ckpt"), extra)
    agent = LengthAgentLoop(tq, fail=set())
    trainer = build_v1_trainer(config, tq, agent, dataset_size=12, seed=5)
    calls = spy(trainer._vip(), rollout_n=4)
    first_idx = None

    def fail_first_prompt(batch: Any) -> None:  # fail one session of the first submitted prompt of step 1
        nonlocal first_idx
        if first_idx is None:
            first_idx = int(batch["index"][0])
            agent.fail.add((0, first_idx))
        LengthAgentLoop.generate_sequences(agent, batch)

    agent.generate_sequences = fail_first_prompt  # type: ignore[method-assign]
    trainer.fit(agent)

    hook = trainer._vip_hook
    batches = trainer.actor_rollout_wg.batches
    assert len(agent.submissions) == 3 == len(batches)
    step2 = [idx for _, idx, _ in agent.submissions[1]]
    assert len(set(step2)) < len(step2)  # a prompt twice: two occurrence layers, each with its token share
    padded_any = False
    for k, (sub, upd) in enumerate(zip(agent.submissions, batches)):
        planned = {uid: n for uid, _, n in sub if n}
        real = [u for u in upd["uid"] if not u.startswith("pad")]
        pads = len(upd["uid"]) - len(real)
        expected = dict(planned)
        if k == 0:
            expected[next(u for u, i, _ in sub if i == first_idx)] -= 1  # the failed session
        assert group_sizes(real) == expected  # trained groups = planned (one short where a session failed)
        assert len(upd["uid"]) % 8 == 0 and pads == (-len(real)) % 8  # verl's no-op rows make DP x mini-batch rows
        padded_any |= pads > 0
        np.testing.assert_allclose(upd["adv"], reference_advantage(upd["scores"], upd["uid"], "grpo", False), atol=1e-6)
    assert padded_any  # token plans whose rows are not a multiple: the v1 loop pads, it does not cut
    # token plans at every step (per occurrence layer), never over their share of the 100-token cap; the first,
    # before any length, priced at response_length a rollout (the engine's budget policy, as TRL and the trainer)
    token_plans = [c for c in calls["plan"] if c["token_budget"] is not None]
    assert len(token_plans) == len(calls["plan"]) and token_plans[0]["step"] == 1
    assert np.all(token_plans[0]["plan"].expected_lengths == R_LEN)
    for c in token_plans:
        assert c["plan"].expected_tokens <= c["token_budget"] * (1 + 1e-9)
    layers = [s for s, p in hook._plans.items() if p.token_budget is not None]
    assert sum(hook._plans[s].token_budget for s in layers) == pytest.approx(100.0 * 3)  # 3 steps, all layers
    # lengths reaching observe = what the agent wrote (response_mask counts), the short group aligned with its rewards
    observed: dict[str, list[int]] = defaultdict(list)
    for step in sorted({c["step"] for c in calls["observe"]}):
        for pid, lens in observed_lengths(calls, step).items():  # checks each is aligned with its rewards
            observed[pid].extend(lens)
    written: dict[str, list[int]] = defaultdict(list)
    for sub in agent.submissions:
        for uid, idx, _ in sub:
            written[str(idx)].extend(agent.rows[uid])
    assert {k: sorted(v) for k, v in observed.items()} == {k: sorted(v) for k, v in written.items() if v}
    short = [c for c in calls["observe"] if c["step"] == 1]
    lens1 = {pid: ln for c in short for pid, ln in zip(c["ids"], c["lengths"])}
    assert len(lens1[str(first_idx)]) == next(n for _, i, n in agent.submissions[0] if i == first_idx) - 1
    vip_logs = [d for _, d in logged if "vip/budget" in d]
    assert len(vip_logs) == 3
    for d in vip_logs:
        assert VIP_METRICS | TOKEN_OUTCOME <= set(d)
    for d in vip_logs:
        # vip/optimality_gap is left out when a merged plan has no certificate (a refill planned as a rule)
        assert TOKEN_PLAN - {"vip/optimality_gap"} <= set(d)
        assert d["vip/tokens_planned"] <= d["vip/token_budget"] * (1 + 1e-9)
        assert d["vip/token_budget"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------ rounding, refusals
@pytest.mark.parametrize("seed", range(40))
def test_trim_to_multiple_is_the_largest_reachable_multiple(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m, n_min, multiple = int(rng.integers(1, 6)), int(rng.integers(2, 4)), int(rng.integers(2, 9))
    counts = np.where(rng.random(m) < 0.25, 0, rng.integers(n_min, 9, m))
    if counts.sum() == 0:
        counts[0] = n_min
    reachable = [np.array(c) for c in itertools.product(*[[0, *range(n_min, int(x) + 1)] for x in counts])]
    best = max((int(c.sum()) for c in reachable if c.sum() > 0 and c.sum() % multiple == 0), default=None)
    if best is None:
        with pytest.raises(ValueError, match="cannot be cut to a positive multiple"):
            trim_to_multiple(counts, multiple, n_min)
        return
    out = trim_to_multiple(counts, multiple, n_min)
    assert int(out.sum()) == best and np.all(out <= counts)
    assert np.all((out == 0) | (out >= n_min))


def test_hook_rounds_a_token_plan_down_and_never_adds_tokens() -> None:
    """The legacy loop's rounding: re-plan with the rollout cap rounded down, then cut; tokens stay under the cap."""
    from vipalloc.integrations.verl.core import VIPConfig
    from vipalloc.integrations.verl.hook import VIPHook

    rng = np.random.default_rng(0)
    ids = [str(i) for i in range(8)]
    cut = []
    for token_budget, multiple in (("uniform", 16), (70.0, 16), (65.0, 6), (90.0, 12), (66.0, 12), (20.0, 8)):
        hook = VIPHook(VIPConfig(strategy="vip", predictor="beta", n_min=2, n_max=8, token_budget=token_budget),
                       "drgrpo", max_length=R_LEN)  # fmt: skip
        cap_n = 32 - 32 % multiple  # the rollout budget, a multiple (divisible_budget)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a small cap is raised to n_min rollouts (below)
            first = hook.plan(ids, None, [f"u0_{i}" for i in ids], cap_n, 1, rollout_n=4, multiple=multiple)
        if token_budget == "uniform":  # no lengths yet: uniform's rollouts
            assert first.plans[0].token_budget is None and first.budget == cap_n
        else:  # a cap, priced at response_length a rollout (the engine's budget policy, as TRL and the CPU trainer)
            assert first.plans[0].token_budget == pytest.approx(max(token_budget, 2 * R_LEN * len(ids)))
            assert first.budget * R_LEN <= first.plans[0].token_budget and first.budget % multiple == 0
        uids = [f"u0_{i}" for i, n in zip(ids, first.counts.tolist()) for _ in range(n)]
        lens = np.array([length_of(int(u.split("_")[1]), rng) for u in uids])
        succ = np.array([rng.random() < true_p(int(u.split("_")[1])) for u in uids], dtype=float)
        metrics = hook.observe(uids, succ, exact=True, where="test", lengths=lens)
        assert metrics["vip/tokens_generated"] == float(lens.sum())
        if token_budget == 20.0:  # below n_min rollouts of every prompt at the predicted lengths: raised, warned
            with pytest.warns(RuntimeWarning, match="token_budget=20 cannot pay for n_min=2 rollouts"):
                bp = hook.plan(ids, None, [f"u1_{i}" for i in ids], cap_n, 2, rollout_n=4, multiple=multiple)
            raised = bp.plans[0]
            assert raised.token_budget == pytest.approx(2 * float(np.sum(raised.expected_lengths)))
            assert float(bp.counts @ raised.expected_lengths) <= raised.token_budget * (1 + 1e-9)
            continue
        bp = hook.plan(ids, None, [f"u1_{i}" for i in ids], cap_n, 2, rollout_n=4, multiple=multiple)
        plan = bp.plans[0]
        cap = 4 * float(np.sum(plan.expected_lengths)) if token_budget == "uniform" else token_budget
        assert plan.token_budget == pytest.approx(cap)
        assert bp.budget % multiple == 0 and 0 < bp.budget <= cap_n
        assert float(bp.counts @ plan.expected_lengths) <= cap * (1 + 1e-9)
        assert np.all((bp.counts == 0) | (bp.counts >= 2))
        assert plan.metrics()["vip/tokens_planned"] <= cap * (1 + 1e-9)
        cut.append(bool(np.isnan(plan.optimality_gap)))  # cut by trim_to_multiple: no certificate any more
    # both paths ran: (66, 12) plans ~22 rollouts, and a rollout cap of 12 < 8 prompts x n_min is refused by the
    # engine, so it is cut; "uniform" lands on a multiple when re-planned under the rounded-down cap
    assert cut[0] is False and cut[-1] is True


def test_token_mode_refusals_before_the_first_step(tmp_path) -> None:
    from vipalloc.integrations.verl_trainer import check_config

    base = ["algorithm.norm_adv_by_std_in_grpo=false", "trainer.use_v1=false"]
    with pytest.raises(ValueError, match="vip_authors.*is refused: the authors' procedure"):
        check_config(compose([*base, "vip.strategy=vip_authors", "vip.token_budget=uniform"]))
    two_phase = [*base, "vip.two_phase=true", "vip.strategy=vip_two_phase", "vip.token_budget=uniform"]
    with pytest.raises(ValueError, match="two_phase=true is refused by the verl plug-in.*rounding the commit down"):
        check_config(compose(two_phase))
    assert check_config(compose([*base, "vip.token_budget=5000"])).token_budget == 5000
    # the trainer process refuses too, when its hook is built (before any plan; no workers needed)
    cls = plug.vip_trainer_class()
    t = cls.__new__(cls)
    t.config = compose(legacy_overrides(str(tmp_path), ["vip.strategy=vip_authors", "vip.token_budget=uniform"]))
    with pytest.raises(ValueError, match="vip_authors"):
        t._vip()
    from verl.trainer.ppo.v1 import PPOTrainerSync

    v1 = plug.vip_v1_trainer_class(PPOTrainerSync)
    t1 = v1.__new__(v1)
    t1.config = compose(["algorithm.norm_adv_by_std_in_grpo=false", *two_phase[2:]])
    with pytest.raises(ValueError, match="two_phase=true is refused by the verl plug-in.*rounding the commit down"):
        t1._vip()
    for bad in ("all", 0, -5, float("nan"), True):
        with pytest.raises(ValueError, match="vip.token_budget must be"):
            plug.VIPConfig.from_mapping({"token_budget": bad})
    assert plug.VIPConfig.from_mapping({"token_budget": "uniform"}).token_budget == "uniform"
