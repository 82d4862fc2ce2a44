"""``vipalloc demo`` and ``vipalloc train`` (registered on the main CLI; heavy imports only inside commands)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


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
        strategies: str = typer.Option("uniform,vip", help="Comma-separated strategies (any of train's, or dapo)."),
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
        """Warm-up (cached), then train uniform vs VIP at the same rollout budget and write a report."""
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from vipalloc.training.demo import run_demo

        names = [s.strip() for s in strategies.split(",") if s.strip()]
        try:
            extra = parse_overrides(set_)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        console = Console()
        try:
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
                console=console,
            ) as bar:
                warm_task = bar.add_task("warm-up", total=1, info="")
                tasks: dict[str, Any] = {}  # one bar per run: several run at once with --jobs

                def on_event(kind: str, info: dict) -> None:
                    if kind == "warmup":
                        bar.update(warm_task, total=info["total"], completed=info["step"])
                    elif kind == "run":
                        bar.update(warm_task, completed=bar.tasks[warm_task].total, visible=False)
                        tasks[info["label"]] = bar.add_task(info["label"], total=info["steps"], info="")
                    elif kind == "restart":
                        console.log(f"{info['run_dir']}: written by another configuration, restarting that run")
                    elif kind == "step" and info["label"] in tasks:
                        acc = f" eval {info['eval_acc']:.3f}" if "eval_acc" in info else ""
                        bar.update(
                            tasks[info["label"]],
                            completed=info["step"],
                            info=f"reward {info['train_reward']:.3f}{acc}",
                        )

                report = run_demo(
                    out=out,
                    quick=quick,
                    seeds=range(seeds if seeds is not None else (1 if quick else 6)),
                    strategies=names,
                    steps=steps,
                    on_event=on_event,
                    predictor=predictor,
                    threads=threads,
                    jobs=jobs,
                    **extra,
                )
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(report.read_text())  # plain markdown: rich would squeeze the wide tables
        console.print(f"[bold]report:[/bold] {report}")

    @app.command()
    def train(
        config: Path = typer.Option(..., "--config", help="YAML or TOML file with TrainConfig options."),
        steps: int | None = typer.Option(None, help="Override the number of steps."),
        run_dir: str | None = typer.Option(None, "--run-dir", help="Override the run folder."),
    ) -> None:
        """Train with a config file; resumes from the run folder's last checkpoint after a kill."""
        from rich.progress import Progress

        from vipalloc.training.config import load_config
        from vipalloc.training.trainer import train as run_train

        try:
            cfg = load_config(config, steps=steps, run_dir=run_dir)
        except ValueError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        with Progress() as bar:
            task = bar.add_task(f"train {cfg.strategy}", total=cfg.steps)
            res = run_train(cfg, progress=lambda s, n, rec: bar.update(task, completed=s))
        final = [m for m in res.metrics if "eval_acc" in m][-1]
        typer.echo(f"done: {res.run_dir} (final eval accuracy {final['eval_acc']:.3f})")
