"""Rollout history: one row per (training step, prompt) with that group's rollout outcomes.

A row holds the number of rollouts (``trials``), how many of them succeeded (``successes``: reward >= the
store's ``success_threshold``), the sum of the raw rewards and, when the caller reported them, the generated tokens
of the successful and of the failed rollouts (``tokens_success`` / ``tokens_fail``, summed) with how many rollouts
of each kind had a length (``token_rollouts_success`` / ``token_rollouts_fail``, the denominators of the token sums;
rollouts reported without a length count in neither). Rows are kept in growable numpy columns, so a store of
millions of rows costs ~40 bytes a row and windowed aggregates are vectorised.

File format (``save``/``load``): JSON Lines. The first line is a header::

    {"format": "vipalloc.history", "version": 1, "rows": N, "success_threshold": 0.5, "sha256": "..."}

followed by one row per line: ``{"step": 3, "prompt_id": "q17", "trials": 8, "successes": 5, "reward_sum": 5.0}``
(optionally ``"prompt": "<text>"`` the first time a prompt appears, and, since version 2, ``"tokens_success"``,
``"tokens_fail"``, ``"token_rollouts_success"``, ``"token_rollouts_fail"`` when lengths were recorded; version 1
files load with no lengths, and version 2 files, which named the two counts ``"lengths_success"`` /
``"lengths_fail"``, load with the old names mapped to the new). The checksum covers every row line, so a
truncated or edited file is detected. ``load`` also accepts hand-written files without a header whose rows give
either ``"rewards": [1, 0, 1]`` (optionally with ``"lengths": [212, 80, 130]``, generated tokens per rollout) or
``"trials"``/``"successes"``; every problem is reported with its line number.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vipalloc._io import StateFileError, atomic_write_text, parse_json_line

__all__ = ["HistoryAggregates", "RolloutHistory", "aggregate_duplicates", "validate_lengths", "validate_rewards"]

FORMAT = "vipalloc.history"
# 2 adds the token columns; 3 renames their counts lengths_* -> token_rollouts_* (a version-2 reader would take the
# new names for absent and silently drop them, so the bump makes it refuse instead). Versions 1 and 2 still load,
# the old count names (files, state dicts) read as the new ones.
VERSION = 3
_TOKEN_COLS = ("tokens_success", "tokens_fail", "token_rollouts_success", "token_rollouts_fail")
OLD_TOKEN_COLUMNS = {"token_rollouts_success": "lengths_success", "token_rollouts_fail": "lengths_fail"}


def validate_rewards(prompt_id: str, rewards: Any) -> np.ndarray:
    """Return ``rewards`` as a float64 1-D array, or raise ``ValueError`` naming the prompt and the problem.

    Verifiable rewards must be finite and in ``[0, 1]``; map other scales to ``[0, 1]`` before reporting them.
    """
    try:
        arr = np.asarray(rewards, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"rewards for prompt {prompt_id!r} are not numeric: {rewards!r}") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"rewards for prompt {prompt_id!r} must be a 1-D sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"rewards for prompt {prompt_id!r} contain NaN or inf ({arr.tolist()}); "
            "drop rollouts that could not be scored instead of reporting NaN"
        )
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError(
            f"rewards for prompt {prompt_id!r} are outside [0, 1] ({arr.min():g}..{arr.max():g}); "
            "verifiable rewards must be in [0, 1]: rescale or binarise them first"
        )
    return arr


def validate_lengths(prompt_id: str, lengths: Any, n: int) -> np.ndarray:
    """Return ``lengths`` (generated tokens per rollout, aligned with that prompt's ``n`` rewards) as float64
    ``(n,)``, or raise ``ValueError`` naming the prompt and the problem."""
    try:
        arr = np.asarray(lengths, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"lengths for prompt {prompt_id!r} are not numeric: {lengths!r}") from None
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.shape != (n,):
        raise ValueError(
            f"prompt {prompt_id!r} has {n} rewards but {arr.size} lengths; give one length (generated tokens) per "
            "rollout, in the order of its rewards"
        )
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(np.mod(arr, 1) != 0):
        raise ValueError(
            f"lengths for prompt {prompt_id!r} must be whole numbers of tokens >= 0, got {arr.tolist()[:8]}"
        )
    return arr


@dataclass(frozen=True)
class HistoryAggregates:
    """Per-prompt totals over a window of steps. All arrays have shape ``(P,)`` aligned with ``prompt_ids``."""

    prompt_ids: list[str]
    trials: np.ndarray  # int64, rollouts in the window
    successes: np.ndarray  # int64, successful rollouts in the window
    reward_sum: np.ndarray  # float64, sum of raw rewards in the window
    last_step: np.ndarray  # int64, latest step with a row for the prompt

    @property
    def rate(self) -> np.ndarray:
        """Empirical success rate ``successes / trials`` (float64, NaN-free: every prompt has trials >= 1)."""
        return self.successes / np.maximum(self.trials, 1)


class RolloutHistory:
    """Append-only store of rollout outcomes per (step, prompt).

    Parameters
    ----------
    success_threshold:
        A rollout counts as a success when its reward is ``>= success_threshold`` (in ``(0, 1]``).
    """

    def __init__(self, success_threshold: float = 0.5) -> None:
        if not (isinstance(success_threshold, (int, float)) and 0.0 < float(success_threshold) <= 1.0):
            raise ValueError(f"success_threshold must be in (0, 1], got {success_threshold!r}")
        self.success_threshold = float(success_threshold)
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._texts: dict[str, str] = {}
        self._n = 0
        cap = 64
        self._step = np.zeros(cap, np.int64)
        self._pid = np.zeros(cap, np.int64)
        self._trials = np.zeros(cap, np.int64)
        self._succ = np.zeros(cap, np.int64)
        self._rsum = np.zeros(cap, np.float64)
        # token columns: summed tokens of successful / failed rollouts, and how many of each had a length
        self._tok_s = np.zeros(cap, np.float64)
        self._tok_f = np.zeros(cap, np.float64)
        self._len_s = np.zeros(cap, np.int64)
        self._len_f = np.zeros(cap, np.int64)

    # ------------------------------------------------------------------ writing
    def __len__(self) -> int:
        return self._n

    @property
    def prompt_ids(self) -> list[str]:
        """Every prompt id ever recorded, in first-seen order."""
        return list(self._ids)

    @property
    def last_step(self) -> int | None:
        """The largest step recorded, or ``None`` for an empty history."""
        return int(self._step[: self._n].max()) if self._n else None

    def positions(self, prompt_ids: Sequence[str]) -> np.ndarray:
        """Each id's index into :attr:`prompt_ids` (int64 ``(N,)``; -1 for ids never recorded), without copying the
        id list or building a new index."""
        return np.array([self._index.get(str(p), -1) for p in prompt_ids], np.int64)

    def prompt_text(self, prompt_id: str) -> str | None:
        """The prompt text recorded for ``prompt_id`` (if any was given)."""
        return self._texts.get(prompt_id)

    def _grow(self, extra: int) -> None:
        need = self._n + extra
        cap = len(self._step)
        if need <= cap:
            return
        while cap < need:
            cap *= 2
        for name in ("_step", "_pid", "_trials", "_succ", "_rsum", "_tok_s", "_tok_f", "_len_s", "_len_f"):
            old = getattr(self, name)
            new = np.zeros(cap, old.dtype)
            new[: self._n] = old[: self._n]
            setattr(self, name, new)

    def _pid_of(self, prompt_id: str) -> int:
        idx = self._index.get(prompt_id)
        if idx is None:
            idx = len(self._ids)
            self._ids.append(prompt_id)
            self._index[prompt_id] = idx
        return idx

    def append(self, step: int, prompt_id: str, rewards: Any, prompt: str | None = None, lengths: Any = None) -> None:
        """Record one prompt's rollout rewards at ``step`` (rewards: 1-D, finite, in [0, 1]; ``lengths``:
        generated tokens per rollout, aligned with ``rewards``, or None)."""
        self.extend(
            step,
            [prompt_id],
            [rewards],
            prompts=None if prompt is None else [prompt],
            lengths=None if lengths is None else [lengths],
        )

    @property
    def has_lengths(self) -> bool:
        """True once any rollout was recorded with its length."""
        return bool(self._n and (self._len_s[: self._n].any() or self._len_f[: self._n].any()))

    def extend(
        self,
        step: int,
        prompt_ids: Sequence[str],
        rewards: Sequence[Any],
        prompts: Sequence[str | None] | None = None,
        lengths: Sequence[Any] | None = None,
    ) -> None:
        """Record several prompts' rewards at ``step``. ``lengths``: None, or one entry per prompt, each None
        (unknown) or the generated tokens of its rollouts aligned with its rewards. Validates everything before
        writing anything."""
        step = _check_step(step)
        ids = [str(p) for p in prompt_ids]
        if len(ids) != len(rewards):
            raise ValueError(f"got {len(ids)} prompt ids but {len(rewards)} reward arrays; pass one array per prompt")
        if prompts is not None and len(prompts) != len(ids):
            raise ValueError(f"got {len(ids)} prompt ids but {len(prompts)} prompt texts")
        arrs = [validate_rewards(pid, r) for pid, r in zip(ids, rewards)]
        lens: list[np.ndarray | None] | None = None
        if lengths is not None:
            if len(lengths) != len(ids):
                raise ValueError(f"got {len(ids)} prompt ids but {len(lengths)} length arrays; pass one per prompt")
            lens = [None if ln is None else validate_lengths(pid, ln, a.size) for pid, a, ln in zip(ids, arrs, lengths)]
        self.extend_validated(step, ids, arrs, prompts, lens)

    def extend_validated(
        self,
        step: int,
        prompt_ids: list[str],
        rewards: list[np.ndarray],
        prompts: Sequence[str | None] | None = None,
        lengths: list[np.ndarray | None] | None = None,
    ) -> None:
        """:meth:`extend` for inputs a caller has already checked (``step`` a whole number >= 0, ``rewards`` and
        ``lengths`` the arrays :func:`validate_rewards` / :func:`validate_lengths` returned, ``prompts`` aligned):
        records without checking them again (``Allocator.observe`` validates before it touches any state)."""
        ids = prompt_ids
        arrs = rewards
        trials = np.array([a.size for a in arrs], np.int64)
        succ = np.array([int(np.count_nonzero(a >= self.success_threshold)) for a in arrs], np.int64)
        rsum = np.array([float(a.sum()) for a in arrs], np.float64)
        tok = np.zeros((4, len(ids)))  # tokens of successes, of failures; lengths known among successes, failures
        if lengths is not None:
            for j, (a, ln) in enumerate(zip(arrs, lengths)):
                if ln is None:
                    continue
                ok = a >= self.success_threshold
                tok[:, j] = ln[ok].sum(), ln[~ok].sum(), ok.sum(), (~ok).sum()
        self._write_rows(np.full(len(ids), step, np.int64), ids, trials, succ, rsum, tok)
        if prompts is not None:
            for pid, text in zip(ids, prompts):
                if text is not None and pid not in self._texts:
                    self._texts[pid] = str(text)

    def extend_counts(
        self,
        step: int,
        prompt_ids: Sequence[str],
        successes: Any,
        trials: Any,
        reward_sum: Any = None,
        tokens: Any = None,
    ) -> None:
        """Record pre-aggregated groups (``successes`` of ``trials`` rollouts per prompt) at ``step``. ``tokens``:
        None, or float ``(4, M)``: summed tokens of the successful and of the failed rollouts, and how many
        successful and failed rollouts had a length (as :meth:`rows` returns them)."""
        step = _check_step(step)
        ids = [str(p) for p in prompt_ids]
        s = np.asarray(successes)
        t = np.asarray(trials)
        if s.shape != (len(ids),) or t.shape != (len(ids),):
            raise ValueError(f"successes and trials must have shape ({len(ids)},), got {s.shape} and {t.shape}")
        if not (np.issubdtype(s.dtype, np.integer) and np.issubdtype(t.dtype, np.integer)):
            if not (np.all(np.mod(s, 1) == 0) and np.all(np.mod(t, 1) == 0)):
                raise ValueError("successes and trials must be whole numbers")
        s = s.astype(np.int64)
        t = t.astype(np.int64)
        if np.any(t < 0) or np.any(s < 0) or np.any(s > t):
            raise ValueError("need 0 <= successes <= trials for every prompt")
        rs = s.astype(np.float64) if reward_sum is None else np.asarray(reward_sum, np.float64)
        if rs.shape != (len(ids),) or not np.all(np.isfinite(rs)) or np.any(rs < 0) or np.any(rs > t):
            raise ValueError("reward_sum must be finite and within [0, trials] for every prompt")
        tok = np.zeros((4, len(ids))) if tokens is None else np.asarray(tokens, np.float64)
        if tok.shape != (4, len(ids)) or not np.all(np.isfinite(tok)) or np.any(tok < 0):
            raise ValueError(f"tokens must be finite, >= 0, shape (4, {len(ids)})")
        if np.any(tok[2] > s) or np.any(tok[3] > t - s):
            raise ValueError("more rollouts with a length than rollouts of that outcome")
        self._write_rows(np.full(len(ids), step, np.int64), ids, t, s, rs, tok)

    def _write_rows(
        self,
        steps: np.ndarray,
        ids: list[str],
        trials: np.ndarray,
        succ: np.ndarray,
        rsum: np.ndarray,
        tok: np.ndarray,
    ) -> None:
        k = len(ids)
        self._grow(k)
        sl = slice(self._n, self._n + k)
        self._step[sl] = steps
        self._pid[sl] = [self._pid_of(p) for p in ids]
        self._trials[sl] = trials
        self._succ[sl] = succ
        self._rsum[sl] = rsum
        self._tok_s[sl], self._tok_f[sl] = tok[0], tok[1]
        self._len_s[sl], self._len_f[sl] = tok[2], tok[3]
        self._n += k

    def merge(self, other: RolloutHistory) -> None:
        """Append every row of ``other`` (token columns and first prompt texts included), step by step."""
        rows = other.rows()
        ids_all = other.prompt_ids
        for step in np.unique(rows["step"]):
            sel = rows["step"] == step
            ids = [ids_all[i] for i in rows["prompt_index"][sel]]
            tok = np.stack([rows[k][sel] for k in _TOKEN_COLS])
            self.extend_counts(
                int(step), ids, rows["successes"][sel], rows["trials"][sel], rows["reward_sum"][sel], tok
            )
        for pid in ids_all:
            text = other.prompt_text(pid)
            if text is not None and pid not in self._texts:
                self._texts[pid] = text

    # ------------------------------------------------------------------ reading
    def rows(self, window: int | None = None, *, before_step: int | None = None) -> dict[str, np.ndarray]:
        """Raw rows (copies) in the window: ``step``, ``prompt_index`` (into :attr:`prompt_ids`), ``trials``,
        ``successes``, ``reward_sum`` and the token columns ``tokens_success``, ``tokens_fail`` (float64 sums),
        ``token_rollouts_success``, ``token_rollouts_fail`` (int64 counts of the rollouts behind those sums).
        ``window`` counts steps back from the newest step kept (``None``: all)."""
        mask = self._window_mask(window, before_step)
        n = self._n
        return {
            "step": self._step[:n][mask].copy(),
            "prompt_index": self._pid[:n][mask].copy(),
            "trials": self._trials[:n][mask].copy(),
            "successes": self._succ[:n][mask].copy(),
            "reward_sum": self._rsum[:n][mask].copy(),
            "tokens_success": self._tok_s[:n][mask].copy(),
            "tokens_fail": self._tok_f[:n][mask].copy(),
            "token_rollouts_success": self._len_s[:n][mask].copy(),
            "token_rollouts_fail": self._len_f[:n][mask].copy(),
        }

    def _window_mask(self, window: int | None, before_step: int | None) -> np.ndarray:
        if window is not None and (not isinstance(window, (int, np.integer)) or window < 1):
            raise ValueError(f"window must be a positive number of steps or None, got {window!r}")
        steps = self._step[: self._n]
        mask = np.ones(self._n, bool)
        if before_step is not None:
            mask &= steps < before_step
        if window is not None and mask.any():
            newest = steps[mask].max()
            mask &= steps > newest - window
        return mask

    def aggregates(self, window: int | None = None, *, before_step: int | None = None) -> HistoryAggregates:
        """Per-prompt totals over the last ``window`` steps (all steps if ``None``) strictly before ``before_step``."""
        mask = self._window_mask(window, before_step)
        pid = self._pid[: self._n][mask]
        n_ids = len(self._ids)
        trials = np.bincount(pid, weights=self._trials[: self._n][mask], minlength=n_ids)
        succ = np.bincount(pid, weights=self._succ[: self._n][mask], minlength=n_ids)
        rsum = np.bincount(pid, weights=self._rsum[: self._n][mask], minlength=n_ids)
        last = np.full(n_ids, -1, np.int64)
        np.maximum.at(last, pid, self._step[: self._n][mask])
        present = np.bincount(pid, minlength=n_ids) > 0
        keep = np.flatnonzero(present)
        return HistoryAggregates(
            prompt_ids=[self._ids[i] for i in keep],
            trials=trials[keep].astype(np.int64),
            successes=succ[keep].astype(np.int64),
            reward_sum=rsum[keep],
            last_step=last[keep],
        )

    def iter_steps(self) -> Iterable[tuple[int, list[str], np.ndarray, np.ndarray]]:
        """Yield ``(step, prompt_ids, successes, trials)`` per step in increasing step order, rows of a step
        in insertion order (used to replay a history into a predictor)."""
        if not self._n:
            return
        steps = self._step[: self._n]
        order = np.argsort(steps, kind="stable")
        bounds = np.flatnonzero(np.diff(steps[order])) + 1
        for chunk in np.split(order, bounds):
            yield (
                int(steps[chunk[0]]),
                [self._ids[i] for i in self._pid[chunk]],
                self._succ[chunk].copy(),
                self._trials[chunk].copy(),
            )

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Exact state as arrays (for the allocator's single-file checkpoint)."""
        text_ids = [p for p in self._ids if p in self._texts]
        return {
            "success_threshold": self.success_threshold,
            "prompt_ids": list(self._ids),
            "text_ids": text_ids,
            "texts": [self._texts[p] for p in text_ids],
            "step": self._step[: self._n].copy(),
            "prompt_index": self._pid[: self._n].copy(),
            "trials": self._trials[: self._n].copy(),
            "successes": self._succ[: self._n].copy(),
            "reward_sum": self._rsum[: self._n].copy(),
            "tokens_success": self._tok_s[: self._n].copy(),
            "tokens_fail": self._tok_f[: self._n].copy(),
            "token_rollouts_success": self._len_s[: self._n].copy(),
            "token_rollouts_fail": self._len_f[: self._n].copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> RolloutHistory:
        """Rebuild a history from :meth:`state_dict` output (validated)."""
        try:
            h = cls(success_threshold=float(state["success_threshold"]))
            ids = [str(p) for p in state["prompt_ids"]]
            cols = [np.asarray(state[k]) for k in ("step", "prompt_index", "trials", "successes", "reward_sum")]
            n0 = len(cols[0])
            # no token columns: written before token budgets (no lengths known); lengths_*: before the counts' rename
            tok = [np.asarray(v) if (v := _token_field(state, k)) is not None else np.zeros(n0) for k in _TOKEN_COLS]
        except (KeyError, TypeError, ValueError) as exc:
            raise StateFileError(f"history state is malformed ({exc})") from None
        n = len(cols[0])
        if any(len(c) != n for c in (*cols, *tok)):
            raise StateFileError("history state columns have different lengths")
        if n and (cols[1].min() < 0 or cols[1].max() >= len(ids)):
            raise StateFileError("history state refers to unknown prompt indices")
        if n and (np.any(cols[2] < 0) or np.any(cols[3] < 0) or np.any(cols[3] > cols[2])):
            raise StateFileError("history state has invalid trials/successes")
        for pid in ids:
            h._pid_of(pid)
        if len(h._ids) != len(ids):
            raise StateFileError("history state has duplicate prompt ids")
        h._grow(n)
        h._step[:n], h._pid[:n], h._trials[:n], h._succ[:n], h._rsum[:n] = cols
        h._tok_s[:n], h._tok_f[:n], h._len_s[:n], h._len_f[:n] = tok
        h._n = n
        h._texts = dict(zip(state.get("text_ids", []), state.get("texts", [])))
        return h

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the history as checksummed JSON Lines, atomically (old file intact if interrupted)."""
        lines = []
        seen_text: set[str] = set()
        for i in range(self._n):
            pid = self._ids[self._pid[i]]
            row: dict[str, Any] = {
                "step": int(self._step[i]),
                "prompt_id": pid,
                "trials": int(self._trials[i]),
                "successes": int(self._succ[i]),
                "reward_sum": float(self._rsum[i]),
            }
            if self._len_s[i] or self._len_f[i]:
                row["tokens_success"] = float(self._tok_s[i])
                row["tokens_fail"] = float(self._tok_f[i])
                row["token_rollouts_success"] = int(self._len_s[i])
                row["token_rollouts_fail"] = int(self._len_f[i])
            if pid in self._texts and pid not in seen_text:
                row["prompt"] = self._texts[pid]
                seen_text.add(pid)
            lines.append(json.dumps(row, separators=(",", ":")))
        body = "".join(line + "\n" for line in lines)
        header = {
            "format": FORMAT,
            "version": VERSION,
            "rows": self._n,
            "success_threshold": self.success_threshold,
            "sha256": hashlib.sha256(body.encode()).hexdigest(),
        }
        atomic_write_text(path, json.dumps(header, separators=(",", ":")) + "\n" + body)

    @classmethod
    def load(cls, path: str | os.PathLike[str], success_threshold: float = 0.5) -> RolloutHistory:
        """Read a history file (see module docstring). Raises :class:`~vipalloc._io.StateFileError` (a
        ``ValueError``) naming the file, the line and the fix for anything corrupt, truncated or malformed."""
        p = Path(path)
        if not p.exists():
            raise StateFileError(f"{p}: no such history file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise StateFileError(f"{p}: not a UTF-8 text file; a history file is JSON Lines") from None
        lines = text.splitlines(keepends=True)
        header = None
        start = 0
        if lines:
            first = _parse_line(p, 1, lines[0])
            if "format" in first:
                header = first
                start = 1
        if header is not None:
            if header.get("format") != FORMAT:
                raise StateFileError(f"{p}: line 1: format {header.get('format')!r} is not {FORMAT!r}")
            version = header.get("version")
            if not isinstance(version, int) or version < 1:
                raise StateFileError(f"{p}: line 1: invalid version {version!r}")
            if version > VERSION:
                raise StateFileError(
                    f"{p}: written by a newer vipalloc (history format {version} > {VERSION}); upgrade vipalloc"
                )
            body = "".join(lines[1:])
            if hashlib.sha256(body.encode()).hexdigest() != header.get("sha256"):
                n_rows = sum(1 for ln in lines[1:] if ln.strip())
                raise StateFileError(
                    f"{p}: checksum mismatch ({n_rows} rows present, header says {header.get('rows')}): the file "
                    "is truncated or was edited; restore it from a previous copy"
                )
            success_threshold = float(header.get("success_threshold", success_threshold))
        h = cls(success_threshold=success_threshold)
        for lineno in range(start, len(lines)):
            line = lines[lineno]
            if not line.strip():
                continue
            row = _parse_line(p, lineno + 1, line)
            _ingest_row(h, p, lineno + 1, row)
        return h


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise ValueError(f"step must be an integer, got {step!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


def _parse_line(path: Path, lineno: int, line: str) -> dict[str, Any]:
    return parse_json_line(path, lineno, line, StateFileError, "; the file may be truncated")


def _token_field(d: dict[str, Any], name: str) -> Any:
    """``d[name]`` for a token column, else the value under the column's name before version 3, else None."""
    old = OLD_TOKEN_COLUMNS.get(name)
    if name in d:
        if old is not None and old in d and not np.array_equal(np.asarray(d[old]), np.asarray(d[name])):
            raise ValueError(f"'{name}' and its old name '{old}' are both given and differ; keep one")
        return d[name]
    return d.get(old) if old is not None else None


def _ingest_row(h: RolloutHistory, path: Path, lineno: int, row: dict[str, Any]) -> None:
    where = f"{path}: line {lineno}"
    if "step" not in row or "prompt_id" not in row:
        raise StateFileError(f"{where}: each row needs 'step' and 'prompt_id'")
    pid = row["prompt_id"]
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise StateFileError(f"{where}: prompt_id must be a string, got {pid!r}")
    prompt = row.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise StateFileError(f"{where}: 'prompt' must be a string")
    try:
        if "rewards" in row:
            if not isinstance(row["rewards"], list):
                raise ValueError("'rewards' must be a list of numbers")
            lengths = row.get("lengths")
            if lengths is not None and not isinstance(lengths, list):
                raise ValueError("'lengths' must be a list of token counts, one per reward")
            h.extend(row["step"], [str(pid)], [row["rewards"]], prompts=[prompt], lengths=[lengths])
        elif "trials" in row and "successes" in row:
            t, s = row["trials"], row["successes"]
            rs = row.get("reward_sum", s)
            for name, v in (("trials", t), ("successes", s)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"'{name}' must be an integer, got {v!r}")
            if isinstance(rs, bool) or not isinstance(rs, (int, float)) or not math.isfinite(rs):
                raise ValueError(f"'reward_sum' must be a finite number, got {rs!r}")
            tok = [0 if (v := _token_field(row, k)) is None else v for k in _TOKEN_COLS]
            for name, v in zip(_TOKEN_COLS, tok):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                    raise ValueError(f"'{name}' must be a finite number >= 0, got {v!r}")
            tokens = np.array(tok, np.float64).reshape(4, 1)
            h.extend_counts(row["step"], [str(pid)], np.array([s]), np.array([t]), np.array([float(rs)]), tokens)
            if prompt is not None and str(pid) not in h._texts:
                h._texts[str(pid)] = prompt
        else:
            raise ValueError("each row needs 'rewards' (a list) or 'trials' and 'successes'")
    except ValueError as exc:
        raise StateFileError(f"{where}: {exc}") from None


def aggregate_duplicates(
    ids: list[str], succ: np.ndarray, trials: np.ndarray
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Merge rows of the same prompt within one step (a hand-written history may repeat a prompt)."""
    uniq = list(dict.fromkeys(ids))
    if len(uniq) == len(ids):
        return ids, succ, trials
    index = {p: i for i, p in enumerate(uniq)}
    pos = np.array([index[p] for p in ids])
    return (
        uniq,
        np.bincount(pos, weights=succ, minlength=len(uniq)).astype(np.int64),
        np.bincount(pos, weights=trials, minlength=len(uniq)).astype(np.int64),
    )
