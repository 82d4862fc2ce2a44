"""Token budgets in the TRL plug-in: lengths from TRL's completion mask feed the allocator, token-mode plans.

A stand-in policy (``_trl_helpers.UnevenPolicy``) answers each prompt with a scripted length: 2, 3 or 5 tokens, or
8, the ``max_completion_length`` (cut there, no EOS). The tiny model still runs TRL's log-prob passes and training.
Two processes: ``tests/_trl_mp_worker.py``'s ``tokens`` scenario.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from _trl_helpers import TRUE_P, DigitReward, UnevenPolicy, sums, tiny_llama, tiny_tokenizer  # noqa: E402
from trl import GRPOTrainer, TrlParser  # noqa: E402

from vipalloc import Allocator  # noqa: E402
from vipalloc.integrations.trl import VIPGRPOConfig, VIPGRPOTrainer  # noqa: E402
from vipalloc.telemetry import OUTCOME_TOKEN_METRIC_NAMES, PLAN_TOKEN_METRIC_NAMES  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

PROMPTS, G, N_MAX, MAX_LEN, STEPS = 4, 4, 8, 8, 5  # 4 prompts x 8 sampled rows, at most 16 rollouts per batch
CAP = 64.0  # the absolute cap: n_min=2 rollouts of 4 prompts at the 8-token maximum, below uniform's ~72 tokens


def token_args(out: Path, **kw) -> VIPGRPOConfig:
    base = dict(
        output_dir=str(out),
        use_cpu=True,
        per_device_train_batch_size=PROMPTS * G // 2,
        gradient_accumulation_steps=2,
        num_generations=G,
        n_max=N_MAX,
        n_min=2,
        max_completion_length=MAX_LEN,
        max_steps=STEPS,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        loss_type="grpo",
        beta=0.0,
        strategy="vip",
        predictor="oracle",
        token_budget="uniform",
        seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return VIPGRPOConfig(**base)


def train(tmp_path_factory, strategy: str = "vip", **kw) -> dict:
    """A short run: every plan (with the uniform tokens computed just before it), every observe call, the raw
    scored batch of each step, TRL's logs. A two-phase ``strategy``: ``plans`` holds the pilots (with the uniform
    tokens and the keyword arguments), ``commits`` the commits, each with the tokens left when it was planned."""
    out = tmp_path_factory.mktemp("tokens")
    tok = tiny_tokenizer()
    data = sums(n=8)  # 8 prompts: seen again from the third step, so lengths are predicted per prompt
    policy = UnevenPolicy(tok, data, MAX_LEN)
    plans, commits, observed, raw, records = [], [], [], [], []
    base_score = GRPOTrainer._generate_and_score_completions

    class Spy(Allocator):
        def plan(self, prompt_ids, prompts=None, budget=None, step=None, **kwargs):
            uniform = self.uniform_tokens(prompt_ids, G, prompts=prompts)
            result = super().plan(prompt_ids, prompts=prompts, budget=budget, step=step, **kwargs)
            plans.append((result, uniform, kwargs))
            return result

        def plan_pilot(self, prompt_ids, prompts=None, budget=None, step=None, pilot_n=2, **kwargs):
            uniform = self.uniform_tokens(prompt_ids, G, prompts=prompts)
            result = super().plan_pilot(
                prompt_ids, prompts=prompts, budget=budget, step=step, pilot_n=pilot_n, **kwargs
            )
            plans.append((result, uniform, {**kwargs, "budget": budget, "pilot_n": pilot_n}))
            return result

        def plan_commit(self, step=None):
            result = super().plan_commit(step)
            commits.append((result, len(observed)))  # observe calls made before the commit was planned
            return result

        def observe(self, prompt_ids, rewards, step, lengths=None, **kwargs):
            observed.append((step, list(prompt_ids), [np.asarray(x).tolist() for x in lengths]))
            return super().observe(prompt_ids, rewards, step, lengths=lengths, **kwargs)

    class Recording(VIPGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            output = super()._generate_and_score_completions(inputs)
            records.append(self.vip_last)
            return output

    def score(self, inputs):
        output = base_score(self, inputs)
        raw.append(output["completion_mask"].sum(1).tolist())
        return output

    two_phase = strategy in ("vip_two_phase", "pilot_commit")
    args = token_args(out, strategy=strategy, two_phase=two_phase, **kw)
    allocator = Spy(strategy=strategy, predictor="oracle", n_min=2, n_max=N_MAX, embedder="hashing")
    allocator.predictor.set_true_p([f"q{i}" for i in range(8)], TRUE_P[:8])
    mp = pytest.MonkeyPatch()
    policy.install(mp)
    mp.setattr(GRPOTrainer, "_generate_and_score_completions", score)
    try:
        trainer = Recording(
            model=tiny_llama(len(tok)),
            reward_funcs=DigitReward(),
            args=args,
            train_dataset=data,
            processing_class=tok,
            allocator=allocator,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.train()
    finally:
        mp.undo()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return dict(
        trainer=trainer,
        policy=policy,
        plans=plans,
        commits=commits,
        observed=observed,
        raw=raw,
        records=records,
        logs=logs,
        warnings=[str(w.message) for w in caught if "token_budget" in str(w.message)],
    )


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory) -> dict:
    return train(tmp_path_factory)


@pytest.fixture(scope="module")
def cap_run(tmp_path_factory) -> dict:
    return train(tmp_path_factory, token_budget=CAP)


def test_lengths_given_to_observe_are_the_completion_mask_counts(uniform_run) -> None:
    run = uniform_run
    assert len(run["observed"]) == len(run["records"]) == STEPS
    for (step, ids, lengths), rec, mask in zip(run["observed"], run["records"], run["raw"]):
        assert step == rec.step and ids == [p for p, c in zip(rec.prompt_ids, rec.counts) if c > 0]
        by_id = dict(zip(rec.prompt_ids, range(len(rec.prompt_ids))))
        for pid, got in zip(ids, lengths):
            i = by_id[pid]
            rows = mask[i * N_MAX : i * N_MAX + int(rec.counts[i])]  # distinct prompts: prompt i fills block i
            assert got == rows == rec.lengths[i].tolist()
    # the lengths really are uneven, and some completions were cut at max_completion_length
    every = [x for _, _, lengths in run["observed"] for ln in lengths for x in ln]
    assert set(every) == {2, 3, 5, MAX_LEN}
    history = run["trainer"].allocator.history
    assert history.has_lengths


def test_uniform_token_mode_plans_what_uniform_would_spend(uniform_run) -> None:
    plans = uniform_run["plans"]
    assert len(plans) == STEPS
    first, uniform0, kw0 = plans[0]
    # no length known yet: the first generation batch is planned by rollouts (the budget, exactly)
    assert uniform0 is None and first.token_budget is None and "token_budget" not in kw0
    assert int(first.counts.sum()) == PROMPTS * G
    for plan, uniform, kw in plans[1:]:
        assert uniform is not None and kw["token_budget"] == pytest.approx(uniform, rel=1e-12)
        assert plan.token_budget == pytest.approx(uniform, rel=1e-12)
        assert plan.expected_tokens is not None and plan.expected_tokens <= plan.token_budget * (1 + 1e-9)
        assert int(plan.counts.sum()) <= PROMPTS * G  # the rollout budget stays a cap
        assert plan.counts.max() <= N_MAX
    # lengths were learnt per prompt: the long prompts are predicted longer than the short ones
    last = plans[-1][0]
    lengths = dict(zip(last.prompt_ids, last.expected_lengths))
    policy = uniform_run["policy"]
    texts = {f"q{i}": p for i, p in enumerate(sums(n=8)["prompt"])}
    longest = max(lengths, key=lambda k: policy.tokens_of(texts[k]))
    shortest = min(lengths, key=lambda k: policy.tokens_of(texts[k]))
    assert lengths[longest] > lengths[shortest]


def test_token_metrics_are_logged(uniform_run) -> None:
    logs, records = uniform_run["logs"], uniform_run["records"]
    assert len(logs) == STEPS
    for h, rec in zip(logs, records):
        assert set(OUTCOME_TOKEN_METRIC_NAMES) <= set(h)
        generated = sum(int(ln.sum()) for ln in rec.lengths)
        assert h["vip/tokens_generated"] == pytest.approx(generated)
        cut = sum(int((ln >= MAX_LEN).sum()) for ln in rec.lengths) / sum(ln.size for ln in rec.lengths)
        assert h["vip/frac_truncated"] == pytest.approx(cut)
    assert any(h["vip/frac_truncated"] > 0 for h in logs)
    for h, rec in zip(logs[1:], records[1:]):  # token plans from the second step on
        assert set(PLAN_TOKEN_METRIC_NAMES) <= set(h)
        assert h["vip/tokens_planned"] == pytest.approx(rec.plan.expected_tokens)
        assert h["vip/token_budget"] == pytest.approx(rec.plan.token_budget)
        assert h["vip/tokens_planned"] <= h["vip/token_budget"] * (1 + 1e-9)
    assert all(math.isfinite(h["loss"]) for h in logs)


def test_absolute_cap_is_respected(cap_run) -> None:
    plans, records = cap_run["plans"], cap_run["records"]
    assert len(plans) == STEPS and not cap_run["warnings"]
    first = plans[0][0]
    # before any length is known the cap is planned at the longest a completion can be: it holds for certain
    np.testing.assert_array_equal(first.expected_lengths, np.full(PROMPTS, float(MAX_LEN)))
    assert first.token_budget == CAP and sum(int(ln.sum()) for ln in records[0].lengths) <= CAP
    for plan, _, _ in plans:
        assert plan.token_budget == CAP
        assert plan.expected_tokens is not None and plan.expected_tokens <= CAP * (1 + 1e-9)
        assert int(plan.counts.sum()) <= PROMPTS * G
    # the cap binds: later plans spend fewer rollouts than the rollout budget
    assert any(int(p.counts.sum()) < PROMPTS * G for p, _, _ in plans[1:])


# ---------------------------------------------------------------------- two-phase steps under a token budget
def check_two_phase_steps(run: dict) -> list[tuple]:
    """Per step: the pilot's lengths reached ``observe`` before the commit was planned and the commit's after, each
    equal to TRL's completion-mask counts of its rows; every group is pilot + commit rows (the first rows of its
    n_max-wide block, at most n_max); the rollout budget caps the step. Returns, per step, ``(pilot, plan kwargs,
    uniform tokens, commit, pilot tokens spent, record)``."""
    pilots, commits, observed, raw, records = (run[k] for k in ("plans", "commits", "observed", "raw", "records"))
    assert len(pilots) == len(commits) == len(records) == len(raw) == STEPS
    assert len(observed) == 2 * STEPS  # the pilot's rollouts, then the commit's, every step
    steps = []
    for k, ((pilot, uniform, kw), (commit, seen), rec, mask) in enumerate(zip(pilots, commits, records, raw)):
        assert pilot.phase == "pilot" and commit.phase == "commit" and rec.step == pilot.step == commit.step
        assert seen == 2 * k + 1  # the pilot's outcomes and lengths were observed before the commit was planned
        (s_pilot, pilot_ids, pilot_lens), (s_commit, commit_ids, commit_lens) = observed[2 * k : 2 * k + 2]
        assert s_pilot == s_commit == rec.step
        assert rec.prompt_ids == pilot.prompt_ids == commit.prompt_ids
        block = {pid: i for i, pid in enumerate(rec.prompt_ids)}  # distinct prompts: prompt i fills block i
        assert pilot_ids == [p for p, c in zip(pilot.prompt_ids, pilot.counts) if c > 0]
        assert commit_ids == [p for p, c in zip(commit.prompt_ids, commit.counts) if c > 0]
        for pid, got in zip(pilot_ids, pilot_lens):
            i = block[pid]
            assert got == mask[i * N_MAX : i * N_MAX + int(pilot.counts[i])]
        for pid, got in zip(commit_ids, commit_lens):
            i = block[pid]
            start = i * N_MAX + int(pilot.counts[i])
            assert got == mask[start : start + int(commit.counts[i])]
        assert set(pilot.counts.tolist()) <= {0, kw["pilot_n"]} and kw["budget"] == PROMPTS * G
        np.testing.assert_array_equal(rec.counts, pilot.counts + commit.counts)
        assert rec.counts.max() <= N_MAX and int(rec.counts.sum()) <= PROMPTS * G
        real = np.asarray(rec.real_rows, bool).reshape(-1, N_MAX)
        np.testing.assert_array_equal(real, np.arange(N_MAX)[None, :] < rec.counts[:, None])
        assert [ln.tolist() for ln in rec.lengths] == [
            mask[i * N_MAX : i * N_MAX + int(c)] for i, c in enumerate(rec.counts)
        ]
        spent = float(sum(sum(ln) for ln in pilot_lens))
        steps.append((pilot, kw, uniform, commit, spent, rec))
    every = {x for _, _, lengths in observed for ln in lengths for x in ln}
    assert len(every) >= 2 and max(every) == MAX_LEN  # uneven lengths, some cut at max_completion_length
    return steps


@pytest.fixture(scope="module", params=["vip_two_phase", "pilot_commit"])
def two_phase_run(request, tmp_path_factory) -> dict:
    return train(tmp_path_factory, strategy=request.param)


def test_two_phase_uniform_token_mode(two_phase_run) -> None:
    """Pilot and commit carry uniform's token budget; the pilot's tokens spent (completion mask) plus the commit's
    predicted tokens fit it."""
    steps = check_two_phase_steps(two_phase_run)
    every = {x for _, _, lengths in two_phase_run["observed"] for ln in lengths for x in ln}
    assert len(every) >= 3 and MAX_LEN in every  # of 2, 3, 5 and 8 tokens
    pilot, kw, uniform, commit, _, rec = steps[0]
    # no length known yet: the first step is planned by rollouts (pilot + commit = the budget, exactly)
    assert uniform is None and kw.get("token_budget") is None
    assert pilot.token_budget is None and commit.token_budget is None and int(rec.counts.sum()) == PROMPTS * G
    for pilot, kw, uniform, commit, spent, _rec in steps[1:]:
        assert uniform is not None and kw["token_budget"] == pytest.approx(uniform, rel=1e-12)
        assert pilot.token_budget == pytest.approx(uniform, rel=1e-12)
        assert commit.token_budget == pytest.approx(uniform, rel=1e-12)
        assert pilot.expected_tokens is not None and pilot.expected_tokens <= uniform * (1 + 1e-9)
        committed = float(commit.counts @ commit.expected_lengths)
        assert spent + committed <= uniform * (1 + 1e-9)


def test_two_phase_token_metrics_are_logged(two_phase_run) -> None:
    logs, records = two_phase_run["logs"], two_phase_run["records"]
    assert len(logs) == STEPS
    for h, rec in zip(logs, records):
        assert set(OUTCOME_TOKEN_METRIC_NAMES) <= set(h)
        assert h["vip/tokens_generated"] == pytest.approx(sum(int(ln.sum()) for ln in rec.lengths))  # pilot + commit
        assert h["vip/budget"] == int(rec.counts.sum())
    for h, rec in zip(logs[1:], records[1:]):
        # a rule (pilot_commit) certifies no gap: its vip/optimality_gap is left out, not logged as NaN
        expected = set(PLAN_TOKEN_METRIC_NAMES) - (
            {"vip/optimality_gap"} if math.isnan(rec.plan.optimality_gap) else set()
        )
        assert expected <= set(h) and ("vip/optimality_gap" in h) == (expected == set(PLAN_TOKEN_METRIC_NAMES))
        assert h["vip/token_budget"] == pytest.approx(rec.plan.token_budget)
        assert h["vip/tokens_planned"] == pytest.approx(rec.plan.expected_tokens)  # the whole step's groups
    assert all(math.isfinite(h["loss"]) for h in logs)


def test_two_phase_absolute_cap(tmp_path_factory) -> None:
    """A cap in tokens: the first step's pilot and commit are planned at max_completion_length per rollout, so the
    tokens generated stay under the cap; later steps at the predicted lengths."""
    run = train(tmp_path_factory, strategy="vip_two_phase", token_budget=CAP)
    steps = check_two_phase_steps(run)
    assert not run["warnings"]
    pilot, _, _, commit, spent, rec = steps[0]
    np.testing.assert_array_equal(pilot.expected_lengths, np.full(PROMPTS, float(MAX_LEN)))
    assert sum(int(ln.sum()) for ln in rec.lengths) <= CAP
    for pilot, kw, _, commit, spent, _rec in steps:
        assert kw["token_budget"] == pilot.token_budget == commit.token_budget == CAP
        assert spent + float(commit.counts @ commit.expected_lengths) <= CAP * (1 + 1e-9)
    assert any(int(rec.counts.sum()) < PROMPTS * G for *_, rec in steps)  # the cap binds


def test_cap_below_the_minimum_plans_the_minimum_with_a_warning(tmp_path) -> None:
    """A cap that cannot pay for n_min rollouts per prompt at the predicted lengths: planned at that minimum."""
    args = token_args(tmp_path, token_budget=PROMPTS * 2.0)
    allocator = Allocator(strategy="vip", predictor="beta", n_min=2, n_max=N_MAX, embedder="hashing")
    ids = [f"q{i}" for i in range(PROMPTS)]
    trainer = VIPGRPOTrainer.__new__(VIPGRPOTrainer)
    trainer.args, trainer.allocator = args, allocator
    with pytest.warns(RuntimeWarning, match="cannot pay for n_min"):
        tokens, lengths = trainer._vip_token_budget(ids, ids, PROMPTS * G)
    assert tokens == 2 * PROMPTS * MAX_LEN and lengths is not None
    # a two-phase step: the minimum is the pilot's max(n_min, pilot_n) rollouts per prompt
    trainer.args = token_args(tmp_path, token_budget=PROMPTS * 3.0, strategy="vip_two_phase", two_phase=True, pilot_n=3)
    allocator = Allocator(strategy="vip_two_phase", predictor="beta", n_min=2, n_max=N_MAX, embedder="hashing")
    trainer.allocator = allocator
    with pytest.warns(RuntimeWarning, match="pilot_n"):
        tokens, lengths = trainer._vip_token_budget(ids, ids, PROMPTS * G)
    assert tokens == 3 * PROMPTS * MAX_LEN and lengths is not None
    pilot = allocator.plan_pilot(ids, budget=PROMPTS * G, pilot_n=3, token_budget=tokens, expected_lengths=lengths)
    assert pilot.counts.tolist() == [3] * PROMPTS


def test_token_mode_refusals_fire_at_construction(tmp_path) -> None:
    for strategy in ("vip_two_phase", "pilot_commit"):  # two-phase token mode is supported
        assert token_args(tmp_path, strategy=strategy, two_phase=True).token_budget == "uniform"
    with pytest.raises(ValueError, match="pilot_n"):  # the pilot is part of a cap: pilot_n one-token rollouts each
        token_args(tmp_path, strategy="vip_two_phase", two_phase=True, pilot_n=3, token_budget=PROMPTS * 3 - 1)
    with pytest.raises(ValueError, match="vip_authors"):
        token_args(tmp_path, strategy="vip_authors")
    for bad in ("banana", -5.0, float("inf"), True):
        with pytest.raises(ValueError, match="token_budget"):
            token_args(tmp_path, token_budget=bad)
    with pytest.raises(ValueError, match="n_min"):
        token_args(tmp_path, token_budget=PROMPTS * 2 - 1)  # not even one token per rollout at n_min
    assert token_args(tmp_path, token_budget="off").token_budget is None
    assert token_args(tmp_path, token_budget="5000").token_budget == 5000.0
    # an allocator whose strategy has no token mode: refused before TRL builds anything
    tok = tiny_tokenizer()
    built = []
    base_init = GRPOTrainer.__init__

    @functools.wraps(base_init)
    def init(self, *a, **k):
        built.append(1)
        return base_init(self, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(GRPOTrainer, "__init__", init)
        with pytest.raises(ValueError, match="cannot plan under a token budget"):
            VIPGRPOTrainer(
                model=tiny_llama(len(tok)),
                reward_funcs=DigitReward(),
                args=token_args(tmp_path, strategy="vip"),
                train_dataset=sums(n=8),
                processing_class=tok,
                allocator=Allocator(strategy="vip_authors", predictor="beta", n_min=2, n_max=N_MAX),
            )
    assert not built


def test_token_budget_from_the_command_line(tmp_path) -> None:
    parser = TrlParser(VIPGRPOConfig)
    common = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--num_generations", "4", "--report_to", "none"]
    for value, expected in (("uniform", "uniform"), ("20000", 20000.0), ("off", None)):
        (cfg,) = parser.parse_args_and_config(args=[*common, "--token_budget", value])
        assert cfg.token_budget == expected


# ---------------------------------------------------------------------- two processes
MP_SCENARIOS = ("tokens", "tokens-two-phase")  # one torchrun launch runs both (start-up is most of its time)


@pytest.fixture(scope="module")
def mp_dumps(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    out = tmp_path_factory.mktemp("mp-tokens")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("_trl_mp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    proc = subprocess.run(
        [*cmd, str(out), ",".join(MP_SCENARIOS)], timeout=600, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        name: tuple(json.loads((out / f"{name}.rank{r}.json").read_text()) for r in (0, 1))  # type: ignore[misc]
        for name in MP_SCENARIOS
    }


def test_two_processes_gather_lengths_and_plan_by_tokens(mp_dumps) -> None:
    d0, d1 = mp_dumps["tokens"]
    steps = d0["steps"]
    assert len(steps) == len(d1["steps"]) >= 4
    uneven = False
    for k, (s0, s1) in enumerate(zip(steps, d1["steps"])):
        assert s0["counts"] == s1["counts"]  # one plan, broadcast
        n_max = s0["n_max"]
        real = np.asarray(s0["real_rows"], bool)
        half = real.size // 2
        uneven |= int(real[:half].sum()) != int(real[half:].sum())
        mask = s0["mask"] + s1["mask"]  # completion-mask counts of the gathered batch, process order
        by_id = {pid: i for i, pid in enumerate(s0["prompt_ids"])}
        for pid, got in zip(s0["observed_ids"], s0["observed_lengths"]):  # main process: what observe received
            i = by_id[pid]
            assert got == mask[i * n_max : i * n_max + s0["counts"][i]]
        assert sum(map(len, s0["observed_lengths"])) == sum(s0["counts"])
        assert s0["lengths"] == s1["lengths"]  # vip_last.lengths: the gathered batch's, on every process
        if k == 0:
            assert s0["token_budget"] is None and sum(s0["counts"]) == s0["budget_rollouts"]
        else:
            assert s0["token_budget"] == pytest.approx(s0["uniform_tokens"], rel=1e-12)
            assert s0["expected_tokens"] <= s0["token_budget"] * (1 + 1e-9)
            assert sum(s0["counts"]) <= s0["budget_rollouts"]
    assert uneven  # the plans left the processes with different numbers of real rows
    every = {x for s in steps for ln in s["observed_lengths"] for x in ln}
    assert len(every) >= 3  # uneven lengths, some cut at the maximum
    for d in (d0, d1):
        rows = [c["rows"] for c in d["trained"]]
        assert all(r == rows[2 * (i // 2)] for i, r in enumerate(rows))  # equal micro-batches within a step
        assert all(math.isfinite(c["loss"]) for c in d["trained"])
        for h in d["logs"]:
            assert set(OUTCOME_TOKEN_METRIC_NAMES) <= set(h)
        assert all(set(PLAN_TOKEN_METRIC_NAMES) <= set(h) for h in d["logs"][1:])
    # both processes trained the same number of rows at every micro-batch
    assert [c["rows"] for c in d0["trained"]] == [c["rows"] for c in d1["trained"]]


def test_two_processes_two_phase_under_a_token_budget(mp_dumps) -> None:
    """``vip_two_phase`` with ``token_budget="uniform"`` on two processes: the pilot's gathered completion-mask
    lengths reach observe before the commit, the commit's after; pilot tokens spent + the commit's predicted tokens
    fit the budget; n_max-wide groups of pilot + commit rows; equal rows per process at every micro-batch."""
    d0, d1 = mp_dumps["tokens-two-phase"]
    steps = d0["steps"]
    assert len(steps) == len(d1["steps"]) >= 4
    uneven = False
    for k, (s0, s1) in enumerate(zip(steps, d1["steps"])):
        half = len(s0["real_rows"]) // 2
        uneven |= sum(s0["real_rows"][:half]) != sum(s0["real_rows"][half:])
        assert s0["counts"] == s1["counts"]  # one plan, broadcast
        n_max, counts = s0["n_max"], s0["counts"]
        pilot, commit = s0["pilot"], s0["commit"]
        assert counts == [a + b for a, b in zip(pilot, commit)] and max(counts) <= n_max
        assert set(pilot) <= {0, 2} and sum(counts) <= s0["budget_rollouts"]
        real = np.asarray(s0["real_rows"], bool).reshape(-1, n_max)
        np.testing.assert_array_equal(real, np.arange(n_max)[None, :] < np.asarray(counts)[:, None])
        mask = s0["mask"] + s1["mask"]  # completion-mask counts of the gathered batch, process order
        by_id = {pid: i for i, pid in enumerate(s0["prompt_ids"])}
        assert s0["observed_before"] == 2 * k + 1  # the pilot was observed before the commit was planned
        pilot_ids, pilot_lens = s0["pilot_observed"]
        for pid, got in zip(pilot_ids, pilot_lens):
            i = by_id[pid]
            assert got == mask[i * n_max : i * n_max + pilot[i]]
        for pid, got in zip(s0["observed_ids"], s0["observed_lengths"]):  # the commit's rows
            i = by_id[pid]
            assert got == mask[i * n_max + pilot[i] : i * n_max + counts[i]]
        assert s0["lengths"] == s1["lengths"]
        if k == 0:
            assert s0["pilot_token_budget"] is None and s0["commit_token_budget"] is None
            assert sum(counts) == s0["budget_rollouts"]
            continue
        budget = s0["uniform_tokens"]
        assert s0["pilot_token_budget"] == pytest.approx(budget, rel=1e-12)
        assert s0["commit_token_budget"] == pytest.approx(budget, rel=1e-12)
        spent = sum(sum(ln) for ln in pilot_lens)
        assert spent + float(np.dot(commit, s0["commit_lengths"])) <= budget * (1 + 1e-9)
    assert uneven  # the plans left the processes with different numbers of real rows
    for d in (d0, d1):
        rows = [c["rows"] for c in d["trained"]]
        assert all(r == rows[2 * (i // 2)] for i, r in enumerate(rows))  # equal micro-batches within a step
        assert all(math.isfinite(c["loss"]) for c in d["trained"])
        assert all(set(PLAN_TOKEN_METRIC_NAMES) <= set(h) for h in d["logs"][1:])
        assert all(set(OUTCOME_TOKEN_METRIC_NAMES) <= set(h) for h in d["logs"])
    assert [c["rows"] for c in d0["trained"]] == [c["rows"] for c in d1["trained"]]


# ---------------------------------------------------------------------- AsyncGRPOTrainer's rollout loop
def test_async_loop_feeds_group_tokens_and_plans_chunks_by_tokens(monkeypatch) -> None:
    pytest.importorskip("aiohttp")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import asyncio

    import test_trl_async as ta

    class Uneven(ta.StandInServerLoop):
        async def _generate_one_turn(self, prompt_ids):
            ids, logps = await super()._generate_one_turn(prompt_ids)
            k = int(self.tokenizer.decode(prompt_ids).rsplit("task ", 1)[1].split("<")[0])
            pad = self.tokenizer(" ok" * (3 * (k % 4)), add_special_tokens=False)["input_ids"]
            return pad + ids, [-0.5] * (len(pad) + len(ids))  # prompts k % 4 == 3 answer longest

    monkeypatch.setattr(ta, "StandInServerLoop", Uneven)
    loop = ta._loop(vip_token_budget="uniform")
    plans, observed = [], []
    plan, observe = loop.allocator.plan, loop.allocator.observe

    def plan_spy(ids, prompts=None, budget=None, step=None, **kw):
        uniform = loop.allocator.uniform_tokens(ids, loop.vip_mean_n, prompts=prompts)
        result = plan(ids, prompts=prompts, budget=budget, step=step, **kw)
        plans.append((result, uniform, budget))
        return result

    def observe_spy(ids, rewards, step, lengths=None):
        observed.append((ids[0], [int(x) for x in lengths[0]]))
        return observe(ids, rewards, step, lengths=lengths)

    loop.allocator.plan, loop.allocator.observe = plan_spy, observe_spy  # type: ignore[method-assign]
    try:
        asyncio.run(ta._drive(loop, groups=24))
    finally:
        loop._tool_pool.shutdown(wait=False, cancel_futures=True)
    # every group's generated tokens per episode (GroupRecord.tokens) went to observe, uneven across prompts
    assert [(r.prompt_id, r.tokens.tolist()) for r in loop.vip_log] == observed
    assert len({int(r.tokens.mean()) for r in loop.vip_log}) >= 3
    # the first chunk (no lengths yet) by rollouts; once lengths are back, chunks are token plans at uniform's spend
    assert plans[0][0].token_budget is None and plans[0][1] is None
    later = [(p, u, b) for p, u, b in plans if u is not None]
    assert later
    for p, uniform, budget in later:
        assert p.token_budget == pytest.approx(uniform, rel=1e-12)
        assert p.expected_tokens is not None and p.expected_tokens <= p.token_budget * (1 + 1e-9)
        assert int(p.counts.sum()) <= budget
    metrics = []
    while not loop._metrics_queue.empty():
        metrics.append(loop._metrics_queue.get_nowait())
    assert any("vip/tokens_planned" in m for m in metrics) and any("vip/group_tokens" in m for m in metrics)


def test_async_trainer_refuses_token_mode_without_a_token_strategy(tmp_path) -> None:
    from trl.experimental.async_grpo import AsyncGRPOConfig

    from vipalloc.integrations.trl import VIPAsyncGRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import test_trl_async as ta

    args = AsyncGRPOConfig(output_dir=str(tmp_path), max_steps=2, num_generations=4, use_cpu=True, bf16=False)
    authors = Allocator(strategy="vip_authors", predictor="beta", n_min=2, n_max=8, embedder="hashing")
    with pytest.raises(ValueError, match="cannot plan under a token budget"):
        VIPAsyncGRPOTrainer("m", ta.solved, args, ta._dataset(), allocator=authors, rollout_token_budget="uniform")
    with pytest.raises(ValueError, match="token_budget"):
        VIPAsyncGRPOTrainer("m", ta.solved, args, ta._dataset(), rollout_token_budget="lots")
    # the old keyword (the name TRL's AsyncGRPOConfig uses for packed training rows) still works, with a warning
    with pytest.warns(FutureWarning, match="renamed rollout_token_budget"):
        with pytest.raises(ValueError, match="cannot plan under a token budget"):
            VIPAsyncGRPOTrainer("m", ta.solved, args, ta._dataset(), allocator=authors, token_budget="uniform")
    with pytest.raises(ValueError, match="give rollout_token_budget= only"):
        VIPAsyncGRPOTrainer("m", ta.solved, args, ta._dataset(), token_budget=5.0, rollout_token_budget=5.0)
