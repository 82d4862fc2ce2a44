"""A small, readable online RL trainer (CleanRL style) for verifiable-reward arithmetic on CPU.

Per step::

    prompts = sample M from the training pool
    plan    = allocator.plan(ids, prompts, budget = M * n_mean, step)       # how many rollouts each prompt gets
    rollouts: counts[i] samples of prompt i (temperature 1); reward = exact match (0/1)
    allocator.observe(ids, rewards, step, lengths)                          # lengths: generated tokens
    advantages per prompt group (any size; grouped by prompt id) -> one policy-gradient update

Loss normalisation: each rollout's summed completion log-probability is weighted by its advantage and by
``1 / (n_i * M_kept)``, i.e. the mean over a prompt's rollouts, then the mean over kept prompts, divided by the
constant ``max_new_tokens`` (Dr.GRPO's length-unbiased constant normaliser). A prompt's gradient is thus the
estimator's per-prompt average whatever its group size, which is the quantity whose variance VIP models.

DAPO dynamic sampling (``strategy="dapo"``): generate uniform groups for the step's prompts and further fresh
batches (at most ``dapo_max_batches``), keep only mixed groups (0 < successes < n) up to M of them; EVERY generated
rollout counts toward the cumulative budget, so DAPO is compared at equal cumulative rollouts.

Token mode (``token_budget``): the plan spends at most ``T`` generated tokens a step (``sum_i n_i c_i <= T``, ``c_i``
the allocator's expected tokens per rollout, learnt from the lengths observed), the rollout budget kept as a cap.
Every step logs its generated tokens (``tokens_used``, ``cum_tokens``), its wall-clock (``cum_seconds``) and the
``vip/tokens_*`` telemetry.

Determinism and resume: all randomness comes from seeded generators whose states are checkpointed with the model,
optimizer, allocator and metrics; a resumed run reproduces the uninterrupted run's metrics exactly.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vipalloc import Allocator, Plan
from vipalloc._io import atomic_write_text
from vipalloc.budget import BudgetSpec, StepBudget
from vipalloc.strategies import TWO_PHASE_STRATEGIES
from vipalloc.telemetry import COUNTS_TAG
from vipalloc.training.checkpoint import CKPT_NAME, CheckpointError, read_checkpoint, write_checkpoint
from vipalloc.training.config import TrainConfig
from vipalloc.training.evaluation import eval_metrics
from vipalloc.training.generation import resolve_device, sample, sequence_logprobs, token_logprobs
from vipalloc.training.losses import group_advantages
from vipalloc.training.model import CharTokenizer, build_policy
from vipalloc.training.tasks import Problem, final_answer, make_problems, reward
from vipalloc.training.two_phase import TwoPhaseRound, two_phase_round
from vipalloc.training.update import NO_UPDATE, policy_update
from vipalloc.training.warmup import warmup_policy

__all__ = [  # the generation and warm-up helpers keep their old import path
    "CKPT_NAME",
    "RunResult",
    "Trainer",
    "budget_spec",
    "checkpoint_config",
    "evaluate",
    "resolve_device",
    "same_run",
    "sample",
    "sequence_logprobs",
    "token_logprobs",
    "train",
    "warmup_policy",
]

METRICS_NAME = "metrics.jsonl"
#: options that may differ between a killed run and its resumption (they do not change what is computed)
RESUME_FREE = frozenset({"steps", "threads", "tensorboard", "ckpt_every", "run_dir"})


def same_run(a: TrainConfig, b: TrainConfig) -> bool:
    """Whether a checkpoint written under config ``a`` may be resumed under config ``b``."""
    return a.model_dump(exclude=set(RESUME_FREE)) == b.model_dump(exclude=set(RESUME_FREE))


def checkpoint_config(run_dir: str | Path) -> TrainConfig | None:
    """The config stored in ``run_dir``'s checkpoint, or None when there is none (or it cannot be read safely)."""
    path = Path(run_dir) / CKPT_NAME
    if not path.exists():
        return None
    try:
        return TrainConfig.model_validate_json(read_checkpoint(path)["config"])
    except (CheckpointError, ValueError):  # a corrupt or foreign checkpoint: the caller decides (the demo restarts)
        return None


def budget_spec(cfg: TrainConfig) -> BudgetSpec:
    """The run's budget under the engine's one policy (:mod:`vipalloc.budget`): ``prompts_per_step x n_mean``
    rollouts; in token mode ``token_budget`` ("uniform" or tokens a step) with the rollouts capped at
    ``token_rollout_cap`` x that (two-phase strategies: the rollout budget itself, their pilot is sized from it),
    a first step priced at ``max_new_tokens`` a rollout."""
    two_phase = cfg.strategy in TWO_PHASE_STRATEGIES  # two generation rounds a step
    factor = 1.0 if two_phase else cfg.token_rollout_cap
    return BudgetSpec(
        rollouts=cfg.budget,
        tokens=cfg.token_budget,
        rollout_cap=None if factor is None else int(round(cfg.budget * factor)),
        max_length=cfg.max_new_tokens,
        least=max(cfg.n_min, cfg.pilot_n) if two_phase else None,
    )


@dataclass
class RunResult:
    """Paths and summary of a finished run."""

    run_dir: Path
    metrics: list[dict[str, Any]]
    plans: list[dict[str, Any]]


@dataclass
class StepRollouts:
    """One step's generation and the batch it trains on.

    ``plan``: the prediction made before generating (a two-phase step's pilot); ``final``: the plan whose metrics
    and variances are logged (the commit's); ``counts[i]``: rollouts prompt ``i`` got; ``owners[r]``, ``comps[r]``,
    ``rewards[r]``: rollout ``r``'s prompt index, completion (token ids) and reward; ``per_prompt[i]``: prompt
    ``i``'s rewards. ``train_*``: what the update sees (``train_owners`` index ``train_probs``): the step's own
    rollouts, a two-phase step's trained groups, or DAPO's kept mixed groups. ``used`` / ``tokens``: rollouts and
    tokens generated (DAPO's extra batches included); ``alloc_seconds``: time in the allocator.
    """

    plan: Plan
    final: Plan
    counts: np.ndarray
    owners: list[int]
    comps: list[list[int]]
    rewards: list[float]
    per_prompt: list[list[float]]
    train_probs: list[Problem]
    train_owners: list[int]
    train_comps: list[list[int]]
    train_rewards: list[float]
    alloc_seconds: float
    used: int = 0
    tokens: int = 0
    two_phase: TwoPhaseRound | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.used = self.used or len(self.owners)
        self.tokens = self.tokens or sum(len(c) for c in self.comps)


def evaluate(
    model: torch.nn.Module, tok: CharTokenizer, problems: list[Problem], samples: int, cfg: TrainConfig, seed: int
) -> dict[str, float]:
    """``samples`` temperature-1 samples of every held-out prompt, scored as the papers do
    (:func:`vipalloc.training.evaluation.eval_metrics`): ``eval_acc`` (mean@k), pass@k, maj@k, overall and per
    level, with their standard errors. ``seed`` fixes the sampling (and maj@k's subsets)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [p.prompt for p in problems for _ in range(samples)]
    comps = sample(model, tok, prompts, cfg.max_new_tokens, cfg.temperature, gen)
    texts = [final_answer(tok.decode(c), cfg.task) for c in comps]
    answers = [texts[i * samples : (i + 1) * samples] for i in range(len(problems))]
    return eval_metrics(answers, [p.answer for p in problems], [p.level for p in problems], seed=seed)


class Trainer:
    """Holds the policy, optimizer, allocator, data and RNGs of one run; :meth:`run` trains to ``cfg.steps``."""

    def __init__(self, cfg: TrainConfig, warm_state: dict[str, torch.Tensor] | None = None) -> None:
        self.cfg = cfg
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.tok = CharTokenizer()
        self.device = resolve_device(cfg.device)
        self.model = build_policy(cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head).to(self.device)
        warm = warm_state if warm_state is not None else warmup_policy(cfg)
        self.model.load_state_dict(warm)
        self.ref_model: torch.nn.Module | None = None
        if cfg.kl_coef > 0:  # frozen copy of the warm-up policy, the KL anchor
            self.ref_model = build_policy(cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head).to(self.device)
            self.ref_model.load_state_dict(warm)
            self.ref_model.requires_grad_(False)
        self.opt: torch.optim.Optimizer
        if cfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(
                self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
            )
        else:
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.pool = make_problems(cfg.pool_size, seed=cfg.pool_seed, levels=cfg.level_tuples, tag="t")
        self.eval_set = make_problems(cfg.eval_size, seed=cfg.pool_seed + 7919, levels=cfg.level_tuples, tag="e")
        if len({p.prompt_id for p in self.pool}) != len(self.pool):
            raise ValueError("the training pool repeats a prompt id; use another pool_seed or a smaller pool_size")
        self.alloc = _allocator(cfg)
        self.budget = budget_spec(cfg)
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        self.cum_rollouts = 0
        self.cum_tokens = 0
        self.metrics: list[dict[str, Any]] = []
        self.plans: list[dict[str, Any]] = []
        self.run_dir = Path(cfg.run_dir)

    # -------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> None:
        """Everything needed to continue identically, in one file written atomically (tensors and plain data)."""
        with tempfile.TemporaryDirectory() as tmpdir:
            apath = Path(tmpdir) / "allocator.json"
            self.alloc.save(apath)
            allocator = apath.read_text()
        write_checkpoint(
            self.run_dir,
            {
                "step": self.step,
                "cum_rollouts": self.cum_rollouts,
                "cum_tokens": self.cum_tokens,
                "model": self.model.state_dict(),
                "opt": self.opt.state_dict(),
                "allocator": allocator,
                "np_rng": json.dumps(self.rng.bit_generator.state),
                "torch_gen": self.gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "metrics": json.dumps(self.metrics),
                "plans": json.dumps(self.plans),
                "config": self.cfg.model_dump_json(),
            },
        )

    def load_checkpoint(self) -> bool:
        """Restore the last checkpoint of ``run_dir`` if there is one; returns whether it did. Raises
        :class:`~vipalloc.training.checkpoint.CheckpointError` for a file that cannot be read safely and
        ``ValueError`` for one written by another configuration."""
        path = self.run_dir / CKPT_NAME
        if not path.exists():
            return False
        payload = read_checkpoint(path)  # on the CPU; load_state_dict moves to the device
        if not same_run(TrainConfig.model_validate_json(payload["config"]), self.cfg):
            raise ValueError(f"{path} was written by a different configuration; use another run_dir or the same config")
        self.step = int(payload["step"])
        self.cum_rollouts = int(payload["cum_rollouts"])
        self.cum_tokens = int(payload.get("cum_tokens", 0))  # checkpoints before token counting have none
        self.model.load_state_dict(payload["model"])
        self.opt.load_state_dict(payload["opt"])
        with tempfile.TemporaryDirectory() as tmpdir:
            apath = Path(tmpdir) / "allocator.json"
            apath.write_text(payload["allocator"])
            self.alloc = Allocator.load(apath)
        self.rng.bit_generator.state = json.loads(payload["np_rng"])
        self.gen.set_state(payload["torch_gen"])
        torch.set_rng_state(payload["torch_rng"])
        self.metrics = json.loads(payload["metrics"])
        self.plans = json.loads(payload["plans"])
        return True

    def _write_metrics(self) -> None:
        # Rewritten from the checkpointed list: after a resume the file holds exactly the uninterrupted run's lines.
        atomic_write_text(self.run_dir / METRICS_NAME, "".join(json.dumps(m) + "\n" for m in self.metrics))

    # -------------------------------------------------------------- one step
    def train_step(self) -> dict[str, Any]:
        """One step: draw prompts, plan and generate (one or two rounds), fill DAPO's batch, update, log."""
        t0 = time.perf_counter()
        for group in self.opt.param_groups:  # linear lr ramp over the first lr_warmup_steps (a function of the step)
            group["lr"] = self.cfg.lr * min(1.0, (self.step + 1) / max(self.cfg.lr_warmup_steps, 1))
        idx = self.rng.choice(len(self.pool), size=self.cfg.candidate_prompts, replace=False)
        problems = [self.pool[i] for i in idx]
        gen = (
            self._two_phase_rollouts(problems)
            if self.cfg.strategy in TWO_PHASE_STRATEGIES
            else self._plan_rollouts(problems)
        )
        if self.cfg.strategy == "dapo":
            self._dapo_fill(gen)
        upd = self._update(gen)
        self.cum_rollouts += gen.used
        self.cum_tokens += gen.tokens
        rec = self._record(gen, upd, time.perf_counter() - t0)
        self.plans.append(
            {
                "step": self.step,
                "counts": gen.counts.tolist(),
                "p_mean": gen.plan.p_mean.round(5).tolist(),
                "rate": _success_rates(gen.per_prompt).tolist(),
                **({"pilot": gen.plan.counts.tolist()} if gen.two_phase is not None else {}),
            }
        )
        return rec

    def _step_budget(self, problems: list[Problem]) -> StepBudget:
        """This step's budget for the batch (:func:`budget_spec` resolved by the engine's policy)."""
        return self.budget.resolve(self.alloc, [p.prompt_id for p in problems], self.step, [p.prompt for p in problems])

    def _plan_rollouts(self, problems: list[Problem]) -> StepRollouts:
        """One round: plan, generate ``counts[i]`` rollouts of prompt ``i``, observe rewards and lengths."""
        ids = [p.prompt_id for p in problems]
        ta = time.perf_counter()
        budget = self._step_budget(problems)
        plan = self.alloc.plan(ids, prompts=[p.prompt for p in problems], step=self.step, **budget.kwargs())
        t_alloc = time.perf_counter() - ta
        counts = plan.counts.copy()
        owners, comps, rewards = self._rollouts(problems, counts)
        per_prompt = [[r for o, r in zip(owners, rewards) if o == i] for i in range(len(problems))]
        ta = time.perf_counter()
        self.alloc.observe(ids, per_prompt, step=self.step, lengths=_group_lengths(owners, comps, len(problems)))
        t_alloc += time.perf_counter() - ta
        return StepRollouts(
            plan, plan, counts, owners, comps, rewards, per_prompt, problems, owners, comps, rewards, t_alloc
        )

    def _two_phase_rollouts(self, problems: list[Problem]) -> StepRollouts:
        """Pilot round, commit round (:func:`vipalloc.training.two_phase.two_phase_round`); both observe their
        lengths, and in token mode the pilot's tokens come off the step's budget."""
        ta = time.perf_counter()
        budget = self._step_budget(problems)
        t_budget = time.perf_counter() - ta
        assert budget.rollouts is not None  # budget_spec: two-phase steps always carry the rollout budget
        tp = two_phase_round(
            self.alloc,
            problems,
            self._rollouts,
            budget=budget.rollouts,
            step=self.step,
            pilot_n=self.cfg.pilot_n,
            token_budget=budget.tokens,
            expected_lengths=None if budget.expected_lengths is None else budget.expected_lengths.tolist(),
        )
        return StepRollouts(
            tp.pilot,  # the prediction made before generating
            tp.commit,
            tp.commit.group_sizes,
            tp.owners,
            tp.comps,
            tp.rewards,
            tp.per_prompt,
            tp.train_probs,  # each trained prompt's whole group; pilot_commit: committed prompts only
            tp.train_owners,
            tp.train_comps,
            tp.train_rewards,
            tp.alloc_seconds + t_budget,
            two_phase=tp,
        )

    def _rollouts(self, problems: list[Problem], counts: np.ndarray) -> tuple[list[int], list[list[int]], list[float]]:
        """``counts[i]`` samples of ``problems[i]``: ``(owners, completions, rewards)``, one entry per rollout; a
        completion's length (``len``) is its generated tokens, end-of-sequence included, at most max_new_tokens."""
        owners = [i for i, c in enumerate(counts) for _ in range(int(c))]
        comps = sample(
            self.model,
            self.tok,
            [problems[i].prompt for i in owners],
            self.cfg.max_new_tokens,
            self.cfg.temperature,
            self.gen,
        )
        rewards = [reward(self.tok.decode(c), problems[i].answer, self.cfg.task) for c, i in zip(comps, owners)]
        return owners, comps, rewards

    def _update(self, gen: StepRollouts) -> Mapping[str, float | None]:
        """Group advantages (any group size) and the policy-gradient update on the step's training batch."""
        owners_t = torch.tensor(gen.train_owners, dtype=torch.long)
        rewards_t = torch.tensor(gen.train_rewards, dtype=torch.float64)
        adv = group_advantages(rewards_t, owners_t, self.cfg.loss) if len(gen.train_owners) else torch.zeros(0)
        if not len(gen.train_owners) or float(adv.abs().sum()) == 0:
            return NO_UPDATE
        prompts = [p.prompt for p in gen.train_probs]
        return policy_update(
            self.model,
            self.opt,
            self.ref_model,
            self.tok,
            self.cfg,
            self.rng,
            prompts,
            gen.train_owners,
            gen.train_comps,
            adv,
        )

    def _dapo_fill(self, gen: StepRollouts) -> None:
        """DAPO dynamic sampling: keep the mixed groups (0 < successes < n); draw fresh uniform batches until
        ``prompts_per_step`` are kept or ``dapo_max_batches`` were drawn. Every generated rollout and token counts
        (``gen.used``, ``gen.tokens``); ``gen.train_*`` become the kept groups."""
        cfg = self.cfg
        kept_probs: list[Problem] = []
        kept_owners: list[int] = []
        kept_comps: list[list[int]] = []
        kept_rewards: list[float] = []

        def take(probs: list[Problem], groups: list[list[float]], comps_: list[list[int]], owners_: list[int]) -> None:
            for i, g in enumerate(groups):
                if len(kept_probs) >= cfg.prompts_per_step:
                    return
                if 0 < sum(g) < len(g):
                    j = len(kept_probs)
                    kept_probs.append(probs[i])
                    rows = [k for k, o in enumerate(owners_) if o == i]
                    kept_owners.extend([j] * len(rows))
                    kept_comps.extend(comps_[k] for k in rows)
                    kept_rewards.extend(g)

        take(gen.train_probs, gen.per_prompt, gen.comps, gen.owners)
        for _ in range(cfg.dapo_max_batches - 1):
            if len(kept_probs) >= cfg.prompts_per_step:
                break
            idx = self.rng.choice(len(self.pool), size=cfg.prompts_per_step, replace=False)
            extra = [self.pool[i] for i in idx]
            o2, c2, r2 = self._rollouts(extra, np.full(len(extra), cfg.n_mean))
            gen.used += len(o2)
            gen.tokens += sum(len(c) for c in c2)
            take(extra, [[r for o, r in zip(o2, r2) if o == i] for i in range(len(extra))], c2, o2)
        gen.train_probs, gen.train_owners, gen.train_comps, gen.train_rewards = (
            kept_probs,
            kept_owners,
            kept_comps,
            kept_rewards,
        )

    def _record(self, gen: StepRollouts, upd: Mapping[str, float | None], seconds: float) -> dict[str, Any]:
        """The step's metrics line: the plan's and the outcome's ``vip/*`` telemetry (:mod:`vipalloc.telemetry`:
        where the budget went, against the pre-generation prediction), rollouts and tokens, the update's
        diagnostics, timings; a two-phase step adds each round's share."""
        cfg = self.cfg
        succ = np.array([sum(g) for g in gen.per_prompt])
        n_arr = np.array([len(g) for g in gen.per_prompt])
        gen_mask = n_arr > 0
        lengths = _group_lengths(gen.owners, gen.comps, len(gen.per_prompt))
        outcome = self.alloc.outcome_metrics(gen.per_prompt, gen.plan, lengths=lengths, max_length=cfg.max_new_tokens)
        rec: dict[str, Any] = {
            "step": self.step,
            **_finite_token_metrics(gen.final.metrics()),
            **_finite_token_metrics(outcome),
            "rollouts_used": int(gen.used),
            "cum_rollouts": int(self.cum_rollouts),
            "tokens_used": int(gen.tokens),  # every generated token of the step (DAPO's extra batches included)
            "cum_tokens": int(self.cum_tokens),
            "frac_all_correct": float(np.mean(succ[gen_mask] == n_arr[gen_mask])),
            "frac_all_wrong": float(np.mean(succ[gen_mask] == 0)),
            "expected_variance": float(gen.final.expected_variance),
            "uniform_variance": float(gen.final.uniform_variance),
            **upd,
            "alloc_seconds": gen.alloc_seconds,
            "step_seconds": seconds,
        }
        # training wall-clock so far (evaluations excluded), from the records: correct across kills and resumes
        rec["cum_seconds"] = sum(float(r.get("step_seconds", 0.0)) for r in self.metrics) + rec["step_seconds"]
        tp = gen.two_phase
        if tp is not None:  # two rounds: where the budget went, what trained, each round's generation time
            n_pilot = int(tp.pilot.counts.sum())
            rec.update(
                pilot_rollouts=n_pilot,
                commit_rollouts=int(tp.commit.counts.sum()),
                pilot_tokens=int(sum(len(c) for c in tp.comps[:n_pilot])),
                trained_prompts=int(tp.commit.train_mask.sum()),
                pilot_gen_seconds=tp.gen_seconds[0],
                commit_gen_seconds=tp.gen_seconds[1],
            )
            if tp.commit.expected_lengths is not None:  # the commit's extra rollouts at their expected lengths
                rec["commit_tokens_planned"] = float(tp.commit.counts @ tp.commit.expected_lengths)
        if not (np.isfinite(rec["loss"]) and np.isfinite(rec["grad_norm"])):
            raise FloatingPointError(f"non-finite loss at step {self.step}")
        return rec

    # -------------------------------------------------------------- loop
    def run(
        self, progress: Callable[[int, int, dict[str, Any]], None] | None = None, stop_after: int | None = None
    ) -> RunResult:
        """Train until ``cfg.steps`` (resuming from ``run_dir`` if a checkpoint exists). ``stop_after`` ends early
        after that many steps of this call (used by tests to simulate a kill)."""
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.load_checkpoint():
            self._write_metrics()  # drop lines a killed process wrote after its last checkpoint
        writer = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=self.step)
        done_here = 0
        if self.step == 0 and not self.metrics:
            ev = evaluate(self.model, self.tok, self.eval_set, cfg.eval_samples, cfg, seed=cfg.seed + 10_000)
            self.metrics.append({"step": -1, "cum_rollouts": 0, "cum_tokens": 0, "cum_seconds": 0.0, **ev})
        while self.step < cfg.steps:
            rec = self.train_step()
            self.step += 1
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                te = time.perf_counter()
                rec.update(
                    evaluate(
                        self.model, self.tok, self.eval_set, cfg.eval_samples, cfg, seed=cfg.seed + 10_000 + self.step
                    )
                )
                rec["eval_seconds"] = time.perf_counter() - te
            self.metrics.append(rec)
            if writer is not None:
                for k, v in rec.items():
                    if k != "step" and isinstance(v, (int, float)):
                        writer.add_scalar(k, v, rec["step"])
                writer.add_histogram(COUNTS_TAG, np.asarray(self.plans[-1]["counts"]), rec["step"])
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save_checkpoint()
                self._write_metrics()
            if progress is not None:
                progress(self.step, cfg.steps, rec)
            done_here += 1
            if stop_after is not None and done_here >= stop_after:
                break
        if writer is not None:
            writer.close()
        self._write_metrics()
        return RunResult(self.run_dir, self.metrics, self.plans)


def _finite_token_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` without the token metrics that are NaN (the outcome shares of a step that generated nothing; the
    plan's own token keys are left out by the engine where they do not apply): NaN is not valid JSON and never
    equals itself, so a resumed run's records could not match the uninterrupted run's."""
    return {
        k: v
        for k, v in metrics.items()
        if not (k.startswith(("vip/token", "vip/frac_truncated")) and isinstance(v, float) and v != v)
    }


def _allocator(cfg: TrainConfig) -> Allocator:
    """The run's :class:`~vipalloc.Allocator`. DAPO plans uniform groups; uniform plans ignore predictions, so they
    get the cheap empirical predictor (their wall time is not charged for a GP they do not use; their logged
    predictor error is then the empirical predictor's)."""
    strategy = "uniform" if cfg.strategy == "dapo" else cfg.strategy
    predictor = "empirical" if strategy == "uniform" else cfg.predictor
    return Allocator.from_settings(  # n_min, n_max, seed, embedder: the config's own
        cfg,
        strategy=strategy,
        predictor=predictor,
        estimator="rloo" if cfg.loss == "rloo" else "drgrpo",
        predictor_kwargs=cfg.predictor_kwargs if predictor == cfg.predictor else None,
        strategy_kwargs={"pool_factor": cfg.pilot_pool_factor} if cfg.strategy == "pilot_commit" else None,
    )


def _success_rates(per_prompt: list[list[float]]) -> np.ndarray:
    """Each prompt's share of correct rollouts, float ``(M,)``; NaN for a prompt that got none."""
    succ = np.array([sum(g) for g in per_prompt])
    n_arr = np.array([len(g) for g in per_prompt])
    return np.where(n_arr > 0, succ / np.maximum(n_arr, 1), np.nan)


def _group_lengths(owners: list[int], comps: list[list[int]], m: int) -> list[list[int]]:
    """Generated tokens of each rollout grouped by prompt (``m`` groups, in rollout order): observe's lengths."""
    out: list[list[int]] = [[] for _ in range(m)]
    for o, c in zip(owners, comps):
        out[o].append(len(c))
    return out


def train(cfg: TrainConfig, progress=None, warm_state=None, stop_after: int | None = None) -> RunResult:
    """Build a :class:`Trainer` for ``cfg`` and run it (resumes from ``cfg.run_dir`` when a checkpoint exists)."""
    return Trainer(cfg, warm_state=warm_state).run(progress=progress, stop_after=stop_after)
