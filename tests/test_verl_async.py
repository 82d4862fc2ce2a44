"""verl's asynchronous experimental trainers (CPU, local Ray, stand-ins for the rollout and actor workers).

* ``one_step_off_policy``: verl's real ``OneStepOffRayTrainer.fit`` (an asyncio loop generating batch ``t+1`` while
  batch ``t`` trains) with our VIP subclass, a rollout stand-in whose generation takes uneven, random time: every
  step trains exactly its planned groups, batch ``t+1`` is planned before batch ``t`` is observed (the posterior one
  step behind), each batch is observed once against its own plan step, and the budget is per optimizer step.
* ``fully_async_policy``: refused before the first step with the exact reason.
"""

from __future__ import annotations

import asyncio
import types
from typing import Any

import numpy as np
import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from test_verl import P_TABLE, compose, group_sizes, reference_advantage  # noqa: E402
from test_verl_loops import (  # noqa: E402
    PromptDataset,
    StubActorGroup,
    StubRolloutManager,
    legacy_overrides,
    stub_rollout_worker_class,
)

from vipalloc.integrations import verl as plug  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        yield ray
    finally:
        ray.shutdown()


class AsyncRollout:
    """The awaited ``generate_sequences`` of verl's ``AgentLoopManager`` in one_step_off_policy, taking an uneven,
    random time (0-60 ms) per batch so generation and training interleave differently at every step."""

    def __init__(self, inner: StubRolloutManager, events: list[tuple[str, int]], seed: int = 0) -> None:
        self.inner, self.events = inner, events
        self.rng = np.random.default_rng(seed)

    async def generate_sequences(self, batch: Any) -> Any:
        self.events.append(("gen_start", len(self.inner.seen)))
        await asyncio.sleep(float(self.rng.random()) * 0.06)
        out = self.inner.generate_sequences(batch)
        self.events.append(("gen_done", len(self.inner.seen)))
        return out


def test_one_step_off_policy_plans_each_dispatch_and_observes_late(ray_local, tmp_path, monkeypatch) -> None:
    from verl.experimental.one_step_off_policy.ray_trainer import OneStepOffRayTrainer
    from verl.trainer.ppo.ray_trainer import Role
    from verl.utils.dataset.rl_dataset import collate_fn
    from verl.utils.tracking import Tracking

    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(Tracking, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Tracking, "log", lambda self, data, step, **k: logged.append((step, dict(data))))
    extra = ["trainer.save_freq=-1", "trainer.total_training_steps=4", "actor_rollout_ref.hybrid_engine=false"]
    config = compose(legacy_overrides(str(tmp_path / "ckpt"), extra))
    events: list[tuple[str, int]] = []
    seen: list[dict[str, Any]] = []
    cls = plug.vip_one_step_off_trainer_class()
    assert issubclass(cls, OneStepOffRayTrainer) and cls.fit is OneStepOffRayTrainer.fit  # verl's own async fit

    class Recording(cls):  # type: ignore[misc, valid-type]
        def _get_gen_batch(self, batch: Any) -> Any:
            out = super()._get_gen_batch(batch)
            events.append(("plan", self._vip_hook._last_plan_step))
            return out

        def _update_actor(self, batch: Any) -> Any:
            out = super()._update_actor(batch)
            ntb = batch.non_tensor_batch
            events.append(("observed", self.global_steps))
            seen.append({"uid": np.asarray(ntb["uid"], dtype=str), "gen_uid": np.asarray(ntb["gen_uid"], dtype=str),
                         "scores": batch.batch["token_level_scores"].sum(-1).numpy().astype(np.float64),
                         "adv": batch.batch["advantages"], "mask": batch.batch["response_mask"]})  # fmt: skip
            return out

    t = Recording(
        config=config,
        tokenizer=None,
        role_worker_mapping={Role.Actor: object},
        resource_pool_manager=types.SimpleNamespace(get_n_gpus=lambda: 2),
        train_dataset=PromptDataset(8),
        val_dataset=PromptDataset(8),
        collate_fn=collate_fn,
    )
    t.actor_rollout_wg = t.actor_wg = StubActorGroup(dp=2)
    t.checkpoint_manager = types.SimpleNamespace(update_weights=lambda step: None, sleep_replicas=lambda: None)
    inner = StubRolloutManager(stub_rollout_worker_class(ray_local).remote(P_TABLE), ray_local)
    t.async_rollout_manager = AsyncRollout(inner, events, seed=1)
    asyncio.run(t.fit())

    hook = t._vip_hook
    assert len(seen) == 4 and len(inner.seen) == 4
    for gen_groups, upd in zip(inner.seen, seen):
        assert sum(gen_groups.values()) == 32  # the budget of each optimizer step, exact (multiple of lcm(2, 16))
        assert group_sizes(upd["uid"]) == gen_groups  # trained groups = generated groups = plan
        np.testing.assert_array_equal(upd["uid"], upd["gen_uid"])
        ref = reference_advantage(upd["scores"], upd["uid"], "grpo", norm=False)
        first = upd["mask"].argmax(-1)
        np.testing.assert_allclose(upd["adv"][torch.arange(len(ref)), first].numpy(), ref, atol=1e-6)
    # one step off: batch t+1 is planned (and dispatched) before batch t is observed
    order = [e for e in events if e[0] in ("plan", "observed")]
    plans = [i for i, e in enumerate(order) if e[0] == "plan"]
    observed = [i for i, e in enumerate(order) if e[0] == "observed"]
    assert [order[i][1] for i in plans] == [1, 2, 3, 4] and [order[i][1] for i in observed] == [1, 2, 3, 4]
    for k in range(3):
        assert plans[k + 1] < observed[k]  # plan k+2 made with the posterior before step k+1's outcomes
    assert set(inner.seen[0].values()) == {4} and set(inner.seen[1].values()) == {4}  # nothing observed yet
    assert any(set(g.values()) != {4} or len(g) < 8 for g in inner.seen[2:])  # re-allocated once outcomes arrived
    agg = hook.allocator.history.aggregates()
    assert int(agg.trials.sum()) == 128  # every rollout observed once, against its own plan step
    assert int(agg.successes.sum()) == int(sum(b["scores"].sum() for b in seen))
    vip_logs = [d for _, d in logged if "vip/budget" in d]
    assert len(vip_logs) == 4 and all(d["vip/budget"] == 32 == d["vip/rollouts_generated"] for d in vip_logs)


def test_one_step_off_refuses_two_phase_and_fully_async_is_refused_with_its_reason(tmp_path) -> None:
    from verl.experimental.fully_async_policy.fully_async_trainer import FullyAsyncTrainer
    from verl.experimental.one_step_off_policy.ray_trainer import OneStepOffRayTrainer

    from vipalloc.integrations.verl import vip_trainer_class
    from vipalloc.integrations.verl_trainer import check_config

    cls = plug.vip_one_step_off_trainer_class()
    extra = ["vip.two_phase=true", "vip.strategy=vip_two_phase", "actor_rollout_ref.hybrid_engine=false"]
    t = cls.__new__(cls)  # the refusal comes with the hook, before any plan (no workers needed)
    t.config = compose(legacy_overrides(str(tmp_path), extra))
    with pytest.raises(ValueError, match="two_phase=true is refused with one_step_off_policy"):
        t._vip()
    assert issubclass(vip_trainer_class(OneStepOffRayTrainer), OneStepOffRayTrainer)  # fit is the only override
    reason = r"_get_samples_from_queue .*required_samples.*prepare_single_generation_data.*would unlock"
    with pytest.raises(ValueError, match=reason):
        vip_trainer_class(FullyAsyncTrainer)
    with pytest.raises(ValueError, match="fully_async_policy.*" + reason):  # its config, before Ray starts
        check_config(compose(["algorithm.norm_adv_by_std_in_grpo=false", "+async_training.require_batches=1"]))
    broken = type("OneStepOffRayTrainer", (OneStepOffRayTrainer,), {"_async_gen_next_batch": lambda self, it: None})
    with pytest.raises(plug.UnsupportedVerlError, match="_get_gen_batch"):
        plug.vip_one_step_off_trainer_class(broken)
