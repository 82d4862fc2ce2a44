"""Progress events of the benchmark runners: ``progress(kind, info)`` callbacks, and their display.

Every ``run_*`` runner takes ``progress: Progress`` and calls it with one of these kinds:

* ``"phase"``: ``{"name": str, "total": int | None}``, a new stage of work with ``total`` units;
* ``"advance"``: ``{"n": int (default 1), "label": str (optional)}``, units of the current stage done;
* ``"run"``: one run (or measurement) finished: ``{"label": str}`` plus any of ``"seed": int``, ``"wall": float``
  (seconds), ``"final": float`` (the run's headline number) and ``"detail": str``;
* ``"eval"``: an evaluation inside a run: ``{"label": str, "step": int, "metric": str, "value": float}``.

The runners never print. :class:`BenchDisplay` (what ``vipalloc bench`` passes) turns the events into rich bars on
a terminal and, when standard output is not a terminal, into one flushed line per stage, finished run and
evaluation (:class:`vipalloc.console.ProgressConsole`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vipalloc.console import ProgressConsole, format_eval, format_run

__all__ = ["BenchDisplay", "Progress", "noop"]

Progress = Callable[[str, dict[str, Any]], None]


def noop(kind: str, info: dict[str, Any]) -> None:
    """The default ``progress``: ignore every event."""
    return None


class BenchDisplay:
    """Adapts the runners' ``progress(kind, info)`` events to a :class:`~vipalloc.console.ProgressConsole`: one
    bar per phase on a terminal (finished runs logged above it), plain lines otherwise."""

    def __init__(self, console: ProgressConsole) -> None:
        self.console = console
        self.task: int | None = None

    def __call__(self, kind: str, info: dict[str, Any]) -> None:
        c = self.console
        if kind == "phase":
            if self.task is not None:
                c.finish(self.task)
            name = str(info.get("name", ""))
            self.task = c.add_task(name, total=info.get("total"))
            c.note(f"{name}: started")
        elif kind == "advance" and self.task is not None:
            c.advance(self.task, info.get("n", 1))
            if "label" in info:
                c.update(self.task, description=str(info["label"]))
        elif kind == "run":
            c.line(format_run(info))
        elif kind == "eval":
            if c.plain:  # on a terminal the bar carries it; a log keeps every evaluation
                c.line(format_eval(info))
