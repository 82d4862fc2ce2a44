"""Streaming readers for the rollout logs ``vipalloc replay`` understands: format detection and :func:`read_logs`.

Four formats (see ``docs/replay.md``), each read by its own module:

* ``trl``: ``GRPOTrainer(log_completions=True)``'s ``completions_<step>.parquet`` (:mod:`~vipalloc.replay.read_trl`);
* ``verl``: ``trainer.rollout_data_dir``'s ``<global_step>.jsonl`` (:mod:`~vipalloc.replay.read_jsonl`);
* ``history``: vipalloc's own ``history.jsonl``, or ``{"prompt_id", "rewards"}`` rows;
* ``tinker``: the Tinker cookbook's ``iteration_<n>/train_rollout_summaries.jsonl``.

Nothing is held per rollout: every rollout is folded at once into the group the trainer formed
(:class:`~vipalloc.replay.table.GroupTable`: counts, token sums, the range of the training signal), and only one
text per distinct prompt is kept (the GP embeds it). Readers raise :class:`ReplayInputError` naming the file, the
line (or parquet row) and the field. A reward that is not 0/1 read without ``--threshold`` is refused (exit 2):
full marks on a continuous reward would call every group hopeless.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from vipalloc._io import iter_json_lines
from vipalloc.replay.read_jsonl import VERL_NAME, read_history, read_tinker, read_verl
from vipalloc.replay.read_trl import read_trl
from vipalloc.replay.table import (
    GroupTable,
    ReadOptions,
    ReadStats,
    ReplayInputError,
    whitespace_tokens,
)

__all__ = [
    "FORMATS",
    "GroupTable",
    "ReadOptions",
    "ReadStats",
    "ReplayInputError",
    "detect_format",
    "read_logs",
    "whitespace_tokens",
]

FORMATS = ("trl", "verl", "history", "tinker")
_TRL_NAME = re.compile(r"completions_(\d+)\.parquet$")
_TINKER_NAME = "rollout_summaries.jsonl"


def _tinker_files(folder: Path) -> list[Path]:
    """Training rollout summaries under a Tinker ``log_path`` (``eval_*`` files are evaluation, not training)."""
    found = sorted(folder.glob(f"*{_TINKER_NAME}")) + sorted(folder.glob(f"iteration_*/*{_TINKER_NAME}"))
    return [f for f in found if not f.name.startswith("eval")]


def _expand(paths: Sequence[Path]) -> list[Path]:
    """Files named directly, plus the log files inside named directories (TRL's ``completions/`` and Tinker's
    ``iteration_*/`` included)."""
    out: list[Path] = []
    for p in paths:
        if not p.exists():
            raise ReplayInputError(f"{p}: no such file or directory")
        if p.is_file():
            out.append(p)
            continue
        inner = p / "completions" if (p / "completions").is_dir() else p
        found = _tinker_files(inner) or sorted(inner.glob("*.parquet")) + sorted(inner.glob("*.jsonl"))
        if not found:
            raise ReplayInputError(
                f"{p}: no *.parquet or *.jsonl log files inside; pass TRL's completions/ folder, verl's "
                "rollout_data_dir, a Tinker log_path or a history.jsonl"
            )
        out.extend(found)
    return out


def _sniff(path: Path) -> str:
    if path.suffix == ".parquet":
        return "trl"
    lines = iter_json_lines(path, ReplayInputError, "; cannot tell the log format")
    first = next(lines, None)
    lines.close()
    if first is None:
        return "empty"
    row = first[2]
    if row.get("format") == "vipalloc.history" or "prompt_id" in row and ("rewards" in row or "trials" in row):
        return "history"
    if "input" in row and "output" in row:
        return "verl"
    if "group_idx" in row and "iteration" in row and "total_reward" in row:
        return "tinker"
    raise ReplayInputError(
        f"{path}: line 1: not a known log (verl rows have 'input'/'output'/'score', history rows 'prompt_id'/"
        "'rewards', Tinker summaries 'iteration'/'group_idx'/'total_reward'); name the format with --format"
    )


def detect_format(paths: Sequence[Path], fmt: str | None = None) -> tuple[str, list[Path]]:
    """The log format and its files in step order. ``fmt`` (one of :data:`FORMATS`) skips detection."""
    if fmt is not None and fmt not in FORMATS:
        raise ReplayInputError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    files = _expand([Path(p) for p in paths])
    if fmt is None:
        kinds = {f: _sniff(f) for f in files}
        found = {k for k in kinds.values() if k != "empty"}
        if len(found) > 1:
            raise ReplayInputError(
                f"the paths mix log formats ({', '.join(sorted(found))}); replay one run's logs at a time"
            )
        fmt = found.pop() if found else "history"
    if fmt == "trl":
        parquet = [f for f in files if f.suffix == ".parquet"]
        if files and not parquet:
            raise ReplayInputError(f"{files[0]}: --format trl reads TRL's completions_*.parquet files, not JSON Lines")
        files = parquet
    elif files and any(f.suffix == ".parquet" for f in files):
        raise ReplayInputError(f"{next(f for f in files if f.suffix == '.parquet')}: a parquet file in a {fmt} log")

    def order(f: Path) -> tuple[int, str]:
        m = (_TRL_NAME if fmt == "trl" else VERL_NAME).search(f.name)
        return (int(m.group(1)) if m else -1, str(f))

    return fmt, sorted(files, key=order) if fmt in ("trl", "verl") else files


def _check_reward_range(opts: ReadOptions, stats: ReadStats) -> None:
    """A reward that is not 0/1 needs ``--threshold``: full marks (1.0) would be a silent, wrong default."""
    if opts.threshold is not None or stats.fmt == "history" or not stats.reward_non_binary:
        return
    lo, hi = stats.reward_min, stats.reward_max
    mid = lo + (hi - lo) / 2
    raise ReplayInputError(
        f"the reward {stats.reward_label} is not 0/1: {stats.reward_non_binary:,} of {stats.reward_values:,} "
        f"rollouts have other values, range [{lo:g}, {hi:g}]; say what counts as a success with --threshold T "
        f"(a rollout succeeds when its reward >= T, e.g. --threshold {mid:.3g}), or name a 0/1 reward with --reward"
    )


def read_logs(
    paths: Sequence[Path], opts: ReadOptions, tick: Callable[[ReadStats], None] | None = None
) -> tuple[GroupTable, ReadStats]:
    """Read every log file into the trainer's groups. ``tick(stats)`` is called as reading progresses."""
    if opts.threshold is not None and not math.isfinite(opts.threshold):
        raise ReplayInputError(f"--threshold must be a finite number, got {opts.threshold}")
    if opts.group_size is not None and opts.group_size < 0:
        raise ReplayInputError(
            f"--group-size must be >= 0 (0: each run of one prompt is a group), got {opts.group_size}"
        )
    fmt, files = detect_format(paths, opts.fmt)
    table = GroupTable()
    stats = ReadStats(fmt=fmt, files_total=len(files))
    reader = {"trl": read_trl, "verl": read_verl, "history": read_history, "tinker": read_tinker}[fmt]
    reader(files, opts, table, stats, tick or (lambda s: None))
    _check_reward_range(opts, stats)
    return table, stats
