"""``vipalloc bench predictors``: next-step calibration of every predictor (Brier, log loss, MAE, Spearman) on
simulator traces and on a trace of the real CPU trainer, split into seen and never-seen prompts; and the next-step
error of the allocator's length model (``Allocator.expected_lengths``) against model-free baselines
(:mod:`vipalloc.bench.length_eval`).
:func:`run_predictors` returns its raw results and writes ``predictors.md`` / ``predictors.json``.

Predictors are reached through :class:`vipalloc.Allocator` (``plan`` predicts, ``observe`` learns), exactly as a
trainer would use them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc.bench.length_eval import LengthErrors, length_baselines, realised_mean, step_lengths
from vipalloc.bench.progress import Progress, noop
from vipalloc.bench.sim_lengths import SimLengthModel, expected_length, prompt_length_factors, sample_lengths
from vipalloc.bench.simulator import PromptStream, SimConfig, Simulator
from vipalloc.reporting import fmt_ci, git_commit, md_table, provenance

__all__ = [
    "PREDICTOR_SPECS",
    "Trace",
    "replay_predictor",
    "run_predictors",
    "simulator_trace",
    "trainer_trace",
]


@dataclass
class Trace:
    """Rollout outcomes of a run, step by step: per step the prompt ids, texts, successes and trials (int arrays,
    aligned), and in simulations the true success probabilities at that step (else None). Optional per step:
    ``tokens`` (float ``(4, M)``: the history's token columns, see :mod:`vipalloc.bench.length_eval`) and, in
    simulations, ``expected_length`` (float ``(M,)``, the true expected tokens per rollout before the cap)."""

    name: str
    steps: list[dict[str, Any]]

    def save(self, path: str | Path) -> None:
        """JSON Lines, one step per line (arrays as lists)."""
        from vipalloc._io import atomic_write_text

        lines = []
        for st in self.steps:
            rec = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in st.items()}
            lines.append(json.dumps(rec))
        atomic_write_text(path, "".join(line + "\n" for line in lines))

    @classmethod
    def load(cls, path: str | Path, name: str | None = None) -> Trace:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"{p}: no such trace file")
        steps = []
        for lineno, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                st = {
                    "step": int(rec["step"]),
                    "ids": [str(i) for i in rec["ids"]],
                    "texts": [str(t) for t in rec["texts"]],
                    "successes": np.asarray(rec["successes"], np.int64),
                    "trials": np.asarray(rec["trials"], np.int64),
                    "p_true": None if rec.get("p_true") is None else np.asarray(rec["p_true"], np.float64),
                }
                for key in ("tokens", "expected_length"):  # optional (traces written before lengths lack them)
                    if rec.get(key) is not None:
                        st[key] = np.asarray(rec[key], np.float64)
            except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
                raise ValueError(f"{p}: line {lineno}: not a trace step ({exc})") from None
            steps.append(st)
        if not steps:
            raise ValueError(f"{p}: the trace is empty")
        return cls(name or p.stem, steps)


def simulator_trace(
    cfg: SimConfig,
    seed: int,
    *,
    steps: int = 60,
    batch: int = 64,
    n_rollouts: int = 8,
    new_frac: float = 0.25,
    pool: int = 512,
    lengths: SimLengthModel | None = None,
) -> Trace:
    """A simulated training run with uniform allocation (``n_rollouts`` each), recorded as a :class:`Trace`.

    Rollouts have lengths (:mod:`vipalloc.bench.sim_lengths`, ``lengths`` or its defaults; a rollout cut at the cap
    scores 0), recorded as the step's token columns.

    Each step's batch has ``round(new_frac * batch)`` never-seen prompts (drawn once from a reserve) and the rest
    from a recurring pool of ``pool`` prompts visited in epochs, so every step scores both kinds. The policy learns
    (Dr.GRPO updates, ``cfg.sigma`` noise), so success rates drift as in training.
    """
    from vipalloc import Allocator

    n_new = int(round(new_frac * batch))
    n_old = batch - n_new
    if n_old > pool:
        raise ValueError(f"the recurring part of a batch ({n_old}) exceeds the pool ({pool})")
    sim = Simulator(cfg.with_(n_prompts=pool + n_new * steps), seed)
    stream = PromptStream(pool, seed)
    rng_r = np.random.default_rng([seed, 11])
    rng_g = np.random.default_rng([seed, 12])
    rng_l = np.random.default_rng([seed, 13])  # length noise: its own stream
    lcfg = lengths or SimLengthModel()
    factors = prompt_length_factors(sim, lcfg)
    alloc = Allocator(strategy="uniform", predictor="empirical", n_min=2, n_max=max(2, n_rollouts), seed=seed)
    out = []
    for t in range(steps):
        idx = np.concatenate(
            [stream.next(n_old) if n_old else np.zeros(0, np.int64), pool + t * n_new + np.arange(n_new)]
        )
        ids = [sim.ids[i] for i in idx]
        plan = alloc.plan(ids, budget=n_rollouts * len(idx), step=t)
        p = sim.true_p(idx)
        smp = sample_lengths(sim, idx, sim.rollouts(idx, plan.counts, rng_r), rng_l, lcfg, factors, n_rollouts)
        rewards = smp.rewards
        alloc.observe(ids, rewards, step=t, lengths=smp.lengths)
        ok = [r > 0 for r in rewards]
        out.append(
            {
                "step": t,
                "ids": ids,
                "texts": [sim.texts[i] for i in idx],
                "successes": np.array([int(r.sum()) for r in rewards], np.int64),
                "trials": np.array([len(r) for r in rewards], np.int64),
                "p_true": p,
                "tokens": np.array(
                    [
                        [float(ln[o].sum()) for ln, o in zip(smp.lengths, ok)],
                        [float(ln[~o].sum()) for ln, o in zip(smp.lengths, ok)],
                        [float(o.sum()) for o in ok],
                        [float((~o).sum()) for o in ok],
                    ]
                ),
                "expected_length": expected_length(p, factors[idx], lcfg),
            }
        )
        sim.update(sim.gradient(idx, rewards, rng_g, p=p))
    return Trace(f"simulator seed {seed}", out)


def trainer_trace(
    out_dir: str | Path,
    *,
    steps: int = 60,
    prompts_per_step: int = 32,
    n_mean: int = 8,
    pool_size: int = 256,
    seed: int = 0,
    progress: Progress = noop,
) -> Trace:
    """Run the real CPU trainer (uniform allocation, Dr.GRPO) and record its rollout outcomes as a :class:`Trace`.

    A run folder under ``out_dir`` is reused (the trainer resumes from its checkpoint), so a second call is fast.
    """
    from vipalloc.training.config import TrainConfig
    from vipalloc.training.trainer import Trainer, checkpoint_config, same_run, warmup_policy

    cfg = TrainConfig(
        run_dir=str(Path(out_dir) / "trace_run"),
        strategy="uniform",
        predictor="empirical",
        embedder="hashing",
        seed=seed,
        steps=steps,
        prompts_per_step=prompts_per_step,
        n_mean=n_mean,
        pool_size=pool_size,
        eval_every=max(steps, 1),
        ckpt_every=10,
        tensorboard=False,
    )
    progress("phase", {"name": "trainer trace: warm-up (cached)", "total": steps})
    old = checkpoint_config(cfg.run_dir)
    if Path(cfg.run_dir).exists() and (old is None or not same_run(old, cfg)):
        shutil.rmtree(cfg.run_dir)  # written by another configuration (e.g. an older version): trace afresh
    t0 = time.perf_counter()
    warm = warmup_policy(  # a line every tenth in a log: the first warm-up takes minutes
        cfg,
        on_tenth=lambda s, n, loss: progress(
            "eval", {"label": "warm-up", "step": f"{s}/{n}", "metric": "loss", "value": loss}
        ),
    )
    trainer = Trainer(cfg, warm_state=warm)
    trainer.run(progress=lambda s, n, rec: progress("advance", {}))
    progress(
        "run", {"label": "trainer trace", "seed": seed, "wall": time.perf_counter() - t0, "detail": f"{steps} steps"}
    )
    texts = {p.prompt_id: p.prompt for p in trainer.pool}
    hist = trainer.alloc.history
    rows = hist.rows()
    order = np.argsort(rows["step"], kind="stable")  # iter_steps' order: by step, insertion order within a step
    cols = np.stack(
        [rows[k][order] for k in ("tokens_success", "tokens_fail", "token_rollouts_success", "token_rollouts_fail")]
    )
    out = []
    at = 0
    for step, ids, succ, trials in hist.iter_steps():
        tok = cols[:, at : at + len(ids)].astype(np.float64)
        at += len(ids)
        out.append(
            {
                "step": int(step),
                "ids": list(ids),
                "texts": [texts[i] for i in ids],
                "successes": np.asarray(succ, np.int64),
                "trials": np.asarray(trials, np.int64),
                "p_true": None,
                "tokens": tok if hist.has_lengths else None,
            }
        )
    return Trace(f"CPU trainer (seed {seed}, {steps} steps, pool {pool_size})", out)


PREDICTOR_SPECS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("gp (vipalloc)", "gp", {}),
    ("gp (paper)", "gp", {"preset": "paper"}),
    ("beta", "beta", {}),
    ("empirical", "empirical", {}),
    ("ridge", "ridge", {}),
)


def replay_predictor(
    trace: Trace, predictor: str, predictor_kwargs: dict[str, Any] | None = None, embedder: str = "hashing"
) -> dict[str, Any]:
    """Replay ``trace`` through an ``Allocator(strategy="uniform", predictor=...)``: at each step predict the
    batch (``plan``), score against what the step produced, then ``observe`` it. Step 0 is not scored (nothing to
    predict from). Returns metrics for all / seen-before / never-seen prompts and the mean seconds per step."""
    from vipalloc import Allocator
    from vipalloc.predictors.metrics import calibration_metrics, merge_metrics

    n_max = max(2, max(int(st["trials"].max()) for st in trace.steps))
    alloc = Allocator(
        strategy="uniform",
        predictor=predictor,
        n_min=2,
        n_max=n_max,
        embedder=embedder,
        predictor_kwargs=predictor_kwargs,
    )
    seen: set[str] = set()
    parts: dict[str, list[dict[str, Any]]] = {"all": [], "seen": [], "never seen": []}
    len_err = LengthErrors()
    secs = []
    for st in trace.steps:
        ids, s, n = st["ids"], st["successes"], st["trials"]
        if predictor == "oracle":
            if st["p_true"] is None:
                raise ValueError("the oracle predictor needs a trace with true p (a simulator trace)")
            alloc.predictor.set_true_p(ids, st["p_true"])
        tokens = st.get("tokens")
        mask_seen = np.array([i in seen for i in ids])
        if tokens is not None and alloc.history.has_lengths:  # the length model's next-step prediction
            pred = alloc.expected_lengths(ids, step=st["step"], prompts=st["texts"])
            if pred is not None:
                len_err.add(pred.expected, realised_mean(np.asarray(tokens, np.float64)), mask_seen)
        t0 = time.perf_counter()
        # budget = the step's rollouts; the uniform plan only has to cover every prompt's rollouts
        plan = alloc.plan(
            ids, prompts=st["texts"], budget=min(int(n.max()) * len(ids), n_max * len(ids)), step=st["step"]
        )
        rewards = [np.r_[np.ones(si), np.zeros(ni - si)] for si, ni in zip(s, n)]
        lens = step_lengths(s, n, None if tokens is None else np.asarray(tokens, np.float64))
        alloc.observe(ids, rewards, step=st["step"], lengths=None if tokens is None else lens)
        secs.append(time.perf_counter() - t0)
        if st["step"] > trace.steps[0]["step"]:
            pt = st["p_true"]
            for key, mask in (("all", np.ones(len(ids), bool)), ("seen", mask_seen), ("never seen", ~mask_seen)):
                if mask.any():
                    parts[key].append(
                        calibration_metrics(plan.p_mean[mask], s[mask], n[mask], None if pt is None else pt[mask])
                    )
        seen.update(ids)
    return {
        "metrics": {k: merge_metrics(v) for k, v in parts.items()},
        "length": len_err.result(),
        "seconds_per_step": float(np.mean(secs)),
    }


_CAL_COLS = ("brier", "log_loss", "mae_rate", "spearman_rate", "mae_true", "spearman_true")


def run_predictors(
    out_dir: str | Path = "reports",
    *,
    seeds: int = 3,
    steps: int = 60,
    batch: int = 64,
    pool: int = 512,
    config: SimConfig | None = None,
    train_trace: bool = True,
    train_steps: int = 60,
    trace_path: str | Path | None = None,
    minilm: bool = True,
    command: str = "vipalloc bench predictors",
    progress: Progress = noop,
) -> dict[str, Any]:
    """Next-step calibration of every predictor on simulator traces (``seeds`` of them, with the oracle as the
    noise floor) and on one trace of the real CPU trainer. Writes ``predictors.md`` / ``predictors.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config or SimConfig()
    commit = git_commit()
    t_start = time.perf_counter()
    specs = list(PREDICTOR_SPECS)
    sim_specs = specs + [("oracle (true p)", "oracle", {})]
    sim_res: dict[str, list[dict[str, Any]]] = {lbl: [] for lbl, _, _ in sim_specs}
    sim_len_base: list[dict[str, Any]] = []
    progress("phase", {"name": "simulator traces", "total": seeds * len(sim_specs)})
    for seed in range(seeds):
        trace = simulator_trace(cfg, seed, steps=steps, batch=batch, pool=pool)
        sim_len_base.append(length_baselines(trace.steps))
        if seed == 0:
            trace.save(out / "predictors_sim_trace_seed0.jsonl")
        for lbl, name, kw in sim_specs:
            t0 = time.perf_counter()
            sim_res[lbl].append(replay_predictor(trace, name, kw))
            progress("advance", {})
            brier = sim_res[lbl][-1]["metrics"]["all"]["brier"]
            progress(
                "run",
                {
                    "label": f"{lbl} on simulator trace",
                    "seed": seed,
                    "wall": time.perf_counter() - t0,
                    "detail": f"Brier {brier:.4f}",
                },
            )
    train_res: dict[str, dict[str, Any]] = {}
    train_len_base: dict[str, Any] = {}
    train_name = None
    if train_trace or trace_path is not None:
        if trace_path is not None:
            tr = Trace.load(trace_path)
        else:
            tr = trainer_trace(out / "predictors_train", steps=train_steps, progress=progress)
            tr.save(out / "predictors_train_trace.jsonl")
        train_name = tr.name
        train_len_base = length_baselines(tr.steps)
        t_specs = list(specs)
        if minilm:
            t_specs.append(("gp (vipalloc, MiniLM)", "gp", {}))
        progress("phase", {"name": "trainer trace replay", "total": len(t_specs)})
        for lbl, name, kw in t_specs:
            emb = "minilm" if "MiniLM" in lbl else "hashing"
            t0 = time.perf_counter()
            try:
                train_res[lbl] = replay_predictor(tr, name, kw, embedder=emb)
                detail = f"Brier {train_res[lbl]['metrics']['all']['brier']:.4f}"
            except ImportError as exc:  # MiniLM not installed: say so in the report
                train_res[lbl] = {"error": str(exc)}
                detail = f"not run ({exc})"
            progress("advance", {})
            progress(
                "run", {"label": f"{lbl} on the trainer trace", "wall": time.perf_counter() - t0, "detail": detail}
            )
    elapsed = time.perf_counter() - t_start
    result = {
        "commit": commit,
        "config": cfg.to_dict(),
        "seeds": seeds,
        "steps": steps,
        "batch": batch,
        "elapsed_s": elapsed,
        "simulator": sim_res,
        "trainer": train_res,
        "trainer_trace": train_name,
        "length_baselines": {"simulator": sim_len_base, "trainer": train_len_base},
    }
    (out / "predictors.json").write_text(json.dumps(result, default=float))
    # ---- report
    lines = [
        "# Predictor calibration (next-step)",
        "",
        provenance(
            command,
            {
                "simulator traces": f"{seeds} seeds x {steps} steps x {batch} prompts x 8 rollouts (uniform), 25% "
                f"of each batch never seen before; sigma={cfg.sigma:g}, lr={cfg.lr:g}; embedder hashing",
                "trainer trace": train_name or "not run",
                "wall time": f"{elapsed:.0f} s",
            },
            commit=commit,
        ),
        "At each step every predictor (through `Allocator.plan`) predicts the batch's success probabilities",
        "before seeing that step's rollouts; then the rollouts are observed. Scores per prompt, averaged over",
        "prompts and steps (step 0 excluded): Brier and log loss per rollout, MAE and Spearman correlation of the",
        "prediction vs the realised rate (a noisy target: even the true p has MAE > 0 there, see the oracle row) and,",
        "in the simulator, vs the true p. *seen*: prompts observed at an earlier step; *never seen*: first appearance.",
        "",
        "## Simulator traces (mean ± 95% CI over seeds)",
        "",
    ]
    headers = [
        "predictor",
        "prompts",
        "Brier",
        "log loss",
        "MAE vs rate",
        "Spearman vs rate",
        "MAE vs true p",
        "Spearman vs true p",
        "ms/step",
    ]
    for subset in ("all", "seen", "never seen"):
        rows = []
        for lbl, rs in sim_res.items():
            mets = [r["metrics"][subset] for r in rs]
            rows.append(
                [lbl, f"{np.mean([m['count'] for m in mets]):.0f}"]
                + [fmt_ci([m[c] for m in mets]) for c in _CAL_COLS]
                + [fmt_ci([1e3 * r["seconds_per_step"] for r in rs], digits=1)]
            )
        lines += [f"### {subset} prompts", "", md_table(headers, rows), ""]
    if train_res:
        lines += [f"## Real CPU trainer trace: {train_name}", "", "One trace (no true p: only realised rates).", ""]
        h2 = ["predictor", "subset", "prompts", "Brier", "log loss", "MAE vs rate", "Spearman vs rate", "ms/step"]
        rows = []
        for lbl, r in train_res.items():
            if "error" in r:
                rows.append([lbl, "—", "—", r["error"], "", "", "", ""])
                continue
            for subset in ("all", "seen", "never seen"):
                m = r["metrics"][subset]
                rows.append(
                    [lbl, subset, str(m["count"])]
                    + [f"{m[c]:.4f}" if np.isfinite(m[c]) else "—" for c in _CAL_COLS[:4]]
                    + [f"{1e3 * r['seconds_per_step']:.1f}"]
                )
        lines += [md_table(h2, rows), ""]
    lines += _length_lines(sim_res, sim_len_base, train_res, train_len_base)
    (out / "predictors.md").write_text("\n".join(lines))
    return result


def _length_lines(
    sim_res: dict[str, list[dict[str, Any]]],
    sim_base: list[dict[str, Any]],
    train_res: dict[str, dict[str, Any]],
    train_base: dict[str, Any],
) -> list[str]:
    """The report's length section: next-step MAE of log length, seen / never-seen prompts."""
    subsets = ("all", "seen", "never seen")
    lines = [
        "## Length model: next-step error of log length",
        "",
        "`Allocator.expected_lengths` (the expected tokens per rollout `p L_success + (1 - p) L_fail` that token",
        "budgets plan with; `p` from the row's predictor) at each step, from earlier steps only, against the prompt's",
        "realised mean tokens per rollout at that step: mean |log predicted - log realised| (0.1 ~ 10% off).",
        "Baselines: the global mean tokens per rollout so far; the prompt's mean at its last step (never-seen: the",
        "global mean). The simulator's oracle is the true expected length before the cap (its error is the noise of",
        "a group's mean). Prompts scored in brackets.",
        "",
    ]
    rows = []
    for lbl, rs in sim_res.items():
        if not rs or "length" not in rs[0]:
            continue
        cells = [f"{lbl} (allocator)"]
        for sub in subsets:
            vals = [r["length"][sub]["mae_log"] for r in rs]
            cells.append(f"{fmt_ci(vals)} ({np.mean([r['length'][sub]['count'] for r in rs]):.0f})")
        rows.append(cells)
    for name in sim_base[0] if sim_base else []:
        cells = [name]
        for sub in subsets:
            vals = [b[name][sub]["mae_log"] for b in sim_base]
            cells.append(f"{fmt_ci(vals)} ({np.mean([b[name][sub]['count'] for b in sim_base]):.0f})")
        rows.append(cells)
    if rows:
        lines += ["**Simulator traces** (mean ± 95% CI over seeds)", "", md_table(["length predictor", *subsets], rows)]
        lines.append("")
    t_rows = []
    for lbl, r in train_res.items():
        if "length" in r and r["length"]["all"]["count"]:
            t_rows.append(
                [f"{lbl} (allocator)"]
                + [f"{r['length'][sub]['mae_log']:.3f} ({r['length'][sub]['count']})" for sub in subsets]
            )
    for name, d in train_base.items():
        if d["all"]["count"]:
            t_rows.append([name] + [f"{d[sub]['mae_log']:.3f} ({d[sub]['count']})" for sub in subsets])
    if t_rows:
        lines += ["**CPU trainer trace**", "", md_table(["length predictor", *subsets], t_rows), ""]
    elif train_res:
        lines += ["The CPU trainer trace has no lengths (a trace written before lengths were recorded).", ""]
    return lines
