"""Long work shows progress wherever it runs: rich bars on a terminal, one flushed plain line per stage, finished
run and evaluation when standard output is a log file or a pipe (``make demo > log``, CI, ``nohup``)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vipalloc.bench.progress import BenchDisplay
from vipalloc.console import ProgressConsole, format_eval, format_run

# a tiny trainer: the warm-up (cached per module) and 4 RL steps take seconds on one core
TINY_TRAIN: dict[str, Any] = {
    "prompts_per_step": 8,
    "n_mean": 4,
    "n_max": 8,
    "pool_size": 48,
    "eval_size": 16,
    "eval_samples": 2,
    "eval_every": 2,
    "ckpt_every": 2,
    "model": {"n_layer": 2, "n_embd": 32, "n_head": 2},
    "levels": [[2, 1]],
    "warmup": {"steps": 60, "batch_size": 32},
    "predictor": "beta",
}


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("warm")


def test_plain_lines_off_a_terminal_bars_on_one() -> None:
    log = io.StringIO()  # not a terminal
    with ProgressConsole("bench x", stream=log) as c:
        assert c.plain
        t = c.add_task("phase", total=3)
        c.advance(t)
        c.update(t, description="other")
        c.finish(t)
        c.note("phase: started")
        c.line("run a finished: 1.0 s")
    assert log.getvalue() == "[bench x] phase: started\n[bench x] run a finished: 1.0 s\n"  # bars draw nothing

    tty = _Tty()
    with ProgressConsole("bench x", stream=tty) as c:
        assert not c.plain
        t = c.add_task("phase", total=3)
        c.advance(t, 2)
        c.finish(t)
        c.note("only in logs")
        c.line("run a finished: 1.0 s")
    out = tty.getvalue()
    assert "run a finished: 1.0 s" in out and "[bench x]" not in out and "only in logs" not in out
    assert ProgressConsole("x", stream=_Tty(), plain=True).plain  # forcing wins over detection


def test_line_formats() -> None:
    assert format_run({"label": "uniform seed 3", "wall": 88.2, "detail": "mean@8 0.210"}) == (
        "run uniform seed 3 finished: 88 s, mean@8 0.210"
    )
    assert format_run({"label": "vip (gp)", "seed": 1, "wall": 2.34, "final": 0.4904}) == (
        "run vip (gp) seed 1 finished: 2.3 s, final 0.490"
    )
    assert format_run({"label": "solvers M=256"}) == "run solvers M=256 finished"
    assert format_eval({"label": "uniform seed 3", "step": 40, "metric": "mean@8", "value": 0.19}) == (
        "uniform seed 3 step 40 eval mean@8 0.190"
    )


def test_bench_simulate_into_a_pipe_prints_a_line_per_run(tmp_path: Path) -> None:
    """The real command with stdout a pipe: every finished run is a line carrying its real final success."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = tmp_path / "rep"
    exe = Path(sys.executable).parent / "vipalloc"  # the installed console script, as users run it
    cmd = [str(exe), "bench", "simulate", "--seeds", "2", "--steps", "3"]
    cmd += ["--rows", "uniform,vip:beta", "--sweep", "0,10", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "[bench simulate] league at sigma=10.0: started"
    assert "[bench simulate] sigma sweep: started" in lines
    runs = [ln for ln in lines if re.match(r"\[bench simulate\] run .* finished: ", ln)]
    # league: 2 rows x 2 seeds; sweep: sigma=0 reruns both rows (sigma=10 reuses the league's runs)
    assert len(runs) == 8
    res_json = json.loads((out / "simulate.json").read_text())
    for label, rs in res_json["league"].items():
        for r in rs:
            final = r["success"][-1]
            want = f"[bench simulate] run {label} seed {r['seed']} finished: "
            hit = [ln for ln in runs if ln.startswith(want)]
            assert len(hit) == 1 and hit[0].endswith(f", final {final:.3f}"), (want, runs)
    for r in res_json["sweep"]["0.0"]["vip (beta)"]:
        want = f"[bench simulate] run vip (beta) at sigma=0 seed {r['seed']} finished: "
        assert any(ln.startswith(want) and ln.endswith(f", final {r['success'][-1]:.3f}") for ln in runs)
    assert lines[-1] == f"wrote {out / 'simulate.md'}"


def test_demo_with_stdout_captured_prints_evaluations_and_finished_runs(tmp_path: Path, warm_cache: Path) -> None:
    from typer.testing import CliRunner

    from vipalloc.cli import app

    out = tmp_path / "demo"
    args = ["demo", "--steps", "4", "--seeds", "1", "--strategies", "uniform,vip", "--jobs", "1", "--out", str(out)]
    args += ["--predictor", TINY_TRAIN["predictor"]]
    for k, v in {**TINY_TRAIN, "tensorboard": False, "warmup_cache": str(warm_cache)}.items():
        if k != "predictor":
            args += ["--set", f"{k}={json.dumps(v)}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert "[demo] warm-up step 60/60" in lines  # first time: the warm-up reports its tenths
    assert "[demo] 2 runs, 1 at a time" in lines
    for strat in ("uniform", "vip"):
        metrics = [json.loads(x) for x in (out / f"{strat}-seed0" / "metrics.jsonl").read_text().splitlines()]
        evals = {m["step"] + 1: m["eval_acc"] for m in metrics if "eval_acc" in m and m["step"] >= 0}  # steps done
        assert sorted(evals) == [2, 4]
        for step, acc in evals.items():  # one line per evaluation, with the recorded value
            assert f"[demo] {strat} seed 0 step {step} eval mean@2 {acc:.3f}" in lines
        done = [ln for ln in lines if ln.startswith(f"[demo] run {strat} seed 0 finished: ")]
        assert len(done) == 1 and done[0].endswith(f" s, mean@2 {evals[4]:.3f}")
        assert lines.index(f"[demo] run {strat} seed 0 started (4 steps)") < lines.index(done[0])
    assert f"[demo] report written: {out / 'report.md'}" in lines


def test_bench_train_events_become_lines(tmp_path: Path, warm_cache: Path) -> None:
    from vipalloc.bench.train import run_train

    log = io.StringIO()
    with ProgressConsole("bench train", stream=log) as console:
        res = run_train(
            tmp_path,
            strategies=["uniform"],
            seeds=1,
            steps=4,
            jobs=1,
            progress=BenchDisplay(console),
            warmup_cache=str(warm_cache),
            **TINY_TRAIN,
        )
    lines = log.getvalue().splitlines()
    metrics = res["runs"]["uniform"][0]["metrics"]
    evals = {m["step"] + 1: m["eval_acc"] for m in metrics if "eval_acc" in m and m["step"] >= 0}  # steps done
    assert sorted(evals) == [2, 4]
    for step, acc in evals.items():
        assert f"[bench train] uniform seed 0 step {step} eval mean@2 {acc:.3f}" in lines
    done = [ln for ln in lines if ln.startswith("[bench train] run uniform seed 0 finished: ")]
    assert len(done) == 1 and done[0].endswith(f"mean@2 {evals[4]:.3f}")
    assert lines[0] == "[bench train] warm-up (cached after the first run): started"
