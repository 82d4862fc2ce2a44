"""The JSON Lines logs ``vipalloc replay`` reads, streamed line by line through :func:`vipalloc._io.iter_json_lines`.

* ``verl``: ``trainer.rollout_data_dir`` holds ``<global_step>.jsonl``, one object per rollout with ``input``,
  ``output``, ``gts``, ``score`` (the total score training used), ``step`` and the reward extras
  (``_write_generations``). verl reorders a step's rows (``balance_batch``), so its groups are its ``uid`` when the
  dump has one (a reward extra), else the rows of one prompt text in a step.
* ``history``: vipalloc's own ``history.jsonl`` (``RolloutHistory.save`` or hand-written rows with ``rewards`` or
  ``trials``/``successes``; an optional ``lengths`` list gives generated tokens per rollout). Rows without
  ``step`` (``{"prompt_id", "rewards"}``, what small audit tools write) take a prompt's k-th row as step k - 1.
* ``tinker``: the Tinker cookbook's ``iteration_<n>/train_rollout_summaries.jsonl``, one object per trajectory
  with ``iteration``, ``group_idx``, ``traj_idx``, ``total_reward`` and ``steps[*].ac_len`` (generated tokens).
  It does not name the prompt: each group is a prompt of its own.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc._io import iter_json_lines
from vipalloc.history import OLD_TOKEN_COLUMNS
from vipalloc.replay.table import (
    GroupTable,
    ReadOptions,
    ReadStats,
    ReplayInputError,
    number,
    prompt_key,
    step_of,
)

__all__ = ["read_history", "read_tinker", "read_verl"]

VERL_NAME = re.compile(r"(\d+)\.jsonl$")
_CHUNK = 4096  # rollouts per token-counting call (a tokenizer is much faster on batches)


def _rows(path: Path) -> Any:
    return iter_json_lines(path, ReplayInputError, "; is the file truncated?")


class _Buffer:
    """Rollouts waiting to be folded (token counting runs in batches)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.groups: list[str] = []
        self.keys: list[str] = []
        self.texts: list[str] = []
        self.rewards: list[float] = []
        self.outputs: list[str] = []
        self.tokens: list[float] = []
        self.signal: list[float] = []

    def add(self, step: int, group: str, key: str, text: str, reward: float, output: str, signal: float) -> None:
        """Buffer one rollout whose tokens are counted from ``output``."""
        self.steps.append(step)
        self.groups.append(group)
        self.keys.append(key)
        self.texts.append(text)
        self.rewards.append(reward)
        self.outputs.append(output)
        self.signal.append(signal)

    def flush(self, opts: ReadOptions, table: GroupTable, stats: ReadStats, tick: Any, count: bool = True) -> None:
        """Fold the buffered rollouts in (``count``: tokens from ``outputs``, else the buffered ``tokens``)."""
        if not self.steps:
            return
        rewards = np.asarray(self.rewards, np.float64)
        stats.observe_rewards(rewards)
        tokens = opts.tokens(self.outputs) if count else np.asarray(self.tokens, np.float64)
        table.add_rollouts(
            self.steps, self.groups, self.keys, self.texts, rewards >= opts.success_threshold, tokens, self.signal
        )
        stats.rollouts += len(self.steps)
        for buf in vars(self).values():
            buf.clear()
        tick(stats)


def read_verl(files: Sequence[Path], opts: ReadOptions, table: GroupTable, stats: ReadStats, tick: Any) -> None:
    """Fold verl rollout dumps into ``table`` (see the module docstring)."""
    fields = opts.reward or ["score"]
    stats.reward_label = " + ".join(fields)
    stats.signal, stats.signal_label = "score", "score"
    no_uid = with_uid = 0
    score_is_reward = fields == ["score"]
    id_field = opts.id_field
    for k, path in enumerate(files):
        stats.current_file = k + 1
        m = VERL_NAME.search(path.name)
        file_step = int(m.group(1)) if m else None
        buf = _Buffer()
        for lineno, _, row in _rows(path):
            where = f"{path}: line {lineno}"
            for name in ("input", "output"):
                if not isinstance(row.get(name), str):
                    raise ReplayInputError(f"{where}: field '{name}': expected a string, got {row.get(name)!r}")
            if "step" in row:
                step = step_of(row["step"], where)
            elif file_step is not None:
                step = step_of(file_step, where)
            else:
                raise ReplayInputError(f"{where}: field 'step': missing, and the file name is not <step>.jsonl")
            reward = 0.0
            for name in fields:
                if name not in row:
                    raise ReplayInputError(f"{where}: field '{name}': missing (fields: {sorted(row)})")
                reward += number(row[name], where, name, allow_bool=True)
            if score_is_reward:
                score = reward
            else:
                score = number(row["score"], where, "score", allow_bool=True) if "score" in row else float("nan")
            text = row["input"]
            key = text
            if id_field:
                if id_field not in row:
                    raise ReplayInputError(f"{where}: field '{id_field}': missing (--id-field)")
                key = prompt_key(row[id_field], where, id_field)
            elif "prompt_id" in row:
                key = prompt_key(row["prompt_id"], where, "prompt_id")
            uid = row.get("uid")
            if uid is not None:
                group = "\x00uid:" + prompt_key(uid, where, "uid")  # never a prompt's text or id
                with_uid += 1
            else:
                group = key
                no_uid += 1
            buf.add(step, group, key, text, reward, row["output"], score)
            if len(buf.steps) >= _CHUNK:
                buf.flush(opts, table, stats, tick)
        buf.flush(opts, table, stats, tick)
        stats.files += 1
        tick(stats)
    if with_uid:
        stats.group_method("verl's uid (one group per prompt sample, as its advantage estimator groups them)")
    if no_uid:
        stats.group_method(
            "merged by prompt within each step: the dump has no 'uid' (verl reorders a step's rows, so their order "
            "names no group); a prompt drawn twice in a step counts as one group"
        )


def read_tinker(files: Sequence[Path], opts: ReadOptions, table: GroupTable, stats: ReadStats, tick: Any) -> None:
    """Fold Tinker cookbook rollout summaries into ``table`` (see the module docstring)."""
    fields = opts.reward or ["total_reward"]
    stats.reward_label = " + ".join(fields)
    stats.signal, stats.signal_label = "score", "total_reward"
    stats.group_method("Tinker's group_idx (each group a prompt of its own: the summaries do not name the prompt)")
    for k, path in enumerate(files):
        stats.current_file = k + 1
        buf = _Buffer()
        for lineno, _, row in _rows(path):
            where = f"{path}: line {lineno}"
            for name in ("iteration", "group_idx"):
                if name not in row:
                    raise ReplayInputError(f"{where}: field '{name}': missing (a Tinker rollout summary has it)")
            step = step_of(row["iteration"], where, "iteration")
            gidx = step_of(row["group_idx"], where, "group_idx")
            metrics = row.get("trajectory_metrics") if isinstance(row.get("trajectory_metrics"), dict) else {}
            reward = 0.0
            for name in fields:
                if name in row:
                    reward += number(row[name], where, name, allow_bool=True)
                elif name in metrics:
                    reward += number(metrics[name], where, f"trajectory_metrics.{name}", allow_bool=True)
                else:
                    raise ReplayInputError(
                        f"{where}: field '{name}': missing (fields: {sorted(row)}; metrics: {sorted(metrics)})"
                    )
            steps = row.get("steps")
            tokens = float("nan")
            if isinstance(steps, list):
                tokens = sum(number(s.get("ac_len"), where, "steps.ac_len") for s in steps if isinstance(s, dict))
            key = f"iteration {step} group {gidx}"
            if opts.id_field and opts.id_field in row:
                key = prompt_key(row[opts.id_field], where, opts.id_field)
            buf.steps.append(step)
            buf.groups.append(f"g:{gidx}")
            buf.keys.append(key)
            buf.texts.append("")
            buf.rewards.append(reward)
            buf.tokens.append(tokens)
            total = row.get("total_reward")
            buf.signal.append(float("nan") if total is None else number(total, where, "total_reward", allow_bool=True))
            if len(buf.steps) >= _CHUNK:
                buf.flush(opts, table, stats, tick, count=False)
        buf.flush(opts, table, stats, tick, count=False)
        stats.files += 1
        tick(stats)


def read_history(files: Sequence[Path], opts: ReadOptions, table: GroupTable, stats: ReadStats, tick: Any) -> None:
    """Fold history rows (each one (step, prompt) group) into ``table`` (see the module docstring)."""
    stats.group_method("the history's rows (one group per row)")
    stepless = False
    for k, path in enumerate(files):
        stats.current_file = k + 1
        thr = opts.threshold
        digest = None
        header: dict[str, Any] | None = None
        rows = 0
        seen: dict[str, int] = {}  # rows without 'step': a prompt's k-th row is step k - 1
        signal_known = True
        for lineno, line, row in _rows(path):
            where = f"{path}: line {lineno}"
            if lineno == 1 and "format" in row:
                if row.get("format") != "vipalloc.history":
                    raise ReplayInputError(f"{where}: field 'format': {row.get('format')!r} is not a vipalloc history")
                header = row
                digest = hashlib.sha256()
                if thr is None:
                    thr = number(row.get("success_threshold", 0.5), where, "success_threshold")
                continue
            if digest is not None:
                digest.update(line.encode())
            id_name = opts.id_field or "prompt_id"
            if id_name not in row:
                raise ReplayInputError(f"{where}: field '{id_name}': missing")
            key = prompt_key(row[id_name], where, id_name)
            if "step" in row:
                step = step_of(row["step"], where)
            else:
                step = seen.get(key, 0)
                stepless = True
            seen[key] = step + 1
            text = row.get("prompt")
            if text is not None and not isinstance(text, str):
                raise ReplayInputError(f"{where}: field 'prompt': expected a string")
            lengths = row.get("lengths")
            cut = 0.5 if thr is None else thr
            vals: list[float] = []
            if "rewards" in row:
                rew = row["rewards"]
                if not isinstance(rew, list) or not rew:
                    raise ReplayInputError(f"{where}: field 'rewards': expected a non-empty list of numbers")
                vals = [number(v, where, "rewards", allow_bool=True) for v in rew]
                t = len(vals)
                s = sum(v >= cut for v in vals)
            elif "trials" in row and "successes" in row:
                t = step_of(row["trials"], where, "trials")
                s = step_of(row["successes"], where, "successes")
                if s > t or t == 0:
                    raise ReplayInputError(f"{where}: field 'successes': need 0 <= successes <= trials and trials >= 1")
                signal_known = False
            else:
                raise ReplayInputError(f"{where}: field 'rewards': missing (or give 'trials' and 'successes')")
            tokens = tok_s = float("nan")
            if lengths is not None:
                if not isinstance(lengths, list) or len(lengths) != t:
                    raise ReplayInputError(f"{where}: field 'lengths': expected a list of {t} token counts")
                lens = [number(v, where, "lengths") for v in lengths]
                tokens = sum(lens)
                if vals:  # aligned with the rewards: the successes' share is known
                    tok_s = sum(ln for ln, v in zip(lens, vals) if v >= cut)
            elif "tokens_success" in row and "tokens_fail" in row:  # a history row (version >= 2): token columns
                ts, tf = (number(row[c], where, c) for c in ("tokens_success", "tokens_fail"))
                # how many rollouts those sums cover; history files before version 3 call them lengths_*
                ls, lf = (
                    int(number(row.get(c, row.get(o, 0)), where, c if c in row else o))
                    for c, o in OLD_TOKEN_COLUMNS.items()
                )
                if ls + lf == t:  # every rollout had a length (else the group's tokens are unknown)
                    tokens, tok_s = ts + tf, ts
            table.add_group(step, f"r:{k}:{lineno}", key, text or "", t, int(s), tokens, tok_s, vals or None)
            stats.rollouts += t
            rows += 1
            if rows % 50_000 == 0:
                tick(stats)
        if header is not None and digest is not None and header.get("sha256") not in (None, digest.hexdigest()):
            raise ReplayInputError(
                f"{path}: line 1: field 'sha256': checksum mismatch ({rows} rows, header says {header.get('rows')}); "
                "the file is truncated or was edited"
            )
        if signal_known and rows:
            stats.signal, stats.signal_label = "score", "rewards"
        stats.reward_label = (
            "recorded successes (rows with 'rewards': reward >= 0.5)" if thr is None else f"reward >= {thr:g}"
        )
        stats.files += 1
        tick(stats)
    if stepless:
        stats.notes.append("rows without 'step': a prompt's k-th row was taken as its step k - 1")
