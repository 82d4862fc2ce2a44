"""``vipalloc bench overhead``: ``Allocator.plan()`` time stage by stage (embed / observe / GP fit / predict /
solve) and peak memory versus batch size and history length; the peers' solvers timed on the same predicted p;
a sweep of the exact GP's window. :func:`run_overhead` returns its raw results and writes ``overhead.md`` /
``overhead.json`` and a PNG.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc.bench.progress import Progress, noop
from vipalloc.reporting import git_commit, md_table, plot_lines, provenance

__all__ = ["run_overhead", "run_token_speed"]


def _synthetic_texts(prefix: str, n: int, rng: np.random.Generator) -> list[str]:
    """Arithmetic-style prompt texts (distinct), for embedding cost and GP features."""
    a, b, c, d = (rng.integers(1, 999, size=n) for _ in range(4))
    ops = np.array(["+", "-", "*"])[rng.integers(0, 3, size=n)]
    return [
        f"[{prefix}{i}] Compute {a[i]} {ops[i]} {b[i]} * {c[i]} and give the result modulo {d[i]}." for i in range(n)
    ]


def _history_rows(rows: int, pool: int, seed: int, rows_per_step: int = 1024) -> Any:
    """A synthetic :class:`RolloutHistory` with ``rows`` (step, prompt) rows over a pool of ``pool`` prompts."""
    from vipalloc.history import RolloutHistory

    rng = np.random.default_rng(seed)
    texts = _synthetic_texts("h", pool, rng)
    ids = [f"h{i}" for i in range(pool)]
    logit_p = rng.normal(0.0, 1.5, size=pool)
    h = RolloutHistory()
    step = 0
    left = rows
    seen_text: set[int] = set()
    while left > 0:
        k = min(rows_per_step, left, pool)
        idx = rng.choice(pool, size=k, replace=False)
        trials = rng.integers(4, 17, size=k)
        succ = rng.binomial(trials, 1.0 / (1.0 + np.exp(-(logit_p[idx] + 0.01 * step))))
        new = [i for i in idx if i not in seen_text]
        if new:  # texts ride on a first reward-array row so GP predictors can embed history prompts
            pos = {int(i): j for j, i in enumerate(idx)}
            h.extend(
                step,
                [ids[i] for i in new],
                [np.r_[np.ones(succ[pos[i]]), np.zeros(trials[pos[i]] - succ[pos[i]])] for i in new],
                prompts=[texts[i] for i in new],
            )
            seen_text.update(int(i) for i in new)
        old = np.array([i for i in idx if i not in set(new)], np.int64)
        if old.size:
            pos = {int(i): j for j, i in enumerate(idx)}
            sel = np.array([pos[int(i)] for i in old])
            h.extend_counts(step, [ids[i] for i in old], succ[sel], trials[sel])
        left -= k
        step += 1
    return h


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares exponent ``b`` of ``y ~ a x^b`` over the finite positive points (NaN if < 2)."""
    x = np.asarray(xs, float)
    y = np.asarray(ys, float)
    ok = np.isfinite(y) & (y > 0) & (x > 0)
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(x[ok]), np.log(y[ok]), 1)[0])


def _load_peer(path: Path, name: str) -> Any | None:
    import importlib.util

    if not path.exists():
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quiet_call(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Time ``fn()`` with its prints swallowed (the peers' code prints diagnostics)."""
    import contextlib
    import io
    import warnings

    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out


def _solver_row(
    p: np.ndarray, budget: int, caps: dict[str, int], vip_peer: Any, ks_peer: Any, n_mean: int
) -> dict[str, Any]:
    """Time every solver on the same predicted ``p`` (one batch); objectives of the vip-objective solvers."""
    from vipalloc import Allocator
    from vipalloc.allocation import objective
    from vipalloc.bench.peers import authors_bisection_allocate, authors_slsqp_allocate, knapsack_dp_allocate

    m = len(p)
    row: dict[str, Any] = {"m": m}

    def ours(strategy: str) -> tuple[float, np.ndarray]:
        a = Allocator(strategy=strategy, predictor="oracle", n_min=2, n_max=32, seed=0)
        ids = [f"o{j}" for j in range(m)]
        a.predictor.set_true_p(ids, np.clip(p, 0.0, 1.0))
        pl = a.plan(ids, budget=budget, step=0)
        return pl.timings["solve"], pl.counts

    def obj(n: np.ndarray) -> float:
        return objective(p, np.asarray(n), estimator="drgrpo", hardness_bonus=4e-4)

    row["ours_vip"], n_ours = ours("vip")
    row["ours_knapsack"], _ = ours("knapsack")
    row["obj_ours"] = obj(n_ours)
    if m <= caps["slsqp"]:
        row["slsqp"], n_s = _quiet_call(lambda: authors_slsqp_allocate(p, budget, estimator="drgrpo"))
        row["obj_slsqp"] = obj(n_s)
    row["bisection"], _ = _quiet_call(lambda: authors_bisection_allocate(p, budget))
    if m <= caps["dp"]:
        row["dp"], _ = _quiet_call(lambda: knapsack_dp_allocate(p, budget, n_min=2, n_max=32))
    if vip_peer is not None and m <= caps["peer"]:
        row["peer_vip"], n_v = _quiet_call(
            lambda: np.asarray(vip_peer.allocate_rollout(p, budget, lower=1, upper=32, allocation_rule="grpo"))
        )
        row["obj_peer_vip"] = obj(n_v)
    if ks_peer is not None and m <= caps["peer"]:
        # their input: [valid, success rate, count]; rates on the grid of an 8-rollout epoch estimate
        states = np.stack([np.ones(m), np.round(p * 8) / 8, np.full(m, 8.0)], axis=1)
        try:
            row["peer_knapsack"], _ = _quiet_call(
                lambda: ks_peer.sampling_budget_by_knapsack(states, n_mean, min_n=2, max_n=32)
            )
        except (AssertionError, ZeroDivisionError, ValueError) as exc:
            # their fallback divides by the number of p in {0, 1} prompts; with none it fails: rerun without it
            row["peer_knapsack_note"] = f"default call failed ({type(exc).__name__}); timed with allow_fallback=False"
            row["peer_knapsack"], _ = _quiet_call(
                lambda: ks_peer.sampling_budget_by_knapsack(states, n_mean, min_n=2, max_n=32, allow_fallback=False)
            )
    return row


def run_overhead(
    out_dir: str | Path = "reports",
    *,
    ms: Sequence[int] = (256, 1024, 4096, 16384),
    histories: Sequence[int] = (10_000, 50_000, 200_000),
    predictors: Sequence[str] = ("gp", "beta"),
    embedder: str = "hashing",
    n_mean: int = 8,
    slsqp_max: int = 1024,
    dp_max: int = 1024,
    peer_code: str | Path | None = None,
    peer_max: int = 256,
    gp_windows: Sequence[int] = (512, 1024, 2048, 4096, 8192),
    window_m: int = 4096,
    token_m: int | None = 4096,
    token_repeats: int = 5,
    command: str = "vipalloc bench overhead",
    progress: Progress = noop,
) -> dict[str, Any]:
    """Time ``plan()`` stage by stage (embed / observe / GP fit / predict / solve) and peak memory for batches of
    ``ms`` prompts after histories of ``histories`` rows; time the peers' solvers on the same predicted p; sweep
    the exact GP's window; time ``plan()`` under a token budget against a rollout budget at ``token_m`` prompts
    (:mod:`vipalloc.bench.overhead_tokens`; None skips it). Writes ``overhead.md`` / ``overhead.json`` and a PNG."""
    import tracemalloc

    from vipalloc import Allocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ms = sorted(int(m) for m in ms)
    histories = sorted(int(h) for h in histories)
    if not ms or not histories or min(ms) < 2 or min(histories) < 1:
        raise ValueError("need at least one batch size >= 2 and one history size >= 1")
    rng = np.random.default_rng(0)
    commit = git_commit()
    t_start = time.perf_counter()
    pool = 8192
    total = len(predictors) * len(histories) * len(ms) + len(ms) + len(gp_windows)
    progress("phase", {"name": "overhead", "total": total})
    stages: list[dict[str, Any]] = []
    p_for_solvers: dict[int, np.ndarray] = {}
    for h_rows in histories:
        hist = _history_rows(h_rows, pool, seed=h_rows)
        last = int(hist.last_step or 0)
        for pred in predictors:
            for m in ms:
                alloc = Allocator(strategy="vip", predictor=pred, n_min=2, n_max=32, embedder=embedder, seed=0)
                alloc.ingest_history(hist)
                ids = [f"b{m}-{j}" for j in range(m)]
                texts = _synthetic_texts(f"b{m}-", m, rng)
                budget = n_mean * m
                s0 = last + 1
                plan_a = alloc.plan(ids, prompts=texts, budget=budget, step=s0)  # new prompts: embedding cost
                rewards = [(rng.random(c) < 0.5).astype(float) for c in plan_a.counts]
                t0 = time.perf_counter()
                alloc.observe(ids, rewards, step=s0)
                t_obs = time.perf_counter() - t0
                t0 = time.perf_counter()
                plan_b = alloc.plan(ids, prompts=texts, budget=budget, step=s0 + 1)  # steady state: cached features
                t_plan = time.perf_counter() - t0
                t0 = time.perf_counter()
                alloc.predictor.predict(ids, s0 + 1)  # the fit is cached now: prediction alone
                t_pred = time.perf_counter() - t0
                rewards = [(rng.random(c) < 0.5).astype(float) for c in plan_b.counts]
                tracemalloc.start()
                alloc.observe(ids, rewards, step=s0 + 1)
                alloc.plan(ids, prompts=texts, budget=budget, step=s0 + 2)
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                if pred == predictors[0] and h_rows == histories[-1]:
                    p_for_solvers[m] = plan_b.p_mean.copy()
                stages.append(
                    {
                        "predictor": pred,
                        "history_rows": h_rows,
                        "m": m,
                        "embed_new": plan_a.timings["embed"],
                        "observe": t_obs,
                        "fit": max(plan_b.timings["predict"] - t_pred, 0.0),
                        "predict": t_pred,
                        "solve": plan_b.timings["solve"],
                        "plan": t_plan,
                        "peak_mb": peak / 2**20,
                    }
                )
                progress("advance", {"label": f"{pred} H={h_rows} M={m}: plan {t_plan:.2f}s"})
                progress("run", {"label": f"{pred} history={h_rows} M={m}", "detail": f"plan() {t_plan:.3f} s"})
    # ---- solvers on the same p
    peer_dir = Path(peer_code) if peer_code is not None else None
    vip_peer = _load_peer(peer_dir / "bernoulli_allocation.py", "_vip_authors_peer") if peer_dir else None
    ks_peer = _load_peer(peer_dir / "exploration_utils.py", "_knapsackrl_peer") if peer_dir else None
    solvers: list[dict[str, Any]] = []
    for m in ms:
        p = p_for_solvers.get(m)
        if p is None:
            p = rng.beta(0.6, 0.6, size=m)
        caps = {"slsqp": slsqp_max, "dp": dp_max, "peer": peer_max}
        row = _solver_row(p, n_mean * m, caps, vip_peer, ks_peer, n_mean)
        solvers.append(row)
        progress("advance", {"label": f"solvers M={m}"})
        progress("run", {"label": f"solvers M={m}", "detail": f"ours vip {1e3 * row['ours_vip']:.1f} ms"})
    # ---- exact-GP window sweep at M = window_m, largest history
    windows: list[dict[str, Any]] = []
    if "gp" in predictors and gp_windows:
        from vipalloc.predictors.gp import PRESETS

        hist = _history_rows(histories[-1], pool, seed=histories[-1])
        last = int(hist.last_step or 0)
        m = window_m
        ids = [f"w{j}" for j in range(m)]
        texts = _synthetic_texts("w", m, rng)
        for mp in gp_windows:
            kw: dict[str, Any] = {"max_points": int(mp)}
            if "max_history" in PRESETS["vipalloc"]:
                kw["max_history"] = max(int(PRESETS["vipalloc"]["max_history"]), int(mp))
            alloc = Allocator(strategy="vip", predictor="gp", n_min=2, n_max=32, embedder=embedder, predictor_kwargs=kw)
            alloc.ingest_history(hist)
            pl = alloc.plan(ids, prompts=texts, budget=n_mean * m, step=last + 1)
            alloc.observe(ids, [(rng.random(c) < 0.5).astype(float) for c in pl.counts], step=last + 1)
            t0 = time.perf_counter()
            pl = alloc.plan(ids, prompts=texts, budget=n_mean * m, step=last + 2)
            t_plan = time.perf_counter() - t0
            windows.append({"max_points": int(mp), "plan": t_plan, **{k: float(v) for k, v in pl.timings.items()}})
            progress("advance", {"label": f"GP window {mp}: plan {t_plan:.2f}s"})
            progress("run", {"label": f"GP window {mp} at M={m}", "detail": f"plan() {t_plan:.3f} s"})
    token_res = None
    if token_m is not None:
        token_res = run_token_speed(token_m, histories[0], token_repeats, n_mean, embedder)
        progress("run", {"label": f"token vs rollout budget at M={token_m}", "detail": f"{token_res['ratio']:.2f}x"})
    elapsed = time.perf_counter() - t_start
    result = {
        "commit": commit,
        "token_speed": token_res,
        "ms": ms,
        "histories": histories,
        "predictors": list(predictors),
        "embedder": embedder,
        "stages": stages,
        "solvers": solvers,
        "gp_windows": windows,
        "window_m": window_m,
        "peer_code": None if peer_dir is None else str(peer_dir),
        "gp_max_points": _gp_default_window(),
        "elapsed_s": elapsed,
    }
    (out / "overhead.json").write_text(json.dumps(result, default=float))
    _write_overhead_report(out, result, command)
    return result


def run_token_speed(
    m: int = 4096, history_rows: int = 50_000, repeats: int = 5, n_mean: int = 8, embedder: str = "hashing"
) -> dict[str, Any]:
    """:func:`vipalloc.bench.overhead_tokens.token_speed` on this bench's synthetic history of ``history_rows``
    rows and a batch of ``m`` new synthetic prompts."""
    from vipalloc.bench.overhead_tokens import token_speed

    if m < 2 or history_rows < 1:
        raise ValueError("need m >= 2 and history_rows >= 1")
    hist = _history_rows(history_rows, 8192, seed=history_rows)
    texts = _synthetic_texts(f"t{m}-", m, np.random.default_rng(m))
    return token_speed(hist, texts, repeats, n_mean, embedder)


def _gp_default_window() -> int | None:
    try:
        from vipalloc.predictors.gp import PRESETS

        return int(PRESETS["vipalloc"]["max_points"])
    except (ImportError, KeyError, TypeError, ValueError):
        return None


def _ms(v: Any) -> str:
    if v is None or not np.isfinite(v):
        return "—"
    v = 1e3 * float(v)
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 1 else f"{v:.2f}"


def _rel(r: dict[str, Any], key: str) -> str:
    """Objective of ``r[key]`` relative to ours (``—`` when absent or ours is 0)."""
    if key not in r or not r.get("obj_ours"):
        return "—"
    return f"{r[key] / r['obj_ours']:.4f}"


def _write_overhead_report(out: Path, res: dict[str, Any], command: str) -> Path:
    stages = res["stages"]
    ms = res["ms"]
    cols = ("embed_new", "observe", "fit", "predict", "solve", "plan")
    names = ("embed (new prompts)", "observe", "GP fit", "predict", "solve", "plan() steady")
    lines = [
        "# Allocator overhead",
        "",
        provenance(
            command,
            {
                "embedder": res["embedder"],
                "budget": "8 rollouts a prompt, n in [2, 32]",
                "GP": f"preset vipalloc, default window max_points={res.get('gp_max_points', '?')}",
                "wall time": f"{res['elapsed_s']:.0f} s",
            },
            commit=res.get("commit"),
        ),
        "Times in milliseconds, one measurement each on a shared 2-core machine (expect ±30% noise).",
        "*embed (new prompts)*: `plan()`'s embedding time for a batch of never-seen prompts (the worst case; seen",
        "prompts are cached). *observe*: `Allocator.observe` of the batch's rewards. *GP fit*: `plan()`'s predict",
        "time minus a second, cached `predictor.predict` (the refit after new observations). *predict*: that",
        "cached prediction. *solve*: the strategy (vip, exact). *plan() steady*: the whole `plan()` after one",
        "observed step, features cached. *peak MB*: tracemalloc peak over one observe + plan.",
        "",
    ]
    for pred in res["predictors"]:
        for h in res["histories"]:
            rows = []
            for m in ms:
                r = next((s for s in stages if s["predictor"] == pred and s["history_rows"] == h and s["m"] == m), None)
                if r is None:
                    continue
                rows.append([str(m)] + [_ms(r[c]) for c in cols] + [f"{r['peak_mb']:.0f}"])
            lines += [
                f"## predictor `{pred}`, history {h:,} rows",
                "",
                md_table(["M"] + list(names) + ["peak MB"], rows),
            ]
        h = res["histories"][-1]
        sub = [s for s in stages if s["predictor"] == pred and s["history_rows"] == h]
        exps = [f"{n} {_slope([s['m'] for s in sub], [s[c] for s in sub]):.2f}" for c, n in zip(cols, names)]
        lines += [f"Scaling exponents in M (fit of t ~ M^b, history {h:,} rows): " + ", ".join(exps) + ".", ""]
    gp_big = [
        s for s in stages if s["predictor"] == "gp" and s["history_rows"] == res["histories"][-1] and s["m"] == 4096
    ]
    if gp_big:
        t = gp_big[0]["plan"]
        verdict = "meets" if t < 1.0 else "MISSES"
        lines += [
            f"**Target** `plan()` < 1 s at M = 4096 with {res['histories'][-1]:,} history rows (GP): {t:.2f} s, "
            f"{verdict} the target on this machine.",
            "",
        ]
    # solvers
    sol = res["solvers"]
    lines += [
        "## Solvers on the same predicted p (budget 8M)",
        "",
        "Our exact solvers (via `Allocator`, strategy `vip` and `knapsack`) next to re-implementations of the",
        "peers' approaches in `vipalloc.bench.peers` (the VIP authors' SLSQP + rounding and their bisection",
        "allocator; Knapsack-RL's dynamic program) and, where given with `--peer-code`, the peers' own public",
        "code run locally (not committed). *objective*: the vip objective (Dr.GRPO variance + 4e-4 log(p) n) of",
        "each plan relative to ours (> 1 = worse). '—': not run at that size (too slow; see the caps).",
        "",
    ]
    hdr = [
        "M",
        "ours vip ms",
        "ours knapsack ms",
        "SLSQP+rounding ms",
        "SLSQP objective",
        "bisection ms",
        "Knapsack DP ms",
        "authors' code ms",
        "authors' objective",
        "KnapsackRL code ms",
    ]
    rows = []
    for r in sol:
        rows.append(
            [
                str(r["m"]),
                _ms(r["ours_vip"]),
                _ms(r["ours_knapsack"]),
                _ms(r.get("slsqp")),
                _rel(r, "obj_slsqp"),
                _ms(r.get("bisection")),
                _ms(r.get("dp")),
                _ms(r.get("peer_vip")),
                _rel(r, "obj_peer_vip"),
                _ms(r.get("peer_knapsack")),
            ]
        )
    lines += [md_table(hdr, rows), ""]
    exps = []
    for key, name in (
        ("ours_vip", "ours vip"),
        ("ours_knapsack", "ours knapsack"),
        ("slsqp", "SLSQP"),
        ("bisection", "bisection"),
        ("dp", "Knapsack DP"),
        ("peer_vip", "authors' code"),
        ("peer_knapsack", "KnapsackRL code"),
    ):
        xs = [r["m"] for r in sol if key in r]
        if len(xs) >= 2:
            exps.append(f"{name} {_slope(xs, [r[key] for r in sol if key in r]):.2f}")
    if exps:
        lines += ["Scaling exponents in M: " + ", ".join(exps) + ".", ""]
    if res["peer_code"]:
        lines += [f"Peer code loaded from `{res['peer_code']}` (fetched locally, not committed).", ""]
        notes = sorted({r["peer_knapsack_note"] for r in sol if "peer_knapsack_note" in r})
        lines += [f"KnapsackRL code: {n}." for n in notes] + ([""] if notes else [])
    else:
        lines += ["Peer public code: not given (`--peer-code DIR` with the peers' files times it too).", ""]
    if res["gp_windows"]:
        default = res.get("gp_max_points")
        rows = [
            [
                f"{w['max_points']}{' (default)' if w['max_points'] == default else ''}",
                _ms(w["plan"]),
                _ms(w.get("embed")),
                _ms(w.get("predict")),
                _ms(w.get("solve")),
            ]
            for w in res["gp_windows"]
        ]
        lines += [
            f"## Exact GP window (`max_points`) at M = {res['window_m']}, {res['histories'][-1]:,} history rows",
            "",
            md_table(["max_points", "plan() ms", "embed ms", "predict (fit + predict) ms", "solve ms"], rows),
            "",
        ]
        fits = [(w["max_points"], w["predict"]) for w in res["gp_windows"]]
        lines += [
            "Predict-time exponent in the window size: "
            f"{_slope([f[0] for f in fits], [f[1] for f in fits]):.2f}. Largest window keeping plan() under 1 s: "
            + (str(max((w["max_points"] for w in res["gp_windows"] if w["plan"] < 1.0), default="none")) + "."),
            "",
        ]
        plot_lines(
            {
                "plan() seconds": (
                    [w["max_points"] for w in res["gp_windows"]],
                    [[w["plan"]] for w in res["gp_windows"]],
                )
            },
            out / "overhead_gp_window.png",
            xlabel="GP window (max_points rows)",
            ylabel="seconds",
            title=f"plan() vs exact-GP window, M={res['window_m']}",
            logx=True,
            logy=True,
            hline=1.0,
        )
        lines += ["![gp window](overhead_gp_window.png)", ""]
    if res.get("token_speed"):
        from vipalloc.bench.overhead_tokens import token_speed_lines

        lines += token_speed_lines(res["token_speed"])
    path = out / "overhead.md"
    path.write_text("\n".join(lines))
    return path
