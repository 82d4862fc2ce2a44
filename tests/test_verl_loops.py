"""verl's trainer loops driven inside a local Ray cluster (CPU) with stub workers, our VIP subclasses in place:

* legacy ``RayPPOTrainer.fit`` (verl's real loop) with a Ray-actor stub rollout worker and a stub actor worker group;
* the v1 (TransferQueue) trainer: verl's real ``PPOTrainer.fit`` (sampling from verl's replay buffer, balancing,
  advantage, actor update, checkpoint, resume) with a stub agent loop that writes trajectories into a real
  TransferQueue as verl's ``AgentLoopWorkerTQ`` does, over a 12-prompt shuffled dataset fetched one prompt at a time
  (so a batch crosses an epoch boundary and holds the same prompt twice);
* the group-size check when the agent loop ignores ``__rollout_n__``; the entry point's trainer installation.
"""

from __future__ import annotations

import json
import os
import types
from typing import Any

import numpy as np
import pytest

pytest.importorskip("verl")

import torch  # noqa: E402
from test_verl import P_TABLE, compose, group_sizes, reference_advantage, true_p  # noqa: E402
from verl import DataProto  # noqa: E402

from vipalloc.integrations import verl as plug  # noqa: E402
from vipalloc.integrations.verl import ALLOCATOR_FILE, PlanNotAppliedError  # noqa: E402
from vipalloc.telemetry import OUTCOME_METRIC_NAMES, PLAN_METRIC_NAMES  # noqa: E402

torch.set_num_threads(1)
VIP_METRICS = set(PLAN_METRIC_NAMES) | set(OUTCOME_METRIC_NAMES)
TQ_OVERRIDES = [
    "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
    "transfer_queue.backend.SimpleStorage.total_storage_size=2000",
]


# ------------------------------------------------------------------------------------------- local Ray cluster
@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        yield ray
    finally:
        ray.shutdown()
    assert not ray.is_initialized()


class PromptDataset(torch.utils.data.Dataset):
    """Rows shaped like verl's ``RLHFDataset`` output (raw chat prompt, dummy tensor, index from extra_info)."""

    def __init__(self, m: int) -> None:
        self.m = m

    def __len__(self) -> int:
        return self.m

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {
            "raw_prompt": [{"role": "user", "content": f"Compute {i} * 7 + 3."}],
            "dummy_tensor": torch.tensor([0], dtype=torch.uint8),
            "data_source": "stub",
            "reward_model": {"ground_truth": str(i * 7 + 3)},
            "extra_info": {"index": i},
            "index": i,
            "tools_kwargs": {},
            "interaction_kwargs": {},
        }


def stub_rollout_worker_class(ray: Any) -> Any:
    @ray.remote(num_cpus=0)
    class StubRolloutWorker:
        """Plays verl's rollout + rule reward: per row a response length and a 0/1 reward ~ Bernoulli(p(index))."""

        def __init__(self, p_table: list[float]) -> None:  # plain data: the worker cannot import this test module
            self.calls = 0
            self.p_table = np.asarray(p_table)

        def generate(self, index: np.ndarray, uids: list[str]) -> dict[str, np.ndarray]:
            rng = np.random.default_rng(self.calls)
            self.calls += 1
            p = self.p_table[np.asarray(index) % len(self.p_table)]
            return {
                "reward": rng.binomial(1, p).astype(np.float32),
                "resp_len": rng.integers(1, 7, len(index)),
                "uids": np.asarray(uids),
            }

    return StubRolloutWorker


P_LEN, R_LEN = 4, 6


def rollout_tensors(resp_len: np.ndarray, reward: np.ndarray) -> dict[str, torch.Tensor]:
    """Agent-loop-shaped tensors: left-padded prompt (no padding here), right-padded response, reward on last token."""
    r = len(resp_len)
    rl = torch.tensor(resp_len)
    response_mask = (torch.arange(R_LEN)[None, :] < rl[:, None]).long()
    prompts = torch.full((r, P_LEN), 5, dtype=torch.long)
    responses = torch.randint(6, 60, (r, R_LEN)) * response_mask
    attention_mask = torch.cat([torch.ones(r, P_LEN, dtype=torch.long), response_mask], dim=1)
    rm_scores = torch.zeros(r, R_LEN)
    rm_scores[torch.arange(r), rl - 1] = torch.as_tensor(reward, dtype=torch.float32)
    return {
        "prompts": prompts,
        "responses": responses,
        "response_mask": response_mask,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "rm_scores": rm_scores,
        "rollout_log_probs": -torch.rand(r, R_LEN) * response_mask,
    }


class StubRolloutManager:
    """Stands in for verl's ``AgentLoopManager.generate_sequences`` on the legacy loop, via a Ray actor."""

    def __init__(self, worker: Any, ray: Any) -> None:
        self.worker, self.ray = worker, ray
        self.seen: list[dict[str, int]] = []

    def generate_sequences(self, gen_batch: DataProto) -> DataProto:
        uids = [str(u) for u in gen_batch.non_tensor_batch["uid"]]
        self.seen.append(group_sizes(uids))
        index = np.asarray(gen_batch.non_tensor_batch["index"], dtype=np.int64)
        out = self.ray.get(self.worker.generate.remote(index, uids))
        assert list(out["uids"]) == uids  # the worker saw the expanded rows in order
        r = len(uids)
        return DataProto.from_dict(
            tensors=rollout_tensors(out["resp_len"], out["reward"]),
            non_tensors={
                "acc": out["reward"].astype(bool),
                "multi_modal_inputs": np.array([{} for _ in range(r)], dtype=object),
                "gen_uid": np.array(uids, dtype=object),  # lets tests check that rows meet their prompt after union
            },
            meta_info={"timing": {}, "reward_extra_keys": ["acc"]},
        )


class StubActorGroup:
    """The actor worker group's surface that fit() touches: DP layout, update, checkpoints."""

    def __init__(self, dp: int) -> None:
        self._dispatch_info = {"actor": list(range(dp))}
        self.updates: list[int] = []
        self.saved: list[str] = []

    def update_actor(self, batch_td: Any) -> Any:
        from verl.utils import tensordict_utils as tu

        self.updates.append(int(batch_td.batch_size[0]))  # the legacy loop passes a TensorDict
        return tu.get_tensordict({}, non_tensor_dict={"metrics": {"mfu": 0.0, "pg_loss": [0.0]}})

    def save_checkpoint(self, local_path: str, *args: Any, **kwargs: Any) -> None:
        os.makedirs(local_path, exist_ok=True)
        self.saved.append(local_path)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        return None


def fit_overrides(ckpt: str) -> list[str]:
    """What both loops' fit tests share: 3 steps of 8 prompts x 4 on 2 stub GPUs, a checkpoint every 2 steps,
    Dr.GRPO-style GRPO (no std), and VIP with the beta predictor."""
    return [
        "trainer.logger=[console]",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.save_freq=2",
        "trainer.total_training_steps=3",
        "trainer.n_gpus_per_node=2",
        f"trainer.default_local_dir={ckpt}",
        "data.train_batch_size=8",
        "actor_rollout_ref.rollout.n=4",
        "algorithm.adv_estimator=grpo",
        "algorithm.norm_adv_by_std_in_grpo=false",
        "algorithm.rollout_correction.bypass_mode=true",
        "vip.strategy=vip",
        "vip.predictor=beta",
        "vip.n_min=2",
        "vip.n_max=8",
    ]


def legacy_overrides(ckpt: str, extra: list[str] = ()) -> list[str]:  # type: ignore[assignment]
    return [
        "trainer.use_v1=false",
        *fit_overrides(ckpt),
        "data.dataloader_num_workers=0",
        "data.val_batch_size=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        *extra,
    ]


def legacy_trainer(config: Any, seen_batches: list[dict[str, Any]]) -> Any:
    """Our ``RayVIPTrainer`` on ``config`` with a stub actor group (DP 2); records what reaches the actor update."""
    from verl.trainer.ppo.ray_trainer import Role
    from verl.utils.dataset.rl_dataset import collate_fn

    class Recording(plug.RayVIPTrainer):  # records what verl hands to the actor update
        def _update_actor(self, batch: DataProto) -> DataProto:
            out = super()._update_actor(batch)
            ntb = batch.non_tensor_batch
            seen_batches.append(
                {
                    "uid": np.asarray(ntb["uid"], dtype=str),
                    "gen_uid": np.asarray(ntb["gen_uid"], dtype=str),
                    "scores": batch.batch["token_level_scores"].sum(-1).numpy().astype(np.float64),
                    "adv": batch.batch["advantages"],
                    "mask": batch.batch["response_mask"],
                    "metrics": dict(out.meta_info["metrics"]),
                }
            )
            return out

    pool = types.SimpleNamespace(get_n_gpus=lambda: 2)
    t = Recording(
        config=config,
        tokenizer=None,
        role_worker_mapping={Role.ActorRollout: object},
        resource_pool_manager=pool,
        train_dataset=PromptDataset(8),
        val_dataset=PromptDataset(8),
        collate_fn=collate_fn,
    )
    t.actor_rollout_wg = StubActorGroup(dp=2)
    t.checkpoint_manager = types.SimpleNamespace(update_weights=lambda step: None, sleep_replicas=lambda: None)
    return t


def test_legacy_fit_in_local_ray_with_stub_rollout_worker(ray_cluster, tmp_path, monkeypatch) -> None:
    """verl's real ``RayPPOTrainer.fit`` (as ``RayVIPTrainer``) for 3 steps on the ``vip_trainer`` config."""
    from verl.utils.tracking import Tracking

    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(Tracking, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Tracking, "log", lambda self, data, step, **k: logged.append((step, dict(data))))
    ckpt = str(tmp_path / "ckpt")
    config = compose(legacy_overrides(ckpt))
    seen_batches: list[dict[str, Any]] = []

    def build() -> Any:
        return legacy_trainer(config, seen_batches)

    trainer = build()
    manager = StubRolloutManager(stub_rollout_worker_class(ray_cluster).remote(P_TABLE), ray_cluster)
    trainer.async_rollout_manager = manager
    trainer.fit()

    hook = trainer._vip_hook
    assert len(manager.seen) == 3 and len(seen_batches) == 3
    for gen_groups, upd in zip(manager.seen, seen_batches):
        assert sum(gen_groups.values()) == 32  # budget = 8 prompts x rollout.n 4, a multiple of lcm(2, 16)
        assert group_sizes(upd["uid"]) == gen_groups  # the trained groups are the generated groups
        np.testing.assert_array_equal(upd["uid"], upd["gen_uid"])  # every row met its own prompt in batch.union
        assert all(c >= 2 for c in gen_groups.values())
        ref = reference_advantage(upd["scores"], upd["uid"], "grpo", norm=False)
        first = upd["mask"].argmax(-1)
        np.testing.assert_allclose(upd["adv"][torch.arange(len(ref)), first].numpy(), ref, atol=1e-6)
        assert "vip/mean_n" in upd["metrics"]
    assert set(manager.seen[0].values()) == {4}  # step 1: nothing known yet, uniform
    later = [c for g in manager.seen[1:] for c in g.values()]
    assert set(later) != {4} or any(len(g) < 8 for g in manager.seen[1:])  # re-allocated (or dropped) after feedback
    # rewards reached the allocator: 32 rollouts per step, successes = the stub's rewards
    agg = hook.allocator.history.aggregates()
    assert int(agg.trials.sum()) == 96
    assert int(agg.successes.sum()) == int(sum(b["scores"].sum() for b in seen_batches))
    # the vip/* metrics are in verl's logged step metrics
    steps = [s for s, d in logged if "vip/mean_n" in d]
    assert steps == [1, 2, 3]
    for _, d in logged:
        assert VIP_METRICS <= set(d)  # the shared names, reduced by verl's reduce_metrics
        assert d["vip/budget"] == 32 == d["vip/rollouts_generated"] and d["vip/max_n"] <= 8
    # checkpoints at step 2 and 3 carry the allocator; a resumed trainer restores it
    for s in (2, 3):
        assert os.path.exists(os.path.join(ckpt, f"global_step_{s}", ALLOCATOR_FILE))
    saved = json.load(open(os.path.join(ckpt, "global_step_3", ALLOCATOR_FILE)))
    assert saved  # a checksummed allocator state file
    resumed = build()
    resumed._load_checkpoint()
    assert resumed.global_steps == 3
    agg2 = resumed._vip().allocator.history.aggregates()
    np.testing.assert_array_equal(agg2.trials, agg.trials)
    np.testing.assert_array_equal(agg2.successes, agg.successes)


def test_legacy_fit_two_phase_pilot_then_commit(ray_cluster, tmp_path, monkeypatch) -> None:
    """``vip.two_phase=true`` in verl's real legacy ``fit``: fit's one generation call becomes a pilot round
    (``pilot_n`` per piloted prompt), ``plan_commit`` on the pilot's rewards, and a commit round; the trained groups
    are pilot + commit, rows aligned with their prompts, the budget exact, every rollout observed once."""
    from verl.utils.tracking import Tracking

    from vipalloc.integrations.verl_trainer import check_config

    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(Tracking, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Tracking, "log", lambda self, data, step, **k: logged.append((step, dict(data))))
    extra = ["trainer.save_freq=-1", "trainer.total_training_steps=2", "vip.two_phase=true",
             "vip.strategy=vip_two_phase", "vip.pilot_n=2"]  # fmt: skip
    config = compose(legacy_overrides(str(tmp_path / "ckpt"), extra))
    assert check_config(config).two_phase
    seen_batches: list[dict[str, Any]] = []
    trainer = legacy_trainer(config, seen_batches)
    manager = StubRolloutManager(stub_rollout_worker_class(ray_cluster).remote(P_TABLE), ray_cluster)
    trainer.async_rollout_manager = manager
    trainer.fit()

    assert len(manager.seen) == 4 and len(seen_batches) == 2  # two generation rounds per step
    for step, upd in enumerate(seen_batches):
        pilot, commit = manager.seen[2 * step], manager.seen[2 * step + 1]
        assert set(pilot.values()) == {2} and sum(pilot.values()) <= 16  # pilot_n each (skipped prompts absent)
        final = {u: pilot.get(u, 0) + commit.get(u, 0) for u in {*pilot, *commit}}
        assert sum(final.values()) == 32 and all(n >= 2 for n in final.values())  # the exact budget
        assert group_sizes(upd["uid"]) == final  # trained groups = pilot + commit
        np.testing.assert_array_equal(upd["uid"], upd["gen_uid"])  # rows of both rounds met their prompt
        ref = reference_advantage(upd["scores"], upd["uid"], "grpo", norm=False)
        first = upd["mask"].argmax(-1)
        np.testing.assert_allclose(upd["adv"][torch.arange(len(ref)), first].numpy(), ref, atol=1e-6)
    assert any(len(set(c.values())) > 1 for c in manager.seen[1::2])  # the commit is not uniform
    agg = trainer._vip_hook.allocator.history.aggregates()
    assert int(agg.trials.sum()) == 64  # pilot and commit rollouts, each observed once
    assert int(agg.successes.sum()) == int(sum(b["scores"].sum() for b in seen_batches))
    vip_logs = [d for _, d in logged if "vip/budget" in d]
    assert len(vip_logs) == 2
    for d, step_pilot in zip(vip_logs, manager.seen[::2]):
        assert VIP_METRICS <= set(d) and d["vip/budget"] == 32 == d["vip/rollouts_generated"]
        assert d["vip/pilot_rollouts"] == sum(step_pilot.values())


# ------------------------------------------------------------------------------------------------ v1 trainer
@pytest.fixture(scope="module")
def transfer_queue(ray_cluster):
    tq = pytest.importorskip("transfer_queue")
    tq.init(compose(TQ_OVERRIDES).transfer_queue)
    try:
        yield tq
    finally:
        tq.close()


class StubAgentLoop:
    """Does what verl's ``AgentLoopWorkerTQ`` does per prompt: ``__rollout_n__`` sessions (``rollout.n`` with
    ``ignore_plan``, as an agent loop that stopped reading the column would), trajectories and a ``finished`` tag
    in the TransferQueue. Rewards are Bernoulli(``true_p(index)``)."""

    def __init__(self, tq: Any, rollout_n: int, seed: int = 0) -> None:
        self.tq, self.rollout_n = tq, rollout_n
        self.rng = np.random.default_rng(seed)
        self.ignore_plan = False
        self.submissions: list[list[tuple[str, int, int]]] = []  # per submission: (uid, index, n) per prompt

    def generate_sequences(self, batch: Any) -> None:
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        sub = []
        for i in range(len(batch)):
            uid, idx = batch["uid"][i], int(batch["index"][i])
            n = self.rollout_n if self.ignore_plan else batch["__rollout_n__"][i]
            sub.append((uid, idx, int(n)))
            fields, keys, tags = [], [], []
            for s in range(n):  # range() over the 0-d tensor, exactly as the agent loop does
                reward = float(self.rng.random() < true_p(idx))
                rl = int(self.rng.integers(1, 7))
                row = {k: v[0, : (rl if v.shape[1] == R_LEN else None)] for k, v in
                       rollout_tensors(np.array([rl]), np.array([reward])).items()}  # fmt: skip
                row.update(uid=uid, num_turns=torch.tensor(2), extra_fields={"reward_extra_info": {"acc": reward}})
                row["old_log_probs"] = row["rollout_log_probs"]  # for tests that skip _compute_old_log_prob
                fields.append(row)
                keys.append(f"{uid}_{s}_0")
                step = int(batch["global_steps"]) if "global_steps" in batch.keys() else 1
                tags.append({"status": "success", "seq_len": P_LEN + rl, "global_steps": step,
                             "min_global_steps": step, "max_global_steps": step})  # fmt: skip
            if keys:
                self.tq.kv_batch_put(
                    keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(fields), tags=tags
                )
            self.tq.kv_put(key=uid, partition_id="train", tag={"status": "finished"})
        self.submissions.append(sub)


class StubActorGroupV1(StubActorGroup):
    """The v1 actor update reads the batch's uid / score / advantage rows from the TransferQueue."""

    def __init__(self, dp: int, tq: Any) -> None:
        super().__init__(dp)
        self.tq = tq
        self.batches: list[dict[str, np.ndarray]] = []

    def update_actor(self, batch: Any) -> Any:
        from verl.utils import tensordict_utils as tu

        data = self.tq.kv_batch_get(
            keys=batch.keys, partition_id=batch.partition_id, select_fields=["uid", "rm_scores", "advantages"]
        )
        self.batches.append({
            "uid": np.asarray(list(data["uid"]), dtype=str),
            "scores": np.array([float(t.sum()) for t in data["rm_scores"].unbind()]),
            "adv": np.array([float(t[0]) for t in data["advantages"].unbind()]),
        })  # fmt: skip
        return tu.get_tensordict({}, non_tensor_dict={"metrics": {"mfu": 0.0, "pg_loss": [0.0]}})


def v1_config(ckpt: str, extra: list[str] = ()) -> Any:  # type: ignore[assignment]
    return compose(
        [
            *fit_overrides(ckpt),
            "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "trainer.v1.sampler.sync_refill_failed_groups=true",  # verl then fetches prompts one at a time
            *TQ_OVERRIDES,
            *extra,
        ]
    )


def build_v1_trainer(config: Any, tq: Any, agent: StubAgentLoop, dataset_size: int, seed: int) -> Any:
    """Our VIP ``PPOTrainerSync`` with stub workers, a one-prompt-per-fetch shuffled dataloader (verl's setting for
    ``sync_refill_failed_groups``), verl's own replay buffer and loop."""
    from omegaconf import open_dict
    from torchdata.stateful_dataloader import StatefulDataLoader
    from verl.trainer.ppo.v1 import PPOTrainerSync
    from verl.utils.dataset.rl_dataset import collate_fn

    with open_dict(config):
        config.data.gen_batch_size = 1  # what PPOTrainer._init_dataloader forces in this mode
    t = plug.vip_v1_trainer_class(PPOTrainerSync)(config)
    t.replay_buffer.poll_interval = 0.02
    t.actor_rollout_wg = StubActorGroupV1(dp=2, tq=tq)
    t.tokenizer = types.SimpleNamespace(eos_token_id=0)
    t.reward_loop_manager = types.SimpleNamespace(reward_loop_worker_handles=[])  # rewards come with the rollouts
    t.checkpoint_manager = types.SimpleNamespace(update_weights=lambda step: None, sleep_replicas=lambda: None)
    t.resource_pool_manager = types.SimpleNamespace(get_n_gpus=lambda: 2)
    gen = torch.Generator().manual_seed(seed)
    t.train_dataloader = StatefulDataLoader(
        PromptDataset(dataset_size), batch_size=1, shuffle=True, generator=gen, drop_last=True, collate_fn=collate_fn
    )
    t.train_dataloader_it = None
    t._init_dump_executor()  # verl's own (fit drains it at the end)
    t.steps_per_epoch = dataset_size // int(config.data.train_batch_size)
    t.total_training_steps = int(config.trainer.total_training_steps)
    t._load_checkpoint()  # resume_mode=auto: global_steps from the latest checkpoint, or 0
    return t


def test_v1_fit_updates_checkpoints_resumes_and_handles_a_prompt_twice(transfer_queue, tmp_path, monkeypatch) -> None:
    """verl's real v1 ``fit`` for 3 steps (update and checkpoint), then a new trainer resumes and trains step 4.

    12 prompts shuffled, batch 8, fetched one at a time: step 2 spans the epoch boundary and holds prompts 8 and 1
    twice (seed 5), which the plug-in used to refuse with a message blaming missing dataset indices."""
    from verl.utils.tracking import Tracking

    tq = transfer_queue
    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(Tracking, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Tracking, "log", lambda self, data, step, **k: logged.append((step, dict(data))))
    ckpt = str(tmp_path / "ckpt")
    agent = StubAgentLoop(tq, rollout_n=4)
    trainer = build_v1_trainer(v1_config(ckpt), tq, agent, dataset_size=12, seed=5)
    assert trainer.global_steps == 0
    trainer.fit(agent)

    assert len(agent.submissions) == 3 and len(trainer.actor_rollout_wg.batches) == 3
    step2 = [idx for _, idx, _ in agent.submissions[1]]
    assert len(step2) == 8 and len(set(step2)) == 6  # the same prompt twice in one batch
    for sub, upd in zip(agent.submissions, trainer.actor_rollout_wg.batches):
        planned = {uid: n for uid, _, n in sub}
        assert sum(planned.values()) == 32 and all(n == 0 or n >= 2 for n in planned.values())
        assert group_sizes(upd["uid"]) == {u: n for u, n in planned.items() if n}  # trained groups = planned
        np.testing.assert_allclose(upd["adv"], reference_advantage(upd["scores"], upd["uid"], "grpo", False), atol=1e-6)
    twice = [(uid, n) for uid, idx, n in agent.submissions[1] if step2.count(idx) == 2]
    assert len(twice) == 4 and sum(n > 0 for _, n in twice) >= 2  # each occurrence its own group
    assert {n for _, _, n in agent.submissions[0]} == {4}  # nothing known yet: uniform
    assert {n for _, _, n in agent.submissions[2]} != {4}  # re-allocated from the feedback
    hook = trainer._vip_hook
    agg = hook.allocator.history.aggregates()
    assert int(agg.trials.sum()) == 96
    assert int(agg.successes.sum()) == int(sum(b["scores"].sum() for b in trainer.actor_rollout_wg.batches))
    vip_steps = [(s, d) for s, d in logged if "vip/budget" in d]
    assert [s for s, _ in vip_steps] == [1, 2, 3]
    for _, d in vip_steps:
        assert VIP_METRICS <= set(d) and d["vip/budget"] == 32 == d["vip/rollouts_generated"]
        assert "critic/score/mean" in d  # verl's own (rollout-weighted) metrics are logged beside ours
    for s in (2, 3):
        assert os.path.exists(os.path.join(ckpt, f"global_step_{s}", ALLOCATOR_FILE))

    # resume: a new trainer picks up step 3's checkpoint (actor stub, dataloader state, allocator) and trains step 4
    resumed_agent = StubAgentLoop(tq, rollout_n=4, seed=1)
    resumed = build_v1_trainer(v1_config(ckpt, ["trainer.total_training_steps=4"]), tq, resumed_agent, 12, seed=5)
    assert resumed.global_steps == 3
    agg2 = resumed._vip().allocator.history.aggregates()
    np.testing.assert_array_equal(agg2.trials, agg.trials)
    np.testing.assert_array_equal(agg2.successes, agg.successes)
    resumed.fit(resumed_agent)
    assert len(resumed_agent.submissions) == 1 and len(resumed.actor_rollout_wg.batches) == 1
    # the duplicate layer of step 2 took a plan step of its own, so training step t > 2 plans at plan step t + 1
    assert sorted(hook._plans) == [1, 2, 3, 4] and sorted(resumed._vip_hook._plans) == [5]
    plan4 = resumed._vip_hook._plans[5]
    # the resumed allocator plans training step 4 exactly as the original one would have
    expected = hook.allocator.plan(plan4.prompt_ids, budget=plan4.budget, step=5).counts
    np.testing.assert_array_equal(plan4.counts, expected)
    assert int(resumed._vip_hook.allocator.history.aggregates().trials.sum()) == 128


def test_v1_agent_loop_ignoring_rollout_n_fails_loudly(transfer_queue) -> None:
    """If verl's agent loop stopped reading ``__rollout_n__``, groups come back uniform: the run stops at feedback
    (before verl's advantage) instead of training uniform while ``vip/*`` reports the plan."""
    from verl.trainer.ppo.v1 import PPOTrainerSync
    from verl.utils.skip import SkipManager

    tq = transfer_queue
    config = compose(
        [
            "data.train_batch_size=8",
            "actor_rollout_ref.rollout.n=4",
            "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "algorithm.norm_adv_by_std_in_grpo=false",
            "vip.strategy=vip",
            "vip.predictor=beta",
            "vip.n_min=2",
            "vip.n_max=8",
            *TQ_OVERRIDES,
        ]
    )
    trainer = plug.vip_v1_trainer_class(PPOTrainerSync)(config)
    trainer.replay_buffer.poll_interval = 0.02
    trainer.actor_rollout_wg = StubActorGroup(dp=2)
    from torchdata.stateful_dataloader import StatefulDataLoader
    from verl.utils.dataset.rl_dataset import collate_fn

    trainer.train_dataloader = StatefulDataLoader(PromptDataset(8), batch_size=8, collate_fn=collate_fn)
    trainer.train_dataloader_it = None
    SkipManager.init(config)
    agent = StubAgentLoop(tq, rollout_n=4)
    trainer.agent_loop_manager = agent
    for step in (1, 2):
        agent.ignore_plan = step == 2
        trainer.global_steps = step
        trainer.prepare_step()
        batch, _ = trainer.replay_buffer.sample(global_steps=step, partition_id="train", batch_size=8)
        try:
            if step == 1:
                metrics: dict[str, float] = {}
                trainer._compute_advantage(batch, metrics)
                assert metrics["vip/budget"] == 32
            else:
                assert {n for _, _, n in agent.submissions[1]} == {4}  # the agent loop ran rollout.n everywhere
                assert set(trainer._vip_hook._plans[2].counts.tolist()) != {4}  # while the plan was not uniform
                before = int(trainer._vip_hook.allocator.history.aggregates().trials.sum())
                with pytest.raises(PlanNotAppliedError, match="__rollout_n__ sessions per prompt"):
                    trainer._compute_advantage(batch, {})
                assert int(trainer._vip_hook.allocator.history.aggregates().trials.sum()) == before == 32
        finally:
            tq.kv_clear(keys=batch.keys, partition_id="train")


# ----------------------------------------------------------------------------------------------- entry point
def test_entry_point_installs_vip_trainers_and_runner_classes(ray_cluster) -> None:
    from verl.trainer import main_ppo_v0
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
    from verl.trainer.ppo.v1 import get_trainer_cls
    from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY

    from vipalloc.integrations.verl_trainer import task_runner_class

    before = dict(TRAINER_REGISTRY)
    with plug.install_vip_trainers():
        assert main_ppo_v0.RayPPOTrainer is plug.RayVIPTrainer
        for mode in ("sync", "colocate_async", "separate_async"):
            cls = get_trainer_cls(mode)
            assert issubclass(cls, before[mode]) and cls.__name__ == "VIP" + before[mode].__name__
    assert dict(TRAINER_REGISTRY) == before and main_ppo_v0.RayPPOTrainer is RayPPOTrainer
    for v1 in (True, False):
        runner = task_runner_class(v1)
        assert hasattr(runner, "remote") and "VIP" in runner.__ray_actor_class__.__name__
