"""Held-out evaluation of the method selector on the swept history -> BENCHMARKS.md ("selector").

    python benchmarks/selector.py                       # the bundled history (select/data)
    python benchmarks/selector.py --history h.sqlite    # any history store

Leave-one-workload-out and leave-one-model-out; every learned selector against the single best
method (SBS), random choice and the per-workload oracle (VBS). LLMs are evaluated lossless-only
and with a quality budget; diffusion samplers are all lossy, so only budgets apply there.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time

from accelerando.bench.report import machine_line, markdown_table, write_section
from accelerando.select.cli import run_evaluation
from accelerando.select.models import default_model
from accelerando.select.recommend import load_bundled
from accelerando.select.table import Constraint, build_table

MODELS = ["knn", "knn-w", "gbm", "forest", "pairwise", "gbm-arm", "forest-arm", "ens", "qmargin", "qmargin-nfe",
          "qkernel", "qkernel-cv"]
# every swept LLM method is lossless, so a lossy LLM budget would repeat the lossless table
BUDGETS = {"llm": [None], "diffusion": [0.0, 0.25]}


def winners(table, family, c):
    """How often each arm is the per-workload oracle: a selection problem only if this spreads."""
    cnt = collections.Counter(table.vbs(w, c)[0] for w in table.wids(family))
    return ", ".join(f"{a} {n}" for a, n in cnt.most_common(6))


def _used(rows, table):
    """(row, workload id, arm id) of the rows the table reads (a re-timed workload: its
    interleaved rows only, see ``build_table``)."""
    from accelerando.select.table import arm_id, workload_id

    def get(r, k):
        return r.get(k) if isinstance(r, dict) else getattr(r, k)
    for r in rows:
        if not table.reads(r):
            continue
        wl = dict(get(r, "workload"))
        wl.setdefault("family", get(r, "family"))
        yield get(r, "metrics"), workload_id(wl), arm_id(get(r, "method"), get(r, "knobs")), wl["family"]


def _q(rel):
    return f"median {rel[len(rel) // 2]:.1%}, 90th percentile {rel[int(0.9 * len(rel))]:.1%}"


def _pooled(rows, table, family):
    """(workload, arm) -> the per-round speed-ups of its re-timed rows, pooled."""
    from accelerando.select.table import INTERLEAVED
    out = collections.defaultdict(list)
    for m, w, a, f in _used(rows, table):
        if f == family and m.get("timing") == INTERLEAVED and not m.get("is_baseline") and m.get("speedup_rounds"):
            out[(w, a)] += m["speedup_rounds"]
    return out


def _rel_iqr(xs):
    from accelerando.bench.harness import percentile
    xs = sorted(xs)
    med = xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
    return (percentile(xs, 75) - percentile(xs, 25)) / med


def noise(rows, family, table):
    """Timing noise of the measurements the table uses: for sweep rows the relative inter-quartile
    range of an arm's timed repeats; for re-timed cells that of its pooled per-round speed-ups
    (baseline time / arm time in the same interleaved round: the noise of the compared quantity),
    and that divided by sqrt(rounds), about the standard error of their median (what the table uses)."""
    from accelerando.select.table import INTERLEAVED
    sweep = sorted(m["iqr_s"] / m["median_s"] for m, w, a, f in _used(rows, table) if f == family
                   and m.get("timing") != INTERLEAVED and m.get("median_s") and m.get("iqr_s") is not None)
    pooled = _pooled(rows, table, family)
    out = []
    if sweep:
        out.append(f"sweep rows: relative IQR of the repeats' times, {_q(sweep)}")
    if pooled:
        n = len({w for w, a in pooled})
        rounds = sorted({len(v) for v in pooled.values()})
        rel = sorted(_rel_iqr(v) for v in pooled.values())
        se = sorted(_rel_iqr(v) / len(v) ** 0.5 for v in pooled.values())
        out.append(f"re-timed cells ({n} workloads, {'/'.join(map(str, rounds))} interleaved rounds a cell): relative "
                   f"IQR of the per-round speed-ups {_q(rel)}; divided by sqrt(rounds) (about the standard error of "
                   f"the median the table uses) {_q(se)}")
    return "; ".join(out) or "unknown"


def noise_ties(rows, table, family, c):
    """Workloads where the oracle's lead over the runner-up arm is smaller than the larger relative
    noise band of the two arms: the relative IQR of the repeats' times for sweep rows, the relative
    IQR of the pooled per-round speed-ups / sqrt(rounds) for re-timed cells (``noise``). There the
    'best' method is best within timing noise only."""
    import statistics
    from accelerando.select.table import INTERLEAVED
    band_of = {k: _rel_iqr(v) / len(v) ** 0.5 for k, v in _pooled(rows, table, family).items()}
    sweep_band = collections.defaultdict(list)
    for m, w, a, f in _used(rows, table):
        if m.get("timing") != INTERLEAVED and m.get("median_s") and m.get("iqr_s") is not None:
            sweep_band[(w, a)].append(m["iqr_s"] / m["median_s"])
    n = ties = 0
    for w in table.wids(family):
        arms = sorted(table.arms_on(w), key=lambda a: -table.utility(w, a, c))
        if len(arms) < 2:
            continue
        u1, u2 = table.utility(w, arms[0], c), table.utility(w, arms[1], c)
        band = max(band_of.get((w, a), statistics.mean(sweep_band.get((w, a), [0.0]))) for a in arms[:2])
        n += 1
        ties += u1 > 0 and (u1 - u2) / u1 < band
    return f"{ties} of {n}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--history", help="history store (default: the bundled data)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--json", help="also write all summaries here")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--note", default="", help="a line on where reused results came from")
    ap.add_argument("--reuse", action="append", default=[],
                    help="JSON written by `accelerando select evaluate --json` (or --json here): reuse its "
                         "results for the families it covers instead of recomputing them")
    args = ap.parse_args(argv)
    if args.history:
        from accelerando.bench.history import open_history
        with open_history(args.history) as h:
            rows = h.rows()
    else:
        rows = load_bundled()
    table = build_table(rows)
    if not len(table):
        print("no measured workloads in the history", file=sys.stderr)
        return 1
    names = [m for m in args.models.split(",") if m]
    t0 = time.perf_counter()
    results = []
    lines = []
    for fam in ("llm", "diffusion"):
        wids = table.wids(fam)
        if not wids:
            continue
        cons = [Constraint(b) for b in BUDGETS[fam]]
        reused = [r for path in args.reuse for r in json.load(open(path)) if r["family"] == fam]
        if reused:
            labels = {r["constraint"] for r in reused}
            cons = [c for c in cons if c.label() in labels]
            res = reused
        else:
            res = run_evaluation(table, names, ["workload", "model"], cons, [fam], console=None)
        results += res
        models_n = len({table.workloads[w].get("model") for w in wids})
        arms_n = len({a for w in wids for a in table.arms_on(w)})
        lines.append(f"\n### {fam}: {len(wids)} workloads, {models_n} models, {arms_n} method configurations\n")
        lines.append(f"Timing noise of the measurements used: {noise(rows, fam, table)}. A difference between two methods "
                     "smaller than that is noise, and the oracle (VBS) profits from it.\n")
        for c in cons:
            lines.append(f"Per-workload oracle winners ({c.label()}): {winners(table, fam, c)}\n")
            lines.append(f"Workloads where the oracle's lead over the runner-up is within timing noise ({c.label()}): "
                         f"{noise_ties(rows, table, fam, c)}\n")
        for scheme in ("workload", "model"):
            for c in cons:
                part = [r for r in res if r["scheme"] == scheme and r["constraint"] == c.label()]
                if not part:
                    continue
                lines.append(f"\nLeave-one-{scheme}-out, {c.label()} ({part[0]['n']} held-out workloads):\n")
                lines.append(markdown_table(
                    ["policy", "top-1", "within 5%", "mean speed-up", "VBS speed-up", "mean regret", "regret / VBS",
                     "closed gap", "violations"],
                    [[r["policy"] + (" (default)" if r["policy"] == default_model(fam) else ""), f"{r['top1']:.2f}",
                      f"{r['within5']:.2f}", f"{r['mean_utility']:.3f}", f"{r['mean_vbs']:.3f}", f"{r['mean_regret']:.3f}",
                      f"{r['rel_regret']:.1%}", "-" if r["closed_gap"] != r["closed_gap"] else f"{r['closed_gap']:.2f}",
                      f"{r['violation_rate']:.1%}"] for r in part]))
    cmd = "python benchmarks/selector.py" + (f" --history {args.history}" if args.history else "") + \
        "".join(f" --reuse {p}" for p in args.reuse)
    md = "\n".join([
        "## Method selector: held-out evaluation",
        "",
        f"Command: `{cmd}` ({time.perf_counter() - t0:.0f} s). Machine of the evaluation: {machine_line()}.",
        *([args.note, ""] if args.note else []),
        "Data: the sweep history (`accelerando sweep`, bundled as `src/accelerando/select/data/history.jsonl.gz`);"
        " its speed-ups were measured on the machine recorded in each row.",
        "",
        "Utility = speed-up over the baseline of the same run when the quality constraint holds, else 0;"
        " the baseline (1.0) is always allowed. VBS = per-workload oracle, SBS = single best method on the"
        " training folds, random = expected utility of a uniformly random allowed method."
        " Closed gap = (sel - SBS) / (VBS - SBS); regret / VBS = mean regret / mean VBS speed-up."
        " Diffusion arms are (sampler, fraction of the NFE budget); loss = relative increase of the error"
        " to a 100-step reference over the full-budget baseline's.",
        "",
        "**Data.** LLM: 60 workloads (the LLM grid's entries 1-61 without entry 4, whose target answers EOS at once), 8 random-init Llama targets with their drafts, 13 method configurations: `generate`, `spec-draft` (k = 2, 4, adaptive), `spec-prompt-lookup` (k = 4, 8), transformers' assisted generation and prompt lookup (batch 1), `specinfer`, `rsd-c`, `rsd-s`, `rsd-sparse`, `rsd-dyn`. Diffusion: 90 workloads, 4 random-init UNets, budgets 5-30 steps, three spacings, batch 1-4; 12 samplers at 1, 1/2 and 1/4 of the budget. Plus 6 DiT workloads on the zoo `digits-dit` (the diffusion grid's entries 90-95, budgets 10-50, batch 1-4): DDIM, S-PNDM, DPM++(2M) and the 6 DiT arms (`dit-cache-static`, `dit-cache-threshold`, `dit-ras`, `dit-tome`, `dit-diffusers-fbc`, `dit-diffusers-taylorseer`) at 1, 1/2 and 1/4 of the budget (sweep rows, 2 timed repeats, not re-timed); entries 96-101 (`digits-dit-32`) are in the grid but not yet swept. Every workload was re-timed in 10 interleaved rounds (`accelerando sweep --retime`), sampling LLM workloads with a seed per round.",
        '',
        "**How the tables were made** (OMP_NUM_THREADS=1, two evaluations at a time, merged into the JSON files this script reads with `--reuse`; the SBS and random rows were identical across them). LLM: `accelerando select evaluate --family llm --scheme workload --models ens,gbm,gbm-arm,forest` beside `... --models knn,knn-w,pairwise,forest-arm`, then `... --scheme model --models knn,knn-w,gbm,forest,pairwise,gbm-arm,forest-arm,ens` (about 7 min). Diffusion: `accelerando select evaluate --family diffusion --scheme workload --max-loss 0 --max-loss 0.25 --models qkernel-cv,qkernel,knn,knn-w,pairwise` (about 8 min) beside `... --models qmargin-nfe` (about 14 min), then `... --scheme model --models qkernel-cv,qkernel,qmargin-nfe,knn,knn-w,pairwise` (74 s). gbm, forest and their per-arm variants are not in the diffusion tables: their gate (speed-up x P(meets the budget) from one classifier over all arms) keeps a half-budget arm's P near its base rate, so they pick about the baseline.",
        '',
        '**Against the targets (closed gap >= 0.8, regret <= 5% of VBS, no lossless violation).** LLM: **met**. `pairwise` (the default) closes 0.88 of the gap leave-one-workload-out (regret 3.0% of VBS; SBS 24.1%) and 0.87 leave-one-model-out (3.1%); gbm 0.84 / 0.75, knn-w 0.80 / 0.83, ens 0.82 / 0.72. Diffusion at loss <= 0: **met**, `qkernel-cv` 0.83 / regret 3.1% (1 violation in 90), `qmargin-nfe` 0.81 / 3.6%. At loss <= 0.25: **not met**, qkernel-cv 0.72 / 8.8%, qkernel 0.75 / 8.0%, qmargin-nfe 0.68 / 10.1%. Leave-one-model-out (4 UNets) qkernel-cv closes 0.57 / 0.65 (regret 8.1% / 10.7%). The lossless constraint is never violated for LLMs (only lossless methods are candidates).',
        '',
        '**Defaults** are the models with the best mean closed gap over both schemes (and, for diffusion, both budgets): `pairwise` for LLMs (0.875; knn-w 0.815, gbm 0.795), `qkernel-cv` for diffusion (0.69; qmargin-nfe 0.66, qkernel 0.63). They were chosen on these folds, so read their rows as somewhat optimistic; the margin and bandwidths inside `qkernel-cv` are chosen inside each training split.',
        '',
        "**Where the diffusion regret at loss <= 0.25 comes from** (qkernel-cv, leave-one-workload-out, 0.18 per workload): 0.08 from four workloads whose quarter or half budget's error depends on the UNet more than the kernel allows (S-PNDM at a quarter of 30 trailing steps: error ratio +75% on the c16x32 UNet, +16% and +7% on c24x48 and c32x64), 0.03 from two leading-8 workloads whose half-budget samplers sit 0.011 (log ratio) inside the budget, most of the rest from samplers within timing noise of the oracle's pick. Where the oracle's lead is within timing noise (lines below) a 'wrong' pick costs about nothing; the 'within 5%' column counts it as a hit.",
        *lines,
    ])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    print(md)
    if not args.no_write:
        write_section("selector", md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
