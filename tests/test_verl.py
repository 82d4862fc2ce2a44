"""verl plug-in on real verl objects (CPU): DataProto expansion, uid groups, verl's own advantage and balancing code,
hydra config group, and both trainer loops driven for a few steps inside a local Ray cluster with stub workers:

* legacy ``RayPPOTrainer.fit`` (verl's real loop) with a Ray-actor stub rollout worker and a stub actor worker group;
* the v1 (TransferQueue) trainer's submit -> replay-buffer sample -> advantage path with a stub agent loop that
  writes trajectories into a real TransferQueue, as verl's ``AgentLoopWorkerTQ`` does.
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
from verl import DataProto  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402

from vipalloc.integrations import verl as plug  # noqa: E402
from vipalloc.integrations.verl import (  # noqa: E402
    ALLOCATOR_FILE,
    VIPConfig,
    VIPHook,
    divisible_budget,
    expand_by_counts,
    required_multiple,
    resolve_estimator,
)

torch.set_num_threads(1)
CONFIG_DIR = os.path.join(os.path.dirname(plug.__file__), "verl_config")


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
    assert default == VIPConfig().to_dict()

    from vipalloc.integrations.verl_trainer import check_config

    cfg = compose(["vip.n_max=16", "vip.strategy=knapsack", "algorithm.adv_estimator=rloo"])
    vip = check_config(cfg)
    assert (vip.n_max, vip.strategy) == (16, "knapsack")
    assert resolve_estimator(vip, cfg.algorithm.adv_estimator) == "rloo"
    assert resolve_estimator(vip, "grpo") == "drgrpo"
    with pytest.raises(ValueError, match="adv_estimator='gae' is not supported"):
        check_config(compose(["algorithm.adv_estimator=gae"]))
    with pytest.raises(ValueError, match="outside vip.n_min..vip.n_max"):
        check_config(compose(["actor_rollout_ref.rollout.n=2"]))
    with pytest.raises(ValueError, match=r"unknown vip config key\(s\) \['n_maximum'\]"):
        VIPConfig.from_mapping({"n_maximum": 3})
    with pytest.raises(ValueError, match="n_min must be an integer >= 2"):
        VIPConfig.from_mapping({"n_min": 1})
    with pytest.raises(ValueError, match="n_max must be an integer >= vip.n_min"):
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
    with pytest.raises(ValueError, match="cannot identify prompts"):
        hook.prompt_ids({"index": np.zeros(4)}, 4)


def test_feedback_metrics_and_allocator_file_round_trip(tmp_path) -> None:
    m = 8
    batch = make_batch(m, seed=2)
    cfg = VIPConfig(strategy="vip", predictor="beta", n_min=2, n_max=8, success_key="acc")
    hook = VIPHook(cfg, "drgrpo")
    counts = plan_batch(hook, batch, budget=32, step=1)
    out = expand_by_counts(batch, counts)
    acc = np.random.default_rng(1).binomial(1, 0.4, len(out)).astype(float)
    padding_uid = np.array(["pad-row"], dtype=object)  # rows not planned here (e.g. padding) are ignored
    metrics = hook.observe(np.concatenate([out.non_tensor_batch["uid"], padding_uid]), np.append(acc, 1.0))
    assert set(metrics) >= {
        "vip/mean_n",
        "vip/max_n",
        "vip/frac_zero_std",
        "vip/pred_abs_err",
        "vip/expected_var_ratio_vs_uniform",
    }
    assert metrics["vip/mean_n"] == pytest.approx(counts[counts > 0].mean())
    agg = hook.allocator.history.aggregates()
    assert int(agg.trials.sum()) == len(out) and int(agg.successes.sum()) == int(acc.sum())
    assert hook.observe(out.non_tensor_batch["uid"], acc) == {}  # a prompt is observed once
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
    hook.observe(eb.non_tensor_batch["uid"], np.ones(len(eb)))  # feedback in any order, each against its own plan
    hook.observe(ea.non_tensor_batch["uid"], np.zeros(len(ea)))
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

        self.updates.append(int(batch_td.batch_size[0]))
        return tu.get_tensordict({}, non_tensor_dict={"metrics": {"mfu": 0.0, "pg_loss": [0.0]}})

    def save_checkpoint(self, local_path: str, *args: Any, **kwargs: Any) -> None:
        os.makedirs(local_path, exist_ok=True)
        self.saved.append(local_path)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        return None


def test_legacy_fit_in_local_ray_with_stub_rollout_worker(ray_cluster, tmp_path, monkeypatch) -> None:
    """verl's real ``RayPPOTrainer.fit`` (as ``RayVIPTrainer``) for 3 steps on the ``vip_trainer`` config."""
    from verl.trainer.ppo.ray_trainer import Role
    from verl.utils.dataset.rl_dataset import collate_fn
    from verl.utils.tracking import Tracking

    logged: list[tuple[int, dict]] = []
    monkeypatch.setattr(Tracking, "__init__", lambda self, *a, **k: None)
    monkeypatch.setattr(Tracking, "log", lambda self, data, step, **k: logged.append((step, dict(data))))
    ckpt = str(tmp_path / "ckpt")
    overrides = [
        "trainer.use_v1=false",
        "trainer.logger=[console]",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.save_freq=2",
        "trainer.total_training_steps=3",
        "trainer.n_gpus_per_node=2",
        f"trainer.default_local_dir={ckpt}",
        "data.train_batch_size=8",
        "data.dataloader_num_workers=0",
        "data.val_batch_size=8",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",
        "algorithm.adv_estimator=grpo",
        "algorithm.norm_adv_by_std_in_grpo=false",
        "algorithm.rollout_correction.bypass_mode=true",
        "vip.strategy=vip",
        "vip.predictor=beta",
        "vip.n_min=2",
        "vip.n_max=8",
    ]
    config = compose(overrides)

    seen_batches: list[dict[str, Any]] = []

    class Recording(plug.RayVIPTrainer):  # records what verl hands to the actor update
        def _update_actor(self, batch: DataProto) -> DataProto:
            out = super()._update_actor(batch)
            seen_batches.append(
                {
                    "uid": np.asarray(batch.non_tensor_batch["uid"], dtype=str),
                    "scores": batch.batch["token_level_scores"].sum(-1).numpy().astype(np.float64),
                    "adv": batch.batch["advantages"],
                    "mask": batch.batch["response_mask"],
                    "metrics": dict(out.meta_info["metrics"]),
                }
            )
            return out

    def build() -> Any:
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

    trainer = build()
    manager = StubRolloutManager(stub_rollout_worker_class(ray_cluster).remote(P_TABLE), ray_cluster)
    trainer.async_rollout_manager = manager
    trainer.fit()

    hook = trainer._vip_hook
    assert len(manager.seen) == 3 and len(seen_batches) == 3
    for gen_groups, upd in zip(manager.seen, seen_batches):
        assert sum(gen_groups.values()) == 32  # budget = 8 prompts x rollout.n 4, a multiple of lcm(2, 16)
        assert group_sizes(upd["uid"]) == gen_groups  # the trained groups are the generated groups
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
        assert d["vip/budget"] == 32 and d["vip/max_n"] <= 8
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


def test_v1_trainer_with_transfer_queue_and_stub_agent_loop(ray_cluster) -> None:
    """verl's v1 sync trainer: our submit hook -> stub agent loop -> real replay buffer -> real advantage."""
    tq = pytest.importorskip("transfer_queue")
    from torchdata.stateful_dataloader import StatefulDataLoader
    from verl.trainer.ppo.v1 import PPOTrainerSync
    from verl.utils.dataset.rl_dataset import collate_fn
    from verl.utils.skip import SkipManager
    from verl.utils.tensordict_utils import list_of_dict_to_tensordict

    config = compose(
        [
            "data.train_batch_size=8",
            "actor_rollout_ref.rollout.n=4",
            "actor_rollout_ref.actor.ppo_mini_batch_size=2",
            "algorithm.adv_estimator=grpo",
            "algorithm.norm_adv_by_std_in_grpo=false",
            "vip.strategy=vip",
            "vip.predictor=beta",
            "vip.n_min=2",
            "vip.n_max=8",
            "transfer_queue.backend.SimpleStorage.num_data_storage_units=1",
            "transfer_queue.backend.SimpleStorage.total_storage_size=2000",
        ]
    )
    tq.init(config.transfer_queue)
    try:
        cls = plug.vip_v1_trainer_class(PPOTrainerSync)
        assert cls is plug.vip_v1_trainer_class(PPOTrainerSync) and issubclass(cls, PPOTrainerSync)
        trainer = cls(config)
        trainer.replay_buffer.poll_interval = 0.05
        trainer.actor_rollout_wg = StubActorGroup(dp=2)
        trainer.train_dataloader = StatefulDataLoader(PromptDataset(8), batch_size=8, collate_fn=collate_fn)
        trainer.train_dataloader_it = None
        SkipManager.init(config)

        class StubAgentLoop:
            """Does what verl's AgentLoopWorkerTQ does per prompt: n = __rollout_n__, write n trajectories."""

            def __init__(self) -> None:
                self.rng = np.random.default_rng(0)
                self.n_by_uid: dict[str, int] = {}

            def generate_sequences(self, batch: Any) -> None:
                for i in range(len(batch)):
                    uid = batch["uid"][i]
                    n = batch["__rollout_n__"][i]
                    self.n_by_uid[uid] = int(n)
                    idx = int(batch["index"][i])
                    fields, keys, tags = [], [], []
                    for s in range(n):  # range() over the 0-d tensor, exactly as the agent loop does
                        reward = float(self.rng.random() < true_p(idx))
                        rl = int(self.rng.integers(1, 7))
                        row = {k: v[0] for k, v in rollout_tensors(np.array([rl]), np.array([reward])).items()}
                        row["response_mask"] = row["response_mask"][:rl]
                        row["rm_scores"] = row["rm_scores"][:rl]
                        row["rollout_log_probs"] = row["rollout_log_probs"][:rl]
                        row["old_log_probs"] = row["rollout_log_probs"]  # what _compute_old_log_prob would add
                        row["responses"] = row["responses"][:rl]
                        row["uid"] = uid
                        row["extra_fields"] = {"reward_extra_info": {"acc": reward}}
                        fields.append(row)
                        keys.append(f"{uid}_{s}_0")
                        tags.append({"status": "success", "seq_len": P_LEN + rl, "global_steps": 1})
                    if keys:
                        tq.kv_batch_put(
                            keys=keys, partition_id="train", fields=list_of_dict_to_tensordict(fields), tags=tags
                        )
                    tq.kv_put(key=uid, partition_id="train", tag={"status": "finished"})

        agent = StubAgentLoop()
        trainer.agent_loop_manager = agent
        observed = []
        for step in (1, 2):
            trainer.global_steps = step
            trainer.prepare_step()
            assert sum(agent.n_by_uid.values()) == 32  # budget 8 x 4 rollouts, a multiple of lcm(2, 2 x 4)
            assert all(c == 0 or c >= 2 for c in agent.n_by_uid.values())
            batch, _ = trainer.replay_buffer.sample(global_steps=step, partition_id="train", batch_size=8)
            assert len(batch) == 32
            metrics: dict[str, float] = {}
            batch = trainer._compute_advantage(batch, metrics)
            assert metrics["vip/budget"] == 32 and "vip/expected_var_ratio_vs_uniform" in metrics
            data = tq.kv_batch_get(
                keys=batch.keys, partition_id="train", select_fields=["uid", "rm_scores", "advantages"]
            )
            uids = np.asarray(list(data["uid"]), dtype=str)
            assert group_sizes(uids) == {u: c for u, c in agent.n_by_uid.items() if c}
            scores = np.array([float(t.sum()) for t in data["rm_scores"].unbind()])
            adv = np.array([float(t[0]) for t in data["advantages"].unbind()])
            np.testing.assert_allclose(adv, reference_advantage(scores, uids, "grpo", norm=False), atol=1e-6)
            observed.append(dict(agent.n_by_uid))
            tq.kv_clear(keys=batch.keys, partition_id="train")
            agent.n_by_uid.clear()
        assert set(observed[0].values()) == {4}
        assert set(observed[1].values()) != {4}  # the second batch is re-allocated from the first one's rewards
        agg = trainer._vip_hook.allocator.history.aggregates()
        assert int(agg.trials.sum()) == 64
    finally:
        tq.close()


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
