"""``vipalloc demo`` and ``vipalloc train`` (registered on the main CLI; heavy imports only inside commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from vipalloc.console import ProgressConsole, format_eval, format_run
from vipalloc.defaults import DEFAULT_STRATEGY


def parse_overrides(items: list[str]) -> dict[str, object]:
    """``["n_mean=4", "warmup={\"steps\": 300}"]`` -> ``{"n_mean": 4, "warmup": {"steps": 300}}`` (JSON values;
    anything that is not JSON is taken as a string)."""
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _demo_console() -> ProgressConsole:
    """The demo's display: one bar per run (reward and latest evaluation beside it) on a terminal, plain flushed
    ``[demo] ...`` lines otherwise."""
    from rich.progress import TextColumn, TimeElapsedColumn

    return ProgressConsole("demo", columns=(TextColumn("{task.fields[info]}"), TimeElapsedColumn()))


class DemoEvents:
    """``run_demo``'s ``on_event(kind, info)`` shown on a :class:`~vipalloc.console.ProgressConsole`: bars on a
    terminal; in a log, a line per warm-up tenth, started run, evaluation and finished run, e.g.
    ``[demo] uniform seed 3 step 40 eval mean@8 0.190`` and ``[demo] run uniform seed 3 finished: 88 s, mean@8
    0.210``. Finished runs and restarts are logged on a terminal too."""

    def __init__(self, console: ProgressConsole) -> None:
        self.console = console
        self.warm = console.add_task("warm-up", total=1, info="")
        self.tasks: dict[str, int] = {}  # one bar per run: several run at once with --jobs
        self._warm_tenth = -1

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        c = self.console
        if kind == "warmup":
            c.update(self.warm, total=info["total"], completed=info["step"])
            tenth = 10 * int(info["step"]) // max(int(info["total"]), 1)
            if tenth > self._warm_tenth:  # a line per tenth: the warm-up takes minutes the first time
                self._warm_tenth = tenth
                c.note(f"warm-up step {info['step']}/{info['total']}")
        elif kind == "runs":
            c.note(f"{info['n']} runs, {info['jobs']} at a time")
        elif kind == "run":
            c.finish(self.warm)
            c.update(self.warm, visible=False)
            self.tasks[info["label"]] = c.add_task(info["label"], total=info["steps"], info="")
            c.note(f"run {info['label']} started ({info['steps']} steps)")
        elif kind == "restart":
            c.line(f"{info['run_dir']}: written by another configuration, restarting that run")
        elif kind == "step":
            metric = f"mean@{info.get('eval_k', '?')}"
            if info["label"] in self.tasks:
                acc = f" eval {metric} {info['eval_acc']:.3f}" if "eval_acc" in info else ""
                c.update(
                    self.tasks[info["label"]], completed=info["step"], info=f"reward {info['train_reward']:.3f}{acc}"
                )
            if "eval_acc" in info:
                c.note(
                    format_eval(
                        {"label": info["label"], "step": info["step"], "metric": metric, "value": info["eval_acc"]}
                    )
                )
        elif kind == "done":
            final = info.get("eval_acc")
            detail = None if final is None else f"mean@{info.get('eval_k', '?')} {final:.3f}"
            c.line(format_run({"label": info["label"], "wall": info["wall_s"], "detail": detail}))
        elif kind == "report":
            c.note(f"report written: {info['report']}")


def register(app: typer.Typer) -> None:
    """Attach the training commands to the ``vipalloc`` app."""

    @app.command()
    def demo(
        quick: bool = typer.Option(False, "--quick", help="~1-minute smoke run of the same pipeline."),
        seeds: int | None = typer.Option(
            None,
            min=1,
            help="Seeds (0..N-1) per strategy (default 6: paired differences of ~0.005 need several; quick 1).",
        ),
        strategies: str = typer.Option(
            f"uniform,{DEFAULT_STRATEGY}", help="Comma-separated strategies (any of train's, or dapo)."
        ),
        steps: int | None = typer.Option(None, help="RL steps per run (default: 150, quick: 12)."),
        out: Path = typer.Option(Path("runs/demo"), help="Output folder (report.md, plots, runs)."),
        predictor: str | None = typer.Option(None, help="Predictor for allocating strategies (gp, beta, ...)."),
        threads: int | None = typer.Option(None, help="torch CPU threads per run (default 1)."),
        jobs: int | None = typer.Option(
            None, min=1, help="Runs side by side in worker processes (default: one per CPU core, <= runs)."
        ),
        set_: list[str] = typer.Option(
            [], "--set", help="Override any training option, KEY=VALUE (JSON value), e.g. --set n_mean=4."
        ),
    ) -> None:
        """Warm-up (cached), then train uniform vs the default strategy at the same rollout budget; write a report."""
        from vipalloc.training.demo import run_demo

        names = [s.strip() for s in strategies.split(",") if s.strip()]
        try:
            extra = parse_overrides(set_)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        console = _demo_console()
        try:
            with console:
                report = run_demo(
                    out=out,
                    quick=quick,
                    seeds=range(seeds if seeds is not None else (1 if quick else 6)),
                    strategies=names,
                    steps=steps,
                    on_event=DemoEvents(console),
                    jobs=jobs,
                    # --predictor/--threads win over --set predictor=/threads= only when given (no duplicate kwargs)
                    **{**extra, **{k: v for k, v in (("predictor", predictor), ("threads", threads)) if v is not None}},
                )
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(report.read_text())  # plain markdown: rich would squeeze the wide tables
        typer.echo(f"report: {report}")

    @app.command()
    def train(
        config: Path = typer.Option(..., "--config", help="YAML or TOML file with TrainConfig options."),
        steps: int | None = typer.Option(None, help="Override the number of steps."),
        run_dir: str | None = typer.Option(None, "--run-dir", help="Override the run folder."),
    ) -> None:
        """Train with a config file; resumes from the run folder's last checkpoint after a kill."""
        from vipalloc.training.config import load_config
        from vipalloc.training.trainer import train as run_train
        from vipalloc.training.warmup import warmup_policy

        try:
            cfg = load_config(config, steps=steps, run_dir=run_dir)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        with ProgressConsole("train") as console:
            warm_task = console.add_task("warm-up", total=cfg.warmup.steps)
            console.note("warm-up (cached after the first run): started")
            warm = warmup_policy(
                cfg,
                progress=lambda s, n: console.update(warm_task, completed=s),
                on_tenth=lambda s, n, loss: console.note(f"warm-up step {s}/{n}: loss {loss:.3f}"),
            )
            console.update(warm_task, visible=False)
            task = console.add_task(f"train {cfg.strategy}", total=cfg.steps)

            def on_step(step: int, total: int, rec: dict[str, Any]) -> None:
                console.update(task, completed=step)
                if "eval_acc" in rec:  # a log gets every evaluation; a terminal has the bar
                    metric = f"mean@{cfg.eval_samples}"
                    console.note(
                        format_eval({"label": cfg.strategy, "step": step, "metric": metric, "value": rec["eval_acc"]})
                    )

            res = run_train(cfg, progress=on_step, warm_state=warm)
        final = [m for m in res.metrics if "eval_acc" in m][-1]
        typer.echo(f"done: {res.run_dir} (final eval accuracy {final['eval_acc']:.3f})")
