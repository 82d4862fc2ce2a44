"""Progress events of the benchmark runners: ``progress(kind, info)`` callbacks.

Every ``run_*`` runner takes ``progress: Progress`` and calls it with one of these kinds:

* ``"phase"``: ``{"name": str, "total": int | None}``, a new stage of work with ``total`` units;
* ``"advance"``: ``{"n": int (default 1), "label": str (optional)}``, units of the current stage done;
* ``"run"``: ``{"label": str, "seed": int, "final": float | None, "wall": float | None}``, one run finished.

The runners never print: ``vipalloc bench`` turns the events into a progress display.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["Progress", "noop"]

Progress = Callable[[str, dict[str, Any]], None]


def noop(kind: str, info: dict[str, Any]) -> None:
    """The default ``progress``: ignore every event."""
    return None
