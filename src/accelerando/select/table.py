"""History rows -> a performance table: workloads x method configurations ("arms").

One arm is a method with its knobs (``spec-draft[k=4]``). For each (workload, arm) the table
holds the speed-up over the baseline measured in the same run and a *quality loss* (0 = no loss).
A ``Constraint`` says which (workload, arm) cells are acceptable; the *utility* of a cell is its
speed-up when acceptable and 0 when not, so a selection that breaks the constraint is never
better than doing nothing (the baseline, utility 1, is always acceptable).

Quality loss of one row (first rule that applies):
1. ``metrics["quality_loss"]`` when a method reports it;
2. LLM, greedy: ``1 - token_agreement`` with the baseline's tokens (a lossless method reaches 0);
3. LLM, sampling: 0 for a method registered lossless (equality of distributions is proved and
   tested, not measurable per run); otherwise the relative perplexity increase over the baseline;
4. diffusion: the relative increase of the error to the high-accuracy reference over the
   baseline's, ``max(0, rmse_ref / rmse_ref(baseline) - 1)``; without a reference, the RMSE to the
   baseline's sample.

The loss is clipped at 0, so it cannot say by how much a method *beats* the baseline; the table
also keeps the unclipped error ratio ``rmse_ref / rmse_ref(baseline)`` where it was measured
(``err_ratio``), a continuous target for models of quality (a method 30% better than the
baseline is further from breaking ``loss <= 0`` than one 1% better).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

LOSS_TOL = 1e-9
INTERLEAVED = "interleaved"      # metrics["timing"] of a re-timed row (``select.sweep.retime``)


def timing_protocol(metrics: Mapping[str, Any] | None) -> int:
    """How a row was timed, better protocols higher: 0 = the sweep's repeats of one method after
    another; 1 = interleaved rounds (``sweep --retime``); 2 = interleaved rounds that also draw a
    new sampling seed each round (``round_seeds``; sampling LLM workloads), so the speed-up is a
    median over sample paths rather than one path's luck. A workload's cells come from its rows of
    the best protocol present; the others stay in the history unread."""
    m = metrics or {}
    if m.get("timing") != INTERLEAVED:
        return 0
    return 2 if m.get("round_seeds") else 1


@dataclass(frozen=True)
class Constraint:
    """The quality constraint: ``max_loss=None`` -> lossless methods only; a number -> any method
    whose measured quality loss is at most that (see the module docstring for the loss)."""

    max_loss: float | None = None

    def __post_init__(self) -> None:
        if self.max_loss is not None and not (self.max_loss >= 0 and math.isfinite(self.max_loss)):
            raise ValueError(f"max_loss must be a finite number >= 0 or None, got {self.max_loss}")

    @property
    def lossless(self) -> bool:
        return self.max_loss is None

    def admits(self, lossless: bool, loss: float | None) -> bool:
        """Is a (method, measured loss) acceptable? Unknown loss is acceptable only if lossless."""
        if self.max_loss is None:
            return bool(lossless) and (loss is None or loss <= LOSS_TOL)
        if loss is None or not math.isfinite(loss):
            return bool(lossless)
        return loss <= self.max_loss + LOSS_TOL

    def label(self) -> str:
        return "lossless" if self.max_loss is None else f"loss<={self.max_loss:g}"


LOSSLESS = Constraint()


@dataclass(frozen=True)
class Arm:
    """A method configuration."""

    method: str
    knobs: tuple[tuple[str, Any], ...]
    family: str
    lossless: bool
    is_baseline: bool = False

    @property
    def id(self) -> str:
        return arm_id(self.method, dict(self.knobs))

    def knob_dict(self) -> dict[str, Any]:
        return dict(self.knobs)


def _knob_text(v: Any) -> str:
    # tuples come back from the history as lists: one spelling for both, so ids survive a round trip
    if isinstance(v, (list, tuple)):
        return "(" + ",".join(_knob_text(x) for x in v) + ")"
    return str(v)


def arm_id(method: str, knobs: Mapping[str, Any] | None) -> str:
    """``method[k1=v1,k2=v2]`` (sorted knobs; a method without knobs is just its name)."""
    if not knobs:
        return method
    return method + "[" + ",".join(f"{k}={_knob_text(knobs[k])}" for k in sorted(knobs)) + "]"


def workload_id(workload: Mapping[str, Any]) -> str:
    """Stable id of a workload dict, ignoring the measured ``features`` (they are facts about it)."""
    key = {k: v for k, v in workload.items() if k != "features"}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _get(row: Any, name: str, default: Any = None) -> Any:
    if isinstance(row, Mapping):
        return row.get(name, default)
    return getattr(row, name, default)


def _f(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def error_ratio(metrics: Mapping[str, Any], base: Mapping[str, Any] | None) -> float | None:
    """``rmse_vs_reference / rmse_vs_reference(baseline)`` of one row, unclipped; None if unmeasured."""
    r, rb = _f(metrics.get("rmse_vs_reference")), _f((base or {}).get("rmse_vs_reference"))
    return r / rb if r is not None and rb else None


def quality_loss(family: str, metrics: Mapping[str, Any], base: Mapping[str, Any] | None,
                 *, greedy: bool) -> float | None:
    """The quality loss of one row against the baseline row of its run (module docstring)."""
    if _f(metrics.get("quality_loss")) is not None:
        return max(0.0, _f(metrics["quality_loss"]))
    if metrics.get("is_baseline"):
        return 0.0
    lossless = bool(metrics.get("lossless"))
    if family == "llm":
        if greedy and _f(metrics.get("token_agreement")) is not None:
            return max(0.0, 1.0 - _f(metrics["token_agreement"]))
        if lossless:
            return 0.0
        p, pb = _f(metrics.get("perplexity")), _f((base or {}).get("perplexity"))
        if p is not None and pb:
            return max(0.0, p / pb - 1.0)
        return None
    r, rb = _f(metrics.get("rmse_vs_reference")), _f((base or {}).get("rmse_vs_reference"))
    if r is not None and rb:
        return max(0.0, r / rb - 1.0)
    if _f(metrics.get("rmse_vs_baseline")) is not None:
        return 0.0 if lossless else _f(metrics["rmse_vs_baseline"])
    return 0.0 if lossless else None


@dataclass
class PerfTable:
    """Workloads x arms: speed-ups and quality losses (medians / maxima over repeated rows)."""

    workloads: dict[str, dict[str, Any]] = field(default_factory=dict)     # wid -> workload dict
    hardware: dict[str, dict[str, Any]] = field(default_factory=dict)      # wid -> hardware dict
    arms: dict[str, Arm] = field(default_factory=dict)
    speedup: dict[tuple[str, str], float] = field(default_factory=dict)
    loss: dict[tuple[str, str], float | None] = field(default_factory=dict)
    err_ratio: dict[tuple[str, str], float] = field(default_factory=dict)   # unclipped, where measured
    protocol: dict[str, int] = field(default_factory=dict)   # wid -> timing_protocol of its cells

    @property
    def refined(self) -> set[str]:
        """Workloads whose cells come from a re-timing (interleaved rows)."""
        return {w for w, p in self.protocol.items() if p > 0}

    def reads(self, row: Any) -> bool:
        """Whether ``build_table`` took its cells from this history row (its workload's best protocol)."""
        wid = workload_id(_family_workload(row))
        return timing_protocol(_get(row, "metrics")) >= self.protocol.get(wid, 0)

    # -- queries
    def family_of(self, wid: str) -> str:
        return str(self.workloads[wid].get("family", "llm"))

    def wids(self, family: str | None = None) -> list[str]:
        return [w for w in self.workloads if family is None or self.family_of(w) == family]

    def arms_on(self, wid: str) -> list[str]:
        return [a for a in self.arms if (wid, a) in self.speedup]

    def baseline_arm(self, family: str) -> str | None:
        return next((a for a, arm in self.arms.items() if arm.is_baseline and arm.family == family), None)

    def admits(self, wid: str, arm: str, c: Constraint) -> bool:
        return c.admits(self.arms[arm].lossless, self.loss.get((wid, arm)))

    def utility(self, wid: str, arm: str, c: Constraint) -> float:
        """Speed-up if the cell satisfies the constraint, else 0 (see module docstring)."""
        if self.arms[arm].is_baseline:
            return 1.0
        s = self.speedup[(wid, arm)]
        return s if self.admits(wid, arm, c) else 0.0

    def vbs(self, wid: str, c: Constraint) -> tuple[str, float]:
        """The per-workload oracle: the best acceptable arm measured on ``wid`` and its utility."""
        best = max(self.arms_on(wid), key=lambda a: (self.utility(wid, a, c), self.arms[a].is_baseline))
        return best, self.utility(wid, best, c)

    def subset(self, wids: Iterable[str]) -> "PerfTable":
        keep = set(wids)
        return PerfTable({w: d for w, d in self.workloads.items() if w in keep},
                         {w: d for w, d in self.hardware.items() if w in keep}, dict(self.arms),
                         {k: v for k, v in self.speedup.items() if k[0] in keep},
                         {k: v for k, v in self.loss.items() if k[0] in keep},
                         {k: v for k, v in self.err_ratio.items() if k[0] in keep},
                         {w: p for w, p in self.protocol.items() if w in keep})

    def __len__(self) -> int:
        return len(self.workloads)


def build_table(rows: Iterable[Any]) -> PerfTable:
    """Turn history rows (``Measurement`` objects or dicts with the same fields) into a table.

    Rows are grouped into runs by ``run_id`` (the baseline of the same run gives the reference
    for perplexity / reference-error ratios). Rows without a speed-up or with an error are skipped.

    Which measurement counts: a workload that has re-timed rows (``metrics["timing"] ==
    "interleaved"``, from ``accelerando sweep --retime``) takes all its cells from them alone --
    speed-up = median of the per-round speed-ups pooled over its re-timings, quality = the worst
    re-timed row, arms = those the re-timing ran (an arm the current code refuses is gone) -- and
    its older rows stay in the history but are not read here; of re-timings, those that drew a new
    seed each round supersede those that did not (``timing_protocol``). Other workloads: speed-up = median
    over their rows, quality = the worst row.
    """
    rows = list(rows)
    protocol: dict[str, int] = {}
    for r in rows:
        w = workload_id(_family_workload(r))
        protocol[w] = max(protocol.get(w, 0), timing_protocol(_get(r, "metrics")))
    runs: dict[Any, list[Any]] = defaultdict(list)
    for i, r in enumerate(rows):
        if timing_protocol(_get(r, "metrics")) < protocol[workload_id(_family_workload(r))]:
            continue                   # superseded by the workload's better-timed rows
        runs[_get(r, "run_id") or ("row", i)].append(r)
    t = PerfTable()
    sp: dict[tuple[str, str], list[float]] = defaultdict(list)
    ls: dict[tuple[str, str], list[float | None]] = defaultdict(list)
    er: dict[tuple[str, str], list[float]] = defaultdict(list)
    for run in runs.values():
        base = next((_get(r, "metrics") for r in run if (_get(r, "metrics") or {}).get("is_baseline")), None)
        for r in run:
            wl = dict(_get(r, "workload") or {})
            m = dict(_get(r, "metrics") or {})
            s = _f(m.get("speedup"))
            if s is None or s <= 0:
                continue
            family = str(wl.get("family") or _get(r, "family") or "llm")
            wl.setdefault("family", family)
            wid = workload_id(wl)
            if wid not in t.workloads or (wl.get("features") and not t.workloads[wid].get("features")):
                t.workloads[wid] = wl
            hw = _get(r, "hardware")
            if hw:
                t.hardware.setdefault(wid, dict(hw))
            knobs = dict(_get(r, "knobs") or {})
            arm = Arm(_get(r, "method"), tuple(sorted(knobs.items())), family,
                      lossless=bool(m.get("lossless")), is_baseline=bool(m.get("is_baseline")))
            t.arms.setdefault(arm.id, arm)
            greedy = float(wl.get("temperature") or 0.0) == 0.0
            per_round = m.get("speedup_rounds") if m.get("timing") == INTERLEAVED else None
            if arm.is_baseline:
                sp[(wid, arm.id)].append(1.0)
            elif per_round:
                sp[(wid, arm.id)].extend(float(x) for x in per_round)
            else:
                sp[(wid, arm.id)].append(s)
            ls[(wid, arm.id)].append(quality_loss(family, m, base, greedy=greedy))
            if family != "llm" and (ratio := error_ratio(m, base)) is not None:
                er[(wid, arm.id)].append(1.0 if arm.is_baseline else ratio)
    for k, v in sp.items():
        t.speedup[k] = statistics.median(v)
        known = [x for x in ls[k] if x is not None]
        t.loss[k] = max(known) if known else None
    t.err_ratio = {k: max(v) for k, v in er.items()}      # the worst repeat, like the loss
    t.protocol = {w: p for w, p in protocol.items() if w in t.workloads}
    return t


def _family_workload(r: Any) -> dict[str, Any]:
    wl = dict(_get(r, "workload") or {})
    wl.setdefault("family", str(wl.get("family") or _get(r, "family") or "llm"))
    return wl
