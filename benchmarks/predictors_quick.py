"""Quick next-step calibration benchmark of the success predictors on synthetic RLVR-like traces.

Trace (``make_trace``): prompts with clustered unit-norm features; latent logit
``z_i(t) = a_cluster + b_i + g_cluster (0.5 + u_i) t`` (cluster difficulty, an idiosyncratic prompt offset the
features cannot explain, and learning that makes prompts easier at cluster-dependent speeds); every step a batch
of prompts is drawn and each gets ``n`` rollouts (``n`` in {2, 4, 8, 16}, as an adaptive allocator would give),
``s ~ Binomial(n, sigmoid(z))``. Two scenarios:

* ``random``: each step 25% of the batch are never-seen prompts, the rest are drawn from the seen ones;
* ``epochs``: a fixed dataset visited in shuffled epochs (as a trainer does), so every prompt is never-seen in
  epoch 1 and revisited once per epoch afterwards.

Protocol per step: register the batch's features (only then: late registration, as with the Allocator), predict,
draw outcomes, score, observe. Metrics (``vipalloc.predictors.metrics``): Brier, log loss, MAE vs the realised
rate and vs the true ``p``, MAE of ``p(1-p)``, Spearman vs the true ``p``; separately for seen and never-seen
prompts, step 0 excluded. Also the mean predict+observe time per step.

    .venv/bin/python benchmarks/predictors_quick.py            # both scenarios, 3 seeds
    .venv/bin/python benchmarks/predictors_quick.py --quick    # smaller, 1 seed
    .venv/bin/python benchmarks/predictors_quick.py --variant "ls04=length_scale=0.4" --only gp
    .venv/bin/python benchmarks/predictors_quick.py --timing   # observe+predict time, M=4096, 200k rows

On a machine shared by several jobs, set OPENBLAS_NUM_THREADS=1 (oversubscribed BLAS threads can be 10-50x slower).
"""

from __future__ import annotations

import argparse
import ast
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table
from scipy.special import expit

from vipalloc.predictors import GPPredictor, make_predictor
from vipalloc.predictors.metrics import calibration_metrics, merge_metrics


@dataclass
class Trace:
    """A synthetic training run: features, true success probabilities and each step's batch and outcomes."""

    ids: list[str]
    features: np.ndarray  # (N, d) unit-norm float32
    p_true: np.ndarray  # (steps, N)
    batches: list[np.ndarray]  # per step: prompt indices
    trials: list[np.ndarray]  # per step: rollouts per batch prompt
    successes: list[np.ndarray]  # per step


def make_trace(
    scenario: str = "random",
    n_prompts: int = 1500,
    steps: int = 60,
    batch: int = 128,
    dim: int = 64,
    n_clusters: int = 24,
    new_frac: float = 0.25,
    seed: int = 0,
) -> Trace:
    """Generate a trace (see the module docstring); deterministic in ``seed``."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    cluster = rng.integers(n_clusters, size=n_prompts)
    x = centers[cluster] + 0.09 * rng.normal(size=(n_prompts, dim))  # intra-cluster distance ~0.7, inter ~1.4
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    a = rng.normal(-0.8, 1.3, size=n_clusters)
    b = rng.normal(0.0, 1.0, size=n_prompts)
    g = rng.uniform(0.0, 0.08, size=n_clusters)
    u = rng.uniform(size=n_prompts)
    t = np.arange(steps)[:, None]
    p_true = expit(a[cluster] + b + g[cluster] * (0.5 + u) * t)
    batches: list[np.ndarray] = []
    if scenario == "random":
        order = rng.permutation(n_prompts)
        n_new = max(1, int(round(new_frac * batch)))
        used = min(batch, n_prompts)
        batches.append(order[:used])
        for _ in range(1, steps):
            seen = order[:used]
            new = order[used : used + n_new]
            used += len(new)
            old = rng.choice(seen, size=min(batch - len(new), len(seen)), replace=False)
            batches.append(np.concatenate([new, old]))
    elif scenario == "epochs":
        perm = rng.permutation(n_prompts)
        pos = 0
        for _ in range(steps):
            if pos + batch > n_prompts:
                perm, pos = rng.permutation(n_prompts), 0
            batches.append(perm[pos : pos + batch])
            pos += batch
    else:
        raise ValueError(f"unknown scenario {scenario!r}; choose random or epochs")
    trials = [rng.choice([2, 4, 8, 16], size=len(bt), p=[0.2, 0.3, 0.3, 0.2]) for bt in batches]
    successes = [rng.binomial(n, p_true[s, bt]) for s, (bt, n) in enumerate(zip(batches, trials))]
    return Trace([f"q{i}" for i in range(n_prompts)], x.astype(np.float32), p_true, batches, trials, successes)


def evaluate(factory: Callable[[], Any], trace: Trace, oracle: bool = False) -> dict[str, Any]:
    """Run one predictor over a trace; returns merged metrics for seen/unseen prompts and timings."""
    pred = factory()
    seen = np.zeros(len(trace.ids), dtype=bool)
    parts: dict[str, list[dict[str, float | int]]] = {"seen": [], "unseen": []}
    times = []
    for step, bt in enumerate(trace.batches):
        ids = [trace.ids[i] for i in bt]
        if oracle:
            pred.set_true_p(ids, trace.p_true[step, bt])
        pred.set_features(ids, trace.features[bt])
        t0 = time.perf_counter()
        p, _ = pred.predict(ids, step)
        t1 = time.perf_counter()
        s, n = trace.successes[step], trace.trials[step]
        if step > 0:
            for key, mask in (("seen", seen[bt]), ("unseen", ~seen[bt])):
                parts[key].append(calibration_metrics(p[mask], s[mask], n[mask], trace.p_true[step, bt][mask]))
        t2 = time.perf_counter()
        pred.observe(ids, s, n, step)
        times.append(t1 - t0 + time.perf_counter() - t2)
        seen[bt] = True
    return {"seen": merge_metrics(parts["seen"]), "unseen": merge_metrics(parts["unseen"]), "ms": 1e3 * np.mean(times)}


def predictor_factories(variants: dict[str, dict[str, Any]]) -> dict[str, tuple[Callable[[], Any], bool]]:
    facts: dict[str, tuple[Callable[[], Any], bool]] = {
        "gp:paper": (lambda: GPPredictor("paper"), False),
        "gp:vipalloc": (lambda: GPPredictor("vipalloc"), False),
        "gp:vipalloc+fit10": (lambda: GPPredictor("vipalloc", fit_every=10), False),
        "gp:vipalloc+calibrate": (lambda: GPPredictor("vipalloc", calibrate=True), False),
        "gp:vipalloc+gaussian": (lambda: GPPredictor("vipalloc", likelihood="gaussian"), False),
        "gp:vipalloc-own_history": (lambda: GPPredictor("vipalloc", own_history=False), False),
        "gp:vipalloc+max_points2048": (lambda: GPPredictor("vipalloc", max_points=2048), False),
        "beta": (lambda: make_predictor("beta"), False),
        "beta:lam0.8": (lambda: make_predictor("beta", lam=0.8), False),
        "empirical": (lambda: make_predictor("empirical"), False),
        "ridge": (lambda: make_predictor("ridge"), False),
        "oracle": (lambda: make_predictor("oracle"), True),
    }
    for name, kw in variants.items():
        preset = kw.pop("preset", "vipalloc")
        facts[f"gp:{name}"] = (lambda kw=kw, preset=preset: GPPredictor(preset, **kw), False)
    return facts


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name=key=value,key=value`` -> (name, kwargs); values are Python literals."""
    name, _, rest = text.partition("=")
    kw: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            kw[k.strip()] = ast.literal_eval(v.strip())
        except (ValueError, SyntaxError):
            kw[k.strip()] = v.strip()
    return name, kw


SCENARIOS = {
    "random": {"scenario": "random", "n_prompts": 1500, "steps": 60, "batch": 128},
    "epochs": {"scenario": "epochs", "n_prompts": 3072, "steps": 48, "batch": 256},
}
QUICK = {
    "random": {"scenario": "random", "n_prompts": 600, "steps": 30, "batch": 64},
    "epochs": {"scenario": "epochs", "n_prompts": 768, "steps": 24, "batch": 128},
}


def timing(console: Console, m: int = 4096, sizes: tuple[int, ...] = (1024, 2048), history: int = 200_000) -> None:
    """Wall-clock of one training step's ``observe`` (M rows) + ``predict`` (M prompts) with ``history`` rows
    already recorded, 384-d unit-norm features (MiniLM's size), for several ``max_points``; plus the first
    (cold, Laplace iterated to convergence) fit and the paper preset for reference. "CPU s" is the process CPU
    time of observe+predict: on a machine shared with other jobs it is the better measure of the work done."""
    rng = np.random.default_rng(0)
    n_prompts, dim = 5 * m, 384
    centers = rng.normal(size=(64, dim))
    x = centers[rng.integers(64, size=n_prompts)] + 0.08 * np.sqrt(dim / 64) * rng.normal(size=(n_prompts, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    ids = [f"q{i}" for i in range(n_prompts)]
    z = rng.normal(-0.5, 1.5, size=n_prompts)
    steps = history // m
    batches = [rng.choice(n_prompts, m, replace=False) for _ in range(steps + 2)]
    table = Table(title=f"GP step time: M={m} prompts per step, {steps * m} history rows, 384-d features")
    cols = ("predictor", "first predict (cold) s", "observe s", "predict s", "observe+predict s", "... CPU s")
    for col in cols:
        table.add_column(col)
    for name, kw in [(f"vipalloc max_points={k}", {"max_points": k}) for k in sizes] + [("paper", {"preset": "paper"})]:
        gp = GPPredictor(**kw)
        gp.set_features(ids, x)
        for step in range(steps):
            bt = batches[step]
            n = rng.choice([2, 4, 8, 16], size=m)
            gp.observe([ids[i] for i in bt], rng.binomial(n, expit(z[bt])), n, step)
        t0 = time.perf_counter()
        gp.predict([ids[i] for i in batches[steps]], steps)
        cold = time.perf_counter() - t0
        bt = batches[steps]
        n = rng.choice([2, 4, 8, 16], size=m)
        c0, t0 = time.process_time(), time.perf_counter()
        gp.observe([ids[i] for i in bt], rng.binomial(n, expit(z[bt])), n, steps)
        t1 = time.perf_counter()
        gp.predict([ids[i] for i in batches[steps + 1]], steps + 1)
        t2, c2 = time.perf_counter(), time.process_time()
        row = (f"{cold:.2f}", f"{t1 - t0:.3f}", f"{t2 - t1:.3f}", f"{t2 - t0:.3f}", f"{c2 - c0:.3f}")
        table.add_row(name, *row)
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller traces, one seed")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scenario", choices=["random", "epochs", "both"], default="both")
    ap.add_argument("--only", default="", help="comma-separated name prefixes of predictors to run")
    ap.add_argument("--variant", action="append", default=[], help='extra GP: "name=key=value,key=value"')
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    ap.add_argument("--timing", action="store_true", help="only time one step with 200k history rows")
    ap.add_argument("--timing-m", default="4096", help="comma-separated prompts per step for --timing")
    args = ap.parse_args()
    if args.timing:
        for m in map(int, args.timing_m.split(",")):
            timing(Console(width=200), m=m)
        return
    variants = dict(parse_variant(v) for v in args.variant)
    facts = predictor_factories(variants)
    if args.only:
        prefixes = tuple(args.only.split(","))
        facts = {k: v for k, v in facts.items() if k.startswith(prefixes) or k == "oracle"}
    configs = QUICK if args.quick else SCENARIOS
    seeds = range(1 if args.quick else args.seeds)
    console = Console(width=200)
    results: dict[str, dict[str, Any]] = {}
    for scen in ("random", "epochs") if args.scenario == "both" else (args.scenario,):
        traces = [make_trace(**configs[scen], seed=sd) for sd in seeds]
        res: dict[str, Any] = {}
        for name, (fac, is_oracle) in facts.items():
            runs = [evaluate(fac, tr, oracle=is_oracle) for tr in traces]
            res[name] = {part: merge_metrics([r[part] for r in runs]) for part in ("seen", "unseen")} | {
                "ms": float(np.mean([r["ms"] for r in runs]))
            }
        results[scen] = res
        cfg = configs[scen]
        table = Table(
            title=f"{scen}: {cfg['n_prompts']} prompts, {cfg['steps']} steps, batch {cfg['batch']}, "
            f"{len(traces)} seed(s) (lower is better except Spearman)"
        )
        table.add_column("predictor")
        for part in ("seen", "unseen"):
            for col in ("brier", "log_loss", "mae_true", "mae_var", "spearman_true"):
                table.add_column(f"{part} {col.replace('spearman_true', 'rho').replace('log_loss', 'logloss')}")
        table.add_column("ms/step")
        for name, r in res.items():
            cells = [
                f"{r[part][c]:.4f}"
                for part in ("seen", "unseen")
                for c in ("brier", "log_loss", "mae_true", "mae_var", "spearman_true")
            ]
            table.add_row(name, *cells, f"{r['ms']:.1f}")
        console.print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
