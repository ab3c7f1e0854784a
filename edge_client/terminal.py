"""Progress of long work on a terminal (rich), and nothing extra when output is not a terminal.

Lines printed through :meth:`Steps.print` appear above the bar on a terminal and as plain lines
in a pipe or a log, so a command prints the same lines either way. :func:`status_line` keeps one
live line (what a device is doing) under its log. Needs the ``monitor`` extra (rich), which the
coordinator side installs; a device has it only if it also runs the monitor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class Steps:
    def __init__(self, progress: Progress | None, task: TaskID | None) -> None:
        self._progress = progress
        self._task = task

    def print(self, line: str) -> None:
        if self._progress is None:
            print(line, flush=True)
        else:
            self._progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

    def describe(self, text: str) -> None:
        """Say what is being done now (on the bar only)."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text)

    def advance(self, line: str | None = None) -> None:
        """One step done; ``line`` (if any) is printed above the bar."""
        if line is not None:
            self.print(line)
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task)


@contextmanager
def steps(total: int, description: str, *, console: Console | None = None) -> Iterator[Steps]:
    """A bar of ``total`` steps on a terminal; plain lines elsewhere."""
    console = console or Console()
    if not console.is_terminal:
        yield Steps(None, None)
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        yield Steps(progress, progress.add_task(description, total=total))


class _ThroughConsole(logging.Handler):
    """Log records printed by the console, so that they appear above its live line."""

    def __init__(self, console: Console, formatter: logging.Formatter | None) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        self.console.print(self.format(record), markup=False, highlight=False, soft_wrap=True)


@contextmanager
def status_line(console: Console | None = None) -> Iterator[Callable[[str], None]]:
    """A live line on the terminal (stderr) that the yielded function sets; while it shows, the
    root logger's lines go through the console above it, in their own format."""
    console = console or Console(stderr=True)
    root = logging.getLogger()
    handlers = list(root.handlers)
    formatter = handlers[0].formatter if handlers else None
    with console.status("starting", spinner="dots") as status:
        root.handlers = [_ThroughConsole(console, formatter)]
        try:
            yield lambda text: status.update(text)
        finally:
            root.handlers = handlers
