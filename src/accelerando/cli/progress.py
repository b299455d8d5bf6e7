"""Progress bars with an ETA for the long commands, and the ``--quiet`` / ``--json`` options.

``bar(total, what, quiet=...)`` is a context manager around a rich progress bar (on stderr, so
that stdout keeps only results: tables, or one JSON object with ``--json``). It is fed either by
``step(label)`` (one item done, the next one named) or by the sweep-style callback
``bar(i, n, label, eta_s)``. Where stderr is not a terminal (a log file, a pipe) each item is one
plain line instead (``[3/30] label  (ETA 4.2 min)``); with ``quiet`` nothing is printed.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer

quiet_option = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no per-item lines; "
                                            "only the results (or the JSON with --json) and errors.")]
json_option = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout "
                                           "(for scripts); progress and notes go to stderr.")]


def err_console():
    from rich.console import Console
    return Console(stderr=True, width=max(100, int(os.environ.get("COLUMNS", 0) or 0)))


def print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str))


class bar:
    """A rich progress bar with elapsed time and ETA (see the module docstring)."""

    def __init__(self, total: int, what: str, *, quiet: bool = False):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        show = not quiet and sys.stderr.isatty()
        self.lines = not quiet and not show           # a log: one plain line per item
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                          console=err_console(), transient=True, disable=not show)
        self.what = what
        self.task = self.p.add_task(what, total=total)

    def __enter__(self) -> "bar":
        self.p.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.p.__exit__(*exc)

    def _line(self, text: str) -> None:
        typer.echo(text, err=True)

    def step(self, label: str = "", *, advance: int = 1) -> None:
        self.p.update(self.task, advance=advance, description=f"{self.what}: {label}" if label else self.what)
        if self.lines and advance:
            t = self.p.tasks[0]
            self._line(f"[{int(t.completed)}/{int(t.total or 0)}] {self.what}: {label}")

    def total(self, n: int) -> None:
        self.p.update(self.task, total=n)

    def at(self, done: int, n: int, label: str = "", *, line: bool = True) -> None:
        """``done`` of ``n`` finished; in a log, a plain line only where ``line``."""
        self.p.update(self.task, total=n, completed=done, description=f"{self.what}: {label}" if label else self.what)
        if self.lines and line:
            self._line(f"[{done}/{n}] {self.what}: {label}")

    def __call__(self, i: int, n: int, label: str = "", eta: float | None = None) -> None:
        """Sweep-style: item ``i`` of ``n`` (0-based) starts (or, for Ray, has finished)."""
        self.p.update(self.task, total=n, completed=i, description=f"{self.what}: {label}" if label else self.what)
        if self.lines:
            self._line(f"[{i + 1}/{n}] {label}  (ETA " + (f"{eta / 60:.1f} min)" if eta is not None else "-)"))
