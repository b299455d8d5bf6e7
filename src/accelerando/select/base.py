"""What every selector shares: the ``Prediction`` record, a family's training data
(``FamilyData``), the ``Selector`` base class (features, candidate arms, ranking, selection) and
two small helpers. The selectors themselves are in ``models`` (the defaults) and ``baselines``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .features import feature_names, workload_features
from .table import LOSSLESS, Constraint, PerfTable


@dataclass(frozen=True)
class Prediction:
    arm: str
    speedup: float        # predicted speed-up over the baseline
    std: float            # uncertainty of ``speedup`` (one standard deviation)
    p_ok: float           # predicted probability that the constraint holds
    score: float          # ranking score (estimated utility)
    slack: float = 0.0    # quality slack where a quality model gives it (budget - predicted loss, log scale)


@dataclass
class FamilyData:
    """One family's training workloads as every selector sees them, plus the selector's own fit.

    ``X`` is the feature matrix (workloads x ``names``) with missing values imputed by the column
    ``median``; ``Z = (X - mu) / sd`` standardised, ``sd = inf`` for a feature constant over the
    training workloads (so it carries no weight). ``candidates`` are the arms a selection may
    return under the selector's constraint (the baseline always among them)."""

    wids: list[str]
    names: list[str]
    median: np.ndarray
    mu: np.ndarray
    sd: np.ndarray
    X: np.ndarray
    Z: np.ndarray
    arms: list[str]
    candidates: list[str]
    baseline: str | None
    fit: Any = None       # what the selector learned for this family (its own small dataclass)

    def z(self, x: np.ndarray) -> np.ndarray:
        """A query's standardised features."""
        return (x - self.mu) / self.sd


class Selector:
    """Base class: per-family feature matrices, imputation, candidate arms, selection."""

    name = "selector"

    def __init__(self, *, constraint: Constraint = LOSSLESS, min_p_ok: float = 0.8, seed: int = 0):
        if not 0.0 <= min_p_ok <= 1.0:
            raise ValueError(f"min_p_ok must be in [0, 1], got {min_p_ok}")
        self.constraint = constraint
        self.min_p_ok = min_p_ok
        self.seed = seed
        self.table: PerfTable | None = None
        self._fam: dict[str, FamilyData] = {}

    # -- fitting
    def fit(self, table: PerfTable) -> "Selector":
        self.table = table
        self._fam = {}
        for family in sorted({table.family_of(w) for w in table.workloads}):
            wids = table.wids(family)
            names = feature_names(family)
            raw = np.array([[workload_features(table.workloads[w], table.hardware.get(w))[n] for n in names]
                            for w in wids], dtype=float)
            med = np.array([np.median(c[~np.isnan(c)]) if (~np.isnan(c)).any() else 0.0
                            for c in raw.reshape(len(wids), len(names)).T])
            X = np.where(np.isnan(raw), med, raw)
            mu, sd = X.mean(axis=0), X.std(axis=0)
            # a feature constant over the training workloads carries no information: weight 0
            # (else a query that differs in it, e.g. other hardware, is far from everything)
            # ((x - mu) / inf = 0 for any finite x)
            sd = np.where(sd > 1e-12, sd, np.inf)
            arms = [a for a, arm in table.arms.items() if arm.family == family]
            cands = [a for a in arms if table.arms[a].is_baseline or not self.constraint.lossless
                     or table.arms[a].lossless]
            fam = FamilyData(wids=wids, names=names, median=med, mu=mu, sd=sd, X=X, Z=(X - mu) / sd,
                             arms=arms, candidates=cands, baseline=table.baseline_arm(family))
            self._fam[family] = fam
            self._fit_family(family, fam)
        return self

    def _fit_family(self, family: str, fam: FamilyData) -> None:
        """Learn from ``fam`` (set ``fam.fit``)."""

    def _utility(self, wid: str, arm: str) -> float:
        return self.table.utility(wid, arm, self.constraint)

    def _ok(self, wid: str, arm: str) -> bool:
        return self.table.arms[arm].is_baseline or self.table.admits(wid, arm, self.constraint)

    def vector(self, workload: Mapping[str, Any], hardware: Mapping[str, Any] | None = None) -> np.ndarray:
        family = str(workload.get("family", "llm"))
        fam = self._fam[family]
        f = workload_features(workload, hardware)
        x = np.array([f[n] for n in fam.names], dtype=float)
        return np.where(np.isnan(x), fam.median, x)

    # -- predicting
    def families(self) -> list[str]:
        return list(self._fam)

    def rank(self, workload: Mapping[str, Any], *, hardware: Mapping[str, Any] | None = None,
             arms: Sequence[str] | None = None) -> list[Prediction]:
        """Predictions for the candidate arms (restricted to ``arms`` if given), best first."""
        if self.table is None:
            raise RuntimeError("fit the selector first")
        family = str(workload.get("family", "llm"))
        if family not in self._fam:
            raise ValueError(f"no {family} workloads in the history this selector was fitted on")
        fam = self._fam[family]
        cands = [a for a in fam.candidates if arms is None or a in arms]
        x = self.vector(workload, hardware)
        others = [a for a in cands if a != fam.baseline]
        preds = list(self._predict(family, fam, x, others))
        if fam.baseline is not None and fam.baseline in cands:
            preds.append(self._baseline_prediction(family, fam, x, others))
        return sorted(preds, key=lambda p: (-p.score, -p.p_ok, -p.slack, p.arm))

    def select(self, workload: Mapping[str, Any], **kw: Any) -> Prediction:
        """The best arm whose predicted probability of meeting the constraint is >= ``min_p_ok``."""
        ranked = self.rank(workload, **kw)
        ok = [p for p in ranked if p.p_ok >= self.min_p_ok]
        if not ok:
            raise ValueError("no candidate arm (not even the baseline) for this workload")
        return ok[0]

    def _predict(self, family: str, fam: FamilyData, x: np.ndarray, arms: list[str]) -> list[Prediction]:
        raise NotImplementedError

    def _baseline_prediction(self, family: str, fam: FamilyData, x: np.ndarray,
                             others: list[str]) -> Prediction:
        # the baseline's utility is 1 by definition: nothing to predict
        return Prediction(fam.baseline, 1.0, 0.0, 1.0, 1.0)


# ----------------------------------------------------------------------------- helpers

def wstats(values: Sequence[float], weights: Sequence[float]) -> tuple[float, float]:
    """Weighted mean and standard deviation."""
    v, w = np.asarray(values, float), np.asarray(weights, float)
    w = w / w.sum()
    m = float((w * v).sum())
    return m, float(math.sqrt(max(0.0, float((w * (v - m) ** 2).sum()))))


def arm_columns(table: PerfTable, arms: list[str]) -> tuple[list[str], Callable[[str], np.ndarray]]:
    """One-hot of the arm plus its numeric knobs (so the model can interpolate between knob values)."""
    knob_names = sorted({k for a in arms for k, v in table.arms[a].knobs
                         if isinstance(v, (int, float)) and not isinstance(v, bool)})
    index = {a: i for i, a in enumerate(arms)}

    def enc(a: str) -> np.ndarray:
        v = np.zeros(len(arms) + len(knob_names))
        v[index[a]] = 1.0
        kd = table.arms[a].knob_dict()
        for j, k in enumerate(knob_names):
            val = kd.get(k)
            v[len(arms) + j] = float(val) if isinstance(val, (int, float)) and not isinstance(val, bool) else -1.0
        return v
    return knob_names, enc
