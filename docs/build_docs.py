"""Rebuild the model table in docs/zoo.md from the zoo's model cards.

    python docs/build_docs.py            # rewrite the table in docs/zoo.md
    python docs/build_docs.py --check    # exit 1 if the table is out of date (tests/test_docs.py checks it)

The table sits between the zoo_table markers in docs/zoo.md; it is built from each bundled model's
`card.json`, so the numbers in the docs are the numbers the models were saved with. Every other
page (README.md, docs/*.md) is written by hand; tests/test_docs.py runs the README's commands and
code blocks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZOO_PAGE = ROOT / "docs" / "zoo.md"
MODELS = ROOT / "src" / "accelerando" / "zoo" / "models"


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def zoo_table() -> str:
    """One row per bundled model, from its card."""
    rows = ["| model | role | architecture | parameters | training | held-out metrics |", "|---|---|---|---|---|---|"]
    cards = [(p.parent.name, json.loads(p.read_text())) for p in MODELS.glob("*/card.json")]
    roles = ["target", "draft", "medusa", "unet", "dit", "classifier"]
    cards.sort(key=lambda nc: (roles.index(nc[1]["role"]) if nc[1]["role"] in roles else len(roles), nc[0]))
    for name, c in cards:
        m = c.get("metrics", {})
        if c["role"] in ("target", "draft"):
            held = (f"code {_fmt(m['heldout_code_bits_per_byte'])} bits/byte, "
                    f"prose {_fmt(m['heldout_prose_bits_per_byte'])} bits/byte")
            em = m.get("retrieval_exact_match_by_length") or {}
            if str(c.get("trained_length")) in em:
                held += (f"; retrieval exact match {100 * em[str(c['trained_length'])]:.0f}% at "
                         f"{c['trained_length']} tokens (full cache)")
            if "heldout_code_agreement_with_target" in m:
                held += f"; greedy agreement with code-target {100 * m['heldout_code_agreement_with_target']:.1f}%"
                if "foreign_code_agreement_with_target" in m:
                    held += (f" (held-out stdlib), {100 * m['foreign_code_agreement_with_target']:.1f}% "
                             f"(other packages' code)")
            arch = f"{c['architecture']}, {c['recipe']['num_layers']} layer(s) x {c['recipe']['hidden_size']}"
        elif c["role"] == "unet":
            held, arch = f"eps-prediction MSE {_fmt(m['heldout_eps_mse'])}", c["architecture"]
        elif c["role"] == "dit":
            held = (f"eps-prediction MSE {_fmt(m['heldout_eps_mse'])}; DDIM-25 samples: FD "
                    f"{_fmt(m['cfg1_ddim25_frechet_distance'])}, class accuracy "
                    f"{100 * m['cfg1_ddim25_class_accuracy']:.0f}% (guidance 1), FD "
                    f"{_fmt(m['cfg2_ddim25_frechet_distance'])}, {100 * m['cfg2_ddim25_class_accuracy']:.0f}% (guidance 2)")
            r = c["recipe"]
            arch = (f"{c['architecture']}, {r['num_layers']} blocks x {r['num_heads'] * r['head_dim']}, patch 2, "
                    f"{c['tokens']} tokens")
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


BEGIN, END = "<!-- BEGIN zoo_table (python docs/build_docs.py) -->", "<!-- END zoo_table -->"


def build(text: str) -> str:
    """``text`` (docs/zoo.md) with the table between the zoo_table markers rebuilt from the cards."""
    if BEGIN not in text or END not in text:
        raise ValueError(f"docs/zoo.md has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n{zoo_table()}\n{END}{tail}"


def main(argv: list[str]) -> int:
    current = ZOO_PAGE.read_text()
    text = build(current)
    if "--check" in argv:
        if current != text:
            print("docs/zoo.md's model table is out of date: run python docs/build_docs.py", file=sys.stderr)
            return 1
        return 0
    ZOO_PAGE.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
