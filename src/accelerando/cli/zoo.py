"""``accelerando zoo list | info | train``: the bundled tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import console as _console, fail
from .demo import _zoo_has
from .tables import _fmt

app = typer.Typer(no_args_is_help=True, help="The bundled tiny models: list, inspect, retrain.")


def _zoo():
    try:
        from accelerando import zoo
        zoo.names
    except (ImportError, AttributeError):
        fail("the model zoo is not available in this installation")
    return zoo


@app.command("list")
def zoo_list() -> None:
    """List the bundled models with their role and size."""
    from rich.table import Table
    zoo = _zoo()
    t = Table(title="accelerando zoo", title_justify="left")
    for col in ("name", "role", "parameters", "trained"):
        t.add_column(col)
    for name in zoo.names():
        try:
            card = zoo.card(name)
        except Exception:
            card = {}
        params = card.get("parameters")
        t.add_row(name, str(card.get("role", "-")), f"{params:,}" if isinstance(params, int) else _fmt(params),
                  "yes" if _zoo_has(name) else "no")
    _console().print(t)


def _zoo_name(zoo, name: str) -> str:
    names = list(zoo.names())
    if name not in names:
        fail(f"unknown zoo model {name!r}; valid: {', '.join(names)}")
    return name


@app.command("info")
def zoo_info(name: Annotated[str, typer.Argument(help="Zoo model name.")]) -> None:
    """Show a model's card (data, training, held-out metrics) and where it lives."""
    zoo = _zoo()
    _zoo_name(zoo, name)
    try:
        card = zoo.card(name)
    except FileNotFoundError:
        fail(f"zoo model {name} has no card yet (not trained?); run: accelerando zoo train {name}")
    console = _console()
    console.print(f"[bold]{name}[/bold]  {zoo.path(name)}")
    console.print_json(json.dumps(card, default=str))


@app.command("train")
def zoo_train(
    name: Annotated[str, typer.Argument(help="Zoo model name.")],
    seed: int = 0,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Training steps (default: the card's).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Write here instead of the package's zoo folder.")] = None,
) -> None:
    """Retrain a zoo model deterministically from its offline data (drafts need the target)."""
    zoo = _zoo()
    _zoo_name(zoo, name)
    if zoo.card(name).get("role") == "medusa":
        fail(f"{name} holds Medusa heads; they are trained by `{zoo.card(name).get('command', 'accelerando medusa train')}` "
             f"with --out {out_dir or zoo.path(name)}")
    try:
        from accelerando.zoo.train import train
    except ImportError as exc:
        fail(f"zoo training code is not available: {exc}")
    import re
    from .progress import bar
    console = _console()
    step_re = re.compile(r"step (\d+)/(\d+)")

    def progress(*args: Any, **kwargs: Any) -> None:
        text = " ".join(str(a) for a in args) + " ".join(f"{k}={v}" for k, v in kwargs.items())
        m = step_re.search(text)
        if m:                       # a training step: the bar (with its ETA) moves
            b(int(m.group(1)) - 1, int(m.group(2)), text)
        else:
            console.log(text)

    with bar(1, f"training {name}") as b:
        result = train(name, seed=seed, steps=steps, out_dir=out_dir, progress=progress)
    where = out_dir if out_dir is not None else zoo.path(name)
    console.print(f"trained {name} into {where}")
    if isinstance(result, dict) and isinstance(result.get("metrics"), dict):
        console.print("held-out metrics: " + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in result["metrics"].items()))

