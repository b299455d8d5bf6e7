"""``accelerando demo``: every registered method on the bundled zoo models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .common import console as _console, fail, history_location, history_note, history_option, open_history_for as _open_history, parse_ints as _parse_ints, quiet_hf as _quiet_hf, set_threads as _set_threads
from .tables import Progress as _Progress, _counts_text, _num, _quality_text, _vs_ref, report_failures, results_table

DEMO_LLM = "code-target"
DEMO_DRAFTS = ("code-draft-small", "code-draft-tiny")
DEMO_UNET = "digits-unet"
DEMO_DIT = "digits-dit"          # the DiT arms (caches, RAS, ToMe, diffusers' hooks) act inside a DiT


def _dit_arms() -> set[str]:
    """Names of the arms that apply to DiT workloads only (run on DEMO_DIT, not as n/a rows on the UNet)."""
    try:
        from accelerando.diffusion.dit.bench_methods import ARMS
    except ImportError:
        return set()
    return set(ARMS)


def _zoo_has(name: str) -> bool:
    try:
        from accelerando import zoo
        return name in zoo.names() and zoo.is_trained(name)
    except Exception:   # the zoo package may be incomplete while it is being built
        return False


def _train_timesteps(name: str) -> int | None:
    """A zoo UNet's training timesteps from its scheduler config (None when it is not there)."""
    if not _zoo_has(name):
        return None
    from accelerando.bench.models import load_unet_config
    return load_unet_config(name)[0]


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
    report_dir: Annotated[Optional[Path], typer.Option(
        "--report", help="Folder of the HTML report written at the end (default: 'report' beside an SQLite "
                         "history, else ./accelerando-report).")] = None,
    no_report: Annotated[bool, typer.Option("--no-report", help="Do not write the report.")] = False,
) -> None:
    """Run the baseline and every registered method on the bundled zoo models; print speed-up and quality per method and store every row in the history.

    LLM: code-target with its drafts on two held-out code prompts, greedy, batch 1.
    Diffusion: digits-unet, a few samples, a few NFE budgets, RMSE to a many-step reference; the
    DiT arms (block caches, Region-Adaptive Sampling, token merging, diffusers' cache hooks) on
    digits-dit at the largest budget against DDIM at that budget.
    """
    from accelerando.bench.methods import all_methods
    if family not in ("llm", "diffusion", "all"):
        fail(f"--family must be llm, diffusion or all, not {family!r}")
    budgets = _parse_ints(steps, "--steps")
    if family != "llm":
        if reference_steps <= max(budgets):
            fail(f"--reference-steps {reference_steps} is no finer than the run (--steps up to {max(budgets)}): "
                 "the reference must take more steps than any budget")
        T = _train_timesteps(DEMO_UNET)          # before the LLM part spends minutes
        if T is not None and max(reference_steps, *budgets) > T:
            fail(f"{DEMO_UNET} was trained on {T} timesteps; --steps and --reference-steps must not exceed it")
    console = _console()
    _quiet_hf()
    _set_threads(threads)
    collected: list[tuple[str, str, list[Any]]] = []
    with _open_history(ctx, history, write=True) as hist:
        console.print(f"history: {hist.location}")
        if family in ("llm", "all"):
            _demo_llm(console, hist, all_methods("llm"), max_new_tokens, repeats, device, collected)
        if family in ("diffusion", "all"):
            _demo_diffusion(console, hist, all_methods("diffusion"), budgets, samples,
                            reference_steps, repeats, device, collected)
    if not collected:
        console.print("nothing was measured (no registered methods or no zoo models yet)")
        return
    lines = takeaway(collected)
    console.print("[bold]In short:[/bold]")
    for line in lines:
        console.print(f"  {line}", soft_wrap=True)
    if write_benchmarks:
        command = (f"accelerando demo --family {family} --max-new-tokens {max_new_tokens} --steps {steps} "
                   f"--samples {samples} --reference-steps {reference_steps} --repeats {repeats}"
                   + (f" --threads {threads}" if threads else "") + " --write-benchmarks")
        path = _write_demo_section(collected, command, lines)
        console.print(f"wrote the 'demo' section of {path}")
    failed = report_failures(console, [(title, r) for title, _, rows in collected for r in rows])
    history_note(hist)
    if collected and not no_report:
        _write_report(history_location(ctx, history), hist, report_dir, console)
    if failed:
        raise typer.Exit(1)


def _write_report(location: Optional[str], hist, report_dir: Optional[Path], console) -> None:
    """The demo's history as a web page (``accelerando report``); the selector section is left to
    ``accelerando report``, which evaluates on the bundled history too (a minute the first time)."""
    from .report import write_from_history
    raw = getattr(hist, "engine", None)
    db = raw.url.database if raw is not None and raw.dialect.name == "sqlite" else None
    out = report_dir or (Path(db).parent / "report" if db and db != ":memory:" else Path("accelerando-report"))
    rep = write_from_history(location, out, bundled=False, quiet=True)
    console.print(f"report: {rep.path}  (open it in a browser; `accelerando report` adds the selector's held-out results)", soft_wrap=True, highlight=False)


def takeaway(collected: list[tuple[str, str, list[Any]]]) -> list[str]:
    """Three lines: the fastest LLM method whose output equals the baseline's, the fastest diffusion
    (sampler, budget) at no more error to the reference than the baseline at the largest budget --
    a gain that comes from fewer model calls -- and where the rows went."""
    llm = [r for _, fam, rows in collected if fam == "llm" for r in rows if not r.error]
    diff = [r for _, fam, rows in collected if fam == "diffusion" for r in rows if not r.error]
    out = []
    if llm:
        base = next((r for r in llm if r.is_baseline), None)
        same = [r for r in llm if not r.is_baseline and r.metrics.get("exact_match") == 1.0
                and _num(r.metrics.get("speedup"))]
        best = max(same, key=lambda r: r.metrics["speedup"], default=None)
        if best is not None and best.metrics["speedup"] > 1:
            out.append(f"LLM: fastest with output identical to {base.method if base else 'the baseline'} "
                       f"(greedy, token for token): {best.method}, {best.metrics['speedup']:.2f}x.")
        else:
            out.append("LLM: no method beat the baseline with identical output on this machine.")
    if diff:
        bases = [r for r in diff if r.is_baseline and _num(r.metrics.get("rmse_vs_reference"))]
        if bases:
            base = max(bases, key=lambda r: r.metrics["nfe"])
            ok = [r for r in diff if _num(r.metrics.get("rmse_vs_reference"))
                  and r.metrics["rmse_vs_reference"] <= base.metrics["rmse_vs_reference"]
                  and _num(r.metrics.get("median_s")) and r.metrics["median_s"] > 0]
            best = min(ok, key=lambda r: (r.metrics["nfe"], r.metrics["median_s"]))
            if best is base:
                out.append(f"diffusion: no sampler reached {base.method}'s error at {base.metrics['nfe']} model calls "
                           "with fewer model calls (a sampler's gain is fewer model calls: at equal calls they "
                           "cost about the same).")
            else:
                out.append(f"diffusion: {best.method} with {best.metrics['nfe']} model calls is as close to the "
                           f"reference as {base.method} with {base.metrics['nfe']} (RMSE "
                           f"{best.metrics['rmse_vs_reference']:.3g} vs {base.metrics['rmse_vs_reference']:.3g}): "
                           f"{base.metrics['nfe'] / best.metrics['nfe']:.1f}x fewer model calls, "
                           f"{base.metrics['median_s'] / best.metrics['median_s']:.1f}x faster measured. The gain "
                           "is the fewer model calls: at equal calls the samplers cost about the same.")
        else:
            out.append("diffusion: no baseline row with a reference error; nothing to compare.")
    dit = [r for _, fam, rows in collected if fam == "dit" for r in rows if not r.error]
    base = next((r for r in dit if r.is_baseline and _num(r.metrics.get("rmse_vs_reference"))), None)
    if base is not None:
        # within 10% of full compute's own error to the reference: a loss one cannot see at this budget
        ok = [r for r in dit if not r.is_baseline and _num(r.metrics.get("rmse_vs_reference"))
              and _num(r.metrics.get("speedup")) and r.metrics["rmse_vs_reference"] <= 1.1 * base.metrics["rmse_vs_reference"]]
        best = max(ok, key=lambda r: r.metrics["speedup"], default=None)
        if best is not None and best.metrics["speedup"] > 1:
            out.append(f"DiT: {best.method} is {best.metrics['speedup']:.2f}x faster than full compute at the same "
                       f"{base.metrics['nfe']} steps, RMSE to the reference {best.metrics['rmse_vs_reference']:.3g} vs "
                       f"{base.metrics['rmse_vs_reference']:.3g}.")
        else:
            out.append("DiT: no arm was faster than full compute while keeping its error to the reference within 10%.")
    out.append("Every row is in the history (`accelerando history list`); "
               "`accelerando recommend MODEL` picks a method for your own workload.")
    return out


def _write_demo_section(collected: list[tuple[str, str, list[Any]]], command: str, summary: list[str]) -> Path:
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
    parts += ["In short:", ""] + [f"- {line}" for line in summary] + [""]
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
    from accelerando.bench.runner import RunnerError, build_diffusion_setups, timed_diffusion_reference
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
    dit_arms = _dit_arms()
    dit_methods = [m for m in methods if m.is_baseline or m.name in dit_arms]
    methods = [m for m in methods if m.name not in dit_arms]
    with _Progress(len(methods) * len(budgets), console) as prog:
        tables = []
        for n in budgets:
            wl = DiffusionWorkload(DEMO_UNET, steps=n, batch=samples)
            setups = [replace(s, steps=n) for s in base_setups]
            prog.prefix = f"diffusion {n} steps: "
            rows = _measure(setups, methods, wl, reference, reference_s, reference_steps, repeats, hist, prog)
            title = (f"diffusion: {DEMO_UNET}, {samples} samples, {n} steps "
                     f"(reference: {reference_steps} steps)")
            tables.append(results_table(title, "diffusion", rows))
            collected.append((title, "diffusion", rows))
    for t in tables:
        console.print(t)
    if len(dit_methods) > 1:
        _demo_dit(console, hist, dit_methods, max(budgets), samples, reference_steps, repeats, device, collected)


def _measure(setups, methods, wl, reference, reference_s, reference_steps, repeats, hist, prog):
    """One diffusion table's rows: every method on ``setups``, errors against ``reference``, into the history."""
    from accelerando.bench.runner import run_methods
    return run_methods(setups, methods, workload={**wl.key(), "reference_steps": reference_steps},
                       repeats=repeats, warmup=1, history=hist, reference=reference,
                       reference_s=reference_s, progress=prog)


def _demo_dit(console, hist, methods, steps, samples, reference_steps, repeats, device, collected) -> None:
    """The DiT arms on the zoo DiT at one budget: DDIM full compute is the baseline they skip work of."""
    from accelerando.bench.runner import RunnerError, build_diffusion_setups, timed_diffusion_reference
    from accelerando.bench.workloads import DiffusionWorkload
    if not _zoo_has(DEMO_DIT):
        console.print(f"[yellow]diffusion: zoo model {DEMO_DIT} is not available — its DiT arms skipped[/yellow]")
        return
    wl = DiffusionWorkload(DEMO_DIT, steps=steps, batch=samples)
    try:
        with console.status("loading the zoo DiT"):
            setups = build_diffusion_setups(wl, device=device)
        with console.status(f"computing the {reference_steps}-step DiT reference samples"):
            reference, reference_s = timed_diffusion_reference(setups, steps=reference_steps)
    except RunnerError as exc:
        console.print(f"[yellow]diffusion: {exc} — DiT arms skipped[/yellow]")
        return
    with _Progress(len(methods), console) as prog:
        prog.prefix = f"DiT {steps} steps: "
        rows = _measure(setups, methods, wl, reference, reference_s, reference_steps, repeats, hist, prog)
    title = (f"diffusion: {DEMO_DIT} (DiT arms skip work inside the model at the same {steps} DDIM steps), "
             f"{samples} samples (reference: {reference_steps} steps)")
    console.print(results_table(title, "diffusion", rows))
    collected.append((title, "dit", rows))

