"""Result tables and the progress bar shared by ``demo``, ``bench`` and ``recommend --verify``."""

from __future__ import annotations

from typing import Any

def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _quality_text(family: str, m: dict[str, Any]) -> str:
    """Rows written by other tools may lack a metric or hold a non-number; show what is there."""
    parts = []
    if family == "llm":
        if _num(m.get("exact_match")):
            parts.append(f"exact {m['exact_match']:.0%}")
        elif _num(m.get("token_agreement")):
            parts.append(f"agree {m['token_agreement']:.0%}")
        if _num(m.get("perplexity")):
            parts.append(f"ppl {m['perplexity']:.3g}")
    else:
        if _num(m.get("rmse_vs_reference")):
            parts.append(f"rmse(ref) {m['rmse_vs_reference']:.3g}")
        if _num(m.get("rmse_vs_baseline")):
            parts.append(f"rmse(base) {m['rmse_vs_baseline']:.3g}")
    return ", ".join(parts) or "-"


def _counts_text(family: str, m: dict[str, Any]) -> str:
    if family == "llm":
        bits = [f"{m.get('new_tokens', '-')} tok"]
        for key in ("target_calls", "accepted_tokens", "drafted_tokens"):
            if key in m:
                bits.append(f"{key.split('_')[0]} {_fmt(m[key])}")
        return ", ".join(bits)
    return f"nfe {m.get('nfe', '-')}"


def _vs_ref(m: dict[str, Any]) -> str:
    v = m.get("speedup_vs_reference")
    return f"{v:.1f}x" if _num(v) else "-"


def results_table(title: str, family: str, rows: list[Any], label: str = ""):
    from rich.markup import escape
    from rich.table import Table
    with_ref = any(_num(r.metrics.get("speedup_vs_reference")) for r in rows)
    t = Table(title=title, title_justify="left")
    t.add_column("method", no_wrap=True)
    for col in ("median s", "± iqr", "speed-up") + (("vs ref",) if with_ref else ()):
        t.add_column(col, justify="right", no_wrap=True)
    t.add_column("quality", no_wrap=True)
    t.add_column("counts")
    for r in rows:
        name = r.method + (" (baseline)" if r.is_baseline else "")
        if r.error:
            na = getattr(r, "not_applicable", False)
            status = "[yellow]n/a[/yellow]" if na else "[red]failed[/red]"
            # n/a: its first clause ("prk needs at least 3 steps = 11 model calls"); failed: the
            # start of the message (the caller lists the full messages below the table)
            note = r.error.removeprefix("n/a: ").split(": ")[0] if na else r.error[:120]
            t.add_row(name, "-", "-", "-", *(("-",) if with_ref else ()), status, escape(note))
            continue
        m = r.metrics
        t.add_row(name, _fmt(m.get("median_s")), _fmt(m.get("iqr_s"), 2),
                  f"{m['speedup']:.2f}x" if m.get("speedup") else "-",
                  *((_vs_ref(m),) if with_ref else ()),
                  _quality_text(family, m), _counts_text(family, m))
    return t


class Progress:
    """A rich progress bar fed by the runner's ``progress(method, phase)`` callback."""

    def __init__(self, total: int, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                          console=console, transient=True)
        self.task = self.p.add_task("starting", total=total)
        self.prefix = ""

    def __enter__(self):
        self.p.__enter__()
        return self

    def __exit__(self, *exc):
        self.p.__exit__(*exc)

    def __call__(self, method: str, phase: str) -> None:
        if phase == "start":
            self.p.update(self.task, description=f"{self.prefix}{method}")
        else:
            self.p.advance(self.task)



def failures(rows: list[Any], requested: list[str] | None = None) -> list[tuple[str, Any]]:
    """(label, row) of the rows that failed; ``rows`` holds RunRows or (label, RunRow) pairs. A
    method that does not apply (n/a: a budget below its minimum) counts only when it was requested
    by name and applied nowhere."""
    pairs = [r if isinstance(r, tuple) else ("", r) for r in rows]
    out = [(lab, r) for lab, r in pairs if r.error and not getattr(r, "not_applicable", False)]
    for name in requested or []:
        mine = [(lab, r) for lab, r in pairs if r.method == name]
        if mine and all(getattr(r, "not_applicable", False) for _, r in mine):
            out += mine
    return out


def report_failures(console, rows: list[Any], requested: list[str] | None = None) -> bool:
    """After the table: each failed method's full message. True if any failed: the caller then
    exits with status 1 (a run with a failed method is not a success)."""
    from rich.markup import escape
    bad = failures(rows, requested)
    if bad:
        console.print(f"[red]{len({r.method for _, r in bad})} method(s) failed:[/red]")
        for lab, r in bad:
            console.print(f"  {r.method}" + (f" ({lab})" if lab else "") + f": {escape(r.error)}", soft_wrap=True)
    return bool(bad)
