"""Crash-safe, bit-exact state files.

Every piece of saved state (allocator, predictor, history) goes through :func:`atomic_write_json` and
:func:`read_json_checked`. A file is one JSON document::

    {"format": "<kind>", "version": <int>, "sha256": "<hex digest of the canonical payload>", "payload": {...}}

* Atomic: written to a temp file in the same folder, flushed, ``fsync``-ed, then ``os.replace``-d over the
  target (and the folder fsync-ed), so a kill at any moment leaves either the old or the new file, never a mix.
* Bit-exact: numpy arrays are stored as ``{"__ndarray__": dtype, "shape": [...], "data": base64(raw bytes)}``
  and Python floats through ``repr`` (JSON's float round-trip is exact), so save -> load reproduces state exactly.
* Checked: loading verifies the format name, refuses versions newer than this code knows, and recomputes the
  checksum; any mismatch raises :class:`StateFileError` naming the file and what to do.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "StateFileError",
    "atomic_write_json",
    "atomic_write_text",
    "decode",
    "encode",
    "iter_json_lines",
    "parse_json_line",
    "read_json_checked",
]


class StateFileError(ValueError):
    """A state file is missing, corrupt, truncated, of the wrong kind or from a newer version."""


def encode(obj: Any) -> Any:
    """Turn nested dicts/lists/tuples/numpy arrays/scalars into JSON-safe values (lossless)."""
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        if arr.dtype == object:
            raise TypeError("object arrays cannot be saved; convert to a list of str first")
        return {
            "__ndarray__": arr.dtype.str,
            "shape": list(arr.shape),
            "data": base64.b64encode(arr.tobytes()).decode("ascii"),
        }
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"state dict keys must be str, got {type(k).__name__}: {k!r}")
            out[k] = encode(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        if math.isfinite(f):
            return f
        return {"__float__": repr(f)}  # JSON has no inf/nan
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"cannot encode {type(obj).__name__} in a state file")


def decode(obj: Any) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            raw = base64.b64decode(obj["data"], validate=True)
            arr = np.frombuffer(raw, dtype=np.dtype(obj["__ndarray__"]))
            return arr.reshape(obj["shape"]).copy()
        if "__float__" in obj and len(obj) == 1:
            return float(obj["__float__"])
        return {k: decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v) for v in obj]
    return obj


def _canonical(payload: Any) -> bytes:
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + fsync + rename + dir fsync)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)


def atomic_write_json(path: str | os.PathLike[str], kind: str, version: int, payload: Any) -> None:
    """Encode ``payload`` and write it as a checksummed state file of format ``kind``."""
    enc = encode(payload)
    digest = hashlib.sha256(_canonical(enc)).hexdigest()
    doc = {"format": kind, "version": int(version), "sha256": digest, "payload": enc}
    atomic_write_text(path, json.dumps(doc, allow_nan=False, separators=(",", ":")) + "\n")


def read_json_checked(path: str | os.PathLike[str], kind: str, max_version: int) -> tuple[int, Any]:
    """Read a state file written by :func:`atomic_write_json`; return ``(version, decoded payload)``.

    Raises :class:`StateFileError` with a message that names the file and the fix.
    """
    p = Path(path)
    if not p.exists():
        raise StateFileError(f"{p}: no such state file; check the path (nothing was loaded)")
    try:
        text = p.read_text(encoding="utf-8")
        doc = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(
            f"{p}: corrupt or truncated state file ({exc.__class__.__name__}: {exc}); "
            "restore it from your previous checkpoint (nothing was loaded)"
        ) from None
    if not isinstance(doc, dict) or not {"format", "version", "sha256", "payload"} <= doc.keys():
        raise StateFileError(
            f"{p}: not a vipalloc state file (missing format/version/sha256/payload); "
            "pass a file written by vipalloc's save()"
        )
    if doc["format"] != kind:
        raise StateFileError(f"{p}: this is a {doc['format']!r} file, expected {kind!r}")
    version = doc["version"]
    if not isinstance(version, int) or version < 1:
        raise StateFileError(f"{p}: invalid format version {version!r}")
    if version > max_version:
        raise StateFileError(
            f"{p}: written by a newer vipalloc (format version {version} > {max_version} supported); "
            "upgrade vipalloc to load it"
        )
    digest = hashlib.sha256(_canonical(doc["payload"])).hexdigest()
    if digest != doc["sha256"]:
        raise StateFileError(
            f"{p}: checksum mismatch (file was modified or corrupted); "
            "restore it from your previous checkpoint (nothing was loaded)"
        )
    try:
        return version, decode(doc["payload"])
    except (ValueError, TypeError, KeyError) as exc:
        raise StateFileError(f"{p}: corrupt array data ({exc}); restore from a previous checkpoint") from None


# ---------------------------------------------------------------------------------------------- JSON Lines
def parse_json_line(
    path: str | os.PathLike[str], lineno: int, line: str, error: type[ValueError] = ValueError, hint: str = ""
) -> dict[str, Any]:
    """One JSON Lines row: the JSON object on ``line`` (line number ``lineno``, 1-based, of ``path``).

    Raises ``error`` (a ``ValueError`` subclass the caller picks) with one line naming the file, the line and what
    is wrong, followed by ``hint`` (e.g. ``"; the file may be truncated"``) for text that is not JSON.
    """
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: line {lineno}: not valid JSON ({exc.msg}){hint}") from None
    if not isinstance(row, dict):
        raise error(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def iter_json_lines(
    path: str | os.PathLike[str], error: type[ValueError] = ValueError, hint: str = ""
) -> Generator[tuple[int, str, dict[str, Any]], None, None]:
    """Stream a JSON Lines file: ``(line number, raw line, object)`` for every non-blank line, one at a time.

    The file is never held whole in memory. Errors (``error``, one line naming the file and the line): text that is
    not UTF-8, a line that is not JSON (see :func:`parse_json_line`, ``hint`` appended) or not a JSON object.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if type(row) is not dict:  # the error message (rare): the shared single-line parser words it
                    row = parse_json_line(path, lineno, line, error, hint)
                yield lineno, line, row
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text; expected JSON Lines (one JSON object per line)") from None
