"""End-to-end CPU training: budget every step, binary rewards, finite loss, exact resume (also after kill -9)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _training_helpers import tiny

from vipalloc.training.config import TrainConfig, load_config
from vipalloc.training.losses import group_advantages
from vipalloc.training.tasks import make_problems, reward
from vipalloc.training.trainer import Trainer, train

TIMING = {"alloc_seconds", "step_seconds", "eval_seconds", "cum_seconds", "vip/plan_seconds"}  # wall-clock values


def strip(metrics):
    return [{k: v for k, v in m.items() if k not in TIMING} for m in metrics]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("warmup")


@pytest.mark.parametrize(
    "strategy,loss", [("vip", "drgrpo"), ("uniform", "rloo"), ("knapsack", "grpo"), ("dapo", "drgrpo")]
)
def test_budget_rewards_loss(tmp_path, cache, strategy, loss) -> None:
    cfg = tiny(tmp_path / "run", cache, strategy=strategy, loss=loss)
    res = train(cfg)
    steps = [m for m in res.metrics if m["step"] >= 0]
    assert len(steps) == cfg.steps
    for m in steps:
        if strategy == "dapo":
            assert m["rollouts_used"] % cfg.n_mean == 0 and cfg.budget <= m["rollouts_used"] <= 3 * cfg.budget
        else:
            assert m["rollouts_used"] == cfg.budget  # the plan's budget, exactly, every step
        assert np.isfinite(m["loss"])
        assert 0.0 <= m["vip/rollout_accuracy"] <= 1.0
        assert m["vip/budget"] == cfg.budget and m["vip/prompts"] == cfg.prompts_per_step  # shared telemetry names
        if strategy != "dapo":
            assert m["vip/rollouts_generated"] == m["rollouts_used"]
        zero_var = m["frac_all_correct"] + m["frac_all_wrong"]
        assert m["vip/frac_zero_var_groups"] == pytest.approx(zero_var)
        assert not {"train_reward", "mean_n", "dropped", "pred_abs_err", "expected_var_ratio"} & set(m)
    assert any(m["grad_norm"] > 0 for m in steps)  # some groups were mixed: real updates happened
    assert steps[-1]["cum_rollouts"] == sum(m["rollouts_used"] for m in steps)
    for p in res.plans:
        assert sum(p["counts"]) == cfg.budget
        for r in p["rate"]:  # realised rates come from 0/1 rewards: multiples of 1/n
            assert r is None or np.isnan(r) or 0.0 <= r <= 1.0
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_rewards_are_binary_exact_match() -> None:
    assert reward("-4", "-4") == 1.0 and reward("-40", "-4") == 0.0 and reward(" 7", "7") == 1.0
    probs = make_problems(12, seed=3)
    assert len({p.prompt_id for p in probs}) == 12 and {p.level for p in probs} == set(range(6))
    assert all(str(int(p.answer)) == p.answer for p in probs)  # canonical integers: exact match is well defined
    assert all(p.prompt.endswith("=") for p in probs)


def test_group_advantages_any_group_size() -> None:
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    g = torch.tensor([0, 0, 0, 1, 2, 2])  # sizes 3, 1, 2
    dr = group_advantages(r, g, "drgrpo")
    np.testing.assert_allclose(dr.numpy(), [1 / 3, -2 / 3, 1 / 3, 0.0, -0.5, 0.5], atol=1e-7)
    rl = group_advantages(r, g, "rloo")
    np.testing.assert_allclose(rl.numpy(), [0.5, -1.0, 0.5, 0.0, -1.0, 1.0], atol=1e-7)
    gr = group_advantages(r, g, "grpo")
    std0 = np.std([1, 0, 1], ddof=1)
    np.testing.assert_allclose(gr.numpy()[:3], (np.array([1, 0, 1]) - 2 / 3) / (std0 + 1e-6), rtol=1e-5)
    assert float(gr[3]) == 0.0  # singleton group: no baseline, no signal
    const = group_advantages(torch.ones(4), torch.zeros(4, dtype=torch.long), "grpo")
    assert torch.all(const == 0)


def test_resume_matches_uninterrupted(tmp_path, cache) -> None:
    full = train(tiny(tmp_path / "a", cache, strategy="vip", predictor="gp", embedder="hashing"))
    cfg_b = tiny(tmp_path / "b", cache, strategy="vip", predictor="gp", embedder="hashing")
    Trainer(cfg_b).run(stop_after=3)  # "killed" after step 3 (last checkpoint at step 2)
    resumed = Trainer(cfg_b).run()
    assert strip(resumed.metrics) == strip(full.metrics)
    lines_a = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lines_b = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert strip(lines_a) == strip(lines_b)


def test_kill9_resume_identical(tmp_path, cache) -> None:
    """``vipalloc train`` killed with SIGKILL three times at random moments (each time after it wrote a new
    checkpoint, then somewhere before the next), restarted each time, ends with the uninterrupted run's metrics."""
    import yaml

    cfg = tiny(tmp_path / "killed", cache, steps=24, ckpt_every=2, strategy="vip", predictor="gp", embedder="hashing")
    ref = train(cfg.model_copy(update={"run_dir": str(tmp_path / "ref")}))
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(json.loads(cfg.model_dump_json())))
    cmd = [sys.executable, "-m", "vipalloc.cli", "train", "--config", str(cfg_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    rnd = random.Random(0)
    kills = 0
    for _ in range(3):
        before = ckpt.stat().st_mtime_ns if ckpt.exists() else None
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:  # wait for this process's first checkpoint
            if ckpt.exists() and ckpt.stat().st_mtime_ns != before:
                break
            time.sleep(0.02)
        time.sleep(rnd.uniform(0.0, 0.4))  # somewhere between two checkpoints (or during a write)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the runs finished before they could be killed: make the test run longer"
    done = subprocess.run(cmd, capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    got = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert strip(got) == strip(ref.metrics)


def test_config_validation(tmp_path) -> None:
    with pytest.raises(ValueError, match="n_mean"):
        TrainConfig(n_mean=40, n_max=32)
    with pytest.raises(ValueError, match="extra"):
        TrainConfig.model_validate({"nope": 1})
    p = tmp_path / "c.toml"
    p.write_text('strategy = "uniform"\nsteps = 3\n[model]\nn_layer = 2\n')
    cfg = load_config(p)
    assert cfg.strategy == "uniform" and cfg.model.n_layer == 2
    bad = tmp_path / "c.yaml"
    bad.write_text("steps: [1, 2\n")
    with pytest.raises(ValueError, match="invalid YAML"):
        load_config(bad)
    with pytest.raises(ValueError, match="must be .yaml"):
        load_config(tmp_path / "c.json") if (tmp_path / "c.json").write_text("{}") else None


def test_group_advantages_by_id_not_position() -> None:
    """Rollouts of different prompts interleaved in any order get the same advantages as when sorted."""
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    g = torch.tensor([0, 0, 0, 1, 1, 2, 2])  # sizes 3, 2, 2
    perm = torch.tensor([6, 0, 3, 5, 1, 4, 2])
    for est in ("drgrpo", "rloo", "grpo"):
        ref = group_advantages(r, g, est)
        got = group_advantages(r[perm], g[perm], est)
        torch.testing.assert_close(got, ref[perm])
        for k in range(3):  # Dr.GRPO/RLOO/GRPO advantages of a group sum to zero
            assert abs(float(ref[g == k].sum())) < 1e-5


def test_token_logprobs_match_unpadded_forward() -> None:
    from vipalloc.training.model import BOS, CharTokenizer, build_policy
    from vipalloc.training.trainer import token_logprobs

    torch.manual_seed(0)
    model, tok = build_policy(n_layer=1, n_embd=32, n_head=2), CharTokenizer()
    prompts, comps = ["1+2=", "12+345=", "9="], [[4, 5, 2], [6, 2], [3, 3, 3, 3, 2]]
    logp, mask, ent = token_logprobs(model, tok, prompts, comps)
    assert logp.shape == mask.shape == ent.shape == (3, 5)
    for r, (p, c) in enumerate(zip(prompts, comps)):
        ids = torch.tensor([[BOS, *tok.encode(p), *c]])
        full = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        start = ids.shape[1] - len(c) - 1
        want = torch.stack([full[start + t, c[t]] for t in range(len(c))])
        torch.testing.assert_close(logp[r, : len(c)], want, atol=1e-5, rtol=1e-5)
        assert mask[r].sum() == len(c) and float(logp[r, len(c) :].abs().sum()) == 0.0
        assert torch.all(ent[r, : len(c)] > 0)


def test_label_noise_gives_wrong_nearby_answers() -> None:
    from vipalloc.training.tasks import corrupt

    rng = random.Random(0)
    for ans in ["0", "7", "-4", "17", "-903", "1998"]:
        outs = {corrupt(ans, rng) for _ in range(50)}
        assert ans not in outs and len(outs) > 5  # wrong, and varied
        assert all(str(int(o)) == o for o in outs)  # canonical integers, as gold answers are


def test_ppo_kl_update_and_resume(tmp_path, cache) -> None:
    """Clipped multi-minibatch updates with a KL anchor: finite, actually clipping, and exactly resumable."""
    kw = dict(strategy="vip", ppo_epochs=2, minibatches=2, kl_coef=0.05, lr=3e-3, steps=5)
    full = train(tiny(tmp_path / "a", cache, **kw))
    steps = [m for m in full.metrics if m["step"] >= 0]
    assert all(np.isfinite(m["loss"]) and m["kl"] >= 0.0 for m in steps)
    assert any(m["kl"] > 0 for m in steps) and any(m["clip_frac"] > 0 for m in steps)
    cfg_b = tiny(tmp_path / "b", cache, **kw)
    Trainer(cfg_b).run(stop_after=3)
    assert strip(Trainer(cfg_b).run().metrics) == strip(full.metrics)


def test_sgd_optimizer_trains_and_resumes(tmp_path, cache) -> None:
    """optimizer='sgd' really uses torch SGD with the configured momentum, moves the policy, and resumes exactly
    (its momentum buffers live in the checkpoint); momentum with AdamW is refused."""
    kw = dict(strategy="vip", optimizer="sgd", lr=0.05, momentum=0.9, lr_warmup_steps=0, steps=5)
    trainer = Trainer(tiny(tmp_path / "a", cache, **kw))
    assert isinstance(trainer.opt, torch.optim.SGD) and trainer.opt.param_groups[0]["momentum"] == 0.9
    before = [p.detach().clone() for p in trainer.model.parameters()]
    full = trainer.run()
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(trainer.model.parameters(), before))
    assert moved > 0 and all(np.isfinite(m["loss"]) for m in full.metrics if m["step"] >= 0)
    cfg_b = tiny(tmp_path / "b", cache, **kw)
    Trainer(cfg_b).run(stop_after=3)
    assert strip(Trainer(cfg_b).run().metrics) == strip(full.metrics)
    with pytest.raises(ValueError, match="momentum applies to optimizer='sgd'"):
        tiny(tmp_path / "c", cache, momentum=0.9)


def _fake_run(seed: int, slope: float, steps: int = 20, budget: int = 64) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    from vipalloc.training.evaluation import eval_metrics

    def paper(acc: float) -> dict:  # eval records as the trainer writes them: 12 prompts x 16 samples, 2 levels
        answers = [["1" if rng.random() < acc else str(rng.integers(2, 5)) for _ in range(16)] for _ in range(12)]
        return eval_metrics(answers, ["1"] * 12, [i % 2 for i in range(12)], seed=seed)

    metrics = [{"step": -1, "cum_rollouts": 0, **paper(0.2), "eval_acc": 0.2}]
    plans = []
    for s in range(steps):
        rec = {
            "step": s,
            "cum_rollouts": budget * (s + 1),
            "rollouts_used": budget,
            "frac_all_correct": 0.1,
            "frac_all_wrong": 0.3,
            "vip/num_dropped": 1.0,
            "vip/mean_n": 4.2,
            "vip/max_n": 9.0,
            "vip/pred_abs_err": 0.1,
            "vip/expected_var_ratio_vs_uniform": 0.9,
            "alloc_seconds": 0.01,
            "step_seconds": 0.1,
        }
        if (s + 1) % 5 == 0:
            acc = 0.2 + slope * (s + 1) + rng.normal(0, 0.001)
            rec.update({**paper(acc), "eval_acc": acc})
        metrics.append(rec)
        plans.append({"step": s, "counts": [4] * 16, "p_mean": [0.3] * 16, "rate": [0.25] * 16})
    return metrics, plans


def test_paired_verdict_interval() -> None:
    from scipy import stats

    from vipalloc.training.report import paired_verdict

    d = [0.004, 0.006, 0.005, 0.007]
    half = stats.t.ppf(0.975, 3) * np.std(d, ddof=1) / 2
    assert paired_verdict(d) == f"+0.0055 ± {half:.4f} (4/4 seeds ahead; ahead, resolved)"
    assert paired_verdict([0.01, -0.012, 0.003]).endswith("(2/3 seeds ahead; within noise)")
    assert "behind, resolved" in paired_verdict([-0.01, -0.011, -0.009])
    assert "no interval" in paired_verdict([0.02])


def test_report_tables_and_plots(tmp_path) -> None:
    """The report compares at a common budget, pairs seeds, and writes every plot."""
    from vipalloc.training.report import summarize, write_report

    runs, plans = {"uniform": [], "vip": []}, {"uniform": [], "vip": []}
    for seed in range(3):
        for s, slope in (("uniform", 0.002), ("vip", 0.006)):  # vip crosses the target a full evaluation earlier
            m, p = _fake_run(seed, slope)
            runs[s].append(m)
            plans[s].append(p)
    sm = summarize(runs)
    assert sm["common_rollouts"] == 20 * 64
    np.testing.assert_allclose(np.mean(sm["vip"]["paired_diff_at_common"]), 0.004 * 20, atol=0.005)
    assert np.mean(sm["vip"]["rollouts_to_target"]) < np.mean(sm["uniform"]["rollouts_to_target"])
    report = write_report(tmp_path, TrainConfig(), runs, plans, warm_s=1.0)
    text = report.read_text()
    assert "| vip |" in text and "paired diff vs uniform" in text and "1,280" in text
    for name in (
        "eval_vs_rollouts.png",
        "allocations.png",
        "predicted_vs_realised.png",
        "groups.png",
        "eval_metrics.png",
    ):
        assert (tmp_path / name).stat().st_size > 1000
    # the paper metrics: a start and an end row per strategy, per-level rows, the evaluation's size and noise
    assert "| strategy | eval | mean@k | pass@1 | pass@4 | pass@8 | pass@16 | maj@4 | maj@8 | maj@16 |" in text
    assert text.count("| vip | end |") == 1 and "| uniform | 1 |" in text
    assert "12 held-out prompts x 16 samples = 192 samples" in text
    assert json.loads((tmp_path / "summary.json").read_text())["reference"] == "uniform"


def test_parallel_runs_match_sequential(tmp_path, cache) -> None:
    """Worker processes (spawned) give exactly the metrics of in-process runs; the rollout stop evaluates the end."""
    from vipalloc.training.parallel import run_many
    from vipalloc.training.trainer import warmup_policy

    def cfgs(tag: str) -> list[TrainConfig]:
        return [
            tiny(tmp_path / f"{tag}-vip", cache, strategy="vip", seed=1),
            tiny(tmp_path / f"{tag}-dapo", cache, strategy="dapo", seed=2),
        ]

    warm = warmup_policy(cfgs("a")[0])
    stop = 3 * 8 * 4  # three steps' budget: DAPO (which overspends) stops earlier, between evaluations
    events: list[tuple[str, str]] = []
    seq = run_many(cfgs("a"), warm, jobs=1, stop_at_rollouts=stop)
    par = run_many(cfgs("b"), warm, jobs=2, stop_at_rollouts=stop, on_event=lambda k, i: events.append((k, i["label"])))
    assert [strip(r["metrics"]) for r in seq] == [strip(r["metrics"]) for r in par]
    assert [r["steps_done"] for r in seq] == [r["steps_done"] for r in par]
    for r in par:
        assert r["metrics"][-1]["cum_rollouts"] >= stop and "eval_acc" in r["metrics"][-1]
    assert par[1]["steps_done"] < par[0]["steps_done"] == 3
    assert {("run", "vip seed 1"), ("done", "vip seed 1"), ("done", "dapo seed 2")} <= set(events)
    assert sum(k == "step" for k, _ in events) == sum(r["steps_done"] for r in par)
    with pytest.raises(ValueError, match="jobs"):
        run_many(cfgs("c"), warm, jobs=0)


def test_cli_demo_quick_end_to_end(tmp_path) -> None:
    """`vipalloc demo --quick` (the README's smoke run) writes the report, summary and plots, two runs at a time:
    uniform against the library default (DEFAULT_STRATEGY)."""
    from typer.testing import CliRunner

    from vipalloc.cli import app
    from vipalloc.defaults import DEFAULT_STRATEGY as D

    out = tmp_path / "demo"
    args = ["demo", "--quick", "--jobs", "2", "--out", str(out), "--set", f'warmup_cache="{tmp_path / "warm"}"']
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    report = (out / "report.md").read_text()
    assert "| uniform |" in report and f"| {D} |" in report and "Runs: 2 at a time" in report
    summary = json.loads((out / "summary.json").read_text())
    assert {"uniform", D} <= set(summary)
    for png in ("eval_vs_rollouts.png", "allocations.png", "predicted_vs_realised.png", "groups.png"):
        assert (out / png).stat().st_size > 1000
    for run in ("uniform-seed0", f"{D}-seed0"):
        lines = (out / run / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 12 + 1  # the initial evaluation, then one record per step
    before = (out / f"{D}-seed0" / "metrics.jsonl").read_text()
    again = CliRunner().invoke(app, args)  # same configuration: the finished runs are reused, not redone
    assert again.exit_code == 0, again.output
    assert (out / f"{D}-seed0" / "metrics.jsonl").read_text() == before
    changed = CliRunner().invoke(app, [*args, "--set", "lr=0.0003", "--strategies", D])  # stale runs restart
    assert changed.exit_code == 0, changed.output
    assert (out / f"{D}-seed0" / "metrics.jsonl").read_text() != before
    bad = CliRunner().invoke(app, ["demo", "--quick", "--strategies", "uniform,nope", "--out", str(out)])
    assert bad.exit_code == 2 and "unknown strategies" in bad.output


def test_pass_at_k_matches_subset_enumeration() -> None:
    """The unbiased pass@k equals the share of all k-subsets of the n samples that contain a correct one."""
    from itertools import combinations

    from vipalloc.training.evaluation import pass_at_k

    for n, c in [(6, 0), (6, 1), (6, 3), (6, 6), (8, 2), (5, 4)]:
        samples = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(range(n), k))
            want = np.mean([any(samples[j] for j in s) for s in subsets])
            assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 8)


def test_maj_at_k_brute_force_and_ties() -> None:
    """maj@k (Monte Carlo over subsets) converges to the exact mean over all k-subsets with fractional tie credit."""
    from itertools import combinations

    from vipalloc.training.evaluation import maj_at_k

    answers = ["5", "5", "6", "7", "5", "6", "6", "8"]  # gold "5" and "6" both 3 of 8
    assert maj_at_k(answers, "5", 8, np.random.default_rng(0)) == pytest.approx(0.5)  # exact tie of two answers
    assert maj_at_k(answers, "8", 8, np.random.default_rng(0)) == 0.0
    for k in (1, 3, 4):

        def vote(sub: tuple[int, ...]) -> float:
            sub_answers = [answers[j] for j in sub]
            counts = {a: sub_answers.count(a) for a in set(sub_answers)}
            top = max(counts.values())
            return 1.0 / sum(v == top for v in counts.values()) if counts.get("5", 0) == top else 0.0

        exact = np.mean([vote(s) for s in combinations(range(8), k)])
        mc = maj_at_k(answers, "5", k, np.random.default_rng(1), draws=20_000)
        assert mc == pytest.approx(exact, abs=0.01)
    assert maj_at_k(answers, "5", 1, np.random.default_rng(0), draws=20_000) == pytest.approx(3 / 8, abs=0.01)


def test_eval_metrics_consistent_per_level() -> None:
    """pass@1 = maj@1 = mean accuracy; pass@k grows with k; per-level values average back to the overall ones; the
    sampling standard error matches the binomial formula."""
    from vipalloc.training.evaluation import eval_metrics

    rng = np.random.default_rng(0)
    probs = np.array([0.0, 0.1, 0.5, 0.9, 1.0, 0.3] * 4)
    answers = [[("1" if rng.random() < p else str(rng.integers(2, 5))) for _ in range(16)] for p in probs]
    levels = [i % 2 for i in range(len(probs))]
    m = eval_metrics(answers, ["1"] * len(probs), levels, seed=0)
    rate = np.array([np.mean([a == "1" for a in ans]) for ans in answers])
    assert m["eval_acc"] == pytest.approx(rate.mean()) == pytest.approx(m["eval/pass@1"])
    assert m["eval/maj@1"] == pytest.approx(rate.mean(), abs=0.03)  # Monte Carlo over single samples
    assert m["eval/pass@1"] <= m["eval/pass@4"] <= m["eval/pass@8"] <= m["eval/pass@16"] <= 1.0
    assert m["eval/pass@16"] == pytest.approx(np.mean(rate > 0))
    for key in ("mean", "pass@8", "maj@16"):
        per = [m[f"eval/level{L}/{key}"] for L in (0, 1)]
        assert np.mean(per) == pytest.approx(m["eval_acc" if key == "mean" else f"eval/{key}"])
    assert m["eval/mean_se"] == pytest.approx(np.sqrt((rate * (1 - rate)).sum() / 15) / len(rate))
    assert m["eval/samples"] == 16 * len(probs)
    assert eval_metrics(answers, ["1"] * len(probs), levels, seed=0) == m  # seeded: reproducible
    with pytest.raises(ValueError, match="same number"):
        eval_metrics([["1"], ["1", "2"]], ["1", "1"], [0, 0], seed=0)


def test_per_level_label_noise_and_device_validation(tmp_path) -> None:
    """label_noise per level must match the levels; device='cuda' without a GPU is a clear error, 'auto' falls back
    to the CPU; a CPU warm-up keeps its cache key whatever the device option says."""
    from vipalloc.training.trainer import resolve_device

    cfg = TrainConfig(levels=[[2, 1], [3, 1]], warmup={"label_noise": [0.0, 0.6]})
    assert cfg.level_noise == (0.0, 0.6)
    assert TrainConfig(levels=[[2, 1], [3, 1]], warmup={"label_noise": 0.25}).level_noise == (0.25, 0.25)
    with pytest.raises(ValueError, match="one per level"):
        TrainConfig(levels=[[2, 1], [3, 1]], warmup={"label_noise": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        TrainConfig(warmup={"label_noise": 1.0})
    assert cfg.warmup_key("cpu") == cfg.warmup_key() != cfg.warmup_key("cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no GPU"):
            resolve_device("cuda")
        assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")


def test_tensorboard_logs_shared_telemetry(tmp_path, cache) -> None:
    """TensorBoard gets the shared vip/... scalars every step, the counts histogram under vip/counts, and the
    evaluation's pass@k / maj@k; metrics.jsonl carries the same names."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny(tmp_path / "tb", cache, strategy="vip", steps=3, eval_every=3, tensorboard=True)
    res = train(cfg)
    acc = EventAccumulator(str(tmp_path / "tb" / "tb"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "vip/counts" in tags["histograms"]
    hist = acc.Histograms("vip/counts")
    assert [h.step for h in hist] == [0, 1, 2]
    assert all(h.histogram_value.num == cfg.prompts_per_step for h in hist)  # one entry per prompt of the plan
    assert all(h.histogram_value.sum == cfg.budget for h in hist)
    for name in ("vip/mean_n", "vip/share_hopeless", "vip/frac_zero_var_groups", "vip/pred_abs_err", "eval/pass@1"):
        assert name in tags["scalars"], name
    last = res.metrics[-1]
    assert last["eval/pass@1"] == pytest.approx(last["eval_acc"]) and "eval/maj@1" in last


def test_gpu_preset_path_smoke_on_cpu(tmp_path) -> None:
    """`bench train --device cuda`'s path (the gpu preset: 6 x 256 policy, 128-prompt batches) run on the CPU with
    the batch and evaluation shrunk: the preset's policy is built, every run finishes at the equal budget, and the
    report carries the device and the paper metrics. Unknown presets are refused."""
    from vipalloc.bench.train import run_train
    from vipalloc.training.config import PRESETS, preset

    assert preset("gpu", model={"n_layer": 2})["model"] == {"n_layer": 2, "n_embd": 256, "n_head": 8}
    with pytest.raises(ValueError, match="unknown preset"):
        preset("tpu")
    res = run_train(
        tmp_path,
        strategies=("uniform", "vip"),
        seeds=1,
        steps=2,
        quick=True,
        jobs=1,
        device="cpu",
        preset="gpu",
        prompts_per_step=8,
        pool_size=32,
        eval_size=8,
        eval_samples=4,
        warmup={"steps": 3, "batch_size": 16},
        warmup_cache=str(tmp_path / "warm"),
    )
    cfg = res["config"]
    assert cfg["model"] == PRESETS["gpu"]["model"] and cfg["device"] == "cpu"
    assert cfg["warmup"]["lr"] == PRESETS["gpu"]["warmup"]["lr"]  # nested preset options survive the overrides
    for strat in ("uniform", "vip"):
        (run,) = res["runs"][strat]
        assert run["metrics"][-1]["cum_rollouts"] == res["total_rollouts"] == 2 * 8 * cfg["n_mean"]
    text = (tmp_path / "train.md").read_text()
    assert "device cpu" in text and "| uniform | end |" in text and "pass@4" in text


def test_warmup_diagnostics_exact_and_restoring() -> None:
    """success_probability is the sampler's success rate (Monte Carlo); the headroom at scale 1 and the line search
    at step 0 are the exact success; a small exact-gradient step raises it; both leave the model unchanged."""
    from vipalloc.training.diagnostics import (
        gradient_line_search,
        pool_profile,
        sharpening_headroom,
        success_probability,
    )
    from vipalloc.training.model import EOS, CharTokenizer, build_policy
    from vipalloc.training.trainer import sample, sequence_logprobs

    torch.manual_seed(0)
    model, tok = build_policy(n_layer=1, n_embd=32, n_head=2), CharTokenizer()
    probs = make_problems(4, seed=2, levels=((2, 1),))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(40):  # supervised steps until the gold answers are likely but not certain
        loss = -sequence_logprobs(model, tok, [p.prompt for p in probs], [[*tok.encode(p.answer), EOS] for p in probs])
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    exact = success_probability(model, probs).detach()
    assert 0.05 < float(exact.mean()) < 0.95
    gen = torch.Generator().manual_seed(0)
    comps = sample(model, tok, [probs[0].prompt] * 4000, 6, 1.0, gen)
    mc = np.mean([tok.decode(c) == probs[0].answer for c in comps])
    p0 = float(exact[0])
    assert abs(mc - p0) < 4 * np.sqrt(p0 * (1 - p0) / 4000) + 1e-3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    head = sharpening_headroom(model, probs, scales=(1.0, 2.0))
    assert head[1.0] == pytest.approx(float(exact.mean()), abs=1e-6)
    line = gradient_line_search(model, probs, step_norms=(0.0, 1e-3))
    assert line["line"][0][1] == pytest.approx(float(exact.mean()), abs=1e-6)  # type: ignore[index]
    assert line["line"][1][1] > line["line"][0][1]  # type: ignore[index]  # first-order ascent
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    prof = pool_profile(model, probs, TrainConfig(levels=[[2, 1]]), samples=8)
    assert 0.0 <= prof["eval/frac_below_0.05"] + prof["eval/frac_above_0.95"] <= 1.0 and "eval/maj@8" in prof
