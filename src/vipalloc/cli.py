"""The ``vipalloc`` command.

``vipalloc allocate`` turns a rollout history and a batch of prompts into a plan (rollouts per prompt).
Training (``demo``, ``train``) and benchmark (``bench ...``) commands are registered by their sub-packages when
those are importable; their heavy imports (torch, transformers) happen only inside the commands.
Every error is one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from vipalloc import __version__
from vipalloc._io import iter_json_lines
from vipalloc.console import fail
from vipalloc.settings import default, help_text

__all__ = ["app", "fail", "read_batch"]

app = typer.Typer(
    name="vipalloc",
    help="Variance-informed per-prompt rollout allocation (VIP) for online RL with verifiable rewards.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vipalloc {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """vipalloc: decide how many rollouts each prompt gets."""


def read_batch(path: Path) -> tuple[list[str], list[str | None]]:
    """Read a batch file: JSON Lines with ``prompt_id`` (or ``id``) and optional ``prompt`` text per line."""
    if not path.exists():
        raise ValueError(f"{path}: no such batch file")
    ids: list[str] = []
    texts: list[str | None] = []
    for lineno, _, row in iter_json_lines(path):
        pid = row.get("prompt_id", row.get("id"))
        if pid is None or isinstance(pid, (bool, dict, list, float)):
            raise ValueError(f"{path}: line {lineno}: needs a string 'prompt_id'")
        text = row.get("prompt")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{path}: line {lineno}: 'prompt' must be a string")
        ids.append(str(pid))
        texts.append(text)
    if not ids:
        raise ValueError(f"{path}: the batch is empty; add one JSON line per prompt")
    return ids, texts


@app.command()
def allocate(
    batch: Path = typer.Option(..., "--batch", help="JSONL: one {prompt_id, prompt} per line."),
    budget: int | None = typer.Option(
        None, "--budget", help="Total rollouts for the batch (sum of counts); with --token-budget, a cap on them."
    ),
    token_budget: float | None = typer.Option(
        None,
        "--token-budget",
        help="Generated tokens for the batch: sum of counts x expected tokens per rollout, predicted from the "
        "'lengths' of the history's rows (one per reward).",
    ),
    out: Path = typer.Option(..., "--out", help="Where to write the plan (JSONL: prompt_id, n, p_mean, p_std)."),
    history: Path | None = typer.Option(
        None, "--history", help="Rollout history (JSONL written by RolloutHistory.save, or rows with rewards)."
    ),
    state: Path | None = typer.Option(None, "--state", help="Allocator state file (Allocator.save) to start from."),
    strategy: str = typer.Option(default("strategy"), help=help_text("strategy")),
    predictor: str = typer.Option(default("predictor"), help=help_text("predictor")),
    estimator: str = typer.Option(default("estimator"), help=help_text("estimator")),
    n_min: int = typer.Option(default("n_min"), "--n-min", help=help_text("n_min")),
    n_max: int = typer.Option(default("n_max"), "--n-max", help=help_text("n_max")),
    seed: int = typer.Option(default("seed"), help=help_text("seed")),
    embedder: str = typer.Option(default("embedder"), help=help_text("embedder")),
    step: int | None = typer.Option(None, help="Training step of this batch (default: one past the history)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print the summary table."),
) -> None:
    """Plan how many rollouts each prompt of a batch gets."""
    from vipalloc.allocator import Allocator
    from vipalloc.history import RolloutHistory

    try:
        ids, texts = read_batch(batch)
        if state is not None:
            alloc = Allocator.load(state)
        else:
            alloc = Allocator(
                strategy=strategy,
                predictor=predictor,
                estimator=estimator,
                n_min=n_min,
                n_max=n_max,
                seed=seed,
                embedder=embedder,
            )
        if history is not None:
            alloc.ingest_history(RolloutHistory.load(history))
        prompts: list[str] | None
        if any(t is None for t in texts):
            if all(t is None for t in texts):
                prompts = None
            else:
                prompts = [t if t is not None else (alloc.history.prompt_text(i) or "") for i, t in zip(ids, texts)]
        else:
            prompts = [t for t in texts if t is not None]
        if budget is None and token_budget is None:
            raise ValueError("give --budget (rollouts), --token-budget (tokens), or both (a rollout cap too)")
        plan = alloc.plan(ids, prompts=prompts, budget=budget, step=step, token_budget=token_budget)
    except (ValueError, OSError) as exc:
        fail(str(exc))
        return
    from vipalloc._io import atomic_write_text

    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in plan.to_records()))
    if not quiet:
        _print_plan_summary(plan, out)


def _print_plan_summary(plan: Any, out: Path) -> None:
    import numpy as np
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    counts = plan.counts
    kept = counts > 0
    table = Table(title=f"plan for step {plan.step} ({plan.strategy}, {plan.estimator})")
    for col in ("prompts", "kept", "dropped", "budget", "mean n (kept)", "min n", "max n", "var ratio vs uniform"):
        table.add_column(col, justify="right")
    table.add_row(
        str(len(counts)),
        str(int(kept.sum())),
        str(int((~kept).sum())),
        str(plan.budget),
        f"{counts[kept].mean():.2f}" if kept.any() else "-",
        str(int(counts[kept].min())) if kept.any() else "-",
        str(int(np.max(counts))),
        f"{plan.variance_ratio:.3f}",
    )
    console.print(table)
    if plan.expected_tokens is not None:
        cap = "" if plan.token_budget is None else f" of a {plan.token_budget:,.0f}-token budget"
        console.print(f"expected tokens {plan.expected_tokens:,.0f}{cap} (certified gap {plan.optimality_gap:.2e})")
    console.print(f"wrote {out}")


def _register_subcommands() -> None:
    """Attach the training and benchmark commands when their modules exist (a broken module still fails loudly)."""
    import importlib
    import importlib.util

    for module in ("vipalloc.training.cli", "vipalloc.bench.cli", "vipalloc.replay.cli"):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).register(app)


_register_subcommands()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
