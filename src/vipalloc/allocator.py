"""The :class:`Allocator` facade: the one object trainers, integrations, benchmarks and the CLI use.

Per training step::

    plan = allocator.plan(prompt_ids, prompts=texts, budget=B, step=t)   # how many rollouts each prompt gets
    ... generate plan.counts[i] rollouts for prompt i (skip prompts with count 0), score them ...
    allocator.observe(prompt_ids, rewards, step=t)                       # one reward array per prompt

Under a token budget (what users pay: generated tokens), report the rollouts' lengths and plan by tokens::

    plan = allocator.plan(prompt_ids, prompts=texts, step=t, token_budget=T)   # sum_i n_i c_i <= T
    allocator.observe(prompt_ids, rewards, step=t, lengths=token_counts)       # one length array per prompt

Two-phase strategies (``vip_two_phase``, ``pilot_commit``; :mod:`vipalloc.strategies.two_phase`) split a step
in two rounds::

    pilot = allocator.plan_pilot(prompt_ids, prompts=texts, budget=B, step=t, pilot_n=2)   # counts: pilot rollouts
    allocator.observe(prompt_ids, pilot_rewards, step=t)
    commit = allocator.plan_commit(step=t)                 # counts: EXTRA rollouts; pilot + commit == B exactly
    allocator.observe(prompt_ids, commit_rewards, step=t)  # train on each prompt's whole group (commit.train_mask)

Data flows one way: rewards -> :class:`~vipalloc.history.RolloutHistory` -> predictor -> p -> variance model ->
strategy -> counts. ``save``/``load`` keep the whole state (configuration, predictor, history, embedding cache,
outstanding plans) in one checksummed JSON file written atomically, and a loaded allocator plans bit-identically.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from vipalloc._args import as_ids, check_int
from vipalloc._io import StateFileError, atomic_write_json, read_json_checked
from vipalloc.allocator_steps import StepPlanner
from vipalloc.budget import check_rollout_budget
from vipalloc.defaults import (
    DEFAULT_EMBEDDER,
    DEFAULT_ESTIMATOR,
    DEFAULT_N_MAX,
    DEFAULT_N_MIN,
    DEFAULT_PREDICTOR,
    DEFAULT_SEED,
    DEFAULT_STRATEGY,
    DEFAULT_SUCCESS_THRESHOLD,
)
from vipalloc.forecast import Forecaster
from vipalloc.history import RolloutHistory, aggregate_duplicates, validate_lengths, validate_rewards
from vipalloc.plan import Plan, plan_variance, step_permutation
from vipalloc.predictors.length import LengthModel, LengthPrediction
from vipalloc.settings import validate_settings
from vipalloc.strategies import AllocationContext, Strategy, get_strategy, uniform_counts
from vipalloc.strategies.two_phase import (
    PilotState,
)
from vipalloc.strategies.uniform import uniform_token_counts
from vipalloc.telemetry import outcome_metrics

__all__ = ["Allocator", "Plan"]

FORMAT = "vipalloc.allocator"
# Version 2 adds outstanding two-phase pilots ("pilots"); version 3 stores the history's counts behind its token
# sums as token_rollouts_* (were lengths_*: an older reader would drop every length, so it must refuse the file).
# Versions 1 and 2 still load.
VERSION = 3


class Allocator(StepPlanner):
    """Decide how many rollouts each prompt of a batch gets, and learn from the outcomes.

    Every parameter but ``history_window`` and ``length_kwargs`` is a shared setting of :mod:`vipalloc.settings`
    (its default, range and error message are the same on every surface: CLI, TRL, verl, CPU trainer).

    Parameters
    ----------
    strategy:
        ``uniform``, ``vip`` (default: the authors' settings), ``vip_pure``, ``inverse_acc``, ``inverse_var``,
        ``knapsack``, ``gvm``, ``vip_authors`` (the authors' whole procedure), ``dynamo`` or ``hora`` (see
        :mod:`vipalloc.strategies`; the last two read the reward history and the predictor's std); the two-phase
        ``vip_two_phase`` and ``pilot_commit`` are planned with :meth:`plan_pilot` / :meth:`plan_commit` instead of
        :meth:`plan`.
    predictor:
        ``gp`` (default), ``beta``, ``empirical``, ``ridge`` or ``oracle`` (see :mod:`vipalloc.predictors`).
    estimator:
        The policy-gradient estimator whose variance is minimised: ``drgrpo`` or ``rloo``. (Train with GRPO
        if you like; its variance is not a usable allocation target, so allocate with ``drgrpo``.)
    n_min, n_max:
        Bounds on the rollouts of a kept prompt (``2 <= n_min <= n_max``; defaults 2 and 32).
    seed:
        Seeds the tie-breaking permutation of each step (the plan is a deterministic function of seed, step,
        inputs and state).
    embedder:
        Prompt features for predictors that use them: ``auto`` (packaged all-MiniLM-L6-v2 if installed, else a
        hashing embedder), ``minilm`` or ``hashing``.
    success_threshold:
        A rollout succeeds when its reward is ``>= success_threshold``.
    history_window:
        Steps of history kept for :meth:`history_aggregates` (``None``: all). The history itself keeps every row.
    length_kwargs:
        Options of the response-length model (:class:`~vipalloc.predictors.length.LengthModel`:
        ``prior_strength``, ``ridge``, ``min_prompts``).
    """

    def __init__(
        self,
        strategy: str = DEFAULT_STRATEGY,
        predictor: str = DEFAULT_PREDICTOR,
        estimator: str = DEFAULT_ESTIMATOR,
        n_min: int = DEFAULT_N_MIN,
        n_max: int = DEFAULT_N_MAX,
        seed: int = DEFAULT_SEED,
        *,
        embedder: str = DEFAULT_EMBEDDER,
        success_threshold: float = DEFAULT_SUCCESS_THRESHOLD,
        predictor_kwargs: dict[str, Any] | None = None,
        strategy_kwargs: dict[str, Any] | None = None,
        history_window: int | None = None,
        length_kwargs: dict[str, Any] | None = None,
    ) -> None:
        from vipalloc.predictors import make_predictor

        # the shared settings, checked once by their one schema (vipalloc.settings)
        checked = validate_settings(
            {
                "strategy": strategy,
                "predictor": predictor,
                "estimator": estimator,
                "n_min": n_min,
                "n_max": n_max,
                "seed": seed,
                "embedder": embedder,
                "success_threshold": success_threshold,
                "predictor_kwargs": predictor_kwargs,
                "strategy_kwargs": strategy_kwargs,
            }
        )
        self.n_min, self.n_max, self.seed = checked["n_min"], checked["n_max"], checked["seed"]
        self.estimator = estimator
        self.strategy_name = strategy
        self.predictor_name = predictor
        self.embedder_name = embedder
        self.predictor_kwargs = checked["predictor_kwargs"]
        self.strategy_kwargs = checked["strategy_kwargs"]
        self.history_window = history_window
        self.length_kwargs = dict(length_kwargs or {})
        try:
            self.length_model = LengthModel(**self.length_kwargs)
        except TypeError as exc:
            raise ValueError(f"bad length_kwargs: {exc}") from None
        self.strategy: Strategy = get_strategy(strategy, estimator=estimator, **self.strategy_kwargs)
        # features, predictor and length model, with each (batch, step)'s forecast computed once (vipalloc.forecast)
        self._fc = Forecaster(
            make_predictor(predictor, **self.predictor_kwargs), predictor, embedder, self.length_model, history_window
        )
        self.history = RolloutHistory(success_threshold=success_threshold)
        self._pending: dict[int, dict[str, int]] = {}  # step -> {prompt_id: planned count}
        self._pilots: dict[int, PilotState] = {}  # step -> outstanding two-phase pilot (see plan_pilot)
        self._last_step = -1

    # ------------------------------------------------------------------ features and forecasts
    @property
    def success_threshold(self) -> float:
        return self.history.success_threshold

    @property
    def predictor(self) -> Any:
        """The success-probability predictor. Reaching it from outside may change it (e.g. the oracle's
        ``set_true_p``), so every cached forecast is dropped: the next plan predicts afresh."""
        self._fc.invalidate()
        return self._fc.predictor

    @predictor.setter
    def predictor(self, value: Any) -> None:
        self._fc.invalidate()
        self._fc.predictor = value

    @property
    def _cache(self) -> Any:
        """The prompt-embedding cache (None until a feature-based predictor needed one)."""
        return self._fc.cache

    # ------------------------------------------------------------------ plan / observe
    def plan(
        self,
        prompt_ids: Sequence[Any],
        prompts: Sequence[str] | None = None,
        budget: int | None = None,
        step: int | None = None,
        *,
        token_budget: float | None = None,
        expected_lengths: Sequence[float] | np.ndarray | None = None,
    ) -> Plan:
        """Allocate ``budget`` rollouts, or ``token_budget`` generated tokens, over the batch ``prompt_ids`` at
        training ``step``.

        ``prompts`` are the prompt texts (needed the first time a prompt is seen by feature-based predictors).
        ``step`` defaults to one past the last step planned or observed.

        * ``budget`` alone: the counts sum to ``budget`` exactly (feasible: ``[M n_min, M n_max]``).
        * ``token_budget`` (tokens): the counts satisfy ``sum_i n_i c_i <= token_budget`` where ``c_i`` is the
          expected tokens per rollout (``plan.expected_lengths``: from the lengths given to :meth:`observe`, see
          :class:`~vipalloc.predictors.length.LengthModel`, or ``expected_lengths`` when given); ``budget``, when
          given too, caps the rollouts (``sum n <= budget``). ``plan.optimality_gap`` is the certified relative gap
          (0.0 when exact); strategies without a token mode refuse (``ValueError`` with the reason).

        Raises ``ValueError`` for an empty batch, duplicate ids, an infeasible budget (the message names the
        feasible range) or a token budget without any length to predict from; nothing is recorded then.
        """
        if self.strategy.two_phase:
            raise ValueError(
                f"strategy {self.strategy_name!r} is two-phase: call plan_pilot(ids, prompts, budget=B, step=t), "
                "observe the pilot rewards, then plan_commit(step=t) and observe the extra rollouts; plan() cannot "
                "run it"
            )
        ids = as_ids(prompt_ids)
        m = len(ids)
        budget, tokens, given, step = self._budget_args(ids, budget, token_budget, expected_lengths, step)
        if budget is not None:  # refused before embedding: the feature caches keep the first text given for an id
            check_rollout_budget(budget, m, self.n_min, self.n_max, cap=tokens is not None)
        if tokens is not None and self.strategy.token_refusal is not None:
            raise ValueError(
                f"strategy {self.strategy_name!r} cannot plan under a token budget: {self.strategy.token_refusal}"
            )
        fc = self._forecast(ids, prompts, step)
        p_mean, p_std, timings = fc.p_mean.copy(), fc.p_std.copy(), dict(fc.timings)
        t0 = time.perf_counter()
        c = given if given is not None else self._lengths(fc, ids, step)
        perm, inv = step_permutation(self.seed, step, m)
        ctx = None
        if self.strategy.uses_context:  # dynamo, hora: std and reward history (before step)
            rows = self.history.rows(self.history_window, before_step=step)
            ctx = AllocationContext.from_history(ids, p_std, self.history.prompt_ids, rows).take(perm)
        gap = 0.0
        if tokens is None:
            assert budget is not None
            counts = self.strategy.allocate(p_mean[perm], budget, self.n_min, self.n_max, context=ctx)
            counts = np.asarray(counts, np.int64)[inv]
            if counts.shape != (m,) or int(counts.sum()) != budget:
                raise RuntimeError(
                    f"strategy {self.strategy_name!r} returned an invalid plan (sum {counts.sum()} != {budget})"
                )
            # The uniform plan at the same budget, with the remainder on the same (permuted) prompts.
            uniform = uniform_counts(m, budget)[inv]
        else:
            assert c is not None
            res = self.strategy.allocate_tokens(
                p_mean[perm], tokens, c[perm], self.n_min, self.n_max, max_rollouts=budget, context=ctx
            )
            counts, gap = np.asarray(res.counts, np.int64)[inv], float(res.gap)
            if counts.shape != (m,) or float(counts @ c) > tokens * (1 + 1e-9) + 1e-6:
                raise RuntimeError(f"strategy {self.strategy_name!r} returned a plan over the token budget")
            # The uniform plan at the same tokens (and rollout cap), its remainder on the same permuted prompts.
            uniform = uniform_token_counts(c[perm], tokens, self.n_max, budget)[inv]
        timings["solve"] = time.perf_counter() - t0
        return self._issue(
            step,
            ids,
            counts,
            p_mean,
            p_std,
            budget=int(counts.sum()),
            expected=plan_variance(p_mean, counts, self.estimator),
            uniform=plan_variance(p_mean, uniform, self.estimator),
            timings=timings,
            min_keep_relaxed=bool(self.strategy.last_min_keep_relaxed),
            expected_lengths=c,
            expected_tokens=None if c is None else float(counts @ c),
            token_budget=tokens,
            optimality_gap=gap,
            uniform_counts=np.asarray(uniform, np.int64),
        )

    def expected_lengths(
        self, prompt_ids: Sequence[Any], step: int | None = None, *, prompts: Sequence[str] | None = None
    ) -> LengthPrediction | None:
        """The length model's prediction for a batch (tokens per rollout, by outcome and expected, each float64
        ``(M,)``) at ``step``, from the history before it; None before any length was observed. Uses the current
        success predictions (and the prompts' features when the predictor has them: ``prompts``, the texts, are
        needed for prompts it has never seen, as in :meth:`plan`). Forecast once per batch and step: a
        :meth:`plan` of the same batch and step that follows reuses the prediction."""
        ids = as_ids(prompt_ids)
        step = self._last_step + 1 if step is None else check_int("step", step, 0)
        if not self.history.has_lengths:
            return None
        return self._fc.lengths(self._forecast(ids, prompts, step), ids, step, self.history)

    def observe(
        self,
        prompt_ids: Sequence[Any],
        rewards: Sequence[Any],
        step: int,
        lengths: Sequence[Any] | None = None,
        *,
        phase: str | None = None,
    ) -> None:
        """Record the rewards (and, optionally, the lengths) of the rollouts generated for a plan made at ``step``.

        ``lengths``: None, or one entry per prompt aligned with ``rewards``: None (unknown) or the generated tokens
        of each of its rollouts, whole numbers >= 0 in the order of its rewards. Lengths feed the length model
        that token budgets plan with (``plan(..., token_budget=T)``); a wrong count raises and records nothing.

        ``rewards`` holds one 1-D array per prompt with as many entries as rollouts came back, each finite and in
        ``[0, 1]``. Rules for degraded input: fewer rewards than planned is accepted (failed generations are simply
        not counted); more than planned, rewards for a prompt that was never planned at ``step`` or that the plan
        dropped, NaN/inf or out-of-range values raise ``ValueError`` and record nothing. Prompts with no rewards
        (empty arrays) are skipped.

        ``phase`` (two-phase steps): None = the step's current phase; ``"pilot"`` marks pilot rollouts, which may
        arrive after :meth:`plan_commit` (asynchronous generation): they are then checked against the pilot's
        unreported rollouts and recorded as pilot outcomes, never as the commit's.
        """
        ids = as_ids(prompt_ids)
        step = check_int("step", step, 0)
        if len(rewards) != len(ids):
            raise ValueError(f"got {len(ids)} prompt ids but {len(rewards)} reward arrays; pass one array per prompt")
        if phase not in (None, "pilot", "commit"):
            raise ValueError(f"phase must be None, 'pilot' or 'commit', got {phase!r}")
        pilot = self._pilots.get(step)
        if phase is not None and pilot is None:
            raise ValueError(f"phase={phase!r} is for two-phase steps; step {step} has no pilot")
        if phase == "commit" and pilot is not None and pilot.extra is None:
            raise ValueError(f"step {step} has no commit yet: call plan_commit(step={step}) before its rewards")
        late_pilot = phase == "pilot" and pilot is not None and pilot.extra is not None
        planned = self._pending.get(step)
        if late_pilot:  # pilot rollouts still owed after the commit: validate against those, not the commit's
            assert pilot is not None
            planned = {pid: int(pilot.counts[i] - pilot.trials[i]) for pid, i in pilot.index.items()}
        if planned is None:
            known = sorted(self._pending)
            raise ValueError(
                f"no plan was made at step {step} (outstanding plans: steps {known[-5:]}); call plan(..., step={step}) "
                "before observe, with the same step"
            )
        unknown = [pid for pid in ids if pid not in planned]
        again = [pid for pid in unknown if pilot is not None and pid in pilot.index]
        if again:  # planned at this two-phase step, and its rewards of this phase were already recorded
            raise ValueError(
                f"rewards of {len(again)} prompt id(s) were already observed in this phase of step {step}: "
                f"{again[:5]}; report each prompt's rollouts of a phase once (the pilot's before plan_commit, the "
                "extra rollouts after it)"
            )
        if unknown:
            raise ValueError(
                f"rewards reported for {len(unknown)} prompt id(s) not planned at step {step}: {unknown[:5]}; "
                "report only prompts of that step's plan"
            )
        arrs = [validate_rewards(pid, r) for pid, r in zip(ids, rewards)]
        if lengths is not None:
            if isinstance(lengths, (str, bytes)) or len(lengths) != len(ids):
                raise ValueError(
                    f"got {len(ids)} prompt ids but {len(lengths)} length arrays; pass one per prompt (None = unknown)"
                )
            lens: list[np.ndarray | None] = [
                None if ln is None else validate_lengths(pid, ln, a.size) for pid, ln, a in zip(ids, lengths, arrs)
            ]
        for pid, a in zip(ids, arrs):
            if a.size > planned[pid]:
                raise ValueError(
                    f"prompt {pid!r} got {a.size} rewards but its plan at step {step} had {planned[pid]} rollouts; "
                    "report exactly the rollouts the plan asked for"
                )
        keep = [i for i, a in enumerate(arrs) if a.size > 0]
        if not keep:
            return
        kept_ids = [ids[i] for i in keep]
        kept = [arrs[i] for i in keep]
        kept_lens = None if lengths is None else [lens[i] for i in keep]
        thr = self.success_threshold
        successes = np.array([int(np.count_nonzero(a >= thr)) for a in kept], np.int64)
        trials = np.array([a.size for a in kept], np.int64)
        # The predictor validates and may raise; do it before touching the history so a failure records nothing.
        self._fc.invalidate()  # new evidence: the step's forecasts are stale
        self._fc.predictor.observe(kept_ids, successes, trials, step)
        self.history.extend_validated(step, kept_ids, kept, lengths=kept_lens)  # validated above: not again
        if not late_pilot:
            for pid in kept_ids:  # each planned prompt is observed once (per phase, for a two-phase step)
                del planned[pid]
        if pilot is not None and (pilot.extra is None or late_pilot):  # pilot outcomes (the commit's evidence)
            pos = [pilot.index[pid] for pid in kept_ids]
            pilot.successes[pos] += successes
            pilot.trials[pos] += trials
            if pilot.tokens is not None and pilot.lengths is not None:  # tokens spent: reported, else predicted
                spent = [
                    float(ln.sum()) if ln is not None else float(pilot.lengths[i] * a.size)
                    for i, a, ln in zip(pos, kept, kept_lens or [None] * len(kept))
                ]
                pilot.tokens[pos] += spent
        self._last_step = max(self._last_step, step)

    # ------------------------------------------------------------------ helpers
    def outcome_metrics(
        self,
        rewards: Sequence[Any],
        plan: Plan | None = None,
        *,
        lengths: Sequence[Any] | None = None,
        max_length: int | None = None,
    ) -> dict[str, float]:
        """What came back, as ``vip/...`` scalars (:func:`vipalloc.telemetry.outcome_metrics`).

        ``rewards``: one array per prompt, as passed to :meth:`observe`; with ``plan`` (same prompt order) the
        prediction error ``vip/pred_abs_err`` is filled in. ``lengths`` (as passed to :meth:`observe`) adds the
        token metrics (``vip/tokens_generated``, tokens in zero-variance groups, on prompts predicted hopeless or
        solved), ``max_length`` (tokens) the share of rollouts cut there. Uses this allocator's success threshold.
        """
        if plan is not None and len(plan.prompt_ids) != len(rewards):
            raise ValueError(
                f"plan has {len(plan.prompt_ids)} prompts but rewards has {len(rewards)} groups; pass one reward "
                "array per prompt of the plan, in its order"
            )
        return outcome_metrics(
            rewards,
            success_threshold=self.success_threshold,
            p_mean=None if plan is None else plan.p_mean,
            lengths=lengths,
            max_length=max_length,
        )

    def uniform_tokens(
        self, prompt_ids: Sequence[Any], n: int, step: int | None = None, *, prompts: Sequence[str] | None = None
    ) -> float | None:
        """The tokens the uniform plan of ``n`` rollouts per prompt is predicted to spend on this batch,
        ``n * sum_i c_i`` (the length model's expected tokens per rollout), or None before any length was observed:
        the default token budget of the plug-ins' token mode ("spend what uniform would have spent"). ``prompts``:
        the texts, for prompts a feature-based predictor has never seen (as in :meth:`plan`)."""
        pred = self.expected_lengths(prompt_ids, step, prompts=prompts)
        return None if pred is None else float(check_int("n", n, 1) * pred.expected.sum())

    def expected_variance(self, p: Any, counts: Any) -> float:
        """Summed estimator variance of ``counts`` under success probabilities ``p`` (e.g. the true p)."""
        return float(plan_variance(np.asarray(p, np.float64), np.asarray(counts, np.int64), self.estimator))

    def ingest_history(self, history: RolloutHistory) -> None:
        """Replay a recorded history (e.g. from ``vipalloc allocate --history``) into this allocator, step by step."""
        for step, ids, succ, trials in history.iter_steps():
            texts = [history.prompt_text(pid) for pid in ids]
            if getattr(self._fc.predictor, "needs_features", False):
                missing = [pid for pid, t in zip(ids, texts) if t is None and not self._fc.embedding_cache().has(pid)]
                if missing:
                    raise ValueError(
                        f"history has no prompt text for {len(missing)} prompt(s) (e.g. {missing[:3]}) and the "
                        f"{self.predictor_name!r} predictor needs features: add a 'prompt' field to their first row, "
                        "or use --predictor beta/empirical"
                    )
                uniq = list(dict.fromkeys(ids))
                self._fc.register_features(uniq, [history.prompt_text(p) or "" for p in uniq], self.history)
            agg_ids, agg_s, agg_t = aggregate_duplicates(ids, succ, trials)
            self._fc.invalidate()
            self._fc.predictor.observe(agg_ids, agg_s, agg_t, step)
            self._last_step = max(self._last_step, step)
        if len(self.history) == 0:  # an empty allocator takes the history whole (its success threshold too)
            self.history = RolloutHistory.from_state_dict(history.state_dict())
        else:
            self.history.merge(history)

    # ------------------------------------------------------------------ construction from settings
    @classmethod
    def from_settings(cls, settings: Any, *, names: Mapping[str, str] | None = None, **overrides: Any) -> Allocator:
        """An allocator built from a front-end's settings: any object with attributes (a pydantic model, a
        dataclass) or a mapping that carries constructor parameters (``strategy``, ``n_min``, ``seed``, ...).

        ``names`` maps a parameter to the settings' own name for it (e.g. ``{"seed": "allocator_seed"}``);
        ``overrides`` win over the settings. A parameter the settings lack, or set to None where the constructor's
        default is not None, keeps the constructor's default. The one way a config becomes an ``Allocator``."""
        names = dict(names or {})
        unknown = sorted(set(names) - set(_PARAMS))
        if unknown:
            raise ValueError(f"names maps unknown Allocator parameter(s) {unknown}; choose from {sorted(_PARAMS)}")
        kwargs: dict[str, Any] = {}
        for param, default in _PARAMS.items():
            key = names.get(param, param)
            if isinstance(settings, Mapping):
                present, value = key in settings, settings.get(key)
            else:
                present, value = hasattr(settings, key), getattr(settings, key, None)
            if present and (value is not None or default is None):
                kwargs[param] = value
        kwargs.update(overrides)
        return cls(**kwargs)

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        """Constructor arguments, enough to rebuild an empty allocator of the same kind."""
        return {
            "strategy": self.strategy_name,
            "predictor": self.predictor_name,
            "estimator": self.estimator,
            "n_min": self.n_min,
            "n_max": self.n_max,
            "seed": self.seed,
            "embedder": self.embedder_name,
            "success_threshold": self.success_threshold,
            "predictor_kwargs": self.predictor_kwargs,
            "strategy_kwargs": self.strategy_kwargs,
            "history_window": self.history_window,
            "length_kwargs": self.length_kwargs,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this allocator is."""
        pending_steps = sorted(self._pending)
        return {
            "config": self.config(),
            "predictor": self._fc.predictor.state_dict(),
            "history": self.history.state_dict(),
            "embeddings": None if self._cache is None else self._cache.state_dict(),
            "embedder_name": None if self._fc.embedder is None else getattr(self._fc.embedder, "name", None),
            "pending_steps": pending_steps,
            "pending": [
                {"ids": list(self._pending[s]), "counts": np.array(list(self._pending[s].values()), np.int64)}
                for s in pending_steps
            ],
            "last_step": self._last_step,
            "pilots": [{"step": s, **self._pilots[s].to_state()} for s in sorted(self._pilots)],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the whole allocator state to one file, atomically (a crash leaves the previous file intact)."""
        atomic_write_json(path, FORMAT, VERSION, self.state_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Allocator:
        """Restore an allocator saved with :meth:`save`; it plans exactly as the saved one would.

        Raises :class:`~vipalloc._io.StateFileError` (a ``ValueError``) for missing, corrupt, truncated,
        foreign or newer-version files; nothing is modified.
        """
        _, state = read_json_checked(path, FORMAT, VERSION)
        try:
            cfg = dict(state["config"])
            history_window = cfg.pop("history_window", None)
            length_kwargs = cfg.pop("length_kwargs", None)  # absent in files written before token budgets
            alloc = cls(**cfg, history_window=history_window, length_kwargs=length_kwargs)
            alloc.predictor.load_state_dict(state["predictor"])
            alloc.history = RolloutHistory.from_state_dict(state["history"])
            if state.get("embeddings") is not None:
                cache = alloc._fc.embedding_cache()
                cache.load_state_dict(state["embeddings"])
            alloc._pending = {
                int(s): dict(zip(rec["ids"], np.asarray(rec["counts"]).tolist()))
                for s, rec in zip(state["pending_steps"], state["pending"])
            }
            alloc._last_step = int(state["last_step"])
            # version 1 files predate two-phase steps: no outstanding pilots
            alloc._pilots = {int(rec["step"]): PilotState.from_state(rec) for rec in state.get("pilots", [])}
        except StateFileError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError(f"{path}: allocator state is malformed ({exc.__class__.__name__}: {exc})") from None
        return alloc

    def __repr__(self) -> str:
        return (
            f"Allocator(strategy={self.strategy_name!r}, predictor={self.predictor_name!r}, "
            f"estimator={self.estimator!r}, n_min={self.n_min}, n_max={self.n_max}, seed={self.seed})"
        )


# the constructor's parameters and their defaults (what Allocator.from_settings reads from a config)
_PARAMS: dict[str, Any] = {
    name: par.default for name, par in inspect.signature(Allocator.__init__).parameters.items() if name != "self"
}
