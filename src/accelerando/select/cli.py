"""CLI commands of the selector: ``sweep``, ``recommend``, ``select evaluate`` (mounted by ``accelerando.cli``)."""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any, Optional

import typer

from accelerando.cli.common import CLIError, history_option
from accelerando.cli.common import console as _console, history_location as _history_location, split as _split
from accelerando.cli.progress import bar, err_console, json_option, print_json, quiet_option

select_app = typer.Typer(no_args_is_help=True, help="The learned method selector: held-out evaluation.")


def _constraint(max_loss: float | None):
    from .table import Constraint
    try:
        return Constraint(max_loss)
    except ValueError as exc:
        raise CLIError(f"--max-loss: {exc}") from None


def _fmt(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


# ----------------------------------------------------------------------------- sweep

def sweep(
    ctx: typer.Context,
    llm: Annotated[int, typer.Option(help="Number of LLM workloads in the grid.")] = 60,
    diffusion: Annotated[int, typer.Option(help="Number of diffusion workloads in the grid.")] = 30,
    llm_start: Annotated[int, typer.Option(min=0, help="Sweep the LLM grid from this entry on (0-based; e.g. 60 "
                                           "with --llm 76 --zoo: past the bundled entries, half long context).")] = 0,
    diffusion_start: Annotated[int, typer.Option(min=0, help="Sweep the diffusion grid from this entry on (0-based; "
                                                 "e.g. 90 with --diffusion 102: the DiT workloads alone).")] = 0,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated method names (default: all registered).")] = None,
    repeats: Annotated[int, typer.Option(help="Timed repeats per method.")] = 2,
    seed: Annotated[int, typer.Option(help="Seed of the workload grid.")] = 0,
    max_minutes: Annotated[Optional[float], typer.Option(help="Stop starting workloads after this long (resume later).")] = None,
    reference_steps: Annotated[int, typer.Option(help="Diffusion: steps of the high-accuracy reference.")] = 100,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    threads: Annotated[int, typer.Option(help="torch threads (tiny models run best on 1).")] = 1,
    bundle: Annotated[bool, typer.Option(help="Also add the swept rows to the selector's bundled data file (rows it holds stay).")] = False,
    zoo: Annotated[bool, typer.Option("--zoo/--no-zoo", help="Put the zoo's trained models in the grid (when their "
                                      "weights are there); --no-zoo builds the grid of random-init models only, "
                                      "the one the bundled history was swept on.")] = True,
    retime: Annotated[bool, typer.Option("--retime", help="Re-time the arms already in the history (bundled + "
                                         "yours) of the first --llm / --diffusion grid workloads in interleaved "
                                         "rounds, into new rows; quality is recomputed (LLM at temperature 0: "
                                         "lossless arms checked token for token against the baseline).")] = False,
    rounds: Annotated[int, typer.Option(help="--retime: interleaved timed rounds per workload in all (after one warm-up round; a workload re-timed before gets only the missing rounds).")] = 5,
    same_seed: Annotated[bool, typer.Option("--same-seed", help="--retime: keep each workload's seed in every round. "
                                            "By default an LLM workload that samples (temperature > 0) draws a new seed "
                                            "each round, the same for all arms of a round, and its speed-up is the median "
                                            "over rounds of the ratio of time per generated token: one seed's sample may "
                                            "stop at an EOS after 3 tokens for one arm and run 32 for another.")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Run the workloads as tasks on a Ray cluster (a local one unless "
                                      "--ray-address): one task per workload, each pinned to a core of its own, "
                                      "writing to the shared history; a task whose worker dies is retried and "
                                      "resumes, storing no row twice.")] = False,
    ray_address: Annotated[Optional[str], typer.Option(metavar="HOST:PORT|auto", help="A running Ray cluster to use "
                                                       "(implies --ray). A cluster of several nodes needs a history "
                                                       "every node reaches: --history postgresql://...")] = None,
    num_cpus: Annotated[Optional[int], typer.Option(min=1, help="--ray without an address: CPUs of the local cluster "
                                                    "(default: all), i.e. workloads timed at once.")] = None,
    quiet: quiet_option = False,
    json_out: json_option = False,
    history: history_option = None,
) -> None:
    """Run a grid of workloads x method configurations into the history (resumable: rows already
    there are skipped), with progress and an ETA. ``--retime`` re-measures what is there instead."""
    import torch
    from rich.markup import escape
    from accelerando.bench.history import open_history
    from accelerando.cli.common import quiet_hf
    from . import sweep as S
    from .recommend import merge_bundled

    if llm < 0 or diffusion < 0 or repeats < 1 or rounds < 1:
        raise CLIError("--llm/--diffusion must be >= 0, --repeats and --rounds >= 1")
    torch.set_num_threads(max(1, threads))
    quiet_hf()
    zoo_names = None if zoo else []
    wls = S.llm_grid(llm, seed=seed, zoo_names=zoo_names)[llm_start:] + \
        S.diffusion_grid(diffusion, seed=seed, zoo_names=zoo_names)[diffusion_start:]
    console = err_console() if json_out else _console()
    ray = ray or ray_address is not None
    if ray and retime:
        raise CLIError("--ray runs a sweep; --retime runs in this process (interleaved rounds need one machine)")
    if ray and max_minutes:
        raise CLIError("--max-minutes applies to a sweep in this process; with --ray every workload is queued at "
                       "once (stop it with Ctrl-C: a rerun resumes from the history)")

    if retime:
        _retime(ctx, history, S, llm, diffusion, seed, rounds, max_minutes, device, bundle, console,
                seed_rounds=not same_seed, quiet=quiet, json_out=json_out)
        return
    location = _history_location(ctx, history)
    with open_history(location) as h:
        h.check_writable()
        with bar(len(wls), "sweep", quiet=quiet) as progress:
            if ray:
                rep = _ray_sweep(S, wls, h, location, methods, repeats, reference_steps, device, ray_address,
                                 num_cpus, progress)
            else:
                rep = S.run_sweep(wls, history=h, methods=_split(methods), repeats=repeats, device=device,
                                  reference_steps=reference_steps,
                                  max_seconds=max_minutes * 60 if max_minutes else None, progress=progress)
        if json_out:
            print_json({"workloads": rep.workloads, "rounds_run": rep.rounds_run, "rounds_skipped": rep.rounds_skipped,
                        "rows": rep.rows, "seconds": rep.seconds, "stopped_early": rep.stopped_early,
                        "errors": rep.errors})
        else:
            console.print(f"sweep: {rep.workloads} workloads measured, {rep.rounds_run} rounds run, "
                          f"{rep.rounds_skipped} already in the history, {rep.rows} rows, {rep.seconds / 60:.1f} min"
                          + (" on Ray" if ray else "")
                          + (" (stopped at --max-minutes; run again to resume)" if rep.stopped_early else ""))
            for e in rep.errors[:20]:
                console.print(f"[red]error[/red] {escape(e)}", soft_wrap=True)
            if len(rep.errors) > 20:
                console.print(f"... and {len(rep.errors) - 20} more errors")
        if bundle:
            keys = {S.sweep_key(w) for w in wls}
            n = merge_bundled(m for m in h.rows() if m.workload.get("sweep_key") in keys)
            console.print(f"added {n} rows to the bundled selector data")
    if rep.errors:       # a workload or a method that failed: the sweep did not do what was asked
        raise typer.Exit(1)


def _ray_sweep(S, wls, h, location, methods, repeats, reference_steps, device, address, num_cpus, progress):
    """The sweep on Ray: a history every worker reaches (a file for a local cluster; a server URL
    for several nodes); refused before any task starts otherwise."""
    try:
        import ray as _ray  # noqa: F401
    except ImportError:
        raise CLIError("--ray needs Ray: pip install 'accelerando[ray]'") from None
    from .ray_sweep import cluster_nodes, ray_sweep
    import os
    import ray as _ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not _ray.is_initialized():
        kw = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        try:
            _ray.init(**({"address": address} if address else {"num_cpus": num_cpus}), **kw)
        except Exception as exc:    # noqa: BLE001 - a wrong address, no cluster there
            raise CLIError(f"--ray-address {address}: cannot connect to a Ray cluster: {exc}") from None
    if h.engine.dialect.name == "sqlite" and cluster_nodes() > 1:
        raise CLIError(f"the Ray cluster has {cluster_nodes()} nodes; an SQLite history ({h.location}) is on this "
                       "machine only: pass --history postgresql://user:password@host/db")
    # workers open the history themselves: give them the real location (with its password)
    from accelerando.bench.history import default_location
    target = location or default_location()
    return ray_sweep(wls, history=target, methods=_split(methods), repeats=repeats, reference_steps=reference_steps,
                     device=device, progress=progress)


def _retime(ctx, history, S, n_llm, n_diffusion, seed, rounds, max_minutes, device, bundle, console, *,
            seed_rounds: bool = True, quiet: bool = False, json_out: bool = False) -> None:
    from rich.markup import escape
    from accelerando.bench.history import open_history
    from .recommend import load_bundled, merge_bundled, row_key

    def grid(make, n):
        # the bundled history was swept without the zoo models: rebuild those workloads too
        g = make(n, seed=seed)
        keys = {S.sweep_key(w) for w in g}
        return g + [w for w in make(n, seed=seed, zoo_names=[]) if S.sweep_key(w) not in keys]
    t0 = time.perf_counter()
    out = {}
    with open_history(_history_location(ctx, history)) as h:
        h.check_writable()
        rows, seen = [], set()
        for r in load_bundled() + [m for m in h.rows() if m.workload.get("sweep_key")]:
            key = row_key(r)
            if key not in seen:        # a re-timing both bundled and in your history counts once
                seen.add(key)
                rows.append(r)
        for family, make, n in (("diffusion", S.diffusion_grid, n_diffusion), ("llm", S.llm_grid, n_llm)):
            if n == 0:
                continue
            left = max_minutes * 60 - (time.perf_counter() - t0) if max_minutes else None
            with bar(n, f"retime {family}", quiet=quiet) as progress:
                rep = S.retime(rows, grid(make, n), history=h, family=family, rounds=rounds, device=device,
                               progress=progress, max_seconds=left, seed_rounds=seed_rounds)
            out[family] = {k: getattr(rep, k) for k in ("workloads", "todo", "skipped", "missing", "rows", "errors",
                                                        "dropped", "not_exact", "max_quality_drift", "seconds",
                                                        "stopped_early")}
            if json_out:
                continue
            what = "quality moved" if family == "diffusion" else "perplexity moved"
            console.print(f"retime {family}: {rep.workloads} workloads re-timed ({rep.rows} rows; {rounds} interleaved rounds a "
                          f"workload in all), {rep.skipped} already re-timed, {rep.missing} not in the grid, "
                          f"{rep.seconds / 60:.1f} min, load average {min(rep.load, default=0):.1f}-"
                          f"{max(rep.load, default=0):.1f}; {what} by at most {rep.max_quality_drift:.2%} from the stored rows"
                          + (f" (stopped at --max-minutes with {rep.todo - rep.workloads - len(rep.errors)} to go; "
                             "run again to resume)" if rep.stopped_early else ""))
            for e in (rep.errors if quiet else rep.errors + rep.dropped):
                console.print(f"[yellow]not re-timed[/yellow] {escape(e)}")      # arm ids hold [...]
            for e in rep.not_exact:
                console.print(f"[red]lossless arm differs from the baseline's tokens[/red] {escape(e)}")
        if bundle:
            n = merge_bundled(m for m in h.rows() if (m.metrics or {}).get("timing") == S.INTERLEAVED)
            console.print(f"added {n} re-timed rows to the bundled selector data")
    if json_out:
        print_json(out)


# ----------------------------------------------------------------------------- recommend

def recommend(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Model directory, zoo name or random spec (rand-llama-h64-l2-v128-s0).")],
    draft: Annotated[Optional[list[str]], typer.Option(help="Draft model(s) available for speculative decoding.")] = None,
    prompts: Annotated[Optional[str], typer.Option(help="Prompts file (JSON list or one per line).")] = None,
    task: Annotated[Optional[str], typer.Option(help="Task description when there is no prompts file (e.g. 'code completion').")] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")] = 0.0,
    top_p: Annotated[Optional[float], typer.Option(help="Nucleus sampling mass.")] = None,
    batch_size: Annotated[int, typer.Option(help="LLM batch size.")] = 1,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 32,
    steps: Annotated[int, typer.Option(help="Diffusion: NFE budget (timesteps).")] = 20,
    spacing: Annotated[str, typer.Option(help="Diffusion: timestep spacing.")] = "trailing",
    batch: Annotated[int, typer.Option(help="Diffusion: images per batch.")] = 4,
    max_loss: Annotated[Optional[float], typer.Option(help="Allowed quality loss (default: lossless methods only).")] = None,
    selector: Annotated[Optional[str], typer.Option(help="Selector model (default: the best on held-out data).")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Run the top candidates now and record them in the history.")] = False,
    top: Annotated[int, typer.Option(help="Candidates to run with --verify.")] = 3,
    no_bundled: Annotated[bool, typer.Option("--no-bundled", help="Train only on your history, not the bundled one.")] = False,
    device: Annotated[str, typer.Option(help="torch device.")] = "cpu",
    history: history_option = None,
) -> None:
    """Recommend an acceleration method (and knobs) for a workload, with the predicted speed-up
    and the two runners-up; --verify measures the top candidates and writes them to the history."""
    from accelerando.bench.history import open_history
    from accelerando.bench.workloads import load_prompts
    from accelerando.cli.common import quiet_hf
    from . import recommend as RC
    from .models import MODELS

    sel = selector
    if sel is not None and sel not in MODELS:
        raise CLIError(f"unknown selector {sel!r}; valid: {', '.join(MODELS)}")
    c = _constraint(max_loss)
    prompt_list = load_prompts(prompts) if prompts else None
    console = _console()
    quiet_hf()
    d = RC.describe(model, drafts=draft or (), prompts=prompt_list, task=task, temperature=temperature,
                    top_p=top_p, batch_size=batch_size, max_new_tokens=max_new_tokens, steps=steps,
                    spacing=spacing, batch=batch, device=device)
    with open_history(_history_location(ctx, history)) as h:
        rows = RC.training_rows(h, bundled=not no_bundled)
        rec = RC.recommend(d.key, rows, constraint=c, selector=sel)
        _print_recommendation(console, rec, d.key)
        if verify:
            console.print(f"verifying the top {top} candidates on this machine ...")
            out = RC.verify(d, rec, top=top, history=h)
            from dataclasses import replace
            from accelerando.cli.tables import results_table
            shown = [replace(r, method=f"{r.method} at {r.knobs['steps_frac']:g} x the steps")
                     if "steps_frac" in r.knobs else r for r in out]
            console.print(results_table("measured now (written to the history)", rec.family, shown))


def _print_recommendation(console, rec, key) -> None:
    from rich.table import Table
    f = key.get("features") or {}
    console.print(f"workload: {rec.family} {key.get('model')}  constraint: {rec.constraint.label()}  "
                  f"selector: {rec.selector} (trained on {rec.n_workloads} {rec.family} workloads)")
    if rec.family == "llm":
        console.print(f"features: params 10^{_fmt(f.get('log_params'))}, draft/target cost "
                      f"{_fmt(f.get('draft_latency_ratio'))}, prompt trigram repetition {_fmt(f.get('rep3'))}, "
                      f"temperature {key.get('temperature')}, batch {key.get('batch_size')}")
        console.print(f"on the model's own first tokens: prompt-lookup acceptance {_fmt(f.get('gen_lookup_alpha'))}, "
                      f"draft acceptance {_fmt(f.get('gen_draft_alpha'))}")
    for n in rec.notes:
        console.print(f"[yellow]note:[/yellow] {n}")
    choice = rec.choice
    console.print(f"[bold]recommended: {rec.method(choice.arm)}[/bold] knobs {json.dumps(rec.knobs(choice.arm))}  "
                  f"predicted speed-up {_fmt(choice.speedup)}x ± {_fmt(choice.std)}  "
                  f"P(meets constraint) {_fmt(choice.p_ok)}")
    t = Table(title="ranking (best first)")
    for col in ("rank", "method", "knobs", "pred. speed-up", "± (1 sd)", "P(ok)"):
        t.add_column(col)
    for i, p in enumerate(rec.ranked[:3]):
        t.add_row(str(i + 1), rec.method(p.arm), json.dumps(rec.knobs(p.arm)), _fmt(p.speedup), _fmt(p.std), _fmt(p.p_ok))
    if rec.ranked and rec.ranked[0].score > 1 and sum(p.score == rec.ranked[0].score for p in rec.ranked[:3]) > 1:
        # qkernel-cv's tie rule: equal scores, a slower arm may rank above a faster one
        t.caption = ("speed-ups within timing noise of the fastest count as equal; "
                     "those rank by P(ok), then by the predicted margin to the quality budget")
    console.print(t)


# ----------------------------------------------------------------------------- select evaluate

@select_app.command("evaluate")
def evaluate_cmd(
    ctx: typer.Context,
    models: Annotated[str, typer.Option(help="Comma-separated selectors to evaluate.")] = "knn,isac,gbm,forest,pairwise",
    scheme: Annotated[str, typer.Option(help="workload (leave-one-workload-out), model (leave-one-model-out) or both.")] = "both",
    max_loss: Annotated[Optional[list[float]], typer.Option(help="Quality budgets to evaluate besides lossless (repeatable).")] = None,
    family: Annotated[Optional[str], typer.Option(help="llm or diffusion (default: both).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Also write the summaries to this JSON file.")] = None,
    quiet: quiet_option = False,
    json_out: json_option = False,
    history: history_option = None,
) -> None:
    """Held-out evaluation of the selectors on the history (default: the bundled one): top-1
    accuracy, mean regret against the per-workload oracle (VBS), closed gap vs the single best
    method (SBS), constraint violations; SBS and random choice as references."""
    from .evaluate import evaluate
    from .recommend import load_bundled
    from .table import Constraint, build_table

    loc = _history_location(ctx, history)
    if loc:
        from accelerando.bench.history import open_history
        with open_history(loc) as h:
            rows = h.rows()
        source = loc
    else:
        rows = load_bundled()
        source = "bundled history"
    table = build_table(rows)
    if not len(table):
        raise CLIError(f"{source} holds no measured workloads; run `accelerando sweep` first")
    names = _split(models) or []
    schemes = ["workload", "model"] if scheme == "both" else [scheme]
    if any(s not in ("workload", "model") for s in schemes):
        raise CLIError("--scheme must be workload, model or both")
    constraints = [Constraint()] + [_constraint(x) for x in (max_loss or [])]
    families = [family] if family else sorted({table.family_of(w) for w in table.workloads})
    console = None if json_out else _console()
    with bar(len(families) * len(schemes) * len(constraints), "select evaluate", quiet=quiet) as progress:
        results = run_evaluation(table, names, schemes, constraints, families, console=console, source=source,
                                 progress=progress)
    if out:
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)
    if json_out:
        print_json(results)


def run_evaluation(table, names, schemes, constraints, families, *, console=None, source="",
                   progress=None) -> list[dict[str, Any]]:
    """Evaluate and print one table per (family, scheme, constraint); return all summaries as dicts.
    ``progress``: a ``cli.progress.bar`` (one step per table, its folds shown as they run)."""
    from rich.table import Table
    from .evaluate import evaluate
    out = []
    for fam in families:
        for sc in schemes:
            for c in constraints:
                t0 = time.perf_counter()
                what = f"{fam}, leave-one-{sc}-out, {c.label()}"
                folds = (lambda i, n, what=what: progress.step(f"{what}: {i}/{n} held-out folds", advance=0)) if progress else None
                summ, cases = evaluate(table, names, constraint=c, scheme=sc, family=fam, progress=folds)
                if progress:
                    progress.step(what)
                if not cases:
                    continue
                title = (f"{fam}, leave-one-{sc}-out, {c.label()}: {summ[0].n} held-out workloads "
                         f"({source}; {time.perf_counter() - t0:.0f} s)")
                if console is not None:
                    t = Table(title=title)
                    for col in ("policy", "top-1", "within 5%", "mean speed-up", "VBS", "mean regret", "regret/VBS",
                                "closed gap", "violations"):
                        t.add_column(col)
                    for s in summ:
                        t.add_row(s.policy, _fmt(s.top1), _fmt(s.within5), _fmt(s.mean_utility, ".3f"), _fmt(s.mean_vbs, ".3f"),
                                  _fmt(s.mean_regret, ".3f"), _fmt(s.rel_regret, ".1%"), _fmt(s.closed_gap),
                                  _fmt(s.violation_rate, ".1%"))
                    console.print(t)
                for s in summ:
                    out.append({"family": fam, "scheme": sc, "constraint": c.label(), **s.as_dict()})
    return out
