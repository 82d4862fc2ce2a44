"""VIPGRPOTrainer on two CPU processes (torchrun, gloo): plans that leave the processes unequal, every loss type.

One torchrun run of ``tests/_trl_mp_worker.py`` covers every scenario (see its docstring); the tests read what each
process dumped. Scripted plans put all 8 real rows on process 0 at the first step (process 1 has none) and 6 vs 2
at the second, so TRL's per-row gathers in ``_compute_loss`` see unequal shapes unless rows are rebalanced.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")

import torch  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

LOSSES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
SCRIPTED = (*(f"loss-{t}" for t in LOSSES), "span", "vllm-tp1", "vllm-tp2", "vllm-server")  # scripted plans
SCENARIOS = (*SCRIPTED, "two-phase")
# Real rows per process at steps 0 and 1 (worker's SCRIPT / SPAN_SCRIPT over TRL's process slices).
REAL = {"default": ((8, 0), (6, 2)), "span": ((9, 3), (5, 7))}
ROWS = {"default": 2, "span": 3}  # per_device_train_batch_size: rows every process trains on per micro-batch


@pytest.fixture(scope="module")
def dumps(tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    out = tmp_path_factory.mktemp("mp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    worker = Path(__file__).with_name("_trl_mp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    proc = subprocess.run([*cmd, str(out), ",".join(SCENARIOS)], timeout=600, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        s: tuple(json.loads((out / f"{s}.rank{r}.json").read_text()) for r in (0, 1))  # type: ignore[misc]
        for s in SCENARIOS
    }


def _kind(scenario: str) -> str:
    return "span" if scenario == "span" else "default"


def _real_pairs(d: dict, step: int, n_real: int) -> list[tuple[str, str]]:
    """(prompt, completion) of the real rows a process scored at ``step`` (a throw-away call has no real row)."""
    return [tuple(p) for p in d["reward_pairs"][step]] if n_real else []  # type: ignore[misc]


@pytest.mark.parametrize("scenario", SCRIPTED)
def test_processes_train_equal_rows_and_exactly_the_real_ones(dumps, scenario) -> None:
    d0, d1 = dumps[scenario]
    assert d0["world"] == d1["world"] == 2
    kind = _kind(scenario)
    for step, real in enumerate(REAL[kind]):
        for d, n_real in zip((d0, d1), real):
            # every process scored its real rows; one without any still called the reward function once (on a
            # throw-away row) so that a ZeRO-3 reward model's collective forward is entered on every process
            assert d["reward_rows"][step] == max(1, n_real)
            calls = d["trained"][2 * step : 2 * step + 2]  # 2 micro-batches per generation batch
            assert [c["rows"] for c in calls] == [ROWS[kind]] * 2  # equal rows on both processes
        trained = Counter(
            tuple(r[:2]) for d in (d0, d1) for c in d["trained"][2 * step : 2 * step + 2] for r in c["real"]
        )
        scored = Counter(p for d, n in zip((d0, d1), real) for p in _real_pairs(d, step, n))
        assert trained == scored and sum(trained.values()) == sum(real)  # each real row trained once, nothing else
    for d in (d0, d1):
        assert all(math.isfinite(c["loss"]) for c in d["trained"]) and len(d["logs"]) == 2


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_token_positions_match_the_log_prob_passes(dumps, scenario) -> None:
    """Learning rate 0: the policy is the reference, so the KL is 0 exactly when rows moved between processes
    (other prompt widths) at the positions of the reference pass. (Without the position shift: KL ~9e-3.)"""
    for d in dumps[scenario]:
        for h in d["logs"]:
            assert h["kl"] == pytest.approx(0.0, abs=1e-7)
            if "clip_ratio/region_mean" in h:
                assert h["clip_ratio/region_mean"] == 0.0


@pytest.mark.parametrize("scenario", ["loss-dapo", "span"])
def test_advantages_are_group_statistics_across_processes_and_the_allocator_got_them(dumps, scenario) -> None:
    d0, d1 = dumps[scenario]
    for step, real in enumerate(REAL[_kind(scenario)]):
        by_prompt: dict[str, list[float]] = {}
        for d, n in zip((d0, d1), real):
            if n:
                for (_, _, r), (prompt, _) in zip(d["reward_calls"][step], d["reward_pairs"][step]):
                    by_prompt.setdefault(prompt, []).append(r)
        expected: dict[tuple[str, str], float] = {}
        for d, n in zip((d0, d1), real):
            if n:
                for (_, completion, r), (prompt, _) in zip(d["reward_calls"][step], d["reward_pairs"][step]):
                    x = torch.tensor(by_prompt[prompt])
                    expected[(prompt, completion)] = float((r - x.mean()) / (nanstd(x) + 1e-4))
        got = [(tuple(r[:2]), r[2]) for d in (d0, d1) for c in d["trained"][2 * step : 2 * step + 2] for r in c["real"]]
        for key, adv in got:
            assert adv == pytest.approx(expected[key], abs=1e-5)
        # the main process's allocator observed exactly the real rewards of both processes, binarised
        _, hist_ids, succ, trials = d0["history"][step]
        rewards = {p: v for p, v in by_prompt.items()}
        assert sorted(trials) == sorted(len(v) for v in rewards.values())
        assert sum(succ) == sum(int(x >= 0.5) for v in rewards.values() for x in v)
    if scenario == "span":  # prompt 1's 6 rows sit on both processes at step 0 (rows 6-8 and 9-11)
        assert d0["reward_rows"][0] == 9 and d1["reward_rows"][0] == 3


def test_log_extra_columns_keep_only_real_rows(dumps) -> None:
    d0, _ = dumps["loss-dapo"]
    assert len(d0["extra"]) == len(d0["completions"]) == sum(REAL["default"][-1])
    assert d0["extra"] == [sum(ch.isdigit() for ch in c) for c in d0["completions"]]


@pytest.mark.parametrize("scenario", ["vllm-tp1", "vllm-tp2", "vllm-server"])
def test_vllm_generates_the_planned_rows(dumps, scenario) -> None:
    """Colocate mode (tensor parallel 1 or 2) and server mode, through stand-ins for ``vllm.LLM`` / ``VLLMClient``."""
    d0, d1 = dumps[scenario]
    most = [max(max(1, a), max(1, b)) for a, b in REAL["default"]]  # largest rows to generate over the processes
    if scenario == "vllm-server":  # one request per step from the main process, for every process's padded rows
        assert d0["server_calls"] == [2 * m for m in most] and d1["server_calls"] == []
    for d, real in zip((d0, d1), zip(*REAL["default"])):
        if scenario == "vllm-tp1":
            assert d["llm_calls"] == [max(1, n) for n in real]  # one throw-away row on a process without real rows
        elif scenario == "vllm-tp2":  # each rank of the TP group generates the group's prompts, padded
            assert d["llm_calls"] == [2 * m for m in most]
    assert d0["llm_synced"] > 0  # TRL pushed the policy's weights into the engine
    for d in (d0, d1):
        for h in d["logs"]:
            # vLLM's log-probs of the sampled tokens agree with TRL's recomputation row by row (a misaligned row
            # would differ by nats): the importance ratio stays at 1
            assert h["sampling/importance_sampling_ratio/mean"] == pytest.approx(1.0, abs=1e-2)
            assert h["sampling/sampling_logp_difference/max"] < 1e-2
        assert np.isfinite([c["loss"] for c in d["trained"]]).all()


def test_two_phase_pilot_and_commit_on_two_processes(dumps) -> None:
    """vip_two_phase, budget 12 over 4 prompts: a pilot of 2 rollouts each (4 rows per process), observed on the
    main process, then the committed 4 rows; both rounds on both processes, 3 training rows per micro-batch."""
    d0, d1 = dumps["two-phase"]
    for step in range(2):
        pilot = [len(d["reward_calls"][2 * step]) for d in (d0, d1)]
        commit = [len(d["reward_calls"][2 * step + 1]) for d in (d0, d1)]
        assert pilot == [4, 4]  # 2 pilot rollouts for each of the 4 prompts, 2 prompts per process
        scored = [
            tuple(p)
            for d in (d0, d1)
            for c in (d["reward_pairs"][2 * step], d["reward_pairs"][2 * step + 1])
            for p in c
        ]
        trained = [tuple(r[:2]) for d in (d0, d1) for c in d["trained"][2 * step : 2 * step + 2] for r in c["real"]]
        assert len(trained) == 12 and Counter(trained) <= Counter(scored)  # every rollout of the step trained once
        assert sum(commit) >= 12 - 8  # (a process with nothing committed scores one throw-away row)
        _, ids, _, trials = zip(*[h for h in d0["history"] if h[0] == step])
        assert sum(sum(t) for t in trials) == 12  # the allocator observed the pilot, then the commit
        for d in (d0, d1):
            assert [c["rows"] for c in d["trained"][2 * step : 2 * step + 2]] == [3, 3]
            assert d["logs"][step]["kl"] == pytest.approx(0.0, abs=1e-7)
