"""What every ``vipalloc replay`` reader shares: options, statistics, the per-group table and the field checks.

The readers (:mod:`vipalloc.replay.read_trl`, :mod:`vipalloc.replay.read_jsonl`) fold each rollout at once into
the group the *trainer* formed for it (TRL's consecutive block, verl's ``uid``, Tinker's ``group_idx``, a history
row), so nothing is held per rollout. A group also remembers which prompt it belongs to (the allocator plans per
prompt) and the range of the signal training saw (TRL's logged ``advantage``, or the logged total score), which
says whether the group had zero advantage as trained.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MAX_STEP",
    "GroupTable",
    "ReadOptions",
    "ReadStats",
    "ReplayInputError",
    "completion_text",
    "number",
    "prompt_key",
    "prompt_text",
    "step_of",
    "whitespace_tokens",
]

MAX_STEP = 2**62  # steps are stored as int64; anything this large is not a training step


class ReplayInputError(ValueError):
    """A malformed or unusable input; the message is one line naming the file, the line/row and the field."""


def whitespace_tokens(texts: Sequence[str]) -> np.ndarray:
    """Approximate generated tokens per text: whitespace-separated words, float64 ``(N,)``."""
    return np.fromiter((len(t.split()) for t in texts), np.float64, len(texts))


@dataclass
class ReadOptions:
    """How rollouts become successes, groups and token counts.

    ``reward``: columns/fields whose sum is the reward (``None``: the format's total score); ``threshold``: a
    rollout succeeds when that reward is ``>= threshold`` (``None``: 1.0, i.e. full marks, allowed only when every
    reward read is 0 or 1; history rows with ``trials``/``successes`` already say which rollouts succeeded);
    ``id_field``: a column/field naming the prompt (``None``: ``prompt_id`` when present, else the prompt text);
    ``group_size``: TRL rollouts per group (``None``: inferred from the log's layout; ``0``: each run of
    consecutive rows of one prompt is one group); ``count_tokens``: texts -> tokens per text (``None``:
    :func:`whitespace_tokens`, labelled approximate).
    """

    fmt: str | None = None
    reward: list[str] | None = None
    threshold: float | None = None
    id_field: str | None = None
    group_size: int | None = None
    count_tokens: Callable[[Sequence[str]], np.ndarray] | None = None

    @property
    def success_threshold(self) -> float:
        """The threshold in use: ``threshold``, or 1.0 (full marks on a 0/1 reward)."""
        return 1.0 if self.threshold is None else float(self.threshold)

    def tokens(self, texts: Sequence[str]) -> np.ndarray:
        """Generated tokens of each text, float64 ``(N,)``."""
        fn = self.count_tokens or whitespace_tokens
        return np.asarray(fn(texts), np.float64)


@dataclass
class ReadStats:
    """What was read: files, rollouts, how groups were formed, the reward's range, and what was skipped (and why).

    ``signal``: what says a group had zero advantage as trained: ``"advantage"`` (TRL's logged advantage),
    ``"score"`` (the logged total score / rewards, all equal in the group) or ``None`` (the log does not say).
    """

    fmt: str = ""
    files: int = 0  # files read (repeated TRL files excluded)
    files_total: int = 0  # files found
    current_file: int = 0  # 1-based index of the file being read, for progress lines
    rollouts: int = 0
    skipped_duplicate_files: list[str] = field(default_factory=list)  # TRL: a repeat of the previous file's rows
    unscored_rollouts: int = 0  # TRL: every reward column None/NaN for the row (the reward function skipped it)
    reward_label: str = ""  # what success was thresholded on, for the report
    signal: str | None = None
    signal_label: str = ""  # the column/field the signal came from
    grouping: list[str] = field(default_factory=list)  # how groups were formed (one entry per distinct method)
    notes: list[str] = field(default_factory=list)
    reward_min: float = math.inf
    reward_max: float = -math.inf
    reward_values: int = 0
    reward_non_binary: int = 0  # reward values other than 0 and 1

    def group_method(self, text: str) -> None:
        """Record how a file's groups were formed (each distinct method once)."""
        if text and text not in self.grouping:
            self.grouping.append(text)

    def observe_rewards(self, values: np.ndarray) -> None:
        """Track the range of the success reward (float64 ``(N,)``) to catch a continuous reward read as 0/1."""
        v = np.asarray(values, np.float64)
        if v.size:
            self.reward_min = min(self.reward_min, float(v.min()))
            self.reward_max = max(self.reward_max, float(v.max()))
            self.reward_values += int(v.size)
            self.reward_non_binary += int(np.count_nonzero((v != 0.0) & (v != 1.0)))


_COLUMNS = (
    ("_step", np.int64),
    ("_pid", np.int64),
    ("_trials", np.int64),
    ("_succ", np.int64),
    ("_tokens", np.float64),
    ("_tok_s", np.float64),
    ("_sig_lo", np.float64),
    ("_sig_hi", np.float64),
    ("_sig_n", np.int64),
)


class GroupTable:
    """Per-group aggregates, filled while reading. Arrays have shape ``(G,)``, one entry per group.

    A group is what the trainer normalised advantages over: ``(step, group key)``; it belongs to one prompt
    (``prompt_index`` into :attr:`prompt_ids`). ``tokens`` is the sum of generated tokens of the group's rollouts
    (NaN when the log has no token information for it); ``tokens_success`` the part generated by the successful
    rollouts (NaN when the log does not say which lengths belong to which outcome). ``signal_lo`` / ``signal_hi``
    are the smallest / largest training signal of its rollouts (advantage or total score, see
    :class:`ReadStats`), ``signal_n`` how many rollouts had one.
    """

    def __init__(self) -> None:
        self._group: dict[tuple[int, str], int] = {}
        self.prompt_ids: list[str] = []
        self._prompt_index: dict[str, int] = {}
        self.texts: list[str] = []  # first non-empty text seen per prompt, aligned with prompt_ids
        self._cap = 1024
        self._n = 0
        for name, dtype in _COLUMNS:
            setattr(self, name, np.zeros(self._cap, dtype))
        self._sig_lo[:] = np.inf
        self._sig_hi[:] = -np.inf

    _step: np.ndarray
    _pid: np.ndarray
    _trials: np.ndarray
    _succ: np.ndarray
    _tokens: np.ndarray
    _tok_s: np.ndarray
    _sig_lo: np.ndarray
    _sig_hi: np.ndarray
    _sig_n: np.ndarray

    def __len__(self) -> int:
        return self._n

    def _grow(self) -> None:
        self._cap *= 2
        for name, dtype in _COLUMNS:
            old = getattr(self, name)
            new = np.zeros(self._cap, dtype)
            new[: self._n] = old[: self._n]
            if name == "_sig_lo":
                new[self._n :] = np.inf
            elif name == "_sig_hi":
                new[self._n :] = -np.inf
            setattr(self, name, new)

    def _index(self, step: int, group: str, key: str, text: str) -> int:
        g = self._group.get((step, group))
        if g is not None:
            return g
        if self._n == self._cap:
            self._grow()
        p = self._prompt_index.get(key)
        if p is None:
            p = len(self.prompt_ids)
            self._prompt_index[key] = p
            self.prompt_ids.append(key)
            self.texts.append(text)
        elif text and not self.texts[p]:
            self.texts[p] = text
        g = self._n
        self._group[(step, group)] = g
        self._step[g] = step
        self._pid[g] = p
        self._n += 1
        return g

    def add_rollouts(
        self,
        steps: Sequence[int],
        groups: Sequence[str],
        keys: Sequence[str],
        texts: Sequence[str],
        success: Any,
        tokens: Any,
        signal: Any = None,
    ) -> None:
        """Fold ``N`` rollouts in: each in group ``(steps[i], groups[i])`` of prompt ``keys[i]`` (text
        ``texts[i]``); ``success`` bool ``(N,)``; ``tokens`` float64 ``(N,)`` (generated tokens each, NaN unknown);
        ``signal`` float64 ``(N,)`` (the advantage or total score training saw, NaN unknown) or ``None``."""
        n = len(keys)
        idx = np.fromiter((self._index(s, g, k, t) for s, g, k, t in zip(steps, groups, keys, texts)), np.int64, n)
        ok = np.asarray(success, bool)
        np.add.at(self._trials, idx, 1)
        np.add.at(self._succ, idx, ok.astype(np.int64))
        tok = np.asarray(tokens, np.float64)
        np.add.at(self._tokens, idx, tok)
        np.add.at(self._tok_s, idx, np.where(ok, tok, 0.0))
        if signal is not None:
            sig = np.asarray(signal, np.float64)
            known = np.isfinite(sig)
            np.fmin.at(self._sig_lo, idx[known], sig[known])
            np.fmax.at(self._sig_hi, idx[known], sig[known])
            np.add.at(self._sig_n, idx[known], 1)

    def add_group(
        self,
        step: int,
        group: str,
        key: str,
        text: str,
        trials: int,
        successes: int,
        tokens: float,
        tokens_success: float = float("nan"),
        signal: Sequence[float] | None = None,
    ) -> None:
        """Fold in a pre-aggregated group (a history row): ``tokens`` summed over its rollouts, NaN if unknown;
        ``tokens_success`` the successful rollouts' share of it, NaN if unknown; ``signal``: its rollouts' rewards
        when the row lists them (``None``: unknown)."""
        g = self._index(step, group, key, text)
        self._trials[g] += trials
        self._succ[g] += successes
        self._tokens[g] += tokens
        self._tok_s[g] += tokens_success
        if signal is not None and len(signal):
            self._sig_lo[g] = min(self._sig_lo[g], min(signal))
            self._sig_hi[g] = max(self._sig_hi[g], max(signal))
            self._sig_n[g] += len(signal)

    def arrays(self) -> dict[str, np.ndarray]:
        """Copies of the columns, sorted by (step, first appearance): ``step``, ``prompt_index``, ``trials``,
        ``successes``, ``tokens``, ``tokens_success``, ``signal_lo``, ``signal_hi``, ``signal_n``."""
        order = np.argsort(self._step[: self._n], kind="stable")
        names = {
            "step": "_step",
            "prompt_index": "_pid",
            "trials": "_trials",
            "successes": "_succ",
            "tokens": "_tokens",
            "tokens_success": "_tok_s",
            "signal_lo": "_sig_lo",
            "signal_hi": "_sig_hi",
            "signal_n": "_sig_n",
        }
        return {k: getattr(self, v)[: self._n][order].copy() for k, v in names.items()}


# ---------------------------------------------------------------------------------------------- field checks
def number(value: Any, where: str, name: str, *, allow_bool: bool = False) -> float:
    """A finite number from a log field; ``allow_bool``: JSON ``true``/``false`` read as 1/0 (rewards)."""
    if type(value) is float and math.isfinite(value):  # the common case first: millions of rows
        return value
    if isinstance(value, bool):
        if allow_bool:
            return float(value)
        raise ReplayInputError(f"{where}: field '{name}': expected a number, got {value!r}")
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise ReplayInputError(f"{where}: field '{name}': expected a number, got {value!r}")
    try:
        v = float(value)
    except OverflowError:
        raise ReplayInputError(f"{where}: field '{name}': number too large ({value!r})") from None
    if not math.isfinite(v):
        raise ReplayInputError(f"{where}: field '{name}': not a finite number ({value!r})")
    return v


def step_of(value: Any, where: str, name: str = "step") -> int:
    """A non-negative integer (a step, or a count) below :data:`MAX_STEP` from a log field."""
    if type(value) is int and 0 <= value < MAX_STEP:  # the common case first
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ReplayInputError(f"{where}: field '{name}': expected an integer, got {value!r}")
    if isinstance(value, (float, np.floating)) and not (math.isfinite(value) and float(value).is_integer()):
        raise ReplayInputError(f"{where}: field '{name}': expected an integer, got {value!r}")
    if value < 0:
        raise ReplayInputError(f"{where}: field '{name}': must be >= 0, got {value!r}")
    if value >= MAX_STEP:
        raise ReplayInputError(f"{where}: field '{name}': {value!r} is too large (must be below 2**62)")
    return int(value)


def prompt_key(value: Any, where: str, name: str) -> str:
    """A prompt id from a log field: strings and integers (as text)."""
    if value is None or isinstance(value, (bool, float, dict, list)):
        raise ReplayInputError(f"{where}: field '{name}': expected a string or integer prompt id, got {value!r}")
    return str(value)


def _content(value: Any) -> str:
    if isinstance(value, (list, tuple, np.ndarray)):  # multimodal blocks: keep the text ones
        return " ".join(str(b.get("text", "")) for b in value if isinstance(b, dict))
    return "" if value is None else str(value)


def prompt_text(value: Any) -> str:
    """A prompt as text: strings as they are, conversations as ``role: content`` lines (the group's identity)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        parts = []
        for msg in value:
            if isinstance(msg, dict):
                parts.append(f"{msg.get('role', '')}: {_content(msg.get('content'))}")
            else:
                parts.append(str(msg))
        return "\n".join(parts)
    return "" if value is None else str(value)


def completion_text(value: Any) -> str:
    """What the policy generated: a string as it is; a conversation's assistant messages' content only (no role
    prefix, no tool output), joined by newlines. Token and word counts are taken on this text."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        parts = []
        for msg in value:
            if isinstance(msg, dict):
                if msg.get("role", "assistant") == "assistant":
                    parts.append(_content(msg.get("content")))
            else:
                parts.append(str(msg))
        return "\n".join(parts)
    return "" if value is None else str(value)
