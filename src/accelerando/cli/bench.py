"""``accelerando bench``: methods side by side with the baseline on your own model (or a zoo model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import (console as _console, fail, history_note, history_option, open_history_for as _open_history, parse_ints as _parse_ints,
                     parse_knobs as _parse_knobs, quiet_hf as _quiet_hf, set_threads as _set_threads, split as _split,
                     threads_option)
from .tables import Progress as _Progress, report_failures, results_table


def bench(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="A local model directory (causal LM or diffusers UNet), a zoo name or a rand-* spec.")],
    draft: Annotated[Optional[list[str]], typer.Option(help="Draft model directory, zoo name or rand-llama-* spec (repeatable).")] = None,
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

    MODEL is a local directory, a zoo name or a random spec (rand-llama-h64-l2-v256-s0,
    rand-unet-c16x32-i16-s0); its kind comes from config.json: a causal LM runs the LLM decoding
    methods on the prompts, a diffusers UNet runs the diffusion samplers at each NFE budget.
    Limits (positions, vocabularies, training timesteps) and knobs are checked before anything
    runs. If a requested method fails, the table is printed, the full messages are listed below it,
    and the exit status is 1.
    """
    from dataclasses import replace

    from accelerando.bench import runner as R
    from accelerando.bench.methods import all_methods
    from accelerando.bench.models import resolve
    from accelerando.bench.workloads import DiffusionWorkload, LLMWorkload, load_prompts

    kind = resolve(model).kind
    names = _split(methods)
    entries = R.resolve_methods(kind, names)       # unknown / wrong-family names fail before loading
    if not all_methods(kind):
        fail(f"no {kind} methods are registered yet; nothing to benchmark")
    knobs = _parse_knobs(knob)
    R.check_knobs(entries, knobs)                  # a knob for a method not selected / that it lacks
    if kind == "llm":
        for d in draft or []:
            if resolve(d).kind != "llm":
                fail(f"draft {d} is not a causal LM")
        prompt_list = load_prompts(prompts) if prompts is not None else None
    else:
        if draft:
            fail("--draft applies to causal LMs; this model is a diffusion UNet")
        if prompts is not None:
            fail("--prompts applies to causal LMs; this model is a diffusion UNet")
        budgets = _parse_ints(steps, "--steps")
        if reference_steps and reference_steps <= max(budgets):
            fail(f"--reference-steps {reference_steps} is no finer than the run (--steps up to {max(budgets)}): "
                 "the reference must take more steps than any budget, or 0 for none")
    console = _console()
    _quiet_hf()
    _set_threads(threads)
    with _open_history(ctx, history, write=True) as hist:   # a bad history fails before any model loads
        if kind == "llm":
            wl = LLMWorkload(model=str(model), drafts=tuple(draft or ()),
                             domain="custom" if prompts else "code",
                             prompts_file=str(prompts) if prompts else None,
                             prompts=tuple(prompt_list or ()), batch_size=batch_size,
                             max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed)
            with console.status("loading models"):
                setups = R.build_llm_setups(wl, device=device, max_batches=max_batches)
            R.check_limits(setups)
            with _Progress(len(entries), console) as prog:
                rows = R.run_methods(setups, entries, workload={**wl.key(), **R.llm_workload_facts(setups)},
                                     knobs=knobs, repeats=repeats, warmup=warmup, history=hist, progress=prog)
            console.print(results_table(f"{model}: {len(setups)} batch(es) of {batch_size}, "
                                        f"{max_new_tokens} new tokens, temperature {temperature}", "llm", rows))
            failed = report_failures(console, rows, requested=names)
            history_note(hist)
            if failed:
                raise typer.Exit(1)
            return
        with console.status("loading the model"):
            base = R.build_diffusion_setups(DiffusionWorkload(str(model), steps=budgets[0], batch=samples,
                                                              seed=seed), device=device)
        for n in budgets:                          # before the reference: nothing runs on a budget the model lacks
            R.check_steps_fit(base[0].schedule, n, "--steps")
        reference, reference_s = None, None
        if reference_steps:
            R.check_steps_fit(base[0].schedule, reference_steps, "--reference-steps")
            with console.status(f"computing the {reference_steps}-step reference samples"):
                reference, reference_s = R.timed_diffusion_reference(base, steps=reference_steps)
        tables, all_rows = [], []
        with _Progress(len(entries) * len(budgets), console) as prog:
            for n in budgets:
                wl = DiffusionWorkload(str(model), steps=n, batch=samples, seed=seed)
                prog.prefix = f"{n} steps: "
                rows = R.run_methods([replace(s, steps=n) for s in base], entries,
                                     workload={**wl.key(), "reference_steps": reference_steps},
                                     knobs=knobs, repeats=repeats, warmup=warmup, history=hist,
                                     reference=reference, reference_s=reference_s, progress=prog)
                tables.append(results_table(f"{model}: {samples} samples, {n} steps", "diffusion", rows))
                all_rows += [(f"{n} steps", r) for r in rows]
        for t in tables:
            console.print(t)
        failed = report_failures(console, all_rows, requested=names)
        history_note(hist)
        if failed:
            raise typer.Exit(1)
