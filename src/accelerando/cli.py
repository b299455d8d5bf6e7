"""The ``accelerando`` command: demo, bench, history, zoo (+ commands contributed by other modules).

How to add commands from your own module (sweep, recommend, select evaluate, medusa train, ...):

1. In your module (e.g. ``accelerando/select/cli.py``) define EITHER
   ``def register(app: typer.Typer) -> None`` that adds top-level commands or sub-apps to the
   main app (``app.command("sweep")(sweep)``, ``app.add_typer(select_app, name="select")``),
   OR a ``typer.Typer`` named ``app``, which is mounted as a command group under the name given
   in ``PLUGINS`` below.
2. Add one line to ``PLUGINS``: ``"your.module": "group-name"`` (the name is used only for the
   ``app`` form). Modules that do not exist yet are skipped, so the line can go in early.
3. Use ``history_option`` for ``--history`` and raise ``CLIError("one line")`` for bad input: it
   exits with status 1 and that line, never a traceback (``fail`` does the same).

Plugins are imported when the CLI runs, never by ``import accelerando``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
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

# module -> group name (used when the module exposes ``app`` rather than ``register``)
PLUGINS: dict[str, str] = {
    "accelerando.select.cli": "select",
    "accelerando.llm.medusa_cli": "medusa",
}

class _Group(TyperGroup):
    """The root command group: any exception from a command (its own or a plugin's) becomes one
    ``error: ...`` line on stderr and exit status 1. ``ACCELERANDO_DEBUG=1`` shows the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            if os.environ.get("ACCELERANDO_DEBUG"):
                raise
            typer.echo(f"error: {_one_line(exc)}", err=True)
            ctx.exit(1)


app = typer.Typer(
    cls=_Group, name="accelerando", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Make generative models faster without making them worse: measure acceleration methods "
         "side by side on your model, keep every measurement in a history store.")
history_app = typer.Typer(no_args_is_help=True, help="Query and export the measurement history.")
zoo_app = typer.Typer(no_args_is_help=True, help="The bundled tiny models: list, inspect, retrain.")
app.add_typer(history_app, name="history")
app.add_typer(zoo_app, name="zoo")


class CLIError(Exception):
    """Bad input: printed as one line, exit status 1."""


def fail(message: str) -> None:
    raise CLIError(message)


history_option = Annotated[Optional[str], typer.Option(
    "--history", metavar="PATH_OR_URL",
    help="History store: an SQLite file path or any SQLAlchemy URL (postgresql+psycopg2://...). "
         "Default: $ACCELERANDO_HISTORY, else <user cache dir>/accelerando/history.sqlite.")]


threads_option = Annotated[Optional[int], typer.Option(
    min=1, help="torch CPU threads (default: torch's choice). On a busy shared machine 1 can be "
                "much faster for tiny models.")]


def _set_threads(n: int | None) -> None:
    if n is not None:
        import torch
        torch.set_num_threads(n)


@app.callback()
def _root(ctx: typer.Context,
          history: history_option = None) -> None:
    """Make generative models faster without making them worse."""
    ctx.obj = {"history": history}


def _history_location(ctx: typer.Context, history: str | None) -> str | None:
    if history:
        return history
    return (ctx.obj or {}).get("history") if ctx is not None else None


def _open_history(ctx: typer.Context, history: str | None):
    from accelerando.bench.history import open_history
    return open_history(_history_location(ctx, history))


def _console():
    from rich.console import Console
    return Console(width=max(120, int(os.environ.get("COLUMNS", 0) or 0)))


def _split(csv: str | None) -> list[str] | None:
    if csv is None:
        return None
    items = [x.strip() for x in csv.split(",") if x.strip()]
    return items or None


# ----------------------------------------------------------------------------- tables

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
            status = "[yellow]n/a[/yellow]" if getattr(r, "not_applicable", False) else "[red]failed[/red]"
            t.add_row(name, "-", "-", "-", *(("-",) if with_ref else ()), status, r.error[:120])
            continue
        m = r.metrics
        t.add_row(name, _fmt(m.get("median_s")), _fmt(m.get("iqr_s"), 2),
                  f"{m['speedup']:.2f}x" if m.get("speedup") else "-",
                  *((_vs_ref(m),) if with_ref else ()),
                  _quality_text(family, m), _counts_text(family, m))
    return t


class _Progress:
    """A rich progress bar fed by the runner's ``progress(method, phase)`` callback."""

    def __init__(self, total: int, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console, transient=True)
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


# ----------------------------------------------------------------------------- demo

DEMO_LLM = "code-target"
DEMO_DRAFTS = ("code-draft-small", "code-draft-tiny")
DEMO_UNET = "digits-unet"


def _zoo_has(name: str) -> bool:
    try:
        from accelerando import zoo
        if name not in zoo.names():
            return False
        return (Path(zoo.path(name)) / "config.json").exists()
    except Exception:   # the zoo package may be incomplete while it is being built
        return False


def _demo_prompts() -> list[str]:
    """A couple of held-out code prompts from the zoo's data if it offers them, else built-ins."""
    from accelerando.bench.workloads import DEFAULT_CODE_PROMPTS
    try:
        from accelerando.zoo import data
        fn = getattr(data, "heldout_prompts", None)
        if callable(fn):
            prompts = list(fn("code", n=2))
            if prompts:
                return prompts[:2]
    except Exception:
        pass
    return list(DEFAULT_CODE_PROMPTS)


@app.command()
def demo(
    ctx: typer.Context,
    history: history_option = None,
    family: Annotated[str, typer.Option(help="Which family to run: llm, diffusion or all.")] = "all",
    max_new_tokens: Annotated[int, typer.Option(help="Tokens generated per prompt.")] = 32,
    steps: Annotated[str, typer.Option(help="Diffusion NFE budgets (comma-separated).")] = "5,10,20",
    samples: Annotated[int, typer.Option(help="Diffusion samples per budget.")] = 4,
    reference_steps: Annotated[int, typer.Option(help="Steps of the diffusion reference sample.")] = 200,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per method.")] = 2,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    threads: Annotated[Optional[int], typer.Option(
        min=1, help="torch CPU threads. Default 1: the zoo models are so small that per-op overhead, "
                    "not arithmetic, dominates, and extra OpenMP threads only contend.")] = 1,
    write_benchmarks: Annotated[bool, typer.Option(
        "--write-benchmarks", help="Also write the tables into BENCHMARKS.md (section 'demo').")] = False,
) -> None:
    """Run the baseline and every registered method on the bundled zoo models; print speed-up and quality per method and store every row in the history.

    LLM: code-target with its drafts on two held-out code prompts, greedy, batch 1.
    Diffusion: digits-unet, a few samples, a few NFE budgets, RMSE to a many-step reference.
    """
    from accelerando.bench.methods import all_methods
    if family not in ("llm", "diffusion", "all"):
        fail(f"--family must be llm, diffusion or all, not {family!r}")
    budgets = _parse_ints(steps, "--steps")
    console = _console()
    _quiet_hf()
    _set_threads(threads)
    collected: list[tuple[str, str, list[Any]]] = []
    with _open_history(ctx, history) as hist:
        console.print(f"history: {hist.location}")
        if family in ("llm", "all"):
            _demo_llm(console, hist, all_methods("llm"), max_new_tokens, repeats, device, collected)
        if family in ("diffusion", "all"):
            _demo_diffusion(console, hist, all_methods("diffusion"), budgets, samples,
                            reference_steps, repeats, device, collected)
    if not collected:
        console.print("nothing was measured (no registered methods or no zoo models yet)")
    elif write_benchmarks:
        command = (f"accelerando demo --family {family} --max-new-tokens {max_new_tokens} --steps {steps} "
                   f"--samples {samples} --reference-steps {reference_steps} --repeats {repeats}"
                   + (f" --threads {threads}" if threads else "") + " --write-benchmarks")
        path = _write_demo_section(collected, command)
        console.print(f"wrote the 'demo' section of {path}")


def _write_demo_section(collected: list[tuple[str, str, list[Any]]], command: str) -> Path:
    from accelerando.bench.report import machine_line, markdown_table, write_section
    parts = ["## accelerando demo", "",
             f"Command: `{command}`",
             f"Machine: {machine_line()}", "",
             "Speed-up = baseline median time / method median time, measured in the same run. "
             "Quality: LLM exact match of the greedy sequences with the baseline and perplexity under "
             "the target; diffusion RMSE to the many-step reference and to the baseline's sample; "
             "'vs reference' = time of the many-step reference / method time. Timings on a shared, "
             "busy machine: identical work can differ by 10-20 % between rows.", ""]
    for title, fam, rows in collected:
        with_ref = any(_num(r.metrics.get("speedup_vs_reference")) for r in rows)
        table = []
        for r in rows:
            if r.error:
                what = r.error[:60] if getattr(r, "not_applicable", False) else f"failed: {r.error[:60]}"
                table.append([r.method, "-", "-", "-"] + (["-"] if with_ref else []) + [what, "-"])
                continue
            m = r.metrics
            table.append([r.method + (" (baseline)" if r.is_baseline else ""), m.get("median_s"),
                          m.get("iqr_s"), f"{m['speedup']:.2f}x" if m.get("speedup") else "-"]
                         + ([_vs_ref(m)] if with_ref else [])
                         + [_quality_text(fam, m), _counts_text(fam, m)])
        headers = ["method", "median s", "iqr s", "speed-up"] + (["vs reference"] if with_ref else []) + ["quality", "counts"]
        parts += [f"**{title}**", "", markdown_table(headers, table), ""]
    return write_section("demo", "\n".join(parts))


def _demo_llm(console, hist, methods, max_new_tokens, repeats, device, collected) -> None:
    from accelerando.bench.runner import build_llm_setups, llm_workload_facts, run_methods
    from accelerando.bench.workloads import LLMWorkload
    if not methods:
        console.print("[yellow]LLM: no methods registered yet — skipped[/yellow]")
        return
    if not any(m.is_baseline for m in methods):
        console.print("[yellow]LLM: no baseline method registered yet — skipped[/yellow]")
        return
    if not _zoo_has(DEMO_LLM):
        console.print(f"[yellow]LLM: zoo model {DEMO_LLM} is not available yet — skipped[/yellow]")
        return
    drafts = tuple(d for d in DEMO_DRAFTS if _zoo_has(d))
    wl = LLMWorkload(model=DEMO_LLM, drafts=drafts, domain="code", prompts=tuple(_demo_prompts()),
                     batch_size=1, max_new_tokens=max_new_tokens, temperature=0.0)
    with console.status("loading the LLM zoo models"):
        setups = build_llm_setups(wl, device=device)
    key = {**wl.key(), **llm_workload_facts(setups)}
    with _Progress(len(methods), console) as prog:
        prog.prefix = "llm: "
        rows = run_methods(setups, methods, workload=key, repeats=repeats, warmup=1, history=hist,
                           progress=prog)
    title = (f"LLM: {DEMO_LLM} (drafts: {', '.join(drafts) or 'none'}), {len(setups)} code prompts, "
             f"{max_new_tokens} new tokens, greedy, batch 1")
    console.print(results_table(title, "llm", rows))
    collected.append((title, "llm", rows))


def _demo_diffusion(console, hist, methods, budgets, samples, reference_steps, repeats, device,
                    collected) -> None:
    from accelerando.bench.runner import RunnerError, build_diffusion_setups, run_methods, timed_diffusion_reference
    from accelerando.bench.workloads import DiffusionWorkload
    if not methods:
        console.print("[yellow]diffusion: no methods registered yet — skipped[/yellow]")
        return
    if not _zoo_has(DEMO_UNET):
        console.print(f"[yellow]diffusion: zoo model {DEMO_UNET} is not available yet — skipped[/yellow]")
        return
    try:
        with console.status("loading the diffusion zoo model"):
            base_setups = build_diffusion_setups(DiffusionWorkload(DEMO_UNET, steps=budgets[0], batch=samples),
                                                 device=device)
    except RunnerError as exc:
        console.print(f"[yellow]diffusion: {exc} — skipped[/yellow]")
        return
    from dataclasses import replace
    reference, reference_s = None, None
    if any(m.is_baseline for m in methods):
        with console.status(f"computing the {reference_steps}-step reference samples"):
            reference, reference_s = timed_diffusion_reference(base_setups, steps=reference_steps)
    with _Progress(len(methods) * len(budgets), console) as prog:
        tables = []
        for n in budgets:
            wl = DiffusionWorkload(DEMO_UNET, steps=n, batch=samples)
            setups = [replace(s, steps=n) for s in base_setups]
            prog.prefix = f"diffusion {n} steps: "
            rows = run_methods(setups, methods, workload={**wl.key(), "reference_steps": reference_steps},
                               repeats=repeats, warmup=1, history=hist, reference=reference,
                               reference_s=reference_s, progress=prog)
            title = (f"diffusion: {DEMO_UNET}, {samples} samples, {n} steps "
                     f"(reference: {reference_steps} steps)")
            tables.append(results_table(title, "diffusion", rows))
            collected.append((title, "diffusion", rows))
    for t in tables:
        console.print(t)


def _parse_ints(text: str, opt: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{opt} takes comma-separated integers, got {text!r}")
    if not vals or any(v < 1 for v in vals):
        fail(f"{opt} takes positive integers, got {text!r}")
    return vals


# ----------------------------------------------------------------------------- bench

def _parse_knobs(items: list[str] | None) -> dict[str, dict[str, Any]]:
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


@app.command()
def bench(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="A local model directory (causal LM or diffusers UNet) or a zoo name.")],
    draft: Annotated[Optional[list[str]], typer.Option(help="Draft model directory or zoo name (repeatable).")] = None,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated method names (default: all of the family).")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="Prompts file: one prompt per line, or a JSON list of strings.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 64,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    top_k: Annotated[Optional[int], typer.Option(min=1)] = None,
    top_p: Annotated[Optional[float], typer.Option(min=0.0, max=1.0)] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 1,
    max_batches: Annotated[Optional[int], typer.Option(min=1, help="Use at most this many prompt batches.")] = None,
    steps: Annotated[str, typer.Option(help="Diffusion: NFE budgets, comma-separated.")] = "10,20",
    samples: Annotated[int, typer.Option(min=1, help="Diffusion: samples per budget.")] = 4,
    reference_steps: Annotated[int, typer.Option(min=0, help="Diffusion: steps of the reference sample (0: none).")] = 200,
    repeats: Annotated[int, typer.Option(min=1, help="Timed repeats per method.")] = 3,
    warmup: Annotated[int, typer.Option(min=0, help="Untimed warm-up calls per method.")] = 1,
    seed: int = 0,
    knob: Annotated[Optional[list[str]], typer.Option(help="Knob override METHOD.NAME=VALUE (repeatable; JSON values).")] = None,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    threads: threads_option = None,
    history: history_option = None,
) -> None:
    """Benchmark methods on your own model (or a zoo model) side by side with the baseline.

    The model kind is read from config.json: a causal-LM architecture runs LLM decoding methods on the prompts; a diffusers UNet (_class_name) runs diffusion samplers at each NFE budget.
    """
    from accelerando.bench import runner as R
    from accelerando.bench.methods import all_methods
    from accelerando.bench.workloads import DiffusionWorkload, LLMWorkload, load_prompts

    model_dir = R.resolve_model_dir(model)
    kind = R.model_kind(model_dir)
    names = _split(methods)
    R.resolve_methods(kind, names)                 # unknown / wrong-family names fail before loading
    if not all_methods(kind):
        fail(f"no {kind} methods are registered yet; nothing to benchmark")
    knobs = _parse_knobs(knob)
    console = _console()
    _quiet_hf()
    _set_threads(threads)
    with _open_history(ctx, history) as hist:      # a bad history fails before any model loads
        if kind == "llm":
            prompt_list = load_prompts(prompts) if prompts is not None else None
            for d in draft or []:
                if R.model_kind(R.resolve_model_dir(d)) != "llm":
                    fail(f"draft {d} is not a causal LM")
            wl = LLMWorkload(model=str(model), drafts=tuple(draft or ()),
                             domain="custom" if prompts else "code",
                             prompts_file=str(prompts) if prompts else None,
                             prompts=tuple(prompt_list or ()), batch_size=batch_size,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed)
            with console.status("loading models"):
                setups = R.build_llm_setups(wl, device=device, max_batches=max_batches)
            entries = R.resolve_methods("llm", names)
            with _Progress(len(entries), console) as prog:
                rows = R.run_methods(setups, entries, workload={**wl.key(), **R.llm_workload_facts(setups)},
                                     knobs=knobs, repeats=repeats, warmup=warmup, history=hist, progress=prog)
            console.print(results_table(f"{model}: {len(setups)} batch(es) of {batch_size}, "
                                        f"{max_new_tokens} new tokens, temperature {temperature}", "llm", rows))
            return
        if draft:
            fail("--draft applies to causal LMs; this model is a diffusion UNet")
        if prompts is not None:
            fail("--prompts applies to causal LMs; this model is a diffusion UNet")
        budgets = _parse_ints(steps, "--steps")
        from dataclasses import replace
        with console.status("loading the model"):
            base = R.build_diffusion_setups(DiffusionWorkload(str(model), steps=budgets[0], batch=samples,
                                                              seed=seed), device=device)
        entries = R.resolve_methods("diffusion", names)
        reference, reference_s = None, None
        if reference_steps:
            with console.status(f"computing the {reference_steps}-step reference samples"):
                reference, reference_s = R.timed_diffusion_reference(base, steps=reference_steps)
        tables = []
        with _Progress(len(entries) * len(budgets), console) as prog:
            for n in budgets:
                wl = DiffusionWorkload(str(model), steps=n, batch=samples, seed=seed)
                prog.prefix = f"{n} steps: "
                rows = R.run_methods([replace(s, steps=n) for s in base], entries,
                                     workload={**wl.key(), "reference_steps": reference_steps},
                                     knobs=knobs, repeats=repeats, warmup=warmup, history=hist,
                                     reference=reference, reference_s=reference_s, progress=prog)
                tables.append(results_table(f"{model}: {samples} samples, {n} steps", "diffusion", rows))
        for t in tables:
            console.print(t)


def _quiet_hf() -> None:
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


# ----------------------------------------------------------------------------- history

def _filters(method, family, since, model, run_id) -> dict[str, Any]:
    f: dict[str, Any] = {}
    if method:
        f["method"] = _split(method)
    if family:
        f["family"] = family
    if since:
        f["since"] = since
    if model:
        f["model"] = model
    if run_id:
        f["run_id"] = run_id
    return f


@history_app.command("list")
def history_list(
    ctx: typer.Context,
    method: Annotated[Optional[str], typer.Option(help="Method name(s), comma-separated.")] = None,
    family: Annotated[Optional[str], typer.Option(help="llm or diffusion.")] = None,
    since: Annotated[Optional[str], typer.Option(help="ISO date/time, e.g. 2026-11-28 or 2026-11-28T17:00.")] = None,
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


@history_app.command("export")
def history_export(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option("--out", help="Output file.")],
    format: Annotated[str, typer.Option("--format", help="csv or parquet.")] = "csv",
    method: Annotated[Optional[str], typer.Option(help="Method name(s), comma-separated.")] = None,
    family: Annotated[Optional[str], typer.Option()] = None,
    since: Annotated[Optional[str], typer.Option()] = None,
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


# ----------------------------------------------------------------------------- zoo

def _zoo():
    try:
        from accelerando import zoo
        zoo.names
    except (ImportError, AttributeError):
        fail("the model zoo is not available in this installation")
    return zoo


@zoo_app.command("list")
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


@zoo_app.command("info")
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


@zoo_app.command("train")
def zoo_train(
    name: Annotated[str, typer.Argument(help="Zoo model name.")],
    seed: int = 0,
    steps: Annotated[Optional[int], typer.Option(min=1, help="Training steps (default: the card's).")] = None,
    out_dir: Annotated[Optional[Path], typer.Option(help="Write here instead of the package's zoo folder.")] = None,
) -> None:
    """Retrain a zoo model deterministically from its offline data (drafts need the target)."""
    zoo = _zoo()
    _zoo_name(zoo, name)
    try:
        from accelerando.zoo.train import train
    except ImportError as exc:
        fail(f"zoo training code is not available: {exc}")
    console = _console()

    def progress(*args: Any, **kwargs: Any) -> None:
        text = " ".join(str(a) for a in args) + " ".join(f"{k}={v}" for k, v in kwargs.items())
        status.update(f"training {name}: {text}")
        console.log(text)

    with console.status(f"training {name}") as status:
        result = train(name, seed=seed, steps=steps, out_dir=out_dir, progress=progress)
    where = out_dir if out_dir is not None else zoo.path(name)
    console.print(f"trained {name} into {where}")
    if isinstance(result, dict) and isinstance(result.get("metrics"), dict):
        console.print("held-out metrics: " + ", ".join(f"{k} {_fmt(v, 4)}" for k, v in result["metrics"].items()))


# ----------------------------------------------------------------------------- plugins + main

def _load_plugins() -> None:
    for module, group in PLUGINS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
                continue                       # not written yet
            print(f"warning: CLI plugin {module} failed to import: {exc}", file=sys.stderr)
            continue
        except Exception as exc:   # a broken plugin must not take the other commands down
            print(f"warning: CLI plugin {module} failed to import: {exc}", file=sys.stderr)
            continue
        if callable(getattr(mod, "register", None)):
            mod.register(app)
        elif isinstance(getattr(mod, "app", None), typer.Typer):
            app.add_typer(mod.app, name=group)


_plugins_loaded = False


def get_app() -> typer.Typer:
    """The app with plugin commands mounted (idempotent)."""
    global _plugins_loaded
    if not _plugins_loaded:
        _plugins_loaded = True
        _load_plugins()
    return app


def _one_line(exc: BaseException) -> str:
    from accelerando.bench.history import HistoryError
    from accelerando.bench.runner import RunnerError
    from accelerando.bench.workloads import PromptsError
    if isinstance(exc, (CLIError, HistoryError, RunnerError, PromptsError)):
        msg = str(exc)
    elif isinstance(exc, KeyError):          # unknown method / zoo name: the message lists valid ones
        msg = str(exc.args[0]) if exc.args else "unknown name"
    else:
        msg = f"{type(exc).__name__}: {exc}"
    return " ".join(msg.split())


def main() -> None:
    """Console entry point (``accelerando = accelerando.cli:main``)."""
    get_app()()


if __name__ == "__main__":
    main()
