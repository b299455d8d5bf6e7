"""Write measured tables into BENCHMARKS.md, one marked section per benchmark script.

Each benchmark owns the text between ``<!-- BEGIN name -->`` and ``<!-- END name -->``; rerunning
a script replaces only its own section, so scripts never clobber each other's results.
"""

from __future__ import annotations

import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"


def machine_line() -> str:
    """One line naming the machine a table was measured on."""
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
            f"{dev}, torch {torch.__version__}, Python {platform.python_version()}")


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, markdown: str, path: Path | None = None) -> Path:
    """Replace (or append) the section ``name`` of BENCHMARKS.md with ``markdown``."""
    path = Path(path) if path is not None else BENCHMARKS_MD
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEvery table below was produced by the command shown above it, in one run on the machine named.\n"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return path
