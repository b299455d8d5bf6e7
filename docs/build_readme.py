"""Assemble README.md from the per-area pages in docs/readme/ and the zoo's model cards.

    python docs/build_readme.py            # rewrite README.md
    python docs/build_readme.py --check    # exit 1 if README.md is out of date (a test runs this)

Each area keeps its own page (docs/readme/<area>.md, written with `##` headings); the README is
the intro followed by the areas in reading order, their headings one level deeper. `ZOO_TABLE`
in the zoo page becomes a table of the bundled models built from their `card.json` files, so the
numbers in the README are the numbers the models were saved with.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ROOT / "docs" / "readme"
ORDER = ["00-intro", "zoo", "speculative", "trees", "engine", "diffusion", "cli", "selector"]
TAIL = "testing"                 # a top-level section after the areas
MODELS = ROOT / "src" / "accelerando" / "zoo" / "models"


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def zoo_table() -> str:
    """One row per bundled model, from its card."""
    rows = ["| model | role | architecture | parameters | training | held-out metrics |", "|---|---|---|---|---|---|"]
    cards = [(p.parent.name, json.loads(p.read_text())) for p in MODELS.glob("*/card.json")]
    roles = ["target", "draft", "medusa", "unet", "classifier"]
    cards.sort(key=lambda nc: (roles.index(nc[1]["role"]) if nc[1]["role"] in roles else len(roles), nc[0]))
    for name, c in cards:
        m = c.get("metrics", {})
        if c["role"] in ("target", "draft"):
            held = (f"code {_fmt(m['heldout_code_bits_per_byte'])} bits/byte, "
                    f"prose {_fmt(m['heldout_prose_bits_per_byte'])} bits/byte")
            if "heldout_code_agreement_with_target" in m:
                held += f"; greedy agreement with code-target {100 * m['heldout_code_agreement_with_target']:.1f}%"
            arch = f"{c['architecture']}, {c['recipe']['num_layers']} layer(s) x {c['recipe']['hidden_size']}"
        elif c["role"] == "unet":
            held, arch = f"eps-prediction MSE {_fmt(m['heldout_eps_mse'])}", c["architecture"]
        elif c["role"] == "classifier":
            held, arch = f"accuracy {100 * m['heldout_accuracy']:.1f}%", c["architecture"]
        elif c["role"] == "medusa":
            top1 = ", ".join(f"{100 * a:.0f}%" for a in c["heldout_top1_accuracy"])
            what = "agreement with the target's argmax" if c.get("labels", "").startswith("target") else "accuracy"
            held, arch = f"top-1 {what} per head: {top1}", c["architecture"]
        else:
            held, arch = "", c.get("architecture", "")
        secs = c.get("train_seconds")
        training = f"{c.get('steps', '?')} steps" + (f", {secs / 60:.0f} min CPU" if secs else "")
        rows.append(f"| `{name}` | {c['role']} | {arch} | {c['parameters']:,} | {training} | {held} |")
    return "\n".join(rows)


def _demote(text: str) -> str:
    """One more '#' on every heading outside code fences."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if (not fenced and line.startswith("#")) else line)
    return "\n".join(out)


def build() -> str:
    parts = []
    for name in ORDER:
        text = (PAGES / f"{name}.md").read_text().strip()
        parts.append(text if name == ORDER[0] else _demote(text))
    parts.append((PAGES / f"{TAIL}.md").read_text().strip())
    return "\n\n".join(parts).replace("ZOO_TABLE", zoo_table()) + "\n"


def main(argv: list[str]) -> int:
    text, readme = build(), ROOT / "README.md"
    if "--check" in argv:
        if readme.read_text() != text:
            print("README.md is out of date: run python docs/build_readme.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
