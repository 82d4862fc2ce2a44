"""verl plug-in on real DataProto objects: expansion, uid groups, advantages, world-size divisibility, Ray."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, compute_rloo_outcome_advantage  # noqa: E402

from vipalloc.integrations.verl import (  # noqa: E402
    VIPConfig,
    VIPVerlAllocator,
    _plan_onto,
    balanced_order,
    divisible_budget,
    expand_by_counts,
    torch_scores,
)


def make_batch(m: int, seed: int = 0) -> DataProto:
    rng = np.random.default_rng(seed)
    return DataProto.from_dict(
        tensors={"input_ids": torch.tensor(rng.integers(0, 100, (m, 6)))},
        non_tensors={
            "index": np.array([f"q{i}" for i in range(m)], dtype=object),
            "uid": np.array([f"uid-{seed}-{i}" for i in range(m)], dtype=object),
            "raw_prompt": np.array([f"What is {i} + {i}?" for i in range(m)], dtype=object),
        },
    )


def hook_with_oracle(ws: int, m: int, **kw) -> VIPVerlAllocator:
    cfg = VIPConfig(strategy="vip_pure", predictor="oracle", n_min=2, n_max=12, embedder="hashing", **kw)
    hook = VIPVerlAllocator(cfg, world_size=ws)
    hook.allocator.predictor.set_true_p([f"q{i}" for i in range(m)], np.linspace(0.02, 0.98, m))
    return hook


@pytest.mark.parametrize("ws", [1, 2, 8])
def test_plan_expand_groups_divisible_balanced(ws) -> None:
    m = 13
    batch = make_batch(m)
    hook = hook_with_oracle(ws, m)
    counts = hook.plan(batch, step=0, default_n=5)  # requested 65 rollouts
    total = int(counts.sum())
    assert total % ws == 0 and total <= 65 and total > 65 - ws
    assert np.all((counts == 0) | (counts >= 2))
    assert len(set(counts.tolist())) > 1  # the plan is not uniform
    out = expand_by_counts(batch, counts)
    assert len(out) == total
    uids, sizes = np.unique(out.non_tensor_batch["uid"], return_counts=True)
    got = dict(zip(uids, sizes))
    for uid, c in zip(batch.non_tensor_batch["uid"], counts):
        assert got.get(uid, 0) == c
    # verl's fit() calls batch.repeat(n, interleave=True): the marked batch expands by the plan instead, once
    _plan_onto(batch, counts)
    rep = batch.repeat(repeat_times=5, interleave=True)
    assert list(rep.non_tensor_batch["uid"]) == list(out.non_tensor_batch["uid"])
    assert torch.equal(rep.batch["input_ids"], out.batch["input_ids"])
    again = rep.repeat(repeat_times=2, interleave=True)
    assert len(again) == 2 * total  # one-shot: later repeats are verl's own
    # equal rows per rank with balanced tokens
    seqlens = np.random.default_rng(ws).integers(5, 200, total)
    order = balanced_order(seqlens, ws)
    assert sorted(order.tolist()) == list(range(total))
    per_rank = np.array([seqlens[chunk].sum() for chunk in np.split(order, ws)])
    assert all(len(c) == total // ws for c in np.split(order, ws))
    assert per_rank.max() - per_rank.min() <= seqlens.max()


def test_advantages_match_reference_per_group() -> None:
    m = 10
    batch = make_batch(m, seed=1)
    hook = hook_with_oracle(1, m)
    counts = hook.plan(batch, step=0, default_n=4)
    out = expand_by_counts(batch, counts)
    rng = np.random.default_rng(0)
    rewards = rng.binomial(1, 0.5, len(out)).astype(float)
    scores = torch_scores(rewards.tolist())
    mask = torch.ones_like(scores)
    uid = out.non_tensor_batch["uid"]
    dr, _ = compute_grpo_outcome_advantage(scores, mask, uid, norm_adv_by_std_in_grpo=False)
    gr, _ = compute_grpo_outcome_advantage(scores, mask, uid, norm_adv_by_std_in_grpo=True)
    rl, _ = compute_rloo_outcome_advantage(scores, mask, uid)
    for u in np.unique(uid):
        sel = uid == u
        r = rewards[sel]
        np.testing.assert_allclose(dr[sel, -1].numpy(), r - r.mean(), atol=1e-6)
        np.testing.assert_allclose(gr[sel, -1].numpy(), (r - r.mean()) / (r.std(ddof=1) + 1e-6), atol=1e-5)
        np.testing.assert_allclose(rl[sel, -1].numpy(), r - (r.sum() - r) / (len(r) - 1), atol=1e-6)


def test_observe_feeds_allocator_and_metrics(tmp_path) -> None:
    m = 8
    batch = make_batch(m, seed=2)
    hook = VIPVerlAllocator(VIPConfig(strategy="vip", predictor="beta", n_min=4, n_max=8), world_size=2)
    counts = hook.plan(batch, step=0, default_n=6)
    out = expand_by_counts(batch, counts)
    rewards = np.random.default_rng(1).binomial(1, 0.4, len(out)).astype(float)
    out.batch["token_level_scores"] = torch_scores(rewards.tolist())
    out.non_tensor_batch.pop("index")  # verl moves it to the generation batch; the uid is enough
    metrics = hook.observe(out, step=0)
    assert set(metrics) == {
        "vip/mean_n",
        "vip/max_n",
        "vip/frac_dropped",
        "vip/frac_zero_std",
        "vip/pred_abs_err",
        "vip/expected_var_ratio_vs_uniform",
    }
    agg = hook.allocator.history.aggregates()
    assert int(agg.trials.sum()) == len(out) and int(agg.successes.sum()) == int(rewards.sum())
    hook.save(str(tmp_path))
    other = VIPVerlAllocator(VIPConfig(strategy="vip", predictor="beta", n_min=4, n_max=8), world_size=2)
    assert other.load(str(tmp_path))
    np.testing.assert_array_equal(other.plan(make_batch(m, seed=3), 1, 6), hook.plan(make_batch(m, seed=3), 1, 6))


def test_errors() -> None:
    with pytest.raises(ValueError, match="divisible by world size 8"):
        divisible_budget(20, 8, 5, 4, 4)
    assert divisible_budget(65, 8, 13, 2, 12) == 64
    with pytest.raises(ValueError, match="singleton"):
        expand_by_counts(make_batch(2), np.array([1, 3]))
    hook = VIPVerlAllocator(VIPConfig(predictor="beta", prompt_id_key="nope"))
    b = make_batch(3)
    b.non_tensor_batch.pop("index")
    with pytest.raises(ValueError, match="prompt id column 'nope'"):
        hook.plan(DataProto.from_dict(tensors={"x": torch.zeros(3, 1)}), 0, 4)


def test_allocation_step_inside_local_ray_cluster() -> None:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:

        @ray.remote
        class Driver:
            """Holds the plug-in like verl's single-controller driver; a stub rollout worker scores rows."""

            def __init__(self) -> None:
                self.hook = VIPVerlAllocator(
                    VIPConfig(strategy="vip", predictor="beta", n_min=4, n_max=12), world_size=2
                )

            def step(self, batch: DataProto, step: int) -> tuple[int, dict]:
                counts = self.hook.plan(batch, step=step, default_n=8)
                out = expand_by_counts(batch, counts)
                p = np.array([0.1 + 0.8 * (int(str(i)[1:]) % 5) / 4 for i in out.non_tensor_batch["index"]])
                rewards = np.random.default_rng(step).binomial(1, p).astype(float)
                out.batch["token_level_scores"] = torch_scores(rewards.tolist())
                return len(out), self.hook.observe(out, step=step)

        drv = Driver.remote()
        sizes = []
        for step in range(3):
            n, metrics = ray.get(drv.step.remote(make_batch(16, seed=step), step))
            sizes.append(n)
            assert n % 2 == 0 and n <= 128 and metrics["vip/mean_n"] >= 4
        assert sizes[0] == 128  # step 0: no information, uniform
    finally:
        ray.shutdown()


def test_trainer_subclass_hooks_verl() -> None:
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    from vipalloc.integrations import verl as plug

    cls = plug.RayVIPTrainer
    assert issubclass(cls, RayPPOTrainer)
    for name in ("_get_gen_batch", "_update_actor", "_save_checkpoint", "_load_checkpoint"):
        assert getattr(cls, name) is not getattr(RayPPOTrainer, name)
