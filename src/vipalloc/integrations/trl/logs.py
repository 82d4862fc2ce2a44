"""Bookkeeping of the TRL plug-in: TRL's logs, metrics and ``log_extra`` columns over the real rows only.

TRL computes its completion-length metrics, token counter and completions table over every row of the scored
slice; VIP's unused rows are one-token placeholders. These functions put TRL's own bookkeeping back onto the rows
that were generated (and, for a two-phase step, onto the pilot's rows kept for the main round).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, MutableMapping
from typing import Any, cast

import numpy as np
from accelerate.utils import gather_object


def spread_extra_logs(
    pending: MutableMapping[str, list[Any]],
    pending_metrics: MutableMapping[str, list[Any]],
    before: Mapping[str, int],
    metrics_before: Mapping[str, int],
    keep: np.ndarray,
    n: int,
    throwaway: bool,
) -> None:
    """Align what reward functions logged with ``log_extra`` (one value per scored row) to all ``n`` local rows.

    ``pending`` / ``pending_metrics``: TRL's ``_pending_extra_logs`` / ``_pending_metrics``; ``before`` /
    ``metrics_before``: their lengths before the reward call; ``keep``: the local rows that were scored. TRL
    flushes one value per local row of the slice; other rows get ``None`` (removed with the rows later). A
    throw-away call's values and ``log_metric`` entries are discarded.
    """
    for column in list(pending):
        old = before.get(column, 0)
        new = pending[column][old:]
        del pending[column][old:]
        if throwaway:
            if not pending[column]:
                del pending[column]
            continue
        if len(new) == keep.size:
            spread: list[Any] = [None] * n
            for j, i in enumerate(keep):
                spread[i] = new[j]
            new = spread
        pending[column].extend(new)
    if throwaway:
        for name in list(pending_metrics):
            del pending_metrics[name][metrics_before.get(name, 0) :]
            if not pending_metrics[name]:
                del pending_metrics[name]


def merge_pilot_logs(
    pending: MutableMapping[str, list[Any]], pilot_rows: np.ndarray, extra_logs: Mapping[str, list[Any]], n: int
) -> None:
    """Put a two-phase pilot's ``log_extra`` values (one per local row) back into the rows ``pilot_rows`` (bool
    ``(n,)``) they belong to; columns not logged one value per row are left as the reward function logged them."""
    for column, values in extra_logs.items():
        current = pending.get(column) or [None] * n
        if len(current) != n or len(values) != n:
            continue
        for i in np.flatnonzero(pilot_rows):
            current[i] = values[i]
        pending[column] = current


def fix_generation_metrics(
    trainer: Any, prompt_ids: list, completion_ids: list, real: np.ndarray, tool_mask: list | None = None
) -> None:
    """TRL's length metrics and token counter included the placeholders: recompute them over the real rows.

    ``prompt_ids`` / ``completion_ids``: token id lists of the local slice (as ``GRPOTrainer._generate`` returns
    them); ``real``: bool ``(L,)``; ``tool_mask``: TRL's per-row 0/1 lists of a tool episode (0 on tool output),
    whose model tokens are the lengths TRL reports. With several processes the statistics are over the gathered
    batch, as TRL's.
    """
    stop = {*trainer.eos_token_ids, trainer._tokenizer.pad_token_id}
    unused = np.flatnonzero(~real)
    pad_tokens = sum(
        len(prompt_ids[i]) + (len(completion_ids[i]) if tool_mask is None else sum(tool_mask[i])) for i in unused
    )
    stats = [
        (
            len(completion_ids[i]) if tool_mask is None else int(sum(tool_mask[i])),
            len(completion_ids[i]) > 0 and completion_ids[i][-1] not in stop,
        )
        for i in np.flatnonzero(real)
    ]
    if int(trainer.accelerator.num_processes) > 1:
        pad_tokens = sum(gather_object([pad_tokens]))
        stats = gather_object(stats)
    trainer.state.num_input_tokens_seen -= pad_tokens
    metrics = trainer._metrics["train"]
    metrics["num_tokens"] = [trainer.state.num_input_tokens_seen]
    if not stats:  # pragma: no cover - budgets are >= 1
        return
    lengths = np.array([k for k, _ in stats], np.float64)
    truncated = np.array([t for _, t in stats], bool)
    term = lengths[~truncated] if (~truncated).any() else np.zeros(1)
    fixes = {
        "completions/mean_length": lengths.mean(),
        "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(),
        "completions/clipped_ratio": truncated.mean(),
        "completions/mean_terminated_length": term.mean(),
        "completions/min_terminated_length": term.min(),
        "completions/max_terminated_length": term.max(),
    }
    for key, value in fixes.items():
        if metrics.get(key):
            metrics[key][-1] = float(value)


def trim_logs(logs: Mapping[str, Any], real: np.ndarray) -> None:
    """Keep only the real rows of the generation batch TRL just appended to its completions table (``_logs``:
    prompt, completion, rewards, advantages and ``log_extra`` columns, gathered, one entry per sampled row)."""
    n, keep = len(real), np.flatnonzero(real)

    def trim(buf: deque) -> None:
        if len(buf) < n:
            return
        last = [buf.pop() for _ in range(n)][::-1]
        buf.clear()  # the table shows the latest generation batch, as TRL's deques of one batch do
        buf.extend(last[i] for i in keep)

    for key in ("prompt", "completion", "advantages"):
        trim(cast(deque, logs[key]))
    for group in ("rewards", "extra"):
        for buf in cast("dict[str, deque]", logs[group]).values():
            trim(buf)
