"""TRL's completion logs: ``GRPOTrainer(log_completions=True)`` -> ``completions/completions_<step:05d>.parquet``.

Columns: ``step``, ``prompt``, ``completion``, one column per reward function, the ``log_extra`` columns and
``advantage``. TRL keeps the rows of the last generation batch only (a deque of ``generation_batch_size`` rows)
and writes it at every logging step, so a file holds at most one generation batch, and consecutive files hold the
*same* rows when logging is more frequent than generation: such repeated files are skipped.

**Groups as TRL formed them.** TRL lays out a generation batch as groups of ``num_generations`` consecutive rows
(each dataset row repeated) and normalises rewards over each block. Two dataset rows with the same prompt text in
one batch are two groups. So groups are consecutive blocks of the group size (``--group-size``, or the greatest
common divisor of the runs of consecutive rows of one prompt over every file); with ``--group-size 0``, or when the
runs share no divisor above 1, or when blocks of that divisor do not have zero-mean logged advantages but whole runs
do (vipalloc's TRL plug-in, whose groups vary in size), each run is one group; only when no two consecutive rows
share a prompt are rows merged by prompt text, and the report says so.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc.replay.table import (
    GroupTable,
    ReadOptions,
    ReadStats,
    ReplayInputError,
    completion_text,
    number,
    prompt_key,
    prompt_text,
    step_of,
)

__all__ = ["layout_groups", "read_trl"]

_TRL_FIXED = ("step", "prompt", "completion", "advantage", "image", "images")
_PARQUET_BATCH = 16_384  # rows per pyarrow batch: bounded memory whatever the file size


def runs_of(keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths (int64 ``(R,)`` each) of the runs of consecutive equal keys."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.fromiter((keys[i] != keys[i - 1] for i in range(1, n)), bool, n - 1)
    starts = np.r_[0, np.flatnonzero(change) + 1].astype(np.int64)
    return starts, np.diff(np.r_[starts, n]).astype(np.int64)


def layout_groups(
    keys: Sequence[str], group_size: int | None, where: str, log_runs: np.ndarray | None = None
) -> tuple[np.ndarray, str]:
    """Group index of each row of one TRL generation batch (int64 ``(N,)``) and how the groups were formed.

    ``keys``: the rows' prompt identities in file order; ``group_size``: TRL's ``num_generations`` (``None``:
    inferred, ``0``: each run of consecutive rows of one prompt is a group); ``log_runs``: the run lengths of every
    file of the log (inference reads them all: one batch may draw a prompt twice in a row, the whole run rarely
    does); default this file's. Raises :class:`ReplayInputError` when a run of one prompt is not a whole number of
    groups of ``group_size``.
    """
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.int64), ""
    starts, runs = runs_of(keys)
    run_of_row = np.repeat(np.arange(len(runs)), runs)
    if group_size == 0:
        return run_of_row, "each run of consecutive rows of one prompt (--group-size 0)"
    if group_size is not None:
        bad = np.flatnonzero(runs % group_size)
        if bad.size:
            s, r = int(starts[bad[0]]), int(runs[bad[0]])
            raise ReplayInputError(
                f"{where} {s + 1}-{s + r}: {r} consecutive rows of one prompt, not a multiple of --group-size "
                f"{group_size}; pass TRL's num_generations, or --group-size 0 (each run of one prompt is a group)"
            )
        how = f"TRL's consecutive blocks of {group_size} rows (--group-size)"
        return np.arange(n, dtype=np.int64) // group_size, how
    every = runs if log_runs is None or not len(log_runs) else log_runs
    if every.max() == 1:
        first: dict[str, int] = {}
        gid = np.fromiter((first.setdefault(k, len(first)) for k in keys), np.int64, n)
        return gid, (
            "merged by prompt within each step: no two consecutive rows share a prompt, so the log's layout names "
            "no group"
        )
    g = int(np.gcd.reduce(every))
    if g >= 2:
        how = (
            f"TRL's consecutive blocks of {g} rows (num_generations, inferred from the log: the greatest common "
            "divisor of its runs of one prompt; --group-size overrides)"
        )
        return np.arange(n, dtype=np.int64) // g, how
    return run_of_row, "each run of consecutive rows of one prompt (group sizes vary, e.g. vipalloc's TRL plug-in)"


def _keys(data: dict[str, list[Any]], id_col: str | None, where: Any) -> tuple[list[str], list[str]]:
    """Prompt keys (the id column, else the prompt: text, or a conversation's JSON) and prompt texts of a batch."""
    prompts = data["prompt"]
    texts = [prompt_text(p) for p in prompts]
    if id_col:
        keys = [prompt_key(v, where(i), id_col) for i, v in enumerate(data[id_col])]
    else:
        keys = [t if isinstance(p, str) else json.dumps(p, sort_keys=True) for p, t in zip(prompts, texts)]
    return keys, texts


def _trl_columns(path: Path, names: list[str], opts: ReadOptions) -> tuple[list[str], str | None]:
    for col in ("step", "prompt", "completion"):
        if col not in names:
            raise ReplayInputError(f"{path}: missing column '{col}' (a TRL completions parquet has {names})")
    candidates = [c for c in names if c not in _TRL_FIXED and c != opts.id_field and c != "prompt_id"]
    if opts.reward:
        missing = [c for c in opts.reward if c not in names]
        if missing:
            raise ReplayInputError(
                f"{path}: no reward column {missing[0]!r}; columns that may be rewards: {candidates}"
            )
        rewards = list(opts.reward)
    elif len(candidates) == 1:
        rewards = candidates
    else:
        raise ReplayInputError(
            f"{path}: {len(candidates)} columns may be rewards ({candidates}): TRL does not log the reward weights "
            "or which columns are log_extra, so name the success reward with --reward NAME (repeat it to sum "
            "several); what training used is read from the logged 'advantage'"
        )
    id_col = opts.id_field or ("prompt_id" if "prompt_id" in names else None)
    if id_col is not None and id_col not in names:
        raise ReplayInputError(f"{path}: no id column {id_col!r} (--id-field); columns: {names}")
    return rewards, id_col


def _parquet_batches(pf: Any, path: Path, cols: list[str]) -> Iterable[Any]:
    import pyarrow as pa

    try:
        yield from pf.iter_batches(batch_size=_PARQUET_BATCH, columns=cols)
    except (pa.ArrowException, OSError) as exc:
        raise ReplayInputError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None


def _zero_sum(gid: np.ndarray, adv: np.ndarray) -> bool | None:
    """Whether every group's logged advantages (float64 ``(N,)``, NaN unknown) sum to zero, as TRL's group-relative
    advantages do (``scale_rewards`` group, batch or none); ``None`` when no advantage is known."""
    known = np.isfinite(adv)
    if not known.any():
        return None
    sums = np.bincount(gid[known], weights=adv[known])
    size = np.bincount(gid[known], weights=np.abs(adv[known]))
    return bool(np.all(np.abs(sums) <= 1e-4 * np.maximum(1.0, size)))


def _open(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ReplayInputError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None


def _log_runs(files: Sequence[Path], opts: ReadOptions) -> np.ndarray:
    """Run lengths of consecutive rows of one prompt in every file (a first pass over the prompt column only)."""
    out = []
    for path in files:
        pf = _open(path)
        names = [n for n in pf.schema_arrow.names if not n.startswith("__index_level")]
        _, id_col = _trl_columns(path, names, opts)
        keys: list[str] = []
        for batch in _parquet_batches(pf, path, [id_col or "prompt"]):
            data = batch.to_pydict()
            if id_col:
                data["prompt"] = data[id_col]
            keys += _keys(data, id_col, lambda i, path=path: f"{path}: row {i + 1}")[0]
        out.append(runs_of(keys)[1])
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def read_trl(files: Sequence[Path], opts: ReadOptions, table: GroupTable, stats: ReadStats, tick: Any) -> None:
    """Fold TRL's completion parquet files into ``table`` (see the module docstring)."""
    previous: bytes | None = None
    thr = opts.success_threshold
    log_runs = _log_runs(files, opts) if opts.group_size is None else None
    for k, path in enumerate(files):
        stats.current_file = k + 1
        pf = _open(path)
        names = [n for n in pf.schema_arrow.names if not n.startswith("__index_level")]
        rewards, id_col = _trl_columns(path, names, opts)
        adv_col = "advantage" if "advantage" in names else None
        stats.reward_label = " + ".join(rewards)
        cols = ["step", "prompt", "completion", *rewards]
        cols += [c for c in (id_col, adv_col) if c]
        digest = hashlib.sha256()
        steps: list[int] = []
        keys: list[str] = []
        texts: list[str] = []
        completions: list[str] = []
        totals: list[np.ndarray] = []
        scored: list[np.ndarray] = []
        advs: list[np.ndarray] = []
        row0 = 0
        # One file holds one generation batch at most (TRL's bounded deque): its rows are kept until the file is
        # known not to repeat the previous one and its groups are laid out; raw rows are read batch by batch.
        for batch in _parquet_batches(pf, path, cols):
            data = batch.to_pydict()
            n = batch.num_rows

            def where(i: int, path: Path = path, row0: int = row0) -> str:  # parquet rows, 1-based like lines
                return f"{path}: row {row0 + i + 1}"

            steps += [step_of(v, where(i)) for i, v in enumerate(data["step"])]
            b_keys, b_texts = _keys(data, id_col, where)
            total = np.zeros(n)
            ok = np.zeros(n, bool)
            for col in rewards:
                for i, v in enumerate(data[col]):
                    if v is None or (isinstance(v, float) and math.isnan(v)):
                        continue  # TRL logs None/NaN where a reward function skipped the row
                    total[i] += number(v, where(i), col, allow_bool=True)
                    ok[i] = True
            adv = np.full(n, np.nan)
            if adv_col:
                for i, v in enumerate(data[adv_col]):
                    if v is not None and not (isinstance(v, float) and math.isnan(v)):
                        adv[i] = number(v, where(i), adv_col)
            b_comp = [completion_text(c) for c in data["completion"]]
            digest.update(json.dumps([b_keys, b_comp, total.tolist()]).encode())
            keys += b_keys
            texts += b_texts
            completions += b_comp
            totals.append(total)
            scored.append(ok)
            advs.append(adv)
            row0 += n
        fingerprint = digest.digest()
        if row0 and fingerprint == previous:
            # logging_steps < steps_per_generation: TRL wrote the same generation batch again under a new step
            stats.skipped_duplicate_files.append(str(path))
            continue
        previous = fingerprint
        stats.files += 1
        if not row0:
            tick(stats)
            continue
        total_a, ok_a, adv_a = np.concatenate(totals), np.concatenate(scored), np.concatenate(advs)
        gid, how = layout_groups(keys, opts.group_size, f"{path}: rows", log_runs)
        if opts.group_size is None and adv_col and _zero_sum(gid, adv_a) is False:
            lens = runs_of(keys)[1]
            runs = np.repeat(np.arange(len(lens)), lens)
            if _zero_sum(runs, adv_a):  # whole runs are the groups: sizes vary (vipalloc's TRL plug-in)
                gid, how = (
                    runs,
                    (
                        "each run of consecutive rows of one prompt (group sizes vary: blocks of the runs' common "
                        "divisor would not have zero-mean advantages, whole runs do)"
                    ),
                )
        stats.group_method(how)
        keep = np.flatnonzero(ok_a)
        stats.unscored_rollouts += row0 - keep.size
        if adv_col:
            stats.signal, stats.signal_label = "advantage", adv_col
        stats.observe_rewards(total_a[keep])
        tokens = opts.tokens([completions[i] for i in keep])
        table.add_rollouts(
            [steps[i] for i in keep],
            [f"{k}:{gid[i]}" for i in keep],
            [keys[i] for i in keep],
            [texts[i] for i in keep],
            total_a[keep] >= thr,
            tokens,
            adv_a[keep] if adv_col else None,
        )
        stats.rollouts += int(keep.size)
        tick(stats)
