"""The CPU trainer's checkpoint file: written atomically, read without executing code.

A checkpoint holds tensors (model, optimizer, generator states) and plain data (numbers, strings; the allocator,
RNG state, metrics and config as JSON text). It is read with ``torch.load(..., weights_only=True)``, which unpickles
only tensors and plain containers: a file holding anything else (a tampered file, or one written by other code) is
refused with :class:`CheckpointError` before any of its objects is built. Checkpoints written by earlier versions of
the trainer hold the same types and load unchanged.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["CKPT_NAME", "CheckpointError", "read_checkpoint", "write_checkpoint"]

CKPT_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely (or at all); the message names the file and the fix."""


def write_checkpoint(run_dir: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors and plain data only) to ``run_dir/checkpoint.pt`` atomically and durably."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir) as tmpdir:
        tmp = Path(tmpdir) / CKPT_NAME
        torch.save(payload, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, run_dir / CKPT_NAME)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The payload of a checkpoint file, loaded on the CPU without executing code (``weights_only=True``).

    Raises :class:`CheckpointError` when the file holds objects other than tensors and plain data, or is not a
    readable checkpoint (truncated, another format)."""
    try:
        payload = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain data, so it was not loaded (unpickling them could "
            f"run code: {str(exc).splitlines()[0]}); if you trust the file, it was not written by this trainer: "
            "move it away (or use another run_dir) to start the run afresh"
        ) from None
    except (RuntimeError, EOFError, OSError) as exc:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({exc.__class__.__name__}: {str(exc).splitlines()[0]}); move it "
            "away (or use another run_dir) to start the run afresh"
        ) from None
    if not isinstance(payload, dict) or "config" not in payload:
        raise CheckpointError(f"{path} is not a trainer checkpoint (no config); move it away or use another run_dir")
    return payload
