"""verl plug-in, part 2: :class:`VIPHook`, the allocator glue both trainer loops share.

Prompt identity (including the same prompt twice in one submission), planning, the uid -> (prompt, plan step)
bookkeeping, feedback with the group-size check that makes a silently ignored plan fail loudly, the shared ``vip/*``
metrics, and the allocator file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from vipalloc import Allocator, Plan
from vipalloc.budget import BudgetSpec, StepBudget, resolve_tokens
from vipalloc.integrations.verl.core import ALLOCATOR_FILE, SUPPORTED_VERL, VIPConfig, trim_to_multiple
from vipalloc.integrations.verl.layers import as_list, merge_plans, occurrence_layers, one_text_per_id, split_budget

__all__ = ["BatchPlan", "PlanNotAppliedError", "VIPHook"]

logger = logging.getLogger("vipalloc.integrations.verl")

_MAX_PLANS = 16  # plans kept for feedback (async v1 trainers observe a few steps after planning)


class PlanNotAppliedError(RuntimeError):
    """verl generated groups whose sizes differ from the plan: the hook points no longer do what the plug-in needs.

    Raised at feedback, before anything is recorded, instead of letting training run uniform while ``vip/*``
    metrics keep reporting the plan.
    """


@dataclass(frozen=True)
class BatchPlan:
    """The plan of one submission of ``R`` rows: ``counts`` int64 ``(R,)`` aligned with the rows.

    ``plans`` holds one :class:`vipalloc.Plan` per occurrence layer: the first occurrence of every prompt in
    ``plans[0]``, a second occurrence of a prompt (the same prompt twice in one submission, e.g. across an epoch
    boundary when verl fetches prompts one at a time) in ``plans[1]`` at the next plan step, and so on. Without
    repeated prompts there is exactly one plan.
    """

    counts: np.ndarray
    plans: tuple[Plan, ...]

    @property
    def step(self) -> int:
        """Plan step of the first layer."""
        return self.plans[0].step

    @property
    def budget(self) -> int:
        """Rollouts planned for the submission (``counts.sum()``)."""
        return int(self.counts.sum())


class VIPHook:
    """Allocator glue shared by both trainer loops: prompt ids, plan, uid bookkeeping, feedback, metrics, files.

    ``plan`` records which prompt and plan step every uid belongs to, so feedback works from any later view of the
    batch (verl moves the ``index`` column into the generation batch; the uid survives everywhere).
    """

    def __init__(self, cfg: VIPConfig, estimator: str, max_length: int | None = None) -> None:
        self.cfg = cfg
        self.max_length = (
            max_length  # verl's rollout.response_length (tokens): vip/frac_truncated counts rollouts there
        )
        self.estimator = estimator
        # cfg.estimator may be "auto" (resolved by the caller into `estimator`); the hook binarises rewards with
        # cfg.success_threshold itself, so the allocator keeps its default threshold for the 0/1 values it gets.
        self.allocator = Allocator.from_settings(cfg, estimator=estimator, success_threshold=0.5)
        self._uids: dict[str, tuple[str, int]] = {}  # uid -> (prompt id, plan step)
        self._plans: dict[int, Plan] = {}
        self._pilots: dict[int, Plan] = {}  # two-phase steps whose commit is not finished
        self._final: dict[str, tuple[int, int]] = {}  # two-phase uid -> (plan step, pilot + commit group size)
        self._final_metrics: dict[int, dict[str, float]] = {}
        self._last_plan_step = -1
        self._warned: set[str] = set()
        # (plan step, prompt id) -> generated tokens of each observed episode (int64 (k,)), newest plan steps only
        self.episode_tokens: dict[tuple[int, str], np.ndarray] = {}

    # -- prompt identity
    def prompt_ids(self, columns: Mapping[str, Sequence[Any]], m: int) -> list[str]:
        """Stable prompt ids for ``m`` rows; the same prompt twice in the batch gets the same id twice.

        ``columns[prompt_id_key]`` is used when it is consistent with the prompt texts (each id names one text);
        otherwise (e.g. ``extra_info.index`` missing, so verl fills 0) the ids are hashes of the prompt texts.
        """
        key = self.cfg.prompt_id_key
        texts = self.prompt_texts(columns, m)
        if key is not None and key in columns:
            ids = [str(x) for x in as_list(columns[key])]
            if len(ids) == m and len(set(ids)) == m:
                return ids
            if len(ids) == m and texts is not None and one_text_per_id(ids, texts):
                return ids  # a prompt really appears twice (verl's one-prompt fetches crossing an epoch boundary)
            if texts is None:
                raise ValueError(
                    f"prompt id column {key!r} repeats ids within one batch and there is no prompt text column "
                    f"{self.cfg.prompt_text_key!r} to tell a repeated prompt from a missing id; set "
                    "vip.prompt_text_key, or give each dataset row a distinct extra_info.index"
                )
            self._warn_once(
                "dup-ids",
                f"prompt id column {key!r} names different prompt texts with the same id (e.g. extra_info.index "
                "missing, so verl fills 0); falling back to hashes of the prompt text",
            )
        if texts is None:
            raise ValueError(
                f"cannot identify prompts: no usable column {key!r} and no prompt text column "
                f"{self.cfg.prompt_text_key!r}; set vip.prompt_id_key to a non-tensor column that names each prompt"
            )
        return ["h" + hashlib.sha1(t.encode("utf-8")).hexdigest()[:16] for t in texts]

    def prompt_texts(self, columns: Mapping[str, Sequence[Any]], m: int) -> list[str] | None:
        """Prompt texts for the embedder: the last message's content of a chat prompt, or ``str`` of the value."""
        key = self.cfg.prompt_text_key
        if key is None or key not in columns:
            return None
        out = []
        for x in as_list(columns[key]):
            if isinstance(x, (list, tuple, np.ndarray)) and len(x) and isinstance(x[-1], Mapping):
                out.append(str(x[-1].get("content", "")))
            else:
                out.append(str(x))
        return out if len(out) == m else None

    # -- plan
    def plan(
        self,
        ids: list[str],
        texts: list[str] | None,
        uids: Sequence[Any],
        budget: int,
        step: int,
        *,
        rollout_n: int | None = None,
        share: float = 1.0,
        multiple: int | None = None,
    ) -> BatchPlan:
        """Plan ``budget`` rollouts over the rows ``ids`` (aligned with ``uids``) at training ``step``.

        ``budget`` must lie in ``[R * n_min, R * n_max]`` for ``R`` rows. A prompt that appears ``k`` times gets
        one group per occurrence (verl trains each uid as its own group); occurrence layers are planned separately
        at consecutive plan steps with budgets proportional to their sizes, so the allocator never sees a duplicate
        id in one plan and every group is observed against its own record. Plan steps are unique and increasing: a
        second submission in the same training step (async refills) is planned at the next free step.

        Token mode (``cfg.token_budget``, see :meth:`_token_budgets`): ``budget`` becomes the cap on rollouts next to
        the token budget; ``rollout_n`` (verl's ``rollout.n``) prices ``"uniform"``, ``share`` (this submission's
        prompts / ``train_batch_size``) scales an absolute per-step cap to a partial submission, and ``multiple``
        (rows per training batch must be a multiple of it; ``None``: verl pads, as the v1 loop does) rounds the
        token plan's total down (:meth:`_round_to_multiple`), so the tokens never exceed the budget.
        """
        if len(uids) != len(ids):
            raise ValueError(f"got {len(ids)} prompt ids but {len(uids)} uids")
        if len({str(u) for u in uids}) != len(uids):
            raise ValueError("uids repeat within one submission; verl assigns one fresh uid per prompt row")
        layer = occurrence_layers(ids)
        sizes = np.bincount(layer)
        budgets = split_budget(int(budget), sizes, self.cfg.n_min, self.cfg.n_max)
        step = max(int(step), self._last_plan_step + 1)
        rows_of = [np.flatnonzero(layer == k) for k in range(len(budgets))]
        layers = (
            None
            if self.cfg.token_budget is None
            else self._token_budgets(ids, texts, rows_of, budgets, step, rollout_n, share)
        )
        plans = [
            self._plan_layer(ids, texts, rows, b, step + k, given=None if layers is None else layers[k])
            for k, (rows, b) in enumerate(zip(rows_of, budgets))
        ]
        if layers is not None and multiple is not None:  # rollout plans sum to `budget`, a multiple, already
            plans = self._round_to_multiple(plans, ids, texts, rows_of, int(multiple), layers)
        counts = np.zeros(len(ids), dtype=np.int64)
        for rows, plan in zip(rows_of, plans):
            if np.any(plan.counts == 1):  # strategies keep counts in {0} U [n_min, n_max]; guard verl's gotcha anyway
                raise RuntimeError(f"strategy {self.cfg.strategy!r} planned a group of size 1; report this as a bug")
            counts[rows] = plan.counts
            for i in rows.tolist():
                self._uids[str(uids[i])] = (ids[i], plan.step)
            self._plans[plan.step] = plan
        self._last_plan_step = step + len(budgets) - 1
        for old in sorted(self._plans)[:-_MAX_PLANS]:  # the allocator keeps the same newest plans pending
            self._forget(old)
        return BatchPlan(counts=counts, plans=tuple(plans))

    def _plan_layer(
        self,
        ids: list[str],
        texts: list[str] | None,
        rows: np.ndarray,
        budget: int,
        step: int,
        given: StepBudget | None = None,
        before: Plan | None = None,
    ) -> Plan:
        """``Allocator.plan`` for the rows ``rows`` (int ``(r,)``) of the submission: by rollouts (``budget``), or
        under the layer's resolved token budget ``given`` with ``budget`` as its rollout cap; ``before``: an earlier
        plan of the same layer this one replaces (its seconds are added, so ``vip/plan_seconds`` is the whole
        cost)."""
        t0 = time.perf_counter()
        sub_texts = None if texts is None else [texts[i] for i in rows]
        sub_ids = [ids[i] for i in rows]
        token_budget = None if given is None else given.tokens
        lengths = None if given is None else given.expected_lengths
        try:
            plan = self.allocator.plan(
                sub_ids,
                prompts=sub_texts,
                budget=int(budget),
                step=step,
                token_budget=token_budget,
                expected_lengths=lengths,
            )
        except ValueError as exc:  # e.g. the rollout cap below n_min rollouts of every prompt
            if token_budget is None:
                raise
            raise ValueError(
                f"vip.token_budget={self.cfg.token_budget!r} cannot be honoured at this step: {exc}"
            ) from exc
        plan.timings["overhead"] = time.perf_counter() - t0 - sum(plan.timings.values())
        if before is not None:
            for k, v in before.timings.items():
                plan.timings[k] = plan.timings.get(k, 0.0) + v
        return plan

    def _token_budgets(
        self,
        ids: list[str],
        texts: list[str] | None,
        rows_of: list[np.ndarray],
        budgets: list[int],
        step: int,
        rollout_n: int | None,
        share: float,
    ) -> list[StepBudget] | None:
        """Each occurrence layer's token budget, resolved by the engine's one budget policy
        (:class:`vipalloc.budget.BudgetSpec`, shared with the CPU trainer and the TRL plug-in; layer ``k`` is
        planned at ``step + k`` with its rollout budget ``budgets[k]`` as the rollout cap). ``None``: this step is
        planned by rollouts (``"uniform"`` before any length was observed).

        The submission's tokens: ``"uniform"`` = what the uniform plan of ``rollout.n`` per prompt is predicted to
        generate, layer by layer; a number = that cap x ``share``, split over the layers in proportion to their
        ``sum_i c_i`` (``c_i``: expected tokens per rollout; before any length is observed ``c_i`` is verl's
        ``response_length``, the most a rollout can generate, so the cap holds whatever the lengths turn out to be).
        A cap that cannot pay for ``n_min`` rollouts of a layer's prompts is raised to that minimum with a warning.
        The lengths are forecast once per layer and step; the plan reuses them.
        """
        subs = [[ids[i] for i in rows] for rows in rows_of]
        sub_texts = [None if texts is None else [texts[i] for i in rows] for rows in rows_of]
        preds = [
            self.allocator.expected_lengths(sub, step + k, prompts=t) for k, (sub, t) in enumerate(zip(subs, sub_texts))
        ]
        specs: list[BudgetSpec]
        if self.cfg.token_budget == "uniform":
            if rollout_n is None:
                raise ValueError("vip.token_budget='uniform' needs verl's rollout.n to price the uniform plan")
            specs = [BudgetSpec(int(rollout_n) * len(sub), "uniform", rollout_cap=b) for sub, b in zip(subs, budgets)]
        else:
            total = float(self.cfg.token_budget) * float(share)  # type: ignore[arg-type]
            known = [None if p is None else float(p.expected.sum()) for p in preds]
            unit = [u if u is not None else float(len(sub) * (self.max_length or 0)) for u, sub in zip(known, subs)]
            caps = [total * u / sum(unit) if sum(unit) > 0 else total / len(subs) for u in unit]
            specs = [BudgetSpec(b, cap, rollout_cap=b, max_length=self.max_length) for b, cap in zip(budgets, caps)]
        out = [
            resolve_tokens(spec, pred, len(sub), self.allocator.n_min) for spec, pred, sub in zip(specs, preds, subs)
        ]
        if any(o.tokens is None for o in out):
            self._warn_once("tokens-first", "no generated lengths observed yet: this step is planned by rollouts")
            return None
        return out

    def _round_to_multiple(
        self,
        plans: list[Plan],
        ids: list[str],
        texts: list[str] | None,
        rows_of: list[np.ndarray],
        multiple: int,
        layers: list[StepBudget],
    ) -> list[Plan]:
        """Make the token plans' total rollouts a multiple of ``multiple`` (the legacy loop's rows must be; verl's
        v1 loop pads instead) without adding tokens.

        A single plan is first re-planned under the same token budget with the rollout cap rounded down (the
        program then chooses which rollouts to give up, usually landing on the cap); whatever is still off is cut by
        :func:`~vipalloc.integrations.verl.core.trim_to_multiple` (largest groups first). A cut plan's
        ``optimality_gap`` is NaN: the certificate was for the uncut counts.
        """
        total = sum(int(p.counts.sum()) for p in plans)
        if total % multiple == 0:
            return plans
        down = total - total % multiple
        if len(plans) == 1 and down >= len(ids) * self.cfg.n_min:  # the engine refuses a cap below M x n_min
            p = plans[0]
            plans = [self._plan_layer(ids, texts, rows_of[0], down, p.step, given=layers[0], before=p)]
            if int(plans[0].counts.sum()) % multiple == 0:
                return plans
        counts = np.zeros(len(ids), dtype=np.int64)
        for rows, p in zip(rows_of, plans):
            counts[rows] = p.counts
        cut = trim_to_multiple(counts, multiple, self.cfg.n_min)
        self._warn_once(
            "token-round",
            f"a token plan of {int(counts.sum())} rollouts was cut to {int(cut.sum())}, a multiple of {multiple} (DP "
            "size x mini-batch rows, which the legacy loop needs); smaller ppo_mini_batch_size wastes less",
        )
        return [self._with_counts(p, cut[rows]) for p, rows in zip(plans, rows_of)]

    def _with_counts(self, plan: Plan, counts: np.ndarray) -> Plan:
        """``plan`` with fewer rollouts (the allocator accepts fewer outcomes than it planned)."""
        if np.array_equal(counts, plan.counts):
            return plan
        c = plan.expected_lengths
        return replace(
            plan,
            counts=counts,
            budget=int(counts.sum()),
            expected_variance=self.allocator.expected_variance(plan.p_mean, counts),
            expected_tokens=None if c is None else float(counts @ c),
            optimality_gap=float("nan"),
        )

    def _forget(self, step: int) -> None:
        self._plans.pop(step, None)
        for u in [u for u, (_, s) in self._uids.items() if s == step]:
            del self._uids[u]

    # -- feedback
    def observe(
        self,
        uids: Sequence[Any],
        success: np.ndarray,
        *,
        exact: bool,
        where: str,
        lengths: np.ndarray | Sequence[int] | None = None,
    ) -> dict[str, float]:
        """Record one 0/1 outcome per row (rows grouped by uid) and return the ``vip/*`` metrics.

        Rows of a two-phase step's uids (already recorded when they were generated) are only checked against the
        final group sizes (pilot + commit) and return that step's metrics.

        Rows whose uid was not planned here (verl's padding rows, validation) are ignored; each planned prompt is
        observed once. Every planned uid's group size is checked against its plan first: rows for a dropped prompt,
        more rows than planned, or (``exact``: loops where generation cannot fail silently) fewer rows raise
        :class:`PlanNotAppliedError` naming ``where`` (the verl behaviour the plug-in relies on) and record nothing.
        With ``exact=False`` (v1: a failed session leaves its group short) fewer rows are recorded as they came.

        ``lengths``: optional int ``(R,)`` aligned with ``uids``, each episode's generated tokens (verl's
        ``response_mask`` summed: tool output and padding excluded); grouped like the outcomes (a short group's
        lengths are those of the episodes that came back), kept in :attr:`episode_tokens`, passed to
        ``Allocator.observe(lengths=...)`` (the length model token budgets plan with) and to the ``vip/tokens_*``
        metrics.
        """
        final = self._check_final_groups(uids, where)
        by_step, lens = self._record(uids, success, exact=exact, where=where, lengths=lengths)
        metrics = self._metrics([self._plans[s] for s in sorted(by_step)], by_step, lens)
        return {**final, **metrics}

    def _record(
        self,
        uids: Sequence[Any],
        success: np.ndarray,
        *,
        exact: bool,
        where: str,
        lengths: np.ndarray | Sequence[int] | None = None,
    ) -> tuple[dict[int, dict[str, np.ndarray]], dict[int, dict[str, np.ndarray]] | None]:
        """Check and record; returns the outcomes and the lengths (``None`` without ``lengths``) per plan step and
        prompt id (see :meth:`observe`)."""
        success = np.asarray(success, dtype=np.float64).reshape(-1)
        if len(uids) != len(success):
            raise ValueError(f"got {len(uids)} uids but {len(success)} outcomes")
        tokens = None if lengths is None else np.asarray(lengths, dtype=np.int64).reshape(-1)
        if tokens is not None and len(tokens) != len(success):
            raise ValueError(f"got {len(success)} outcomes but {len(tokens)} episode lengths")
        by_uid: dict[str, list[float]] = {}
        len_uid: dict[str, list[int]] = {}
        for r, (u, s) in enumerate(zip(uids, success)):
            if str(u) in self._uids:
                by_uid.setdefault(str(u), []).append(float(s))
                if tokens is not None:
                    len_uid.setdefault(str(u), []).append(int(tokens[r]))
        short = 0
        counts_of: dict[int, dict[str, int]] = {}  # plan step -> prompt id -> planned rollouts
        for u, rows in by_uid.items():
            pid, step = self._uids[u]
            if step not in counts_of:
                counts_of[step] = dict(zip(self._plans[step].prompt_ids, self._plans[step].counts.tolist()))
            planned = counts_of[step][pid]
            if len(rows) > planned or (exact and len(rows) != planned):
                import verl

                raise PlanNotAppliedError(
                    f"uid {u} (prompt {pid!r}, plan step {step}) came back with {len(rows)} rollouts but the VIP plan "
                    f"asked for {planned}: verl did not apply the plan ({where}). Training on these groups would be "
                    f"uniform while vip/* reports the plan, so the run stops here. The plug-in supports verl "
                    f"{SUPPORTED_VERL}; installed: {getattr(verl, '__version__', 'unknown')}"
                )
            short += len(rows) < planned
        if short:
            self._warn_once("short", f"{short} group(s) came back with fewer rollouts than planned (failed sessions)")
        by_step: dict[int, dict[str, np.ndarray]] = {}
        lens_by_step: dict[int, dict[str, np.ndarray]] = {}
        for u, rows in by_uid.items():
            pid, step = self._uids[u]
            by_step.setdefault(step, {})[pid] = np.asarray(rows)
            if tokens is not None:
                lens_by_step.setdefault(step, {})[pid] = np.asarray(len_uid[u], dtype=np.int64)
        for step, groups in sorted(by_step.items()):
            plan = self._plans[step]
            ids = [pid for pid in plan.prompt_ids if pid in groups]
            lens: list[np.ndarray] | None = None
            if tokens is not None:
                lens = [lens_by_step[step][pid] for pid in ids]
                for pid, n_tok in zip(ids, lens):
                    self.episode_tokens[(step, pid)] = n_tok
            self.allocator.observe(ids, [groups[pid] for pid in ids], step=step, lengths=lens)
        for old in sorted({s for s, _ in self.episode_tokens})[:-_MAX_PLANS]:  # bounded like the plans
            for key in [k for k in self.episode_tokens if k[0] == old]:
                del self.episode_tokens[key]
        for u in by_uid:
            del self._uids[u]
        return by_step, (lens_by_step if tokens is not None else None)

    # -- two-phase steps (legacy loop): pilot, commit, both recorded when generated; sizes checked at training
    def plan_pilot(self, ids: list[str], texts: list[str] | None, uids: Sequence[Any], budget: int, step: int) -> Plan:
        """Phase 1 (``Allocator.plan_pilot``): ``budget`` is the whole step's; counts are the pilot rollouts."""
        if len(set(ids)) != len(ids):
            raise ValueError(
                "vip.two_phase needs distinct prompts within a batch (one pilot per prompt); this batch repeats a "
                "prompt; give each dataset row a distinct extra_info.index or set vip.two_phase=false"
            )
        step = max(int(step), self._last_plan_step + 1)
        t0 = time.perf_counter()
        plan = self.allocator.plan_pilot(ids, prompts=texts, budget=int(budget), step=step, pilot_n=self.cfg.pilot_n)
        plan.timings["overhead"] = time.perf_counter() - t0 - sum(plan.timings.values())
        self._last_plan_step = step
        for u, pid in zip(uids, ids):
            self._uids[str(u)] = (pid, step)
        self._plans[step] = plan
        self._pilots[step] = plan
        return plan

    def observe_phase(
        self, uids: Sequence[Any], success: np.ndarray, where: str, lengths: np.ndarray | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
        """Record a phase's rows (sizes exactly as planned; ``lengths`` as in :meth:`observe`); returns the outcomes
        and the lengths (``None`` without ``lengths``) per prompt id."""
        by_step, lens = self._record(uids, success, exact=True, where=where, lengths=lengths)
        if not by_step:
            return {}, None if lens is None else {}
        step = next(iter(by_step))
        return by_step[step], None if lens is None else lens.get(step, {})

    def plan_commit(self, step: int, uids: Sequence[Any]) -> Plan:
        """Phase 2 (``Allocator.plan_commit``): the EXTRA rollouts per prompt; ``uids`` aligned with the pilot."""
        plan = self.allocator.plan_commit(step=step)
        if np.any(plan.group_sizes == 1):
            raise RuntimeError("the two-phase plan made a group of size 1; report this as a bug")
        for u, pid in zip(uids, plan.prompt_ids):
            self._uids[str(u)] = (pid, step)
        self._plans[step] = plan
        return plan

    def finish_two_phase(
        self,
        step: int,
        uids: Sequence[Any],
        pilot: Mapping[str, np.ndarray],
        commit: Mapping[str, np.ndarray],
        lengths: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        """Remember the final group size of every uid and the step's metrics (returned when it is trained);
        ``lengths``: the pilot's and the commit's generated tokens per prompt id, for the ``vip/tokens_*`` metrics."""
        plan, first = self._plans[step], self._pilots.pop(step)
        for u, size in zip(uids, plan.group_sizes.tolist()):
            self._final[str(u)] = (step, int(size))
            self._uids.pop(str(u), None)  # prompts the commit gave no extra rollouts
        timings = {k: first.timings.get(k, 0.0) + plan.timings.get(k, 0.0) for k in {*first.timings, *plan.timings}}
        final = replace(plan, counts=plan.group_sizes, pilot_counts=None, budget=int(plan.group_sizes.sum()),
                        timings=timings)  # fmt: skip
        none = np.zeros(0)
        rewards = [np.concatenate([pilot.get(pid, none), commit.get(pid, none)]) for pid in plan.prompt_ids]
        lens = None
        if lengths is not None:
            lp, lc = lengths
            lens = [np.concatenate([lp.get(pid, none), lc.get(pid, none)]) for pid in plan.prompt_ids]
        outcome = self.allocator.outcome_metrics(rewards, plan=final, lengths=lens, max_length=self.max_length)
        metrics = {**final.metrics(), **outcome}
        metrics["vip/pilot_rollouts"] = float(first.counts.sum())
        self._final_metrics[step] = metrics

    def _check_final_groups(self, uids: Sequence[Any], where: str) -> dict[str, float]:
        sizes: dict[str, int] = {}
        for u in uids:
            if str(u) in self._final:
                sizes[str(u)] = sizes.get(str(u), 0) + 1
        steps = set()
        for u, n in sizes.items():
            step, planned = self._final[u]
            if n != planned:
                raise PlanNotAppliedError(
                    f"uid {u} (two-phase step {step}) reached training with {n} rows but its pilot + commit group has "
                    f"{planned}: verl did not apply the plan ({where}); supported verl: {SUPPORTED_VERL}"
                )
            steps.add(step)
        for u in sizes:
            del self._final[u]
        out: dict[str, float] = {}
        for step in sorted(steps):
            out.update(self._final_metrics.pop(step, {}))
        return out

    def _metrics(
        self,
        plans: list[Plan],
        outcomes: Mapping[int, Mapping[str, np.ndarray]],
        lengths: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    ) -> dict[str, float]:
        """The shared ``vip/*`` names: ``Plan.metrics()`` of the plans whose prompts reached this batch (merged
        when there are several) plus ``Allocator.outcome_metrics`` of what came back (dropped or not yet sampled
        prompts count as not generated); with ``lengths`` (generated tokens per plan step and prompt id) the
        ``vip/tokens_*`` outcome names too, rollouts cut at verl's ``response_length`` counted as truncated."""
        if not plans:
            return {}
        merged = plans[0] if len(plans) == 1 else merge_plans(plans)
        none = np.zeros(0)
        rewards = [outcomes.get(p.step, {}).get(pid, none) for p in plans for pid in p.prompt_ids]
        lens = None
        if lengths is not None:
            lens = [lengths.get(p.step, {}).get(pid, np.zeros(0, np.int64)) for p in plans for pid in p.prompt_ids]
        outcome = self.allocator.outcome_metrics(rewards, plan=merged, lengths=lens, max_length=self.max_length)
        return {**merged.metrics(), **outcome}

    def successes(self, scores: np.ndarray, extra: Sequence[Any] | None) -> np.ndarray:
        """0/1 per row: ``extra`` (the ``success_key`` column) when given, else the summed score, vs the threshold."""
        vals = np.asarray(scores, dtype=np.float64) if extra is None else np.asarray(extra, dtype=np.float64)
        if not np.all(np.isfinite(vals)):
            raise ValueError("non-finite rewards reached the VIP feedback; check the reward function")
        return (vals >= float(self.cfg.success_threshold)).astype(np.float64)

    # -- state
    def save(self, folder: str) -> str:
        """Write ``folder/vip_allocator.json`` atomically; returns the path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, ALLOCATOR_FILE)
        self.allocator.save(path)
        return path

    def load(self, folder: str) -> bool:
        """Restore the allocator from ``folder`` if it holds one; returns whether it did."""
        path = os.path.join(folder, ALLOCATOR_FILE)
        if not os.path.exists(path):
            self._warn_once("no-file", f"no {ALLOCATOR_FILE} in {folder}: the allocator starts without history")
            return False
        self.allocator = Allocator.load(path)
        self._uids.clear()
        self._plans.clear()
        self._pilots.clear()
        self._final.clear()
        self._final_metrics.clear()
        # keep plan steps increasing across the resume (the allocator records the last step it planned or observed)
        self._last_plan_step = int(getattr(self.allocator, "_last_step", -1))
        return True

    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("vipalloc: %s", msg)
