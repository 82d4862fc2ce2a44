"""Run several independent training runs, in this process (``jobs=1``) or in worker processes.

Demo and benchmark runs (strategy x seed) share nothing but the read-only warm-up weights, and each uses one
torch thread, so on an N-core machine N of them run side by side at nearly full speed. Results do not depend on
``jobs``: every run is fully seeded and runs the same code in whatever process it lands (checked by
``tests/test_training.py``). Workers are *spawned* (never forked: a forked torch/BLAS state can deadlock) and
report progress through a queue so the caller's progress bar keeps moving.
"""

from __future__ import annotations

import json
import os
import queue as queue_mod
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from vipalloc._io import atomic_write_text
from vipalloc.training.config import TrainConfig

__all__ = ["RESULT_FILE", "default_jobs", "finished_result", "run_many"]

RESULT_FILE = "result.json"  # a finished run's whole result, beside its checkpoints

#: progress callback: ``(kind, info)`` with kind ``"run"`` (a run started: label, steps), ``"step"`` (label, step,
#: total, train_reward; eval_acc and eval_k, the samples a prompt behind that mean@k, when measured) or ``"done"``
#: (label, wall_s, steps_done, and the final evaluation's eval_acc and eval_k).
Event = Callable[[str, dict[str, Any]], None]

# Numerical libraries read these once, at import: set before a worker imports numpy so that N workers do not each
# start N BLAS threads on N cores (oversubscription made the GP's Cholesky ~30x slower in our measurements).
_THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


class _BudgetReached(Exception):
    pass


def default_jobs(n_runs: int) -> int:
    """Worker processes to use for ``n_runs`` one-thread runs: one per CPU core, at most one per run."""
    return max(1, min(n_runs, os.cpu_count() or 1))


def _label(cfg: TrainConfig) -> str:
    return f"{cfg.strategy} seed {cfg.seed}"


def _run_one(
    cfg_json: str,
    warm_state: dict[str, torch.Tensor] | None,
    stop_at_rollouts: int | None,
    events: Any,
) -> dict[str, Any]:
    """One run; ``events`` is a queue (worker) or a callable (in-process). Returns metrics, plans, wall time."""
    from vipalloc.training.trainer import Trainer, evaluate

    cfg = TrainConfig.model_validate_json(cfg_json)
    label = _label(cfg)
    emit: Event = events if callable(events) else (lambda kind, info: events.put((kind, info)))
    emit("run", {"label": label, "steps": cfg.steps})
    t0 = time.perf_counter()
    tr = Trainer(cfg, warm_state=warm_state)

    def on_step(step: int, total: int, rec: dict[str, Any]) -> None:
        info = {"label": label, "step": step, "total": total, "train_reward": rec.get("vip/rollout_accuracy", 0.0)}
        if "eval_acc" in rec:
            info["eval_acc"] = rec["eval_acc"]
            info["eval_k"] = cfg.eval_samples
        emit("step", info)
        if stop_at_rollouts is not None and rec.get("cum_rollouts", 0) >= stop_at_rollouts:
            raise _BudgetReached

    try:
        tr.run(progress=on_step)
    except _BudgetReached:
        pass
    metrics = list(tr.metrics)
    if "eval_acc" not in metrics[-1]:  # stopped between evaluations (budget reached): evaluate the final policy
        metrics[-1] = dict(metrics[-1])
        metrics[-1].update(
            evaluate(tr.model, tr.tok, tr.eval_set, cfg.eval_samples, cfg, seed=cfg.seed + 10_000 + tr.step)
        )
    wall = time.perf_counter() - t0
    final = {"eval_acc": metrics[-1]["eval_acc"], "eval_k": cfg.eval_samples} if "eval_acc" in metrics[-1] else {}
    emit("done", {"label": label, "wall_s": wall, "steps_done": tr.step, **final})
    result = {"metrics": metrics, "plans": list(tr.plans), "wall_s": wall, "steps_done": tr.step}
    # A finished run leaves its whole result beside its checkpoints, so a long league that is interrupted can
    # reuse it (bench train --reuse) instead of re-running it; written atomically, keyed by config and stop.
    doc = {"config": json.loads(cfg_json), "stop_at_rollouts": stop_at_rollouts, "result": result}
    atomic_write_text(Path(cfg.run_dir) / RESULT_FILE, json.dumps(doc))
    return result


def finished_result(cfg: TrainConfig, stop_at_rollouts: int | None) -> dict[str, Any] | None:
    """The saved result of a finished run of exactly ``cfg`` with the same stop, or ``None`` (absent, damaged,
    or made by a different configuration). Same shape as one :func:`run_many` result."""
    path = Path(cfg.run_dir) / RESULT_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or cut short / damaged: run it again
        return None
    # the folder is not part of what a run computes: a run copied or moved to another folder is the same run
    mine = {k: v for k, v in json.loads(cfg.model_dump_json()).items() if k != "run_dir"}
    try:  # validated again: a run saved before an option existed has that option's default
        theirs = json.loads(TrainConfig.model_validate(saved.get("config") or {}).model_dump_json())
    except ValueError:
        return None
    same_cfg = {k: v for k, v in theirs.items() if k != "run_dir"} == mine
    return saved["result"] if same_cfg and saved.get("stop_at_rollouts") == stop_at_rollouts else None


def _worker_init() -> None:
    torch.set_num_threads(1)


def run_many(
    cfgs: Sequence[TrainConfig],
    warm_state: dict[str, torch.Tensor] | None = None,
    *,
    jobs: int = 1,
    on_event: Event | None = None,
    stop_at_rollouts: int | None = None,
) -> list[dict[str, Any]]:
    """Run every config (each to ``cfg.steps``, or until ``stop_at_rollouts`` cumulative rollouts, then a final
    evaluation) with at most ``jobs`` worker processes; results come back in the order of ``cfgs``.

    Each result: ``metrics`` (the run's per-step records), ``plans``, ``wall_s`` (seconds, this run) and
    ``steps_done``. A worker's exception is re-raised here after the other runs are cancelled.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    emit: Event = on_event or (lambda kind, info: None)
    if jobs == 1 or len(cfgs) <= 1:
        return [_run_one(c.model_dump_json(), warm_state, stop_at_rollouts, emit) for c in cfgs]

    saved = {k: os.environ.get(k) for k in _THREAD_ENV}
    for k in _THREAD_ENV:
        os.environ.setdefault(k, "1")
    ctx = get_context("spawn")
    results: list[dict[str, Any] | None] = [None] * len(cfgs)
    try:
        with (
            ctx.Manager() as manager,
            ProcessPoolExecutor(max_workers=min(jobs, len(cfgs)), mp_context=ctx, initializer=_worker_init) as pool,
        ):
            q = manager.Queue()
            futures = {
                pool.submit(_run_one, c.model_dump_json(), warm_state, stop_at_rollouts, q): i
                for i, c in enumerate(cfgs)
            }
            pending = set(futures)
            try:
                while pending:
                    done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                    _drain(q, emit)
                    for f in done:
                        results[futures[f]] = f.result()  # re-raises a worker's error
                _drain(q, emit)
            except BaseException:
                for f in pending:
                    f.cancel()
                raise
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return [r for r in results if r is not None]


def _drain(q: Any, emit: Event) -> None:
    while True:
        try:
            kind, info = q.get_nowait()
        except queue_mod.Empty:
            return
        emit(kind, info)
