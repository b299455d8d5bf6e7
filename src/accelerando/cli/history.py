"""``accelerando history list | export``: query and export the measurement history."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import console as _console, fail, history_option, open_history_for as _open_history, split as _split
from .tables import _fmt, _quality_text

app = typer.Typer(no_args_is_help=True, help="Query and export the measurement history.")


SINCE_HELP = ("ISO date/time in UTC (2026-11-28, 2026-11-28T17:00), today, yesterday, or an age: "
              "30m, 12h, 3d, 2w.")


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """``--since`` as a UTC datetime; a value that is none of SINCE_HELP's forms is refused (it
    used to be compared as a string and quietly match nothing)."""
    now = now or datetime.now(timezone.utc)
    t = text.strip().lower()
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if t == "today":
        return midnight
    if t == "yesterday":
        return midnight - timedelta(days=1)
    m = re.fullmatch(r"(\d+)\s*([mhdw])", t)
    if m:
        unit = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}[m.group(2)]
        return now - timedelta(**{unit: int(m.group(1))})
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        fail(f"--since {text!r} is not a date; use {SINCE_HELP}")
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when


def _filters(method, family, since, model, run_id) -> dict[str, Any]:
    f: dict[str, Any] = {}
    if method:
        f["method"] = _split(method)
    if family:
        f["family"] = family
    if since:
        f["since"] = parse_since(since)
    if model:
        f["model"] = model
    if run_id:
        f["run_id"] = run_id
    return f


@app.command("list")
def history_list(
    ctx: typer.Context,
    method: Annotated[Optional[str], typer.Option(help="Method name(s), comma-separated.")] = None,
    family: Annotated[Optional[str], typer.Option(help="llm or diffusion.")] = None,
    since: Annotated[Optional[str], typer.Option(help=SINCE_HELP)] = None,
    model: Annotated[Optional[str], typer.Option(help="Workload model.")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="One run's rows.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show the newest N rows.")] = 20,
    history: history_option = None,
) -> None:
    """List stored measurements (newest last)."""
    from rich.table import Table
    with _open_history(ctx, history) as hist:
        rows = hist.rows(limit=limit, **_filters(method, family, since, model, run_id))
        location = hist.location
    console = _console()
    if not rows:
        console.print(f"no rows in {location} match")
        return
    t = Table(title=f"{len(rows)} row(s) from {location}", title_justify="left")
    for col in ("id", "time (UTC)", "family", "model", "method", "median s", "speed-up", "quality"):
        t.add_column(col)
    for r in rows:
        m = r.metrics
        t.add_row(str(r.id), (r.timestamp or "")[:19].replace("T", " "), r.family,
                  str(r.workload.get("model", "-")) + (f" @{r.workload['steps']}" if "steps" in r.workload else ""),
                  r.method, _fmt(m.get("median_s")),
                  f"{m['speedup']:.2f}x" if isinstance(m.get("speedup"), (int, float)) else "-",
                  _quality_text(r.family, m))
    console.print(t)


@app.command("export")
def history_export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Output file.")],
    format: Annotated[str, typer.Option("--format", help="csv or parquet.")] = "csv",
    method: Annotated[Optional[str], typer.Option(help="Method name(s), comma-separated.")] = None,
    family: Annotated[Optional[str], typer.Option()] = None,
    since: Annotated[Optional[str], typer.Option(help=SINCE_HELP)] = None,
    model: Annotated[Optional[str], typer.Option()] = None,
    run_id: Annotated[Optional[str], typer.Option()] = None,
    history: history_option = None,
) -> None:
    """Export measurements to CSV or Parquet, one flat column per workload/knob/metric field."""
    if format not in ("csv", "parquet"):
        fail(f"--format must be csv or parquet, not {format!r}")
    if out.parent and not out.parent.exists():
        fail(f"folder {out.parent} does not exist")
    with _open_history(ctx, history) as hist:
        n = hist.export(out, format=format, **_filters(method, family, since, model, run_id))
    typer.echo(f"wrote {n} row(s) to {out}")

