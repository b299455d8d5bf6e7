"""``accelerando report``: the history as an HTML page with plots (``bench.html_report``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import history_location, history_option
from .progress import bar, err_console, json_option, print_json, quiet_option


def report(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Folder for index.html and its PNGs (created).")] = Path("accelerando-report"),
    bundled: Annotated[bool, typer.Option("--bundled/--no-bundled", help="Evaluate the selector on your swept "
                                          "workloads plus the bundled history (default) or yours only.")] = True,
    selector: Annotated[bool, typer.Option("--selector/--no-selector", help="Include the selector's held-out "
                                           "results (fits the selector once per fold: about a minute the "
                                           "first time, then cached).")] = True,
    quiet: quiet_option = False,
    json_out: json_option = False,
    history: history_option = None,
) -> None:
    """Write a self-contained HTML report of the history (speed vs quality per workload, diffusion
    error vs model calls, LLM tokens/s vs batch and context, the selector's held-out results, the
    machines and versions) and print its path."""
    path = write_from_history(history_location(ctx, history), out, bundled=bundled,
                              selector=selector, quiet=quiet)
    if json_out:
        print_json({"report": str(path.path), "images": [str(p) for p in path.images], "skipped": path.skipped})
    else:
        typer.echo(str(path.path))


def write_from_history(location: Optional[str], out: Path, *, bundled: bool = True, selector: bool = True,
                       quiet: bool = False):
    """Read the history at ``location`` and write the report into ``out`` (used by ``demo`` too)."""
    import platformdirs
    from accelerando.bench.history import open_history
    from accelerando.bench.html_report import write_report
    with open_history(location) as h:
        rows = h.rows()
        source = h.location
    sel_rows = None
    if selector and bundled:
        from accelerando.select.recommend import load_bundled
        sel_rows = [r for r in rows if (r.workload or {}).get("sweep_key")] + load_bundled()
    steps = 7 if selector else 6
    with bar(steps, "report", quiet=quiet) as b:
        def eval_progress(i: int, n: int) -> None:
            b.step(f"selector: {i}/{n} held-out folds", advance=0)
        rep = write_report(rows, out, source=source, selector_rows=sel_rows, selector=selector,
                           cache_dir=Path(platformdirs.user_cache_dir("accelerando")) / "report",
                           progress=lambda s: b.step(s), eval_progress=eval_progress)
    if not quiet:
        for section, why in rep.skipped.items():
            err_console().print(f"note: {section}: {why}", highlight=False)
    return rep
