"""``vipalloc bench``: simulate | predictors | overhead | train | budget. One command per benchmark; each writes a
markdown report (with PNG plots where it has any) under ``--out`` (default ``reports/``). Heavy imports happen inside
the commands."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from vipalloc.bench.progress import BenchDisplay
    from vipalloc.console import ProgressConsole

__all__ = ["register"]


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what} must be comma-separated integers, got {text!r}") from None


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _command(argv: list[str] | None = None) -> str:
    """The command line that re-runs this benchmark, every argument quoted for a shell: ``vipalloc`` and the
    arguments after the program, whether it was launched as the ``vipalloc`` script or as
    ``python -m vipalloc.cli`` (whose ``argv[0]`` is the path of ``vipalloc/cli.py``). Called in-process by another
    program (a test's runner), whose ``argv`` is not this command's: ``vipalloc bench``."""
    import shlex

    argv = sys.argv if argv is None else argv
    if argv:
        prog = Path(argv[0])
        if "vipalloc" in prog.name or (prog.name == "cli.py" and prog.parent.name == "vipalloc"):
            return shlex.join(["vipalloc", *argv[1:]])
    return "vipalloc bench"


def _limit_threads() -> None:
    """One BLAS/torch thread: the benchmarks run many small linear-algebra calls on a shared 2-core machine, where
    a second thread mostly adds contention (measured 3x faster GP fits with one thread under load)."""
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - scikit-learn brings threadpoolctl
        pass


def _display(command: str) -> tuple[ProgressConsole, BenchDisplay]:
    """``(console, progress)`` for one bench command: rich bars on a terminal, flushed plain lines otherwise."""
    from vipalloc.bench.progress import BenchDisplay
    from vipalloc.console import ProgressConsole

    console = ProgressConsole(f"bench {command}")
    return console, BenchDisplay(console)


def register(app: typer.Typer) -> None:
    """Attach the ``bench`` sub-command group to the ``vipalloc`` app."""
    bench = typer.Typer(
        help="Benchmarks: learning-dynamics simulator league, predictor calibration, allocator overhead, CPU training.",
        no_args_is_help=True,
    )
    app.add_typer(bench, name="bench")

    @bench.command()
    def simulate(
        quick: bool = typer.Option(False, "--quick", help="Smaller run (3 seeds, 60 steps, 2-point sweep)."),
        seeds: int | None = typer.Option(None, help="Seeds per row (default 5; quick 3)."),
        steps: int | None = typer.Option(None, help="Training steps (default 120; quick 60)."),
        sigma: float = typer.Option(10.0, help="Score-noise level of the league table."),
        sweep: str | None = typer.Option(None, help="Comma-separated sigmas for the sweep (default 0,1,3,10,30)."),
        rows: str | None = typer.Option(None, help="Comma-separated rows: labels, 'dapo' or strategy:predictor."),
        target: float = typer.Option(0.7, help="Target mean success for steps/rollouts-to-target."),
        batch: int = typer.Option(64, help="Prompts a step."),
        n_mean: int = typer.Option(8, "--n-mean", help="Rollouts a prompt on average (budget = batch x n_mean)."),
        estimator: str = typer.Option("drgrpo", help="Training advantage: drgrpo | rloo | grpo."),
        optimizer: str = typer.Option("sgd", help="Simulator optimizer: sgd | adam."),
        lr: float | None = typer.Option(None, help="Simulator step size (default 1.0 for sgd, 0.02 for adam)."),
        adam_beta1: float = typer.Option(0.9, "--adam-beta1", help="Adam's momentum (0: normalisation only)."),
        out: Path = typer.Option(Path("reports"), help="Report folder."),
    ) -> None:
        """League table of allocation strategies on the policy-gradient simulator, with a sigma sweep."""
        _limit_threads()
        from vipalloc.bench.simulate import SWEEP_ROWS, parse_rows, run_simulate
        from vipalloc.bench.simulator import SimConfig

        try:
            row_specs = parse_rows(rows)
            sw = (
                _floats(sweep, "--sweep")
                if sweep is not None
                else ([0.0, 10.0] if quick else [0.0, 1.0, 3.0, 10.0, 30.0])
            )
            step = lr if lr is not None else (0.02 if optimizer == "adam" else 1.0)
            cfg = SimConfig(estimator=estimator, optimizer=optimizer, lr=step, adam_beta1=adam_beta1)
            n_seeds = seeds if seeds is not None else (3 if quick else 5)
            n_steps = steps if steps is not None else (60 if quick else 120)
            console, show = _display("simulate")
            with console:
                run_simulate(
                    out,
                    rows=row_specs,
                    seeds=n_seeds,
                    steps=n_steps,
                    batch=batch,
                    n_mean=n_mean,
                    sigma=sigma,
                    sweep=sw,
                    # rows you name are the rows you get, in the sweep too; by default it reruns the cheap rows
                    sweep_rows=[r.label for r in row_specs] if rows is not None else SWEEP_ROWS,
                    target=target,
                    config=cfg,
                    command=_command(),
                    progress=show,
                )
        except ValueError as exc:
            _fail(str(exc))
        typer.echo(f"wrote {out / 'simulate.md'}")

    @bench.command()
    def tokens(
        quick: bool = typer.Option(False, "--quick", help="Smaller run (3 seeds, 40 steps, no sweep)."),
        seeds: int | None = typer.Option(None, help="Seeds per row (default 8; quick 3)."),
        steps: int | None = typer.Option(None, help="Uniform's training steps, which set the token total (100)."),
        sigma: float = typer.Option(10.0, help="Score-noise level of the league."),
        sweep: str | None = typer.Option(None, help="Comma-separated extra sigmas for the sweep (default 3,30)."),
        rows: str | None = typer.Option(None, help="Comma-separated rows: labels or strategy:predictor:budget."),
        batch: int = typer.Option(64, help="Prompts a step."),
        n_mean: int = typer.Option(8, "--n-mean", help="Rollouts a prompt on average (uniform's n)."),
        max_length: int = typer.Option(2048, "--max-length", help="Length cap (tokens); a cut rollout scores 0."),
        out: Path = typer.Option(Path("reports"), help="Report folder (runs kept in <out>/tokens_runs, resumable)."),
    ) -> None:
        """Equal-token league on the simulator with response lengths: uniform, vip by rollouts and by tokens,
        knapsack, dynamo; tokens to reach uniform's gain at several levels, with a sigma sweep."""
        _limit_threads()
        from vipalloc.bench.sim_lengths import SimLengthModel
        from vipalloc.bench.token_league import SWEEP_TOKEN_ROWS, parse_token_rows, run_tokens

        try:
            row_specs = parse_token_rows(rows)
            sw = _floats(sweep, "--sweep") if sweep is not None else ([] if quick else [3.0, 30.0])
            console, show = _display("tokens")
            with console:
                run_tokens(
                    out,
                    rows=row_specs,
                    seeds=seeds if seeds is not None else (3 if quick else 8),
                    steps=steps if steps is not None else (40 if quick else 100),
                    batch=batch,
                    n_mean=n_mean,
                    sigma=sigma,
                    sweep=sw,
                    sweep_rows=[r.label for r in row_specs] if rows is not None else SWEEP_TOKEN_ROWS,
                    lengths=SimLengthModel(max_length=max_length),
                    command=_command(),
                    progress=show,
                )
        except ValueError as exc:
            _fail(str(exc))
        typer.echo(f"wrote {out / 'tokens.md'}")

    @bench.command()
    def predictors(
        quick: bool = typer.Option(False, "--quick", help="Smaller run (2 seeds, 30 steps, 20-step trainer trace)."),
        seeds: int | None = typer.Option(None, help="Simulator traces (default 3)."),
        steps: int | None = typer.Option(None, help="Steps per simulator trace (default 60)."),
        train_trace: bool = typer.Option(
            True, "--train-trace/--no-train-trace", help="Also score a CPU-trainer trace."
        ),
        train_steps: int | None = typer.Option(None, "--train-steps", help="Trainer trace steps (default 60)."),
        trace: Path | None = typer.Option(None, help="Use this saved trainer trace (JSONL) instead of training."),
        out: Path = typer.Option(Path("reports"), help="Report folder."),
    ) -> None:
        """Next-step calibration of the predictors (Brier, log loss, MAE, Spearman), seen vs never-seen prompts."""
        _limit_threads()
        from vipalloc.bench.predictors import run_predictors

        try:
            console, show = _display("predictors")
            with console:
                run_predictors(
                    out,
                    seeds=seeds if seeds is not None else (2 if quick else 3),
                    steps=steps if steps is not None else (30 if quick else 60),
                    train_trace=train_trace,
                    train_steps=train_steps if train_steps is not None else (20 if quick else 60),
                    trace_path=trace,
                    command=_command(),
                    progress=show,
                )
        except ValueError as exc:
            _fail(str(exc))
        typer.echo(f"wrote {out / 'predictors.md'}")

    @bench.command()
    def overhead(
        quick: bool = typer.Option(False, "--quick", help="Smaller run (M up to 1024, histories up to 50k)."),
        ms: str | None = typer.Option(None, "--ms", help="Batch sizes (default 256,1024,4096,16384)."),
        history: str | None = typer.Option(None, help="History rows (default 10000,50000,200000)."),
        embedder: str = typer.Option("hashing", help="Embedder for the GP: hashing | minilm | auto."),
        peer_code: Path | None = typer.Option(
            None,
            "--peer-code",
            help="Folder with the peers' public files (bernoulli_allocation.py from HieuNT91/VIP, "
            "exploration_utils.py from liziniu/KnapsackRL) to time them too; not shipped with vipalloc.",
        ),
        slsqp_max: int = typer.Option(1024, "--slsqp-max", help="Largest M for the SLSQP solver."),
        dp_max: int = typer.Option(1024, "--dp-max", help="Largest M for the Knapsack DP."),
        peer_max: int = typer.Option(256, "--peer-max", help="Largest M for the peers' own code."),
        token_m: int = typer.Option(4096, "--token-m", help="M of the token-vs-rollout budget timing (0: skip)."),
        token_only: bool = typer.Option(
            False, "--token-only", help="Only the token-vs-rollout budget timing (prints the ratio, writes JSON)."
        ),
        out: Path = typer.Option(Path("reports"), help="Report folder."),
    ) -> None:
        """plan() time by stage and peak memory vs batch size and history; peers' solvers side by side; plan()
        under a token budget vs a rollout budget."""
        _limit_threads()
        from vipalloc.bench.overhead import run_overhead

        if token_only:
            import json

            from vipalloc.bench.overhead import run_token_speed
            from vipalloc.bench.overhead_tokens import token_speed_lines

            try:
                res = run_token_speed(token_m or 4096, _ints(history, "--history")[0] if history else 50_000)
            except ValueError as exc:
                _fail(str(exc))
            out.mkdir(parents=True, exist_ok=True)
            (out / "overhead_tokens.json").write_text(json.dumps(res))
            typer.echo("\n".join(token_speed_lines(res)))
            typer.echo(f"wrote {out / 'overhead_tokens.json'}")
            return
        try:
            m_list = _ints(ms, "--ms") if ms is not None else ([256, 1024] if quick else [256, 1024, 4096, 16384])
            h_list = (
                _ints(history, "--history")
                if history is not None
                else ([10_000, 50_000] if quick else [10_000, 50_000, 200_000])
            )
            console, show = _display("overhead")
            with console:
                run_overhead(
                    out,
                    ms=m_list,
                    histories=h_list,
                    embedder=embedder,
                    slsqp_max=slsqp_max,
                    dp_max=dp_max,
                    peer_code=peer_code,
                    peer_max=peer_max,
                    gp_windows=(512, 1024, 2048) if quick else (512, 1024, 2048, 4096, 8192),
                    window_m=1024 if quick else 4096,
                    token_m=token_m or None,
                    command=_command(),
                    progress=show,
                )
        except ValueError as exc:
            _fail(str(exc))
        typer.echo(f"wrote {out / 'overhead.md'}")

    @bench.command()
    def train(
        quick: bool = typer.Option(False, "--quick", help="A ~minutes smoke run of the same pipeline (1 seed)."),
        seeds: int | None = typer.Option(None, help="Seeds per strategy (default 3; quick 1)."),
        steps: int | None = typer.Option(None, help="Training steps (default: the demo's 150)."),
        strategies: str = typer.Option(
            "uniform,vip,vip_authors,knapsack,dynamo,hora,dapo",
            help="Comma-separated strategies (the league: 3 seeds of these take ~20 min on 2 cores; the headline "
            "league in docs/results.md uses --seeds 8). '<strategy>-tokens' plans by the tokens uniform would spend "
            "(the rollout budget a cap), '<strategy>-tokens<T>' by T tokens a step.",
        ),
        task: str = typer.Option(
            "chain_sum",
            help="chain_sum | chain_sum_steps (partial sums before the answer: longer chains, more tokens).",
        ),
        max_new_tokens: int | None = typer.Option(
            None, "--max-new-tokens", min=1, help="Generated tokens a rollout at most (default 6; chain_sum_steps 12)."
        ),
        prompts: int | None = typer.Option(None, "--prompts", min=1, help="Prompts a step (default 32)."),
        eval_every: int | None = typer.Option(None, "--eval-every", min=1, help="Steps between evaluations."),
        preset: str | None = typer.Option(
            None, help="A TrainConfig preset under the options above (gpu, tokens_cpu); cuda selects gpu."
        ),
        out: Path = typer.Option(Path("reports"), help="Report folder."),
        jobs: int | None = typer.Option(
            None, min=1, help="Runs side by side in worker processes (default: one per CPU core)."
        ),
        device: str = typer.Option(
            "cpu", help="cpu | cuda | auto. cuda also selects the 'gpu' preset (larger policy and batch)."
        ),
        n_mean: int | None = typer.Option(
            None, "--n-mean", min=2, help="Mean rollouts a prompt (budget = prompts x n_mean; default 8, quick 4)."
        ),
        reuse: bool = typer.Option(
            False, "--reuse", help="Keep runs in <out>/train_runs that finished with this exact configuration."
        ),
        report_only: bool = typer.Option(
            False, "--report-only", help="Only write <out>/train.md again from <out>/train.json (no training)."
        ),
    ) -> None:
        """Real CPU training: strategies x seeds at equal cumulative rollouts, accuracy vs rollouts."""
        from vipalloc.bench.train import rewrite_report, run_train

        if report_only:
            try:
                typer.echo(f"wrote {rewrite_report(out)}")
            except ValueError as exc:
                _fail(str(exc))
            return
        from vipalloc.training.config import STRATEGIES, label_options

        strats = [s.strip() for s in strategies.split(",") if s.strip()]
        bad = []
        for s in strats:
            try:
                label_options(s)
            except ValueError:
                bad.append(s)
        if bad or not strats:
            _fail(f"unknown strategies {bad}; choose from {', '.join(STRATEGIES)} (optionally with -tokens)")
        overrides: dict[str, Any] = {} if n_mean is None else {"n_mean": n_mean}
        if task != "chain_sum":
            overrides["task"] = task
            overrides["max_new_tokens"] = 12 if max_new_tokens is None else max_new_tokens
        elif max_new_tokens is not None:
            overrides["max_new_tokens"] = max_new_tokens
        if prompts is not None:
            overrides["prompts_per_step"] = prompts
        if eval_every is not None:
            overrides["eval_every"] = eval_every
        try:
            console, show = _display("train")
            with console:
                run_train(
                    out,
                    strategies=strats,
                    seeds=seeds if seeds is not None else (1 if quick else 3),
                    steps=steps,
                    quick=quick,
                    jobs=jobs,
                    command=_command(),
                    progress=show,
                    device=device,
                    preset=preset,
                    reuse=reuse,
                    **overrides,
                )
        except ValueError as exc:
            _fail(str(exc))
        typer.echo(f"wrote {out / 'train.md'}")

    @bench.command()
    def lm(
        parts: str = typer.Option("variance,league", help="Comma-separated parts: variance (a), league (b and c)."),
        preset: str | None = typer.Option(None, help="cpu | gpu (default: gpu with --device cuda, else cpu)."),
        device: str = typer.Option("cpu", help="cpu | cuda."),
        seeds: int | None = typer.Option(None, min=1, help="League seeds (default: the preset's, 8)."),
        first_seed: int = typer.Option(
            0, min=0, help="First league seed (runs seeds first_seed.. in a second process; the report reads all)."
        ),
        strategies: str = typer.Option("uniform,vip", help="League strategies by registry name (uniform: baseline)."),
        variance_strategies: str | None = typer.Option(
            None, help="Variance part's strategies (default: uniform, vip, vip_pure, vip_authors, knapsack, coba, ...)."
        ),
        token_strategies: str | None = typer.Option(
            None, help="Strategies also run at equal tokens (default: every strategy but uniform)."
        ),
        modes: str = typer.Option("rollouts,tokens", help="League budget modes: rollouts and/or tokens."),
        jobs: int = typer.Option(1, min=1, help="League runs side by side (spawned processes)."),
        resamples: int | None = typer.Option(None, min=10, help="Variance resamples per allocation."),
        steps: int | None = typer.Option(None, min=1, help="League steps (default: the preset's)."),
        prompts: int | None = typer.Option(None, min=2, help="Pool prompts per task setting (default: the preset's)."),
        eval_prompts: int | None = typer.Option(None, min=2, help="Held-out prompts (default: the preset's)."),
        snapshots: str = typer.Option(
            "pretrained", help="Variance: comma-separated 'pretrained' and/or adapter files saved by the league."
        ),
        settings: str | None = typer.Option(None, help="Variance task settings as TERMSxDIGITS, e.g. 2x1,3x1."),
        budgets: str | None = typer.Option(None, help="Variance budgets, rollouts a prompt (default 2,4,8)."),
        top_layers: int | None = typer.Option(None, min=1, help="LoRA layers from the top (default: the preset's)."),
        lr: float | None = typer.Option(
            None, help="League: Adam's learning rate, > 0 (default: the preset's, 4e-3 on cpu, 2e-3 on gpu)."
        ),
        out: Path = typer.Option(Path("reports"), help="Report folder (work files under <out>/lm, resumable)."),
        threads: int = typer.Option(1, min=1, help="torch CPU threads per process."),
    ) -> None:
        """A real pretrained LM (SmolLM2-135M-Instruct, LoRA): gradient error at snapshots, Brier, GRPO league."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: read when torch loads
        import torch

        from vipalloc.bench.lm import run_lm

        torch.set_num_threads(threads)
        _limit_threads()

        def split(text: str | None) -> list[str]:
            return [p.strip() for p in (text or "").split(",") if p.strip()]

        try:
            pairs = [tuple(int(x) for x in s.lower().split("x")) for s in split(settings)]
            if any(len(p) != 2 for p in pairs):
                raise ValueError(f"--settings takes TERMSxDIGITS items such as 2x1,3x1, got {settings!r}")
            path = run_lm(
                out,
                parts=split(parts),
                preset=preset or ("gpu" if device == "cuda" else "cpu"),
                device=device,
                seeds=seeds,
                first_seed=first_seed,
                strategies=split(strategies),
                **({} if variance_strategies is None else {"variance_strategies": split(variance_strategies)}),
                token_strategies=None if token_strategies is None else split(token_strategies),
                modes=split(modes),
                jobs=jobs,
                threads=threads,
                resamples=resamples,
                steps=steps,
                prompts=prompts,
                eval_prompts=eval_prompts,
                snapshots=split(snapshots),
                settings=[(p[0], p[1]) for p in pairs] or None,
                budgets=[int(b) for b in split(budgets)],
                top_layers="preset" if top_layers is None else top_layers,
                lr=lr,
                command=_command(),
                progress=lambda msg: typer.echo(f"[bench lm] {msg}"),
            )
        except (ValueError, RuntimeError) as exc:
            _fail(str(exc))
        typer.echo(f"wrote {path}")

    @bench.command()
    def budget(
        strategies: str = typer.Option(
            "uniform,vip,vip_authors,vip_pure,knapsack",
            help="Comma-separated strategies (any allocation strategy, e.g. vip_two_phase).",
        ),
        seeds: int = typer.Option(
            10, min=1, help="Draws of the skewed synthetic batch (256 prompts, 20% never and 10% always solved)."
        ),
        trace: Path | None = typer.Option(None, help="A saved CPU-trainer trace (JSONL) to tabulate too."),
        predictor: str = typer.Option("gp", help="Predictor replaying the trace: gp | beta | empirical | ridge."),
        out: Path = typer.Option(Path("reports"), help="Report folder."),
    ) -> None:
        """Where the budget goes: mean rollouts per predicted-p bin and dropped prompts, per strategy."""
        from vipalloc.bench.budget import run_budget

        try:
            _, text = run_budget(
                out,
                strategies=[s.strip() for s in strategies.split(",") if s.strip()],
                seeds=seeds,
                trace=trace,
                predictor=predictor,
                command=_command(),
            )
        except ValueError as exc:
            _fail(str(exc))
        typer.echo(text)
        typer.echo(f"wrote {out / 'budget.md'}")
