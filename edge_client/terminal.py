"""Progress of long work on a terminal (rich), and nothing extra when output is not a terminal.

Lines printed through :meth:`Steps.print` appear above the bar on a terminal and as plain lines
in a pipe or a log, so a command prints the same lines either way. Needs the ``monitor`` extra
(rich), which the coordinator side installs; devices do not use it.
"""

from __future__ import annotations

from collections.abc import Iterator
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
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as progress:
        yield Steps(progress, progress.add_task(description, total=total))
