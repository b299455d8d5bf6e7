"""The ``accelerando`` command. Each command (or command group) lives in its own module and is
mounted below by a direct import, so a module that fails to import fails the CLI loudly.

Adding a command:

1. Write a module with either a command function (``def report(...)``: a top-level command) or a
   ``typer.Typer`` (a group: ``app = typer.Typer(...)`` with ``@app.command("evaluate")``).
   Keep heavy imports (torch, transformers, ...) inside the functions so ``--help`` stays fast.
2. Add one line to ``_mount``: ``app.command("report")(report.report)`` or
   ``app.add_typer(mymod.app, name="group")``.
3. Use ``common.history_option`` for ``--history`` and raise ``CLIError("one line")`` (or call
   ``fail``) for bad input: it exits with status 1 and that line, never a traceback.
"""

from __future__ import annotations

import typer

from accelerando.cli.common import CLIError, Group, fail, history_option, one_line, threads_option  # noqa: F401
from accelerando.cli.tables import results_table  # noqa: F401

app = typer.Typer(
    cls=Group, name="accelerando", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Make generative models faster without making them worse: measure acceleration methods "
         "side by side on your model, keep every measurement in a history store.")


@app.callback()
def _root(ctx: typer.Context,
          history: history_option = None) -> None:
    """Make generative models faster without making them worse."""
    ctx.obj = {"history": history}


def _mount(app: typer.Typer) -> None:
    from accelerando.cli import bench, demo, history, report, zoo
    from accelerando.diffusion.dit import cli as dit_cli
    from accelerando.llm import medusa_cli
    from accelerando.select import cli as select_cli

    app.command("demo")(demo.demo)
    app.command("bench")(bench.bench)
    app.command("report")(report.report)
    app.command("recommend")(select_cli.recommend)
    app.command("sweep")(select_cli.sweep)
    app.add_typer(history.app, name="history")
    app.add_typer(zoo.app, name="zoo")
    app.add_typer(select_cli.select_app, name="select")
    app.add_typer(medusa_cli.app, name="medusa")
    app.add_typer(dit_cli.app, name="dit")


_mount(app)


def get_app() -> typer.Typer:
    """The ``accelerando`` app (kept for callers written against the old plugin loader)."""
    return app


def main() -> None:
    """Console entry point (``accelerando = accelerando.cli:main``)."""
    app()


if __name__ == "__main__":
    main()
