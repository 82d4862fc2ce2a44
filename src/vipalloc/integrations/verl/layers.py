"""Batch helpers of the verl plug-in: column values as lists, and a batch in which prompt ids repeat.

verl may submit the same prompt several times in one batch. :class:`~vipalloc.integrations.verl.hook.VIPHook`
plans such a batch in occurrence layers (the ``k``-th occurrence of every id in layer ``k``,
:func:`occurrence_layers`), splits the budget over the layers (:func:`split_budget`) and merges the per-layer plans
into one (:func:`merge_plans`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vipalloc import Plan

__all__ = ["as_list", "merge_plans", "occurrence_layers", "one_text_per_id", "split_budget"]


def as_list(col: Any) -> list[Any]:
    """A batch column (tensor, array or sequence) as a plain list."""
    if isinstance(col, torch.Tensor):
        return col.tolist()
    if hasattr(col, "tolist"):
        return list(col.tolist())
    return list(col)


def one_text_per_id(ids: Sequence[str], texts: Sequence[str]) -> bool:
    """True when no id stands for two different texts."""
    seen: dict[str, str] = {}
    return all(seen.setdefault(i, t) == t for i, t in zip(ids, texts))


def occurrence_layers(ids: Sequence[str]) -> np.ndarray:
    """``k`` for the ``k``-th (0-based) occurrence of each id: int64 ``(R,)``."""
    seen: dict[str, int] = {}
    out = np.empty(len(ids), dtype=np.int64)
    for i, pid in enumerate(ids):
        out[i] = seen.get(pid, 0)
        seen[pid] = out[i] + 1
    return out


def split_budget(budget: int, sizes: np.ndarray, n_min: int, n_max: int) -> list[int]:
    """Split ``budget`` over layers of ``sizes`` prompts in proportion, each within ``[size*n_min, size*n_max]``."""
    total = int(sizes.sum())
    if not total * n_min <= budget <= total * n_max:
        raise ValueError(
            f"budget {budget} is infeasible for {total} prompt rows with n in [{n_min}, {n_max}]; "
            f"it must lie in [{total * n_min}, {total * n_max}]"
        )
    # floor(budget * s / total) lies in [s*n_min, s*n_max] because budget / total does; the remainder (fewer
    # units than layers) goes to the first layers with room, which exists because the total capacity suffices.
    out = [budget * int(s) // total for s in sizes]
    rest = budget - sum(out)
    for k, s in enumerate(sizes):
        take = min(rest, int(s) * n_max - out[k])
        out[k] += take
        rest -= take
    return out


def merge_plans(plans: Sequence[Plan]) -> Plan:
    """One :class:`Plan` over the concatenated prompts of ``plans`` (variances and timings summed)."""
    timings: dict[str, float] = {}
    for p in plans:
        for k, v in p.timings.items():
            timings[k] = timings.get(k, 0.0) + v
    return Plan(
        prompt_ids=[pid for p in plans for pid in p.prompt_ids],
        counts=np.concatenate([p.counts for p in plans]),
        p_mean=np.concatenate([p.p_mean for p in plans]),
        p_std=np.concatenate([p.p_std for p in plans]),
        budget=sum(p.budget for p in plans),
        step=plans[0].step,
        strategy=plans[0].strategy,
        estimator=plans[0].estimator,
        expected_variance=sum(p.expected_variance for p in plans),
        uniform_variance=sum(p.uniform_variance for p in plans),
        timings=timings,
        min_keep_relaxed=any(p.min_keep_relaxed for p in plans),
        **_merged_token_fields(plans),
    )


def _merged_token_fields(plans: Sequence[Plan]) -> dict[str, Any]:
    """The token fields of :func:`merge_plans`: lengths concatenated and tokens summed when every plan has them;
    the gap is the largest (each plan's relative gap bounds the merged one's), NaN when one has none."""
    if any(p.expected_lengths is None for p in plans):
        return {}
    out: dict[str, Any] = {
        "expected_lengths": np.concatenate([np.asarray(p.expected_lengths) for p in plans]),
        "expected_tokens": float(sum(float(p.expected_tokens or 0.0) for p in plans)),
        "optimality_gap": float(np.max([p.optimality_gap for p in plans])),  # NaN (no certificate) propagates
    }
    if all(p.token_budget is not None for p in plans):
        out["token_budget"] = float(sum(float(p.token_budget or 0.0) for p in plans))
    return out
