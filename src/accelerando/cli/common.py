"""What every command module shares: the root group's error handling, ``CLIError``, the
``--history`` / ``--threads`` options, console, list / number / knob parsing."""

from __future__ import annotations

import json
import os
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

# typer >= 0.23 vendors its own click; these are the exceptions that carry an exit status
_PASS_THROUGH: tuple[type[BaseException], ...] = (typer.Exit, typer.Abort)
try:
    from typer._click import ClickException as _TyperClickException
    _PASS_THROUGH += (_TyperClickException,)
except ImportError:   # older typer uses click itself
    import click
    _PASS_THROUGH += (click.exceptions.Exit, click.ClickException, click.exceptions.Abort)


class Group(TyperGroup):
    """The root command group: any exception from a command becomes one ``error: ...`` line on
    stderr and exit status 1. ``ACCELERANDO_DEBUG=1`` shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            if os.environ.get("ACCELERANDO_DEBUG"):
                raise
            typer.echo(f"error: {one_line(exc)}", err=True)
            ctx.exit(1)


class CLIError(Exception):
    """Bad input: printed as one line, exit status 1."""


def fail(message: str) -> None:
    raise CLIError(message)


history_option = Annotated[Optional[str], typer.Option(
    "--history", metavar="PATH_OR_URL",
    help="History store: an SQLite file path or any SQLAlchemy URL (postgresql://user:password@host/db; pip install 'accelerando[postgres]'). "
         "Default: $ACCELERANDO_HISTORY, else <user cache dir>/accelerando/history.sqlite.")]


threads_option = Annotated[Optional[int], typer.Option(
    min=1, help="torch CPU threads (default: torch's choice). On a busy shared machine 1 can be "
                "much faster for tiny models.")]


def set_threads(n: int | None) -> None:
    if n is not None:
        import torch
        torch.set_num_threads(n)


def history_location(ctx: typer.Context, history: str | None) -> str | None:
    if history:
        return history
    return (ctx.obj or {}).get("history") if ctx is not None else None


def open_history_for(ctx: typer.Context, history: str | None, *, write: bool = False):
    """The history; with ``write``, checked writable now (before anything is measured) and
    wrapped so that a write failing later saves the rows elsewhere (``history_note`` says where)."""
    from accelerando.bench.history import HistoryError, KeepOnFailure, open_history
    hist = open_history(history_location(ctx, history))
    if not write:
        return hist
    try:
        hist.check_writable()
    except HistoryError as exc:
        hist.close()
        fail(f"{exc}; nothing was measured — pass --history with a writable path or URL")
    return KeepOnFailure(hist)


def history_note(hist) -> None:
    """After the results are printed: if some rows could not go to the history, say where they
    went and exit with status 1 (the run did not do all it was asked)."""
    note = getattr(hist, "note", lambda: None)()
    if note:
        typer.echo(f"error: {note}", err=True)
        raise typer.Exit(1)


def console():
    from rich.console import Console
    return Console(width=max(120, int(os.environ.get("COLUMNS", 0) or 0)))


def split(csv: str | None) -> list[str] | None:
    if csv is None:
        return None
    items = [x.strip() for x in csv.split(",") if x.strip()]
    return items or None


def parse_ints(text: str, opt: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{opt} takes comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        fail(f"{opt} takes positive integers, got {text!r}")
    return vals


def parse_knobs(items: list[str] | None) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items or []:
        try:
            lhs, value = item.split("=", 1)
            method, key = lhs.split(".", 1)
        except ValueError:
            fail(f"--knob takes METHOD.NAME=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        out.setdefault(method, {})[key] = parsed
    return out


def quiet_hf() -> None:
    """No per-file progress bars / advice from transformers and diffusers in our output."""
    try:
        from transformers.utils import logging as tlog
        tlog.disable_progress_bar()
        tlog.set_verbosity_error()
    except ImportError:
        pass
    try:
        from diffusers.utils import logging as dlog
        dlog.disable_progress_bar()
        dlog.set_verbosity_error()
    except ImportError:
        pass


def one_line(exc: BaseException) -> str:
    from accelerando.bench.history import HistoryError
    from accelerando.bench.models import ModelError
    from accelerando.bench.runner import RunnerError
    from accelerando.bench.workloads import PromptsError
    if isinstance(exc, (CLIError, HistoryError, ModelError, RunnerError, PromptsError)):
        msg = str(exc)
    elif isinstance(exc, KeyError):          # unknown method / zoo name: the message lists valid ones
        msg = str(exc.args[0]) if exc.args else "unknown name"
    else:
        msg = f"{type(exc).__name__}: {exc}"
    return " ".join(msg.split())

