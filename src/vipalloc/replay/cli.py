"""``vipalloc replay``: registered on the main CLI by :func:`register` (heavy imports only inside the command)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Any

import typer

__all__ = ["register", "run_replay"]


def _tokenizer_counter(path: str) -> Any:
    """Generated tokens per text with the user's tokenizer (offline: a local folder or a cached name)."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
        raise ValueError(f"--tokenizer {path}: cannot load it offline ({type(exc).__name__}: {exc})") from None
    import numpy as np

    def count(texts: Any) -> Any:
        ids = tok(list(texts), add_special_tokens=False)["input_ids"]
        return np.fromiter((len(x) for x in ids), np.float64, len(ids))

    return count


def run_replay(
    paths: list[Path],
    out: Path,
    *,
    fmt: str | None = None,
    reward: list[str] | None = None,
    threshold: float | None = None,
    id_field: str | None = None,
    group_size: int | None = None,
    tokenizer: str | None = None,
    strategies: list[str] | None = None,
    predictor: str = "gp",
    predictors: list[str] | None = None,
    estimator: str = "drgrpo",
    n_min: int | None = None,
    n_max: int | None = None,
    embedder: str = "auto",
    seed: int = 0,
    command: str = "vipalloc replay",
    console: Any = None,
) -> dict[str, Any]:
    """Read the logs, analyse them and write the report into ``out``; returns the ``replay.json`` content.

    Raises :class:`~vipalloc.replay.readers.ReplayInputError` (a ``ValueError``) for malformed input.
    """
    from vipalloc.replay.analysis import (
        CounterfactualConfig,
        iter_step_data,
        prompts_over_run,
        replay_engine,
        waste,
        waste_per_step,
        zero_advantage_groups,
    )
    from vipalloc.replay.readers import ReadOptions, read_logs
    from vipalloc.replay.report import write_report

    say = console.line if console is not None else (lambda s: None)
    _check_engine_options(strategies, predictor, predictors, estimator)
    opts = ReadOptions(fmt=fmt, reward=reward or None, threshold=threshold, id_field=id_field, group_size=group_size)
    if tokenizer:
        opts.count_tokens = _tokenizer_counter(tokenizer)
    t0 = time.perf_counter()
    last = [0.0]

    def tick(stats: Any) -> None:
        now = time.perf_counter()
        if now - last[0] >= 2.0:  # a line every couple of seconds: visible in a log, not a flood
            last[0] = now
            say(
                f"read {stats.rollouts:,} rollouts, file {stats.current_file} of {stats.files_total} ({now - t0:.0f} s)"
            )

    table, stats = read_logs(paths, opts, tick)
    arrays = table.arrays()
    skipped = len(stats.skipped_duplicate_files)
    say(
        f"read {stats.rollouts:,} rollouts from {stats.files} of {stats.files_total} file(s)"
        + (f" ({skipped} repeated file(s) skipped)" if skipped else "")
        + f" in {len(table):,} groups ({time.perf_counter() - t0:.1f} s)"
    )
    zero_adv = zero_advantage_groups(arrays, stats.signal)
    overall = waste(arrays["trials"], arrays["successes"], arrays["tokens"], zero_adv)
    per_step = waste_per_step(arrays, zero_adv)
    tokens_known = overall["tokens"] is not None
    cannot: list[str] = []
    notes: list[str] = list(stats.notes)
    if stats.rollouts == 0 and stats.unscored_rollouts:
        cannot.append(
            f"every one of the {stats.unscored_rollouts:,} rollouts read had no value in the reward column(s) "
            f"{stats.reward_label} (the reward function returned None): nothing to compute; name a scored reward "
            "with --reward"
        )
    elif stats.rollouts == 0:
        cannot.append(
            f"the log holds no rollouts ({stats.files_total} file(s) found, all empty): nothing to compute "
            "(is it the right folder?)"
        )
    if zero_adv is None and stats.rollouts:
        cannot.append(
            "zero advantage as trained: the log has no per-rollout advantage or total score for every group "
            "(TRL: the 'advantage' column; verl: 'score'; history: rows with 'rewards'); the zero-variance measure "
            "on the success reward stands in for it"
        )
    if not tokens_known and stats.rollouts:
        cannot.append(
            "token figures: the log has no completions or lengths (history rows need a 'lengths' list per rollout)"
        )
    if stats.unscored_rollouts:
        notes.append(f"{stats.unscored_rollouts:,} rollouts had no value in the reward column(s) and were skipped")
    if stats.skipped_duplicate_files:
        notes.append(
            f"{len(stats.skipped_duplicate_files)} TRL file(s) repeat the previous file's rows (TRL logs its last "
            "generation batch at every logging step) and were skipped"
        )
    if stats.fmt == "trl":
        notes.append(
            "TRL keeps only the last generation batch when it logs: steps generated between two logging steps are "
            "not in the log, and 'step' is the logging step"
        )
    steps = iter_step_data(table, arrays)
    dup = len(arrays["trials"]) - sum(len(sd.ids) for sd in steps)
    if dup:
        notes.append(
            f"{dup:,} group(s) share their step and prompt with another group (the same prompt drawn twice): each is "
            "its own group in the measured figures; the counterfactual plans such a prompt once with both groups' "
            "rollouts"
        )
    if overall["singleton_groups"]:
        notes.append(f"{overall['singleton_groups']:,} groups have one rollout (zero advantage; counted zero-variance)")
    cfg = CounterfactualConfig(
        strategies=list(strategies) if strategies is not None else CounterfactualConfig().strategies,
        predictor=predictor,
        predictors=list(predictors) if predictors is not None else CounterfactualConfig().predictors,
        estimator=estimator,
        n_min=n_min,
        n_max=n_max,
        embedder=embedder,
        seed=seed,
    )
    preds: dict[str, Any] = {}
    strats: dict[str, Any] = {}
    info: dict[str, Any] = {}
    if len(steps) < 2:
        if stats.rollouts:
            cannot.append(
                "predictor scores and counterfactual plans: the log has one step; they need a next step to forecast"
            )
    elif cfg.strategies or cfg.predictors:
        with_task = console.add_task("replaying allocators", total=len(steps) - 1) if console is not None else None

        def on_step(done: int, total: int) -> None:
            if console is not None and with_task is not None:
                console.update(with_task, completed=max(done - 1, 0))
            if console is not None and (done == total or done % max(1, total // 10) == 0):
                console.note(f"allocators replayed through step {done}/{total}")

        say(f"replaying {len(cfg.strategies)} strategies and {len(cfg.predictors)} predictors over {len(steps)} steps")
        preds, strats, info = replay_engine(
            steps, cfg, tokens_known=tokens_known, plans_dir=out / "counterfactuals", on_step=on_step
        )
        if not tokens_known and cfg.strategies:
            cannot.append("counterfactuals at the same token budget: the log has no token counts")
    nothing = _nothing_to_gain(arrays, zero_adv) if strats else None
    result: dict[str, Any] = {
        "format": stats.fmt,
        "files": stats.files,
        "files_found": stats.files_total,
        "skipped_duplicate_files": stats.skipped_duplicate_files,
        "success": f"{stats.reward_label} >= {opts.success_threshold:g}"
        if stats.fmt != "history"
        else stats.reward_label,
        "grouping": stats.grouping,
        "zero_advantage_method": _zero_adv_method(stats.signal, stats.signal_label) if zero_adv is not None else None,
        "reward_range": (
            {"min": stats.reward_min, "max": stats.reward_max, "non_binary_rollouts": stats.reward_non_binary}
            if stats.reward_values
            else None
        ),
        "tokens_method": _tokens_method(stats.fmt, tokenizer, tokens_known),
        **overall,
        "steps": len(per_step),
        "prompts": prompts_over_run(arrays, len(table.prompt_ids)),
        "per_step": per_step,
        "predictors": preds,
        "strategies": strats,
        "counterfactual_settings": info,
        "counterfactual_nothing_to_gain": nothing,
        "cannot_compute": cannot,
        "notes": notes,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    result["headline"] = headline(result)
    written = write_report(out, result, command)
    say(f"wrote {', '.join(str(p) for p in written[:2])} and {len(written) - 2} plot(s)")
    return result


def _tokens_method(fmt: str, tokenizer: str | None, known: bool) -> str:
    if not known:
        return "unavailable"
    if fmt == "history":
        return "the history's recorded lengths"
    if fmt == "tinker":
        return "exact: Tinker's logged action tokens (steps[*].ac_len)"
    text = "the completion text (a conversation's assistant content, no role prefix)"
    if tokenizer:
        return f"tokenizer {tokenizer} on {text}"
    return f"approximate: whitespace-separated words of {text}; pass --tokenizer for exact counts"


def _zero_adv_method(signal: str | None, label: str) -> str:
    if signal == "advantage":
        return f"the logged '{label}': a group all of whose rollouts had advantage 0 (what TRL trained on)"
    return (
        f"the logged '{label}': a group whose rollouts all scored the same (every group-relative estimator then "
        "gives it zero advantage)"
    )


def _nothing_to_gain(arrays: dict[str, Any], zero_adv: Any) -> str | None:
    """The sentence for a log where no group of a planned step (the second on) was informative, else ``None``."""
    import numpy as np

    steps = arrays["step"]
    if not len(steps):
        return None
    later = steps > steps.min()
    zero = zero_adv if zero_adv is not None else (arrays["successes"] == 0) | (arrays["successes"] == arrays["trials"])
    if later.any() and bool(np.all(np.asarray(zero)[later])):
        what = "zero advantage as trained" if zero_adv is not None else "zero variance"
        return (
            f"Nothing to gain: every group of the planned steps had {what}, so no allocation of these rollouts would "
            "have bought gradient from this run's outcomes (the plans and their modelled variance are still in "
            "replay.json and counterfactuals/, but they describe predictions, not a gain)"
        )
    return None


def headline(result: dict[str, Any]) -> str:
    """The report's first sentence: the share of rollouts (and tokens) that bought no gradient, by the measure that
    means it (zero advantage as trained when the log says, else zero variance on the success reward)."""
    if not result["rollouts"]:
        return "No rollouts to report."
    if result["zero_advantage_share"] is not None:
        share, tok = result["zero_advantage_share"], result["zero_advantage_tokens_share"]
        what = "were in groups with zero advantage as trained: they bought no gradient"
        extra = f" (zero variance on {result['success']}: {100 * result['zero_variance_share']:.1f}%)"
    else:
        share, tok = result["zero_variance_share"], result["zero_variance_tokens_share"]
        what = f"were in groups with zero variance on {result['success']}: they bought no gradient"
        extra = ""
    tok_text = "" if tok is None else f" ({100 * tok:.1f}% of the generated tokens)"
    return f"{100 * share:.1f}% of the {result['rollouts']:,} rollouts{tok_text} {what}{extra}."


def _check_engine_options(
    strategies: list[str] | None, predictor: str, predictors: list[str] | None, estimator: str
) -> None:
    """Refuse unknown names before reading a large log; two-phase strategies need in-step pilot outcomes."""
    from vipalloc import Allocator

    for name in strategies or []:
        alloc = Allocator(strategy=name, predictor="empirical", estimator=estimator, n_min=2, n_max=4)
        try:
            alloc.plan(["a", "b"], budget=4, step=0)
        except ValueError as exc:
            if "two-phase" in str(exc):
                raise ValueError(
                    f"--strategies: {name!r} is two-phase (pilot rollouts, then a commit that depends on their "
                    "outcomes); a log has no pilot outcomes to replay it with: replay 'vip' instead"
                ) from None
            raise
    for name in {predictor, *(predictors or [])}:
        Allocator(strategy="uniform", predictor=name, estimator=estimator)


def _split(value: str | None) -> list[str] | None:
    if value is None:
        return None
    if value.strip().lower() in ("", "none"):
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def register(app: typer.Typer) -> None:
    """Attach ``vipalloc replay`` to the ``vipalloc`` app."""

    @app.command()
    def replay(
        paths: list[Path] = typer.Argument(
            ...,
            help="Log files or folders: TRL's completions/ parquet, verl's rollout_data_dir, a Tinker log_path, a "
            "history.jsonl or {prompt_id, rewards} rows.",
        ),
        out: Path = typer.Option(..., "--out", help="Folder for replay.md, replay.json, plots and plans."),
        fmt: str | None = typer.Option(None, "--format", help="trl | verl | tinker | history (default: detected)."),
        reward: list[str] = typer.Option(
            [], "--reward", help="Reward column/field (repeat to sum several; default: the total score)."
        ),
        threshold: float | None = typer.Option(
            None,
            "--threshold",
            help="A rollout succeeds when its reward >= this (default 1.0, only for a 0/1 reward; history: its own).",
        ),
        id_field: str | None = typer.Option(
            None, "--id-field", help="Column/field naming the prompt (default: prompt_id if present, else the text)."
        ),
        group_size: int | None = typer.Option(
            None,
            "--group-size",
            help="TRL: rollouts per group (num_generations; default: read from the log's layout); 0: each run of "
            "consecutive rows of one prompt is a group.",
        ),
        tokenizer: str | None = typer.Option(
            None, "--tokenizer", help="Tokenizer folder or cached name (offline) for exact token counts."
        ),
        strategies: str | None = typer.Option(
            None,
            "--strategies",
            help="Comma-separated strategies (default vip,vip_authors,inverse_acc; none).",
        ),
        predictor: str = typer.Option("gp", help="Predictor the strategies use."),
        predictors: str | None = typer.Option(
            None, "--predictors", help="Comma-separated predictors to score (default gp,beta,empirical; none)."
        ),
        estimator: str = typer.Option("drgrpo", help="drgrpo | rloo (GRPO runs: drgrpo)."),
        n_min: int | None = typer.Option(None, "--n-min", help="Fewest rollouts of a kept prompt (default <= 4)."),
        n_max: int | None = typer.Option(None, "--n-max", help="Most rollouts of a prompt (default >= 32)."),
        embedder: str = typer.Option("auto", help="auto | minilm | hashing (prompt features for gp)."),
        seed: int = typer.Option(0, help="Seed for tie-breaking."),
    ) -> None:
        """What your last run spent on groups that bought no gradient, and what allocation would have changed."""
        from vipalloc.console import ProgressConsole, fail

        try:
            with ProgressConsole("replay") as console:
                result = run_replay(
                    paths,
                    out,
                    fmt=fmt,
                    reward=reward,
                    threshold=threshold,
                    id_field=id_field,
                    group_size=group_size,
                    tokenizer=tokenizer,
                    strategies=_split(strategies),
                    predictor=predictor,
                    predictors=_split(predictors),
                    estimator=estimator,
                    n_min=n_min,
                    n_max=n_max,
                    embedder=embedder,
                    seed=seed,
                    command=shlex.join(["vipalloc", *sys.argv[1:]]),
                    console=console,
                )
        except (ValueError, OSError) as exc:
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return
        typer.echo(f"{result['headline']} {result['prompt_steps']:,} groups; report: {out / 'replay.md'}")
        for line in result["cannot_compute"]:
            typer.echo(f"cannot compute: {line}")
