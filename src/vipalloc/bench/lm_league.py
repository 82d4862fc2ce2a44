"""Parts (b) and (c) of ``vipalloc bench lm``: a GRPO league on SmolLM2 (LoRA) at equal rollouts and at equal
tokens, and the next-step Brier of the ``gp``, ``beta`` and ``empirical`` predictors along its runs (issue 27).

One run = one (strategy, budget mode, seed): fresh LoRA adapters (seeded: every strategy of a seed starts from the
same adapters), the cheap step of :mod:`vipalloc.bench.lm_fast` (LoRA on the top layers, short answers, prompt-once
sampling), a fixed set of training prompts visited in batches (every prompt comes back every
``train_prompts / batch`` steps, so predictors have history), ``Allocator.plan`` for the counts (two-phase
strategies: ``plan_pilot`` / ``observe`` / ``plan_commit``), the Dr.GRPO loss
``-(1/M) sum_i (1/n_i) sum_j A_ij log pi(y_ij | x_i)``, Adam. Budget modes: ``rollouts`` (``batch * mean_n`` a
step) and ``tokens`` (``token_budget = Allocator.uniform_tokens(ids, mean_n)``: what uniform groups would spend by
the allocator's own length model; the first step, before any length is known, by rollouts).

Held-out: mean@k and pass@k over ``eval_prompts`` prompts, the same prompts and sampling seeds for every strategy of
a seed, with the evaluation's standard error over prompts. Each finished run is one JSON file
``<strategy>-<mode>-seed<seed>.json`` (resumable: a file on disk is not run again); uniform runs at equal rollouts
save their LoRA adapters at ``snapshots`` steps (for the variance part at trained policies). Runs go to ``jobs``
spawned worker processes, each with ``OMP_WAIT_POLICY=PASSIVE`` and its own thread count set before torch starts.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc.bench.lm_model import LMProblem, chain_sum_problems

__all__ = ["MODES", "LeagueConfig", "RunResult", "label", "load_runs", "run_env", "run_league", "run_one"]

BRIER_PREDICTORS = ("gp", "beta", "empirical")
MODES = ("rollouts", "tokens")


@dataclass(frozen=True)
class LeagueConfig:
    """A league's settings. Counts are prompts or rollouts; ``lr`` Adam's step; ``top_layers`` LoRA layers from the
    top (None: every layer); ``short`` the one-number answer format; ``snapshots`` steps at which uniform runs save
    their adapters; ``eval_chunk`` held-out prompts sampled per call (progress is shown per chunk)."""

    steps: int
    batch: int  # prompts per step
    mean_n: int  # rollouts per prompt on average (the rollout budget is batch * mean_n)
    n_min: int
    n_max: int
    train_prompts: int
    eval_prompts: int
    eval_k: int
    eval_every: int
    max_new_tokens: int
    temperature: float
    lr: float
    levels: tuple[tuple[int, int], ...]
    predictor: str = "gp"
    top_layers: int | None = 4
    short: bool = True
    rank: int = 8
    snapshots: tuple[int, ...] = ()
    eval_chunk: int = 32


@dataclass
class RunResult:
    """One run's curves. Per step: cumulative ``rollouts`` / ``tokens`` / ``train_seconds`` (evaluations
    excluded), mean training success, the counts; per evaluation: mean@k, pass@k and its standard error; ``trace``:
    per step ``{"step", "ids", "texts", "successes", "trials", "tokens" (4, M)}`` (length-model traces)."""

    strategy: str
    seed: int
    mode: str = "rollouts"
    steps: list[int] = field(default_factory=list)
    rollouts: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    train_success: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_mean_at_k: list[float] = field(default_factory=list)
    eval_pass_at_k: list[float] = field(default_factory=list)
    eval_se: list[float] = field(default_factory=list)
    counts: list[list[int]] = field(default_factory=list)
    brier: dict[str, list[float]] = field(default_factory=dict)  # predictor -> per-step Brier (seen prompts only)
    brier_n: list[int] = field(default_factory=list)  # rollouts of seen prompts per step
    trace: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # CPU time of the run's process (evaluations included); wall-clock swings with load
    commit: str = "unknown"
    # torch / transformers versions and the CPU's model and vector unit: sampled runs replay bit for bit only on the
    # same ones (floating-point kernels differ across them, and one flipped token changes the trajectory)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        """From a saved run (fields a file lacks keep their defaults; unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def run_env() -> dict[str, str]:
    """What a run's floating-point results depend on besides the commit: ``torch``, ``transformers``, the CPU model
    (from /proc/cpuinfo where there is one) and the vector unit torch's kernels use (``cpu_capability``)."""
    import platform

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass  # not Linux: the platform's name stands
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": cpu,
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
    }


def label(strategy: str, mode: str) -> str:
    """A row's name in the report: the strategy at equal rollouts, ``<strategy>@tokens`` at equal tokens."""
    return strategy if mode == "rollouts" else f"{strategy}@tokens"


def _problems(cfg: LeagueConfig, seed: int) -> tuple[list[LMProblem], list[LMProblem]]:
    train = chain_sum_problems(cfg.train_prompts, 100 + seed, levels=cfg.levels, tag=f"tr{seed}-")
    held = chain_sum_problems(cfg.eval_prompts, 500 + seed, levels=cfg.levels, tag=f"ev{seed}-")
    return train, held


def evaluate(
    policy: Any,
    held: Sequence[LMProblem],
    cfg: LeagueConfig,
    seed: int,
    step: int,
    progress: Callable[[str], None],
    what: str,
) -> tuple[float, float, float]:
    """``(mean@k, pass@k, standard error of mean@k over prompts)`` on ``held`` (``k = cfg.eval_k`` samples a
    prompt; the generator is seeded by (seed, step) only, so every strategy of a seed draws the same numbers)."""
    import torch

    from vipalloc.bench.lm_fast import rewards_of

    gen = torch.Generator(device=policy.device).manual_seed(10_000 * seed + step)
    per_prompt: list[float] = []
    passed: list[float] = []
    for k in range(0, len(held), cfg.eval_chunk):
        chunk = held[k : k + cfg.eval_chunk]
        comps = policy.sample(
            [p.question for p in chunk], [cfg.eval_k] * len(chunk), cfg.max_new_tokens, cfg.temperature, gen
        )
        for r in rewards_of(policy, comps, [p.answer for p in chunk]):
            per_prompt.append(float(r.mean()))
            passed.append(float(r.max()))
        progress(f"{what}: evaluation at step {step}: {len(per_prompt)}/{len(held)} held-out prompts")
    x = np.asarray(per_prompt)
    return float(x.mean()), float(np.mean(passed)), float(x.std(ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0


def _tokens_cols(comps: Sequence[Sequence[list[int]]], rewards: Sequence[np.ndarray]) -> list[list[float]]:
    """The history's token columns of a step: summed tokens of successes / failures and their counts, ``(4, M)``."""
    cols: list[list[float]] = [[], [], [], []]
    for cs, r in zip(comps, rewards):
        lens = np.array([len(c) for c in cs], np.float64)
        ok = r >= 0.5
        for row, v in zip(cols, (lens[ok].sum(), lens[~ok].sum(), ok.sum(), (~ok).sum())):
            row.append(float(v))
    return cols


def _generate(
    policy: Any, texts: Sequence[str], answers: Sequence[str], counts: Sequence[int], cfg: LeagueConfig, gen: Any
) -> tuple[list[list[list[int]]], list[np.ndarray]]:
    """``counts[i]`` replies to ``texts[i]`` and their 0/1 rewards."""
    from vipalloc.bench.lm_fast import rewards_of

    comps = policy.sample(texts, counts, cfg.max_new_tokens, cfg.temperature, gen)
    return comps, rewards_of(policy, comps, answers)


def _observe(
    alloc: Any, ids: Sequence[str], comps: Sequence[Sequence[list[int]]], rewards: Sequence[np.ndarray], step: int
) -> None:
    """Tell the allocator the generated groups' rewards and token lengths."""
    kept = [i for i, r in enumerate(rewards) if r.size]
    alloc.observe(
        [ids[i] for i in kept],
        [rewards[i] for i in kept],
        step,
        lengths=[np.array([len(c) for c in comps[i]], np.float64) for i in kept],
    )


def run_one(
    strategy: str,
    seed: int,
    cfg: LeagueConfig,
    mode: str = "rollouts",
    device: str = "cpu",
    progress: Callable[[str], None] = print,
    snapshot_dir: Path | None = None,
    commit: str = "unknown",
) -> RunResult:
    """One (strategy, mode, seed) run; see the module docstring."""
    import torch

    from vipalloc import Allocator
    from vipalloc.bench.lm_fast import FastPolicy, grpo_update

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    t0 = time.perf_counter()
    c0 = time.process_time()
    what = f"{label(strategy, mode)} seed {seed}"
    progress(f"{what}: loading SmolLM2 (LoRA r={cfg.rank} on the top {cfg.top_layers or 'all'} layers)")
    policy = FastPolicy(seed, device, rank=cfg.rank, top_layers=cfg.top_layers, short=cfg.short)
    opt = torch.optim.Adam(policy.params, lr=cfg.lr)
    train, held = _problems(cfg, seed)
    alloc = Allocator(strategy=strategy, predictor=cfg.predictor, n_min=cfg.n_min, n_max=cfg.n_max, seed=seed)
    shadows = {
        name: Allocator(strategy="uniform", predictor=name, n_min=cfg.n_min, n_max=cfg.n_max, seed=seed)
        for name in BRIER_PREDICTORS
    }
    two_phase = alloc.strategy.two_phase
    res = RunResult(strategy, seed, mode, brier={k: [] for k in BRIER_PREDICTORS}, commit=commit, env=run_env())
    seen: set[str] = set()
    total_r = total_t = 0
    train_s = 0.0

    def record_eval(step: int) -> None:
        m, pk, se = evaluate(policy, held, cfg, seed, step, progress, what)
        res.eval_steps.append(step)
        res.eval_mean_at_k.append(m)
        res.eval_pass_at_k.append(pk)
        res.eval_se.append(se)

    record_eval(0)
    for step in range(cfg.steps):
        t_step = time.perf_counter()
        start = (step * cfg.batch) % len(train)
        probs = [train[(start + i) % len(train)] for i in range(cfg.batch)]
        ids, texts = [p.prompt_id for p in probs], [p.question for p in probs]
        budget = cfg.batch * cfg.mean_n
        tok_budget = alloc.uniform_tokens(ids, cfg.mean_n, step=step, prompts=texts) if mode == "tokens" else None
        args: dict[str, Any] = {"token_budget": tok_budget} if tok_budget is not None else {"budget": budget}
        # the shadows plan n_max each (they only predict), so that any group the run generates can be observed
        preds = {k: a.plan(ids, texts, cfg.batch * cfg.n_max, step=step).p_mean for k, a in shadows.items()}
        gen = torch.Generator(device=device).manual_seed(1_000_000 * seed + 1000 * step + 7)

        answers = [p.answer for p in probs]

        def generate(counts: Sequence[int]) -> tuple[list[list[list[int]]], list[np.ndarray]]:
            return _generate(policy, texts, answers, counts, cfg, gen)  # noqa: B023 (called in this iteration)

        def observe(comps: Sequence[Sequence[list[int]]], rewards: Sequence[np.ndarray]) -> None:
            _observe(alloc, ids, comps, rewards, step)  # noqa: B023 (called in this iteration)

        if two_phase:
            pilot = alloc.plan_pilot(ids, texts, step=step, pilot_n=2, **args)
            comps, rewards = generate(pilot.counts)
            observe(comps, rewards)
            commit_plan = alloc.plan_commit(step=step)
            c2, r2 = generate(commit_plan.counts)
            observe(c2, r2)
            comps = [list(a) + list(b) for a, b in zip(comps, c2)]
            rewards = [np.concatenate([a, b]) for a, b in zip(rewards, r2)]
            counts = [int(r.size) for r in rewards]
        else:
            plan = alloc.plan(ids, texts, step=step, **args)
            comps, rewards = generate(plan.counts)
            observe(comps, rewards)
            counts = [int(c) for c in plan.counts]
        # next-step Brier on prompts seen before (rollout-weighted, binary outcomes), from the shadow predictors
        outcomes = [(i, r) for i, r in enumerate(rewards) if ids[i] in seen and r.size]
        res.brier_n.append(int(sum(r.size for _, r in outcomes)))
        for name, pm in preds.items():
            sq = [float(((pm[i] - r) ** 2).sum()) for i, r in outcomes]
            res.brier[name].append(sum(sq) / res.brier_n[-1] if res.brier_n[-1] else float("nan"))
        for a in shadows.values():  # the shadows see the same rollouts (one group per prompt)
            a.observe([ids[i] for i, r in enumerate(rewards) if r.size], [r for r in rewards if r.size], step)
        seen.update(ids)
        grpo_update(policy, opt, [policy.prompt_ids(q) for q in texts], comps, rewards)
        total_r += int(sum(r.size for r in rewards))
        total_t += int(sum(len(c) for cs in comps for c in cs))
        train_s += time.perf_counter() - t_step
        res.steps.append(step + 1)
        res.rollouts.append(total_r)
        res.tokens.append(total_t)
        res.train_seconds.append(train_s)
        res.counts.append(counts)
        res.train_success.append(float(np.mean(np.concatenate(rewards))))
        res.trace.append(
            {
                "step": step,
                "ids": ids,
                "texts": texts,
                "successes": [int(r.sum()) for r in rewards],
                "trials": [int(r.size) for r in rewards],
                "tokens": _tokens_cols(comps, rewards),
            }
        )
        if snapshot_dir is not None and strategy == "uniform" and mode == "rollouts" and step + 1 in cfg.snapshots:
            snapshot_dir.mkdir(parents=True, exist_ok=True)
            policy.save_adapters(snapshot_dir / f"uniform-seed{seed}-step{step + 1}.pt")
        progress(
            f"{what}: step {step + 1}/{cfg.steps} ({time.perf_counter() - t_step:.0f} s): counts {counts} "
            f"success {res.train_success[-1]:.2f}, {total_t} tokens"
        )
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record_eval(step + 1)
            progress(
                f"{what}: held-out mean@{cfg.eval_k} {res.eval_mean_at_k[-1]:.3f} (se {res.eval_se[-1]:.3f}) "
                f"pass@{cfg.eval_k} {res.eval_pass_at_k[-1]:.3f} after step {step + 1}"
            )
    res.seconds = time.perf_counter() - t0
    res.cpu_seconds = time.process_time() - c0
    return res


def _path(out: Path, strategy: str, mode: str, seed: int) -> Path:
    return out / f"{strategy}-{mode}-seed{seed}.json"


def _worker(
    strategy: str, seed: int, cfg: LeagueConfig, mode: str, device: str, out: str, threads: int, commit: str
) -> str:
    """A spawned worker's run: thread settings before torch starts, plain progress lines, the result file."""
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    from vipalloc.bench.lm_fast import set_threads

    set_threads(threads)
    res = run_one(
        strategy,
        seed,
        cfg,
        mode,
        device,
        lambda msg: print(f"[bench lm] {msg}", flush=True),
        Path(out) / "snapshots",
        commit,
    )
    return _save(Path(out), res)


def _save(out: Path, res: RunResult) -> str:
    from vipalloc._io import atomic_write_text

    path = _path(out, res.strategy, res.mode, res.seed)
    atomic_write_text(path, json.dumps(asdict(res)))
    return str(path)


def run_league(
    out: Path,
    strategies: Sequence[str],
    seeds: Sequence[int],
    cfg: LeagueConfig,
    device: str = "cpu",
    progress: Callable[[str], None] = print,
    *,
    modes: Sequence[str] = ("rollouts",),
    token_strategies: Sequence[str] | None = None,
    jobs: int = 1,
    threads: int = 1,
    commit: str = "unknown",
) -> list[Path]:
    """Run every (seed, strategy, mode) whose file is not yet under ``out`` (seed-major, so pairs complete first);
    ``tokens`` mode for ``token_strategies`` only (default: every strategy but ``uniform``). ``jobs`` > 1 runs them
    in spawned worker processes. Returns the result files written."""
    out.mkdir(parents=True, exist_ok=True)
    tok_s = [s for s in strategies if s != "uniform"] if token_strategies is None else list(token_strategies)
    todo = []
    for seed in seeds:
        for mode in modes:
            for strat in strategies if mode == "rollouts" else tok_s:
                if _path(out, strat, mode, seed).is_file():
                    progress(f"{label(strat, mode)} seed {seed}: on disk, reused")
                    continue
                todo.append((strat, seed, mode))
    progress(f"league: {len(todo)} runs to do in {out} with {jobs} job(s)")
    written: list[Path] = []
    if jobs <= 1:
        for i, (strat, seed, mode) in enumerate(todo):
            res = run_one(strat, seed, cfg, mode, device, progress, out / "snapshots", commit)
            written.append(Path(_save(out, res)))
            progress(f"league: {i + 1}/{len(todo)} runs done ({label(strat, mode)} seed {seed}, {res.seconds:.0f} s)")
        return written
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        pending = {
            pool.submit(_worker, s, sd, cfg, m, device, str(out), threads, commit): (s, sd, m) for s, sd, m in todo
        }
        done_n = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                s, sd, m = pending.pop(fut)
                written.append(Path(fut.result()))
                done_n += 1
                progress(f"league: {done_n}/{len(todo)} runs done ({label(s, m)} seed {sd})")
    return written


def load_runs(folder: Path, labels: Sequence[str] | None = None) -> list[RunResult]:
    """Every finished run in ``folder`` (of ``labels`` when given: ``vip``, ``vip@tokens``, ...), by seed then
    label. Files of the earlier layout (``<strategy>-seed<k>.json``) read as equal-rollout runs."""
    found = []
    for path in folder.glob("*-seed*.json"):
        if not path.stem.rsplit("-seed", 1)[1].isdigit():
            continue  # not a run file
        try:
            res = RunResult.from_dict(json.loads(path.read_text()))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a league result ({exc}); delete it to re-run that run") from None
        name = label(res.strategy, res.mode)
        if labels is None or name in labels:
            order = labels.index(name) if labels is not None else 0
            found.append((res.seed, order, name, res))
    return [r for _, _, _, r in sorted(found, key=lambda t: (t[0], t[1], t[2]))]
