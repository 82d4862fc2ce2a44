"""How long work shows its progress: rich bars on a terminal, plain flushed lines everywhere else.

``vipalloc demo``, ``vipalloc train`` and ``vipalloc bench ...`` run for minutes. On a terminal they draw rich
progress bars; when standard output is a log file, a pipe, CI or ``nohup``, bars would print nothing (rich does
not animate a non-terminal) and Python would buffer whatever else is printed, so the log stayed empty for the
whole run. :class:`ProgressConsole` therefore switches to one plain line per event, prefixed with the command
and flushed at once::

    [demo] run uniform seed 3 finished: 88 s, mean@8 0.210
    [demo] uniform seed 3 step 40 eval mean@8 0.190

The callers decide which events deserve a line (finished runs and evaluations, not every step). :func:`fail` is
every command's one-line error exit. This module imports none of ours: ``vipalloc.training``, ``vipalloc.bench``,
``vipalloc.replay`` and the CLI use it.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any, TextIO

__all__ = ["ProgressConsole", "fail", "format_eval", "format_run"]


def fail(message: str, code: int = 2) -> None:
    """Print ``error: <message>`` as one line on stderr and exit with ``code`` (never a traceback for bad input).

    Every command's error path (``vipalloc allocate``, ``replay``, ``bench``) ends here, so the library never
    imports the CLI to report an error.
    """
    import typer

    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def format_run(info: dict[str, Any]) -> str:
    """``run <label>[ seed <seed>] finished[: <wall> s, final <final>, <detail>]``: one finished run.

    ``info``: ``label`` (str) and any of ``seed`` (int), ``wall`` (seconds), ``final`` (the run's headline
    number, 3 decimals) and ``detail`` (str, appended as is)."""
    head = f"run {info.get('label', '?')}" + (f" seed {info['seed']}" if info.get("seed") is not None else "")
    parts = []
    if info.get("wall") is not None:
        wall = float(info["wall"])
        parts.append(f"{wall:.1f} s" if wall < 10 else f"{wall:.0f} s")
    if info.get("final") is not None:
        parts.append(f"final {float(info['final']):.3f}")
    if info.get("detail"):
        parts.append(str(info["detail"]))
    return f"{head} finished" + (": " + ", ".join(parts) if parts else "")


def format_eval(info: dict[str, Any]) -> str:
    """``<label> step <step> eval <metric> <value>``: one evaluation inside a run (``info``: ``label``,
    ``step``, ``metric`` such as ``"mean@8"``, ``value``)."""
    value = float(info["value"])
    return f"{info.get('label', '?')} step {info.get('step')} eval {info.get('metric', 'acc')} {value:.3f}"


class ProgressConsole:
    """A rich :class:`~rich.progress.Progress` on a terminal, plain ``[prefix] text`` lines otherwise.

    Parameters
    ----------
    prefix:
        Names the command in every plain line (``"demo"``, ``"bench simulate"``).
    stream:
        Where to write (default: ``sys.stdout`` at construction).
    plain:
        ``None`` (default): plain lines exactly when ``stream`` is not a terminal. ``True`` / ``False`` force it.
    columns:
        Extra rich columns after the description and bar (terminal only); default: ``M/N`` and elapsed time.

    Use as a context manager. Bars (``add_task`` / ``update`` / ``advance``) show only on a terminal and are free
    no-ops otherwise; :meth:`line` always shows: printed above the bars, or one flushed plain line;
    :meth:`note` shows only as a plain line.
    """

    def __init__(
        self,
        prefix: str,
        *,
        stream: TextIO | None = None,
        plain: bool | None = None,
        columns: tuple[Any, ...] | None = None,
    ) -> None:
        self.prefix = prefix
        self.stream = stream if stream is not None else sys.stdout
        if plain is None:
            isatty = getattr(self.stream, "isatty", None)
            plain = not (callable(isatty) and isatty())
        self.plain = plain
        self._columns = columns
        self._progress: Any = None
        self._next_id = 0  # task ids handed out in plain mode (nothing is drawn)

    # -------------------------------------------------------------- context
    def __enter__(self) -> ProgressConsole:
        if not self.plain:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            cols = self._columns if self._columns is not None else (MofNCompleteColumn(), TimeElapsedColumn())
            self._progress = Progress(
                TextColumn("{task.description}"), BarColumn(), *cols, console=Console(file=self.stream)
            )
            self._progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    # -------------------------------------------------------------- output
    def line(self, text: str) -> None:
        """One line that stays: above the bars on a terminal, ``[prefix] text`` (flushed) otherwise."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False)  # labels hold brackets
        else:
            print(f"[{self.prefix}] {text}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        """A plain line only when there are no bars (a stage starting: the bars already show it on a terminal)."""
        if self._progress is None:
            print(f"[{self.prefix}] {text}", file=self.stream, flush=True)

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        """A new bar (terminal only); returns its id for :meth:`update` / :meth:`advance`."""
        if self._progress is not None:
            return int(self._progress.add_task(description, total=total, **fields))
        self._next_id += 1
        return self._next_id

    def update(self, task: int, **kwargs: Any) -> None:
        """``rich.progress.Progress.update`` on a terminal; nothing otherwise."""
        if self._progress is not None:
            self._progress.update(task, **kwargs)

    def advance(self, task: int, n: float = 1) -> None:
        """Move a bar ``n`` units on (terminal only)."""
        if self._progress is not None:
            self._progress.advance(task, n)

    def finish(self, task: int) -> None:
        """Fill a bar to its total (terminal only)."""
        if self._progress is not None:
            total = next(t.total for t in self._progress.tasks if t.id == task)
            self._progress.update(task, completed=total)
