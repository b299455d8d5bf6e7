"""The history as a web page: ``write_report(rows, out_dir)`` -> ``out_dir/index.html`` + PNGs.

Sections (each skipped, with a line saying why, when the history has nothing for it):
1. per workload, speed vs quality: every measured method (with its knobs) at its speed-up over the
   baseline of the same run and its quality change; the baseline at (1, 0); the Pareto front
   (no other point both faster and better) joined by a line;
2. diffusion: error to the high-accuracy reference vs model calls, one line per sampler;
3. LLM: tokens/s vs batch size and vs prompt length (context), one line per method;
4. the selector's held-out results (``select.evaluate``: closed gap, regret against the per-
   workload best (VBS) and the single best method (SBS)), on the swept workloads;
5. the machines and library versions the rows were measured with.

The page is self-contained: no script, no remote resource; images are PNG files beside it.
Speed-ups and quality losses come from ``select.table.build_table`` (the selector's own reading
of the history: re-timed rows supersede sweep rows), so the plots show what the selector learns.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

MAX_WORKLOADS = 24          # Pareto panels per family (the most recent workloads)
MAX_LINES = 8               # methods per line plot (the most measured)



def _save(fig, out, title: str, rect=None) -> None:
    """Title, lay out, write and close one figure (every plot of the report ends this way)."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout(**({"rect": rect} if rect is not None else {}))
    fig.savefig(out, dpi=90)
    plt.close(fig)

def _get(r: Any, name: str) -> Any:
    return r.get(name) if isinstance(r, dict) else getattr(r, name, None)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


@dataclass
class Report:
    """What was written: the page, its images, and the sections left out (with why)."""

    path: Path
    images: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


# ----------------------------------------------------------------------------- plots

def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (speed-up, loss) that no other point beats on both (higher speed-up, lower loss),
    sorted by speed-up."""
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(set(front))


def _workload_title(wl: dict[str, Any]) -> str:
    if wl.get("family") == "diffusion":
        return f"{wl.get('model')} | {wl.get('steps')} steps {wl.get('spacing', '')} b={wl.get('batch', '')}"
    return (f"{wl.get('model')} | T={wl.get('temperature')} bs={wl.get('batch_size')} "
            f"{wl.get('domain', '')}")


def plot_pareto(table: Any, family: str, out: Path, *, max_workloads: int = MAX_WORKLOADS) -> tuple[Path | None, int]:
    """Small multiples, one per workload (the last ``max_workloads``): speed-up vs quality loss
    of every arm, the baseline marked, the Pareto front drawn. Returns (png, workloads left out)."""
    plt = _plt()
    wids = table.wids(family)
    shown = wids[-max_workloads:]
    if not shown:
        return None, 0
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    ylabel = "error ratio to baseline - 1" if family == "diffusion" else "quality loss (1 - agreement)"
    for ax, wid in zip(axes.flat, shown):
        pts, base = [], None
        for arm in table.arms_on(wid):
            s = table.speedup.get((wid, arm))
            if family == "diffusion" and (wid, arm) in table.err_ratio:
                q = table.err_ratio[(wid, arm)] - 1.0
            else:
                q = table.loss.get((wid, arm))
            if s is None or q is None:
                continue
            if table.arms[arm].is_baseline:
                base = (s, q)
            pts.append((s, q))
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=14, color="#4477aa", alpha=0.8, label="method (knobs)")
            fx, fy = zip(*pareto_front(pts))
            ax.plot(fx, fy, color="#ee6677", lw=1.2, marker="o", ms=3, label="Pareto front")
        if base is not None:
            ax.scatter([base[0]], [base[1]], marker="*", s=120, color="black", zorder=5, label="baseline")
        ax.axvline(1.0, color="grey", lw=0.6, ls=":")
        ax.axhline(0.0, color="grey", lw=0.6, ls=":")
        ax.set_title(_workload_title(table.workloads[wid]), fontsize=7)
        ax.set_xlabel("speed-up vs baseline", fontsize=7)
        ax.set_ylabel(ylabel, fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(shown):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=6, loc="best")
    _save(fig, out, f"{family}: speed vs quality per workload (better: right and down)",
          rect=(0, 0, 1, 1 - 0.35 / (3.4 * rows)))
    return out, len(wids) - len(shown)


def _median_lines(points: dict[tuple[str, float], list[float]]) -> dict[str, list[tuple[float, float]]]:
    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (name, x), ys in points.items():
        lines[name].append((x, statistics.median(ys)))
    counts = {n: len(v) for n, v in lines.items()}
    keep = sorted(lines, key=lambda n: (-counts[n], n))[:MAX_LINES]
    return {n: sorted(lines[n]) for n in sorted(keep)}


def plot_diffusion_error(rows: Sequence[Any], out: Path) -> Path | None:
    """Error to the reference vs model calls, one panel per denoiser, one line per sampler
    (median over that denoiser's workloads at each number of calls). Only each denoiser's most
    measured timestep spacing is drawn: at a few steps, "leading" spacing stops far from t = 0 and
    its error would hide the samplers' differences."""
    found: dict[tuple[str, str], dict[tuple[str, float], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        m, wl = _get(r, "metrics") or {}, _get(r, "workload") or {}
        nfe, err = _num(m.get("nfe")), _num(m.get("rmse_vs_reference"))
        if (_get(r, "family") or wl.get("family")) != "diffusion" or nfe is None or err is None or nfe <= 0:
            continue
        found[(str(wl.get("model")), str(wl.get("spacing", "")))][(_get(r, "method"), nfe)].append(err)
    by_model: dict[str, dict[tuple[str, float], list[float]]] = {}
    for (model, spacing), pts in sorted(found.items(), key=lambda kv: -sum(map(len, kv[1].values()))):
        label = f"{model}, {spacing} spacing" if spacing else model
        if not any(k.startswith(f"{model},") or k == model for k in by_model):
            by_model[label] = pts
    if not by_model:
        return None
    plt = _plt()
    models = sorted(by_model)[:6]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes.flat, models):
        for name, pts in _median_lines(by_model[model]).items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", ms=3, lw=1, label=name)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(model, fontsize=8)
        ax.set_xlabel("model calls (NFE)", fontsize=8)
        ax.set_ylabel("RMSE to the reference", fontsize=8)
        ax.legend(fontsize=6)
    _save(fig, out, "diffusion: error vs model calls (median over workloads)")
    return out


def plot_llm_throughput(rows: Sequence[Any], out: Path) -> Path | None:
    """Tokens/s vs batch size and vs prompt length, one line per method (median over rows)."""
    by_batch: dict[tuple[str, float], list[float]] = defaultdict(list)
    by_ctx: dict[tuple[str, float], list[float]] = defaultdict(list)
    for r in rows:
        m, wl = _get(r, "metrics") or {}, _get(r, "workload") or {}
        tps = _num(m.get("tokens_per_s"))
        if (_get(r, "family") or wl.get("family")) != "llm" or tps is None:
            continue
        b, ctx = _num(wl.get("batch_size")), _num(wl.get("prompt_len"))
        if b is not None:
            by_batch[(_get(r, "method"), b)].append(tps)
        if ctx is not None:
            by_ctx[(_get(r, "method"), ctx)].append(tps)
    if not by_batch and not by_ctx:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), squeeze=False)
    for ax, pts, label in ((axes[0, 0], by_batch, "batch size"), (axes[0, 1], by_ctx, "prompt length (tokens)")):
        for name, line in _median_lines(pts).items():
            xs, ys = zip(*line)
            ax.plot(xs, ys, marker="o", ms=3, lw=1, label=name)
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("generated tokens / s", fontsize=8)
        ax.set_yscale("log")
        if pts:
            ax.legend(fontsize=6)
    _save(fig, out, "LLM: throughput vs batch and context (median over rows)")
    return out


# ----------------------------------------------------------------------------- selector

SELECTOR_MIN_WORKLOADS = 6


def selector_results(table: Any, *, cache_dir: str | os.PathLike | None = None,
                     progress: Callable[[int, int], None] | None = None) -> list[dict[str, Any]]:
    """Held-out results of each family's default selector (leave-one-model-out; LLM lossless,
    diffusion at quality loss <= 0) with SBS and random as references; cached in ``cache_dir``
    under a hash of the table (a second report of the same history does not re-fit)."""
    from accelerando.select.evaluate import evaluate
    from accelerando.select.models import default_model
    from accelerando.select.table import Constraint
    digest = hashlib.sha1(json.dumps(
        sorted((w, a, round(s, 6), None if table.loss.get((w, a)) is None else round(table.loss[(w, a)], 6))
               for (w, a), s in table.speedup.items()), default=str).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"selector-{digest}.json" if cache_dir else None
    if cache is not None and cache.exists():
        return json.loads(cache.read_text())
    out = []
    for family in ("llm", "diffusion"):
        if len(table.wids(family)) < SELECTOR_MIN_WORKLOADS:
            continue
        c = Constraint() if family == "llm" else Constraint(0.0)
        summ, cases = evaluate(table, [default_model(family)], constraint=c, scheme="model", family=family,
                               progress=progress)
        if cases:
            out += [{"family": family, "scheme": "leave-one-model-out", "constraint": c.label(), **s.as_dict()}
                    for s in summ]
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(out))
    return out


# ----------------------------------------------------------------------------- machines

def machines(rows: Iterable[Any]) -> list[dict[str, Any]]:
    """One entry per (hardware, versions, git revision) with its row count and time span."""
    groups: dict[str, dict[str, Any]] = {}
    for r in rows:
        hw, ver = _get(r, "hardware") or {}, _get(r, "versions") or {}
        entry = {"cpu": hw.get("cpu", "?"), "cores": hw.get("cores", "?"), "accelerator": hw.get("accelerator", "?"),
                 "python": hw.get("python", "?"),
                 **{k: ver.get(k, "?") for k in ("torch", "transformers", "diffusers", "accelerando")},
                 "git": str(_get(r, "git_revision") or "?")[:10]}
        key = json.dumps(entry, sort_keys=True, default=str)
        g = groups.setdefault(key, {**entry, "rows": 0, "first": None, "last": None})
        g["rows"] += 1
        ts = str(_get(r, "timestamp") or "")
        if ts:
            g["first"] = min(g["first"] or ts, ts)
            g["last"] = max(g["last"] or ts, ts)
    return sorted(groups.values(), key=lambda g: -g["rows"])


# ----------------------------------------------------------------------------- the page

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}.note{color:#666;font-size:.9em}"""


def _table_html(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            v = "-" if not math.isfinite(v) else f"{v:.3g}"
        return f"<td>{html.escape(str(v))}</td>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def write_report(rows: Sequence[Any], out_dir: str | os.PathLike, *, source: str = "",
                 selector_rows: Sequence[Any] | None = None, selector: bool = True,
                 cache_dir: str | os.PathLike | None = None,
                 progress: Callable[[str], None] | None = None,
                 eval_progress: Callable[[int, int], None] | None = None) -> Report:
    """Write ``index.html`` and its PNGs into ``out_dir`` (created; files of an earlier report
    there are replaced). ``rows``: history rows (``Measurement``s or dicts). The selector section
    evaluates on ``selector_rows`` (default: ``rows``); ``selector=False`` leaves it out.
    ``progress(step)`` is called before each section."""
    from accelerando.select.table import build_table
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda step: None)
    rows = list(rows)
    rep = Report(out / "index.html")
    say("reading the history")
    table = build_table(rows)
    parts = [f"<h1>accelerando report</h1><p class=note>{len(rows)} rows from {html.escape(source or 'the history')}; "
             f"{len(table.wids('llm'))} LLM and {len(table.wids('diffusion'))} diffusion workloads with a speed-up.</p>"]

    def image(path: Path | None, alt: str, section: str, why: str) -> str:
        if path is None:
            rep.skipped[section] = why
            return f"<p class=note>{html.escape(why)}</p>"
        rep.images.append(path)
        return f'<img src="{html.escape(path.name)}" alt="{html.escape(alt)}">'

    for family in ("llm", "diffusion"):
        say(f"{family}: speed vs quality")
        png, left = plot_pareto(table, family, out / f"pareto-{family}.png")
        parts.append(f"<h2>{family}: speed vs quality, per workload</h2>")
        parts.append(image(png, f"{family} speed vs quality", f"pareto-{family}",
                           f"no {family} workload with a baseline and a speed-up in this history"))
        if left:
            parts.append(f"<p class=note>the last {MAX_WORKLOADS} workloads; {left} earlier ones left out.</p>")
    say("diffusion: error vs model calls")
    parts.append("<h2>diffusion: error vs model calls</h2>")
    parts.append(image(plot_diffusion_error(rows, out / "diffusion-error.png"), "diffusion error vs model calls",
                       "diffusion-error", "no diffusion row with an error to a reference"))
    say("LLM: throughput")
    parts.append("<h2>LLM: tokens/s vs batch and context</h2>")
    parts.append(image(plot_llm_throughput(rows, out / "llm-throughput.png"), "LLM tokens per second",
                       "llm-throughput", "no LLM row with tokens/s"))
    parts.append("<h2>selector: held-out results</h2>")
    if not selector:
        rep.skipped["selector"] = "left out (--no-selector)"
        parts.append("<p class=note>left out (--no-selector).</p>")
    else:
        say("selector: held-out evaluation")
        sel_table = table if selector_rows is None else build_table(selector_rows)
        res = selector_results(sel_table, cache_dir=cache_dir, progress=eval_progress)
        if not res:
            why = (f"fewer than {SELECTOR_MIN_WORKLOADS} swept workloads per family "
                   "(run `accelerando sweep`, or keep the bundled history)")
            rep.skipped["selector"] = why
            parts.append(f"<p class=note>{html.escape(why)}</p>")
        else:
            parts.append("<p class=note>Each family's default selector, leave-one-model-out: trained without "
                         "any workload of the held-out model. Regret: the best acceptable speed-up (VBS) minus "
                         "the chosen one's, over the VBS; closed gap: the share of the single best method's "
                         "(SBS) regret that the selector removes.</p>")
            parts.append(_table_html(
                ["family", "constraint", "policy", "held-out workloads", "top-1", "mean speed-up", "VBS",
                 "regret/VBS", "closed gap", "violations"],
                [[r["family"], r["constraint"], r["policy"], r["n"], r["top1"], r["mean_utility"], r["mean_vbs"],
                  r["rel_regret"], r["closed_gap"], r["violation_rate"]] for r in res]))
    say("machines and versions")
    parts.append("<h2>machines and versions</h2>")
    ms = machines(rows)
    cols = ["rows", "cpu", "cores", "accelerator", "python", "torch", "transformers", "diffusers", "accelerando",
            "git", "first", "last"]
    parts.append(_table_html(cols, [[m.get(c) or "-" for c in cols] for m in ms]) if ms
                 else "<p class=note>no rows.</p>")
    page = ("<!doctype html><html lang=en><head><meta charset=utf-8><title>accelerando report</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n")
    rep.path.write_text(page)
    return rep
