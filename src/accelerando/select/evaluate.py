"""Held-out evaluation of selectors on the history (ASlib practice).

For every held-out group (one workload: leave-one-workload-out; all workloads of one model:
leave-one-model-out) a selector is fitted on the other workloads of the same family and picks an
arm for each held-out workload among the arms measured there. With ``u(w, a)`` the utility
(speed-up when the constraint holds, else 0; the baseline's is 1):

* VBS (virtual best solver) ``max_a u(w, a)``: the per-workload oracle;
* SBS (single best solver): the arm with the best mean utility on the *training* workloads;
* random: the expected utility of a uniformly random candidate arm;
* top-1 accuracy: fraction of workloads where the selection reaches the VBS utility; "within 5%":
  where it reaches 95% of it (timings of near-equal methods differ by noise);
* regret ``u(w, VBS) - u(w, selected)``; mean regret is also given relative to the mean VBS;
* closed gap ``(mean u_sel - mean u_SBS) / (mean u_VBS - mean u_SBS)`` (1 = oracle, 0 = SBS);
  this is ASlib's ``(m_SBS - m_sel) / (m_SBS - m_VBS)`` for a cost ``m = -u``;
* violation rate: fraction of selections whose measured quality breaks the constraint.

Workloads where only the baseline could be measured (no choice to make) are left out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

from .base import Selector
from .baselines import SingleBest
from .models import make_selector
from .table import LOSSLESS, Constraint, PerfTable

TOL = 1e-9


@dataclass
class Case:
    """One held-out workload: the oracle and what each policy picked (utility, violated)."""

    wid: str
    family: str
    vbs: float
    picks: dict[str, str] = field(default_factory=dict)          # policy -> arm
    utility: dict[str, float] = field(default_factory=dict)      # policy -> utility
    violated: dict[str, float] = field(default_factory=dict)     # policy -> 0/1 (random: expected)


@dataclass
class Summary:
    policy: str
    n: int
    top1: float
    within5: float             # fraction of selections within 5% of the oracle (timing-noise band)
    mean_utility: float
    mean_vbs: float
    mean_regret: float
    rel_regret: float          # mean regret / mean VBS utility
    closed_gap: float          # vs the SBS of the same folds; NaN when SBS already is the oracle
    violation_rate: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(cases: Sequence[Case], policy: str, *, sbs_policy: str = "sbs") -> Summary:
    """The metrics of one policy over held-out cases (pure arithmetic, see the module docstring)."""
    if not cases:
        nan = math.nan
        return Summary(policy, 0, nan, nan, nan, nan, nan, nan, nan, nan)
    n = len(cases)
    u = [c.utility[policy] for c in cases]
    v = [c.vbs for c in cases]
    mean_u, mean_v = sum(u) / n, sum(v) / n
    regret = sum(vi - ui for vi, ui in zip(v, u)) / n
    top1 = sum(ui >= vi - TOL for ui, vi in zip(u, v)) / n
    within5 = sum(ui >= 0.95 * vi - TOL for ui, vi in zip(u, v)) / n
    if all(sbs_policy in c.utility for c in cases):
        mean_s = sum(c.utility[sbs_policy] for c in cases) / n
        gap = (mean_u - mean_s) / (mean_v - mean_s) if mean_v - mean_s > TOL else math.nan
    else:
        gap = math.nan
    viol = sum(c.violated.get(policy, 0.0) for c in cases) / n
    return Summary(policy, n, top1, within5, mean_u, mean_v, regret, regret / mean_v if mean_v else math.nan, gap, viol)


def groups(table: PerfTable, scheme: str) -> dict[str, list[str]]:
    """Held-out groups: ``"workload"`` -> one per workload; ``"model"`` -> one per model name."""
    if scheme == "workload":
        return {w: [w] for w in table.workloads}
    if scheme == "model":
        out: dict[str, list[str]] = {}
        for w, d in table.workloads.items():
            out.setdefault(f"{d.get('family')}:{d.get('model')}", []).append(w)
        return out
    raise ValueError(f"scheme must be 'workload' or 'model', got {scheme!r}")


def candidates_on(table: PerfTable, wid: str, c: Constraint) -> list[str]:
    """Arms measured on ``wid`` that a selector may pick under ``c`` (lossless: lossless arms only)."""
    return [a for a in table.arms_on(wid)
            if table.arms[a].is_baseline or not c.lossless or table.arms[a].lossless]


def cross_validate(table: PerfTable, policies: dict[str, Callable[[], Selector]], *,
                   constraint: Constraint = LOSSLESS, scheme: str = "workload",
                   progress: Callable[[int, int], None] | None = None) -> list[Case]:
    """Fit every policy on each training split and record its pick on the held-out workloads.

    ``policies`` maps a name to a factory of unfitted selectors (the SBS is always added as
    ``"sbs"``, the random policy as ``"random"``). Each family is cross-validated on its own.
    """
    policies = {"sbs": lambda: SingleBest(constraint=constraint), **policies}
    cases: list[Case] = []
    held = groups(table, scheme)
    done = 0
    for gname, gw in held.items():
        family = table.family_of(gw[0])
        train = [w for w in table.wids(family) if w not in set(gw)]
        done += 1
        if not train:
            continue                               # nothing to learn from for this family
        sub = table.subset(train)
        fitted = {}
        for name, factory in policies.items():
            sel = factory()
            sel.constraint = constraint
            fitted[name] = sel.fit(sub)
        for w in gw:
            arms = candidates_on(table, w, constraint)
            if len(arms) < 2:
                continue                           # only the baseline was measured: nothing to choose
            _, vbs = table.vbs(w, constraint)
            case = Case(w, family, vbs)
            for name, sel in fitted.items():
                try:
                    pick = sel.select(table.workloads[w], hardware=table.hardware.get(w), arms=arms).arm
                except ValueError:
                    pick = table.baseline_arm(family)
                case.picks[name] = pick
                case.utility[name] = table.utility(w, pick, constraint)
                case.violated[name] = float(not (table.arms[pick].is_baseline or table.admits(w, pick, constraint)))
            case.utility["random"] = sum(table.utility(w, a, constraint) for a in arms) / len(arms)
            case.violated["random"] = sum(not (table.arms[a].is_baseline or table.admits(w, a, constraint))
                                          for a in arms) / len(arms)
            cases.append(case)
        if progress:
            progress(done, len(held))
    return cases


def evaluate(table: PerfTable, models: Iterable[str] = ("knn", "gbm"), *, constraint: Constraint = LOSSLESS,
             scheme: str = "workload", family: str | None = None,
             progress: Callable[[int, int], None] | None = None) -> tuple[list[Summary], list[Case]]:
    """Cross-validate the named models (plus SBS and random); one ``Summary`` per policy."""
    if family is not None:
        table = table.subset(table.wids(family))
    names = [m for m in models if m != "sbs"]
    policies = {m: (lambda m=m: make_selector(m, constraint=constraint)) for m in names}
    cases = cross_validate(table, policies, constraint=constraint, scheme=scheme, progress=progress)
    order = [*names, "sbs", "random"]
    return [summarize(cases, p) for p in order], cases
