"""Streaming readers for the rollout logs ``vipalloc replay`` understands, and the per-group aggregator.

Three formats (see ``docs/replay.md``):

* ``trl``: ``GRPOTrainer(log_completions=True)`` writes ``<output_dir>/completions/completions_<step:05d>.parquet``
  with columns ``step``, ``prompt``, ``completion``, one column per reward function, the ``log_extra`` columns and
  ``advantage``. TRL keeps the rows of the last generation batch only (a deque of ``generation_batch_size`` rows)
  and writes it at every logging step, so a file holds at most one generation batch, and consecutive files hold
  the *same* rows when logging is more frequent than generation: such repeated files are skipped.
* ``verl``: ``trainer.rollout_data_dir`` holds ``<global_step>.jsonl``, one JSON object per rollout with
  ``input``, ``output``, ``gts``, ``score``, ``step`` and the reward extras (``_write_generations``).
* ``history``: vipalloc's own ``history.jsonl`` (``RolloutHistory.save`` or hand-written rows with ``rewards`` or
  ``trials``/``successes``; an optional ``lengths`` list gives generated tokens per rollout).

Nothing is held per rollout: every rollout is folded at once into its (step, prompt) group in :class:`GroupTable`
(counts and token sums), and only one text per distinct prompt is kept (the GP embeds it). Readers raise
:class:`ReplayInputError` naming the file, the line (or parquet row) and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

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

FORMATS = ("trl", "verl", "history")
_TRL_FIXED = ("step", "prompt", "completion", "advantage", "image", "images")
_TRL_NAME = re.compile(r"completions_(\d+)\.parquet$")
_VERL_NAME = re.compile(r"(\d+)\.jsonl$")
_PARQUET_BATCH = 16_384  # rows per pyarrow batch: bounded memory whatever the file size


class ReplayInputError(ValueError):
    """A malformed or unusable input; the message is one line naming the file, the line/row and the field."""


def whitespace_tokens(texts: Sequence[str]) -> np.ndarray:
    """Approximate generated tokens per text: whitespace-separated words, float64 ``(N,)``."""
    return np.fromiter((len(t.split()) for t in texts), np.float64, len(texts))


@dataclass
class ReadOptions:
    """How rollouts become successes, groups and token counts.

    ``reward``: columns/fields whose sum is the reward (``None``: the format's total score); ``threshold``: a
    rollout succeeds when that reward is ``>= threshold`` (``None``: 1.0, i.e. full marks; history rows with
    ``trials``/``successes`` already say which rollouts succeeded); ``id_field``: a column/field naming the
    prompt (``None``: ``prompt_id`` when present, else the prompt text); ``count_tokens``: texts -> tokens per
    text (``None``: :func:`whitespace_tokens`, labelled approximate).
    """

    fmt: str | None = None
    reward: list[str] | None = None
    threshold: float | None = None
    id_field: str | None = None
    count_tokens: Callable[[Sequence[str]], np.ndarray] | None = None

    @property
    def success_threshold(self) -> float:
        return 1.0 if self.threshold is None else float(self.threshold)

    def tokens(self, texts: Sequence[str]) -> np.ndarray:
        fn = self.count_tokens or whitespace_tokens
        return np.asarray(fn(texts), np.float64)


@dataclass
class ReadStats:
    """What was read: files, rollouts, and what was skipped (and why)."""

    fmt: str = ""
    files: int = 0
    rollouts: int = 0
    skipped_duplicate_files: list[str] = field(default_factory=list)  # TRL: a repeat of the previous file's rows
    unscored_rollouts: int = 0  # TRL: every reward column None/NaN for the row (the reward function skipped it)
    reward_label: str = ""  # what success was thresholded on, for the report
    notes: list[str] = field(default_factory=list)


class GroupTable:
    """Per-(step, prompt) aggregates, filled while reading. Arrays have shape ``(G,)``, one entry per group.

    ``tokens`` is the sum of generated tokens of the group's rollouts (NaN when the log has no token
    information for it, e.g. a history row without ``lengths``).
    """

    def __init__(self) -> None:
        self._group: dict[tuple[int, str], int] = {}
        self.prompt_ids: list[str] = []
        self._prompt_index: dict[str, int] = {}
        self.texts: list[str] = []  # first text seen per prompt, aligned with prompt_ids
        self._cap = 1024
        self._n = 0
        self._step = np.zeros(self._cap, np.int64)
        self._pid = np.zeros(self._cap, np.int64)
        self._trials = np.zeros(self._cap, np.int64)
        self._succ = np.zeros(self._cap, np.int64)
        self._tokens = np.zeros(self._cap, np.float64)

    def __len__(self) -> int:
        return self._n

    def _index(self, step: int, key: str, text: str) -> int:
        g = self._group.get((step, key))
        if g is not None:
            return g
        if self._n == self._cap:
            self._cap *= 2
            for name in ("_step", "_pid", "_trials", "_succ", "_tokens"):
                old = getattr(self, name)
                new = np.zeros(self._cap, old.dtype)
                new[: self._n] = old
                setattr(self, name, new)
        p = self._prompt_index.get(key)
        if p is None:
            p = len(self.prompt_ids)
            self._prompt_index[key] = p
            self.prompt_ids.append(key)
            self.texts.append(text)
        g = self._n
        self._group[(step, key)] = g
        self._step[g] = step
        self._pid[g] = p
        self._n += 1
        return g

    def add_rollouts(
        self, steps: Sequence[int], keys: Sequence[str], texts: Sequence[str], success: Any, tokens: Any
    ) -> None:
        """Fold rollouts in: ``success`` bool ``(N,)``, ``tokens`` float64 ``(N,)`` (generated tokens each)."""
        idx = np.fromiter((self._index(s, k, t) for s, k, t in zip(steps, keys, texts)), np.int64, len(keys))
        np.add.at(self._trials, idx, 1)
        np.add.at(self._succ, idx, np.asarray(success, np.int64))
        np.add.at(self._tokens, idx, np.asarray(tokens, np.float64))

    def add_group(self, step: int, key: str, text: str, trials: int, successes: int, tokens: float) -> None:
        """Fold in a pre-aggregated group (a history row): ``tokens`` summed over its rollouts, NaN if unknown."""
        g = self._index(step, key, text)
        self._trials[g] += trials
        self._succ[g] += successes
        self._tokens[g] += tokens

    def arrays(self) -> dict[str, np.ndarray]:
        """Copies of the columns, sorted by (step, first appearance): ``step``, ``prompt_index``, ``trials``,
        ``successes``, ``tokens``."""
        order = np.argsort(self._step[: self._n], kind="stable")
        return {
            "step": self._step[: self._n][order].copy(),
            "prompt_index": self._pid[: self._n][order].copy(),
            "trials": self._trials[: self._n][order].copy(),
            "successes": self._succ[: self._n][order].copy(),
            "tokens": self._tokens[: self._n][order].copy(),
        }


# ---------------------------------------------------------------------------------------------- detection
def _expand(paths: Sequence[Path]) -> list[Path]:
    """Files named directly, plus the log files inside named directories (TRL's ``completions/`` included)."""
    out: list[Path] = []
    for p in paths:
        if not p.exists():
            raise ReplayInputError(f"{p}: no such file or directory")
        if p.is_file():
            out.append(p)
            continue
        inner = p / "completions" if (p / "completions").is_dir() else p
        found = sorted(inner.glob("*.parquet")) + sorted(inner.glob("*.jsonl"))
        if not found:
            raise ReplayInputError(
                f"{p}: no *.parquet or *.jsonl log files inside; pass TRL's completions/ folder, verl's "
                "rollout_data_dir, or a history.jsonl"
            )
        out.extend(found)
    return out


def _sniff(path: Path) -> str:
    if path.suffix == ".parquet":
        return "trl"
    try:
        with path.open(encoding="utf-8") as f:
            first = next((ln for ln in f if ln.strip()), "")
    except UnicodeDecodeError:
        raise ReplayInputError(f"{path}: line 1: not UTF-8 text (expected JSON Lines or parquet)") from None
    if not first:
        return "empty"
    try:
        row = json.loads(first)
    except json.JSONDecodeError as exc:
        raise ReplayInputError(f"{path}: line 1: not valid JSON ({exc.msg}); cannot tell the log format") from None
    if not isinstance(row, dict):
        raise ReplayInputError(f"{path}: line 1: expected a JSON object, got {type(row).__name__}")
    if row.get("format") == "vipalloc.history" or "prompt_id" in row and ("rewards" in row or "trials" in row):
        return "history"
    if "input" in row and "output" in row:
        return "verl"
    raise ReplayInputError(
        f"{path}: line 1: not a known log (verl rows have 'input'/'output'/'score', history rows 'step'/"
        "'prompt_id'/'rewards'); name the format with --format"
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
        m = (_TRL_NAME if fmt == "trl" else _VERL_NAME).search(f.name)
        return (int(m.group(1)) if m else -1, str(f))

    return fmt, sorted(files, key=order) if fmt != "history" else files


# ---------------------------------------------------------------------------------------------- shared helpers
def _number(value: Any, where: str, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplayInputError(f"{where}: field '{name}': expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ReplayInputError(f"{where}: field '{name}': not a finite number ({value!r})")
    return v


def _step_of(value: Any, where: str, name: str = "step") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise ReplayInputError(f"{where}: field '{name}': expected an integer step, got {value!r}")
    if value < 0:
        raise ReplayInputError(f"{where}: field '{name}': step must be >= 0, got {value!r}")
    return int(value)


def _key(value: Any, where: str, name: str) -> str:
    if value is None or isinstance(value, (bool, float, dict, list)):
        raise ReplayInputError(f"{where}: field '{name}': expected a string or integer prompt id, got {value!r}")
    return str(value)


def _message_text(value: Any) -> str:
    """A prompt or completion as text: strings as they are, conversations as ``role: content`` lines."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, np.ndarray)):
        parts = []
        for msg in value:
            if isinstance(msg, dict):
                content = msg.get("content")
                if isinstance(content, (list, tuple, np.ndarray)):  # multimodal blocks: keep the text ones
                    content = " ".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
                parts.append(f"{msg.get('role', '')}: {content}")
            else:
                parts.append(str(msg))
        return "\n".join(parts)
    return "" if value is None else str(value)


# ---------------------------------------------------------------------------------------------- trl
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
            "or which columns are log_extra, so name the reward with --reward NAME (repeat it to sum several)"
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


def _read_trl(files: Sequence[Path], opts: ReadOptions, table: GroupTable, stats: ReadStats, tick: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    previous: bytes | None = None
    thr = opts.success_threshold
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise ReplayInputError(f"{path}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
        names = [n for n in pf.schema_arrow.names if not n.startswith("__index_level")]
        rewards, id_col = _trl_columns(path, names, opts)
        stats.reward_label = " + ".join(rewards)
        cols = ["step", "prompt", "completion", *rewards, *([id_col] if id_col else [])]
        digest = hashlib.sha256()
        pending: list[tuple[list[int], list[str], list[str], np.ndarray, np.ndarray]] = []
        row0 = 0
        unscored = 0
        # One file holds one generation batch at most (TRL's bounded deque), so buffering its folded rows until
        # the file is known not to repeat the previous one is bounded; the raw rows are read batch by batch.
        for batch in _parquet_batches(pf, path, cols):
            data = batch.to_pydict()
            n = batch.num_rows

            def where(i: int, path: Path = path, row0: int = row0) -> str:  # parquet rows, 1-based like lines
                return f"{path}: row {row0 + i + 1}"

            steps = [_step_of(v, where(i)) for i, v in enumerate(data["step"])]
            prompts = data["prompt"]
            texts = [_message_text(p) for p in prompts]
            if id_col:
                keys = [_key(v, where(i), id_col) for i, v in enumerate(data[id_col])]
            else:
                keys = [t if isinstance(p, str) else json.dumps(p, sort_keys=True) for p, t in zip(prompts, texts)]
            total = np.zeros(n)
            scored = np.zeros(n, bool)
            for col in rewards:
                for i, v in enumerate(data[col]):
                    if v is None or (isinstance(v, float) and math.isnan(v)):
                        continue  # TRL logs None/NaN where a reward function skipped the row
                    total[i] += _number(v, where(i), col)
                    scored[i] = True
            completions = [_message_text(c) for c in data["completion"]]
            digest.update(json.dumps([keys, completions, total.tolist()]).encode())
            tokens = opts.tokens(completions)
            keep = np.flatnonzero(scored)
            unscored += n - keep.size
            pending.append(
                (
                    [steps[i] for i in keep],
                    [keys[i] for i in keep],
                    [texts[i] for i in keep],
                    total[keep] >= thr,
                    tokens[keep],
                )
            )
            row0 += n
        fingerprint = digest.digest()
        if row0 and fingerprint == previous:
            # logging_steps < steps_per_generation: TRL wrote the same generation batch again under a new step
            stats.skipped_duplicate_files.append(str(path))
            continue
        previous = fingerprint
        stats.unscored_rollouts += unscored
        for steps_b, keys_b, texts_b, succ_b, tok_b in pending:
            table.add_rollouts(steps_b, keys_b, texts_b, succ_b, tok_b)
            stats.rollouts += len(keys_b)
        stats.files += 1
        tick(stats)


# ---------------------------------------------------------------------------------------------- jsonl
def _lines(path: Path) -> Iterable[tuple[int, str]]:
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    yield lineno, line
    except UnicodeDecodeError:
        raise ReplayInputError(f"{path}: not UTF-8 text; expected JSON Lines") from None


def _parse(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ReplayInputError(f"{path}: line {lineno}: not valid JSON ({exc.msg}); is the file truncated?") from None
    if not isinstance(row, dict):
        raise ReplayInputError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def _flush_verl(buf: tuple[list[Any], ...], opts: ReadOptions, table: GroupTable, stats: ReadStats, tick: Any) -> None:
    """Fold the buffered rollouts (steps, keys, texts, successes, outputs) in, counting tokens in one batch."""
    if buf[0]:
        table.add_rollouts(buf[0], buf[1], buf[2], np.array(buf[3]), opts.tokens(buf[4]))
        stats.rollouts += len(buf[0])
        for b in buf:
            b.clear()
        tick(stats)


def _read_verl(files: Sequence[Path], opts: ReadOptions, table: GroupTable, stats: ReadStats, tick: Any) -> None:
    fields = opts.reward or ["score"]
    stats.reward_label = " + ".join(fields)
    thr = opts.success_threshold
    chunk = 4096  # rollouts per token-counting call (a tokenizer is much faster on batches)
    for path in files:
        m = _VERL_NAME.search(path.name)
        file_step = int(m.group(1)) if m else None
        buf: tuple[list[int], list[str], list[str], list[bool], list[str]] = ([], [], [], [], [])

        for lineno, line in _lines(path):
            row = _parse(path, lineno, line)
            where = f"{path}: line {lineno}"
            for name in ("input", "output"):
                if not isinstance(row.get(name), str):
                    raise ReplayInputError(f"{where}: field '{name}': expected a string, got {row.get(name)!r}")
            if "step" in row:
                step = _step_of(row["step"], where)
            elif file_step is not None:
                step = file_step
            else:
                raise ReplayInputError(f"{where}: field 'step': missing, and the file name is not <step>.jsonl")
            score = 0.0
            for name in fields:
                if name not in row:
                    raise ReplayInputError(f"{where}: field '{name}': missing (fields: {sorted(row)})")
                score += _number(row[name], where, name)
            text = row["input"]
            key = _key(row[opts.id_field], where, opts.id_field) if opts.id_field and opts.id_field in row else None
            if opts.id_field and key is None:
                raise ReplayInputError(f"{where}: field '{opts.id_field}': missing (--id-field)")
            if key is None and "prompt_id" in row:
                key = _key(row["prompt_id"], where, "prompt_id")
            buf[0].append(step)
            buf[1].append(text if key is None else key)
            buf[2].append(text)
            buf[3].append(score >= thr)
            buf[4].append(row["output"])
            if len(buf[0]) >= chunk:
                _flush_verl(buf, opts, table, stats, tick)
        _flush_verl(buf, opts, table, stats, tick)
        stats.files += 1
        tick(stats)


def _read_history(files: Sequence[Path], opts: ReadOptions, table: GroupTable, stats: ReadStats, tick: Any) -> None:
    for path in files:
        thr = opts.threshold
        digest = None
        header: dict[str, Any] | None = None
        rows = 0
        for lineno, line in _lines(path):
            row = _parse(path, lineno, line)
            where = f"{path}: line {lineno}"
            if lineno == 1 and "format" in row:
                if row.get("format") != "vipalloc.history":
                    raise ReplayInputError(f"{where}: field 'format': {row.get('format')!r} is not a vipalloc history")
                header = row
                digest = hashlib.sha256()
                if thr is None:
                    thr = float(row.get("success_threshold", 0.5))
                continue
            if digest is not None:
                digest.update(line.encode())
            for name in ("step", "prompt_id"):
                if name not in row:
                    raise ReplayInputError(f"{where}: field '{name}': missing")
            step = _step_of(row["step"], where)
            key = _key(row[opts.id_field or "prompt_id"], where, opts.id_field or "prompt_id")
            text = row.get("prompt")
            if text is not None and not isinstance(text, str):
                raise ReplayInputError(f"{where}: field 'prompt': expected a string")
            lengths = row.get("lengths")
            if "rewards" in row:
                rew = row["rewards"]
                if not isinstance(rew, list) or not rew:
                    raise ReplayInputError(f"{where}: field 'rewards': expected a non-empty list of numbers")
                vals = [_number(v, where, "rewards") for v in rew]
                t = len(vals)
                s = sum(v >= (0.5 if thr is None else thr) for v in vals)
            elif "trials" in row and "successes" in row:
                t = int(_step_of(row["trials"], where, "trials"))
                s = int(_step_of(row["successes"], where, "successes"))
                if s > t or t == 0:
                    raise ReplayInputError(f"{where}: field 'successes': need 0 <= successes <= trials and trials >= 1")
            else:
                raise ReplayInputError(f"{where}: field 'rewards': missing (or give 'trials' and 'successes')")
            tokens = float("nan")
            if lengths is not None:
                if not isinstance(lengths, list) or len(lengths) != t:
                    raise ReplayInputError(f"{where}: field 'lengths': expected a list of {t} token counts")
                tokens = sum(_number(v, where, "lengths") for v in lengths)
            table.add_group(step, key, text or "", t, s, tokens)
            if text and not table.texts[table._prompt_index[key]]:
                table.texts[table._prompt_index[key]] = text
            stats.rollouts += t
            rows += 1
            if rows % 50_000 == 0:
                tick(stats)
        if header is not None and digest is not None and header.get("sha256") not in (None, digest.hexdigest()):
            raise ReplayInputError(
                f"{path}: line 1: field 'sha256': checksum mismatch ({rows} rows, header says {header.get('rows')}); "
                "the file is truncated or was edited"
            )
        stats.reward_label = (
            "recorded successes (rows with 'rewards': reward >= 0.5)" if thr is None else f"reward >= {thr:g}"
        )
        stats.files += 1
        tick(stats)


def read_logs(
    paths: Sequence[Path], opts: ReadOptions, tick: Callable[[ReadStats], None] | None = None
) -> tuple[GroupTable, ReadStats]:
    """Read every log file into per-(step, prompt) groups. ``tick(stats)`` is called as reading progresses."""
    fmt, files = detect_format(paths, opts.fmt)
    table = GroupTable()
    stats = ReadStats(fmt=fmt)
    if opts.threshold is not None and not math.isfinite(opts.threshold):
        raise ReplayInputError(f"--threshold must be a finite number, got {opts.threshold}")
    reader = {"trl": _read_trl, "verl": _read_verl, "history": _read_history}[fmt]
    reader(files, opts, table, stats, tick or (lambda s: None))
    return table, stats
