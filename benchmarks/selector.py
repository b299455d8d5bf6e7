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

MODELS = ["knn", "knn-w", "gbm", "forest", "pairwise", "gbm-arm", "forest-arm", "ens", "qmargin"]
# every swept LLM method is lossless, so a lossy LLM budget would repeat the lossless table
BUDGETS = {"llm": [None], "diffusion": [0.0, 0.25]}


def winners(table, family, c):
    """How often each arm is the per-workload oracle: a selection problem only if this spreads."""
    cnt = collections.Counter(table.vbs(w, c)[0] for w in table.wids(family))
    return ", ".join(f"{a} {n}" for a, n in cnt.most_common(6))


def noise(rows, family):
    """Median and 90th percentile of the timed repeats' relative inter-quartile range."""
    def get(r, k):
        return (r.get(k) if isinstance(r, dict) else getattr(r, k))
    rel = sorted(m["iqr_s"] / m["median_s"] for r in rows if get(r, "family") == family
                 for m in [get(r, "metrics")] if m.get("median_s") and m.get("iqr_s") is not None)
    if not rel:
        return "unknown"
    return f"relative IQR of the repeats, median {rel[len(rel) // 2]:.1%}, 90th percentile {rel[int(0.9 * len(rel))]:.1%}"


def noise_ties(rows, table, family, c):
    """Workloads where the oracle's lead over the runner-up arm is smaller than the larger relative
    IQR of the two arms' timed repeats: there the 'best' method is best within timing noise only."""
    import statistics
    from accelerando.select.table import arm_id, workload_id
    iqr = collections.defaultdict(list)
    for r in rows:
        m, wl = r["metrics"], dict(r["workload"])
        wl.setdefault("family", r["family"])
        if m.get("median_s") and m.get("iqr_s") is not None:
            iqr[(workload_id(wl), arm_id(r["method"], r["knobs"]))].append(m["iqr_s"] / m["median_s"])
    n = ties = 0
    for w in table.wids(family):
        arms = sorted(table.arms_on(w), key=lambda a: -table.utility(w, a, c))
        if len(arms) < 2:
            continue
        u1, u2 = table.utility(w, arms[0], c), table.utility(w, arms[1], c)
        band = max(statistics.mean(iqr.get((w, a), [0.0])) for a in arms[:2])
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
        lines.append(f"Timing noise of the history: {noise(rows, fam)}. A difference between two methods "
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
        "**Against the targets (closed gap >= 0.8, regret <= 5% of VBS, no lossless violation):** "
        "the lossless constraint is never violated (only lossless methods are candidates). The gap and "
        "regret targets are **not met**. LLM (no model changed in this round; its tables are the previous "
        "run's): the default `ens` (geometric mean of gbm, gbm-arm and forest) closes 0.55 of the "
        "SBS-to-oracle gap leave-one-workload-out (regret 13.2% of VBS) and 0.36 leave-one-model-out "
        "(regret 18.6%; gbm-arm and forest-arm, 0.40, are the best there). A better ensemble did not survive "
        "an honest check: over all 31 subsets of gbm, gbm-arm, forest, forest-arm and knn-w (each member's "
        "predictions stored once per held-out fold), the best subset on these same folds closes 0.59 "
        "leave-one-workload-out (gbm-arm+knn-w) and 0.41 leave-one-model-out (gbm+gbm-arm), but choosing the "
        "subset for each held-out workload by its mean utility on the *other* held-out workloads (other models "
        "for leave-one-model-out) closes 0.53 and 0.37: no better than the fixed default, so the differences "
        "between ensembles are selection noise and the default stays. Hyper-parameters are library "
        "defaults; no search was run. Diffusion: the new default `qmargin` (quality and speed predicted "
        "apart: extra-trees on the unclipped log error ratio to the baseline, the median speed-up per arm, "
        "and the fastest arm whose predicted quality keeps the budget by a safety margin of delta standard "
        "deviations of that arm's out-of-fold residuals, delta chosen by an inner 5-fold cross-validation on "
        "the training workloads) is the first learned selector to beat the single best sampler, "
        "leave-one-workload-out: it closes 0.20 of the gap at loss <= 0 (regret 27.9% of VBS against the "
        "SBS's 34.8%, violations 3.3% against 33%) and 0.31 at loss <= 0.25 (regret 34.1% against 49.4%, "
        "violations 10% against 27%). Leave-one-model-out it is slightly below the SBS (-0.07 at both "
        "budgets; with 3 models, each fold holds out (spacing, budget) combinations that only the held-out "
        "model was run at, e.g. leading spacing at 25 steps, and trees do not extrapolate). A first version "
        "with one margin in log-ratio units for every arm closed 0.00 and 0.31 leave-one-workload-out and "
        "-0.06 and -0.02 leave-one-model-out (violations 13% at loss <= 0); the per-arm scaled margin was "
        "preferred on these same folds, and qmargin was made the default over pairwise (the previous "
        "default) for the best mean closed gap over the four diffusion tables (0.09, against -0.01), also "
        "on these folds: read its rows as somewhat optimistic. "
        "Why gbm and forest fall to about the baseline's "
        "utility here: not a discontinuous target (they regress log speed-up) but their gate: the score is "
        "speed-up x P(ok) from one random-forest classifier over all arms' cells, whose P(ok) for a "
        "half-budget arm stays near its base rate (about 0.5-0.6, under min_p_ok = 0.8), while a "
        "full-budget arm's speed-up (about 1) times a P(ok) below 1 falls under the baseline's 1; in a spot "
        "check of 6 held-out workloads forest picked the baseline on 4 (mean utilities 0.93-1.08). The "
        "ceiling of the qmargin approach: with the *measured* quality (a perfect constraint oracle) and the "
        "same median speed-ups it would close 0.70 (loss <= 0) and 0.79 (loss <= 0.25) leave-one-workload-out; "
        "the rest of the oracle's lead is timing noise (one arm's measured speed-up ranges from 1.1x to "
        "17x across workloads on the loaded machine), so the 0.8 target is out of reach on this history. "
        "Part of the oracle's lead is timing noise in the LLM tables too (the lines below count the "
        "workloads where it is); the rest there is mostly how repetitive the *generated* text of a random "
        "model is, which drives prompt lookup and is only indirectly seen.",
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
