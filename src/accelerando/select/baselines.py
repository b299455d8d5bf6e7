"""The selectors that are not a default: the baselines of MetaInf / ASlib practice that the held-out
evaluation compares the defaults with (BENCHMARKS.md, "selector").

* ``SingleBest``  (SBS): the arm with the best mean utility over the training workloads;
* ``KNN``:        utility averaged over the k nearest training workloads (standardised features;
                  ``knn-w`` weights them by importance); ``Pairwise`` uses it for its speed-ups;
* ``ISAC``:       k-means clusters of workloads, best mean utility in the workload's cluster;
* ``PerfModel``:  one regressor of log speed-up over (workload features, arm one-hot, numeric
                  knobs) — gradient-boosted trees (``"gbm"``) or a random forest (``"forest"``),
                  or one per arm (``-arm``) — and one classifier of "meets the constraint" for
                  lossy budgets;
* ``Ensemble``:   the geometric mean of member selectors' utility estimates.

sklearn is imported where used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .base import FamilyData, Prediction, Selector, arm_columns, wstats
from .table import PerfTable


@dataclass
class SingleBestFit:
    stats: dict[str, Prediction]          # per arm: mean speed-up, its spread, mean utility


class SingleBest(Selector):
    """SBS: one ranking for every workload, by mean utility over the training workloads."""

    name = "sbs"

    def _fit_family(self, family: str, fam: FamilyData) -> None:
        stats = {}
        for a in fam.arms:
            ws = [w for w in fam.wids if (w, a) in self.table.speedup]
            if not ws:
                continue
            u = [self._utility(w, a) for w in ws]
            s = [self.table.speedup[(w, a)] for w in ws]
            stats[a] = Prediction(a, float(np.mean(s)), float(np.std(s)), 1.0, float(np.mean(u)))
        fam.fit = SingleBestFit(stats)

    def _predict(self, family, fam, x, arms):
        # p_ok = 1: the SBS is by definition the best *average*, violations included in the mean
        return [fam.fit.stats[a] for a in arms if a in fam.fit.stats]


@dataclass
class KNNFit:
    weights: np.ndarray                   # per standardised feature (all 1 unless ``weighted``)


class KNN(Selector):
    """Utility averaged over the k nearest training workloads that measured the arm.

    ``weighted=True`` scales each standardised feature by its importance in a small random
    forest that predicts the arms' utilities from the features (a cheap metric learning: features
    that do not change the winner stop diluting the distance)."""

    name = "knn"

    def __init__(self, *, k: int = 5, weighted: bool = False, **kw: Any):
        super().__init__(**kw)
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = k
        self.weighted = weighted
        if weighted:
            self.name = "knn-w"

    def _fit_family(self, family, fam):
        fam.fit = KNNFit(np.ones(fam.Z.shape[1]))
        if not self.weighted or len(fam.wids) < 4:
            return
        from sklearn.ensemble import RandomForestRegressor
        arms = [a for a in fam.candidates if a != fam.baseline]
        Y = np.full((len(fam.wids), len(arms)), np.nan)
        for i, w in enumerate(fam.wids):
            for j, a in enumerate(arms):
                if (w, a) in self.table.speedup:
                    Y[i, j] = self._utility(w, a)
        keep = ~np.all(np.isnan(Y), axis=0)
        if not keep.any():
            return
        Y = Y[:, keep]
        Y = np.where(np.isnan(Y), np.nanmean(Y, axis=0), Y)
        rf = RandomForestRegressor(n_estimators=60, max_depth=4, random_state=self.seed, n_jobs=1).fit(fam.Z, Y)
        imp = rf.feature_importances_
        if imp.max() > 0:
            fam.fit.weights = imp / imp.max()

    def _predict(self, family, fam, x, arms):
        z = fam.z(x)
        d = np.sqrt((((fam.Z - z) * fam.fit.weights) ** 2).sum(axis=1))
        order = np.argsort(d, kind="stable")
        out = []
        for a in arms:
            nb = [i for i in order if (fam.wids[i], a) in self.table.speedup][:self.k]
            if not nb:
                continue
            w = 1.0 / (d[nb] + 1e-3)
            wids = [fam.wids[i] for i in nb]
            u, _ = wstats([self._utility(x_, a) for x_ in wids], w)
            s, sd = wstats([self.table.speedup[(x_, a)] for x_ in wids], w)
            p, _ = wstats([float(self._ok(x_, a)) for x_ in wids], w)
            out.append(Prediction(a, s, sd, p, u))
        return out


@dataclass
class ISACFit:
    km: Any                               # fitted sklearn KMeans
    members: dict[int, list[str]]         # cluster -> its training workloads


class ISAC(Selector):
    """Instance-specific algorithm configuration: cluster the workloads (k-means on standardised
    features), then use the best mean utility of the workload's cluster."""

    name = "isac"

    def __init__(self, *, per_cluster: int = 8, **kw: Any):
        super().__init__(**kw)
        self.per_cluster = per_cluster

    def _fit_family(self, family, fam):
        from sklearn.cluster import KMeans
        n = len(fam.wids)
        k = max(1, min(n, round(n / self.per_cluster)))
        km = KMeans(n_clusters=k, n_init=5, random_state=self.seed).fit(fam.Z) if n else None
        fam.fit = ISACFit(km, {c: [fam.wids[i] for i in range(n) if km.labels_[i] == c] for c in range(k)})

    def _predict(self, family, fam, x, arms):
        c = int(fam.fit.km.predict(fam.z(x)[None])[0])
        out = []
        for a in arms:
            ws = [w for w in fam.fit.members[c] if (w, a) in self.table.speedup] or \
                 [w for w in fam.wids if (w, a) in self.table.speedup]
            if not ws:
                continue
            s = [self.table.speedup[(w, a)] for w in ws]
            out.append(Prediction(a, float(np.mean(s)), float(np.std(s)),
                                  float(np.mean([self._ok(w, a) for w in ws])),
                                  float(np.mean([self._utility(w, a) for w in ws]))))
        return out


@dataclass
class PerfFit:
    enc: Callable[[str], np.ndarray]      # arm -> one-hot + numeric knobs
    arms: set[str]                        # the arms the model was fitted on
    reg: Any = None                       # log speed-up regressor (None: no cells to fit)
    clf: Any = None                       # "meets the constraint" classifier (lossy budgets)
    res_sd: dict[str, float] = field(default_factory=dict)     # per arm: spread of the log residuals
    ok_const: dict[str, float] = field(default_factory=dict)   # per arm: P(ok) without a classifier


class PerfModel(Selector):
    """A learned performance model: log speed-up ~ f(workload features, arm), plus a classifier
    of "meets the constraint" when the budget is lossy (lossless arms are known in advance)."""

    def __init__(self, *, kind: str = "gbm", n_estimators: int = 150, per_arm: bool = False, **kw: Any):
        super().__init__(**kw)
        if kind not in ("gbm", "forest"):
            raise ValueError(f"kind must be 'gbm' or 'forest', got {kind!r}")
        self.kind = kind
        self.per_arm = per_arm
        self.name = kind + ("-arm" if per_arm else "")
        self.n_estimators = n_estimators

    def _regressor(self):
        if self.kind == "gbm":
            from sklearn.ensemble import GradientBoostingRegressor
            return GradientBoostingRegressor(n_estimators=self.n_estimators, max_depth=3, learning_rate=0.05,
                                             subsample=0.8, random_state=self.seed)
        from sklearn.ensemble import RandomForestRegressor
        return RandomForestRegressor(n_estimators=self.n_estimators // 2, min_samples_leaf=2,
                                     random_state=self.seed, n_jobs=1)

    def _fit_family(self, family, fam):
        arms = [a for a in fam.candidates if a != fam.baseline]
        _, enc = arm_columns(self.table, arms)
        fit = fam.fit = PerfFit(enc, set(arms))
        Xs, ys, oks, cell_arm = [], [], [], []
        for i, w in enumerate(fam.wids):
            for a in arms:
                if (w, a) in self.table.speedup:
                    Xs.append(np.concatenate([fam.Z[i], enc(a)]))
                    ys.append(math.log(self.table.speedup[(w, a)]))
                    oks.append(self._ok(w, a))
                    cell_arm.append(a)
        if not Xs:
            return
        X, y = np.array(Xs), np.array(ys)
        if self.per_arm:
            # one regressor per arm over the workload features alone: each arm's response to the
            # features is learned from its own cells instead of through splits on an arm one-hot
            nz = fam.Z.shape[1]
            arm_reg = {}
            for a in set(cell_arm):
                m = np.array([b == a for b in cell_arm])
                arm_reg[a] = self._regressor().fit(X[m][:, :nz], y[m]) if m.sum() >= 2 else float(y[m].mean())
            reg = _PerArm(arm_reg, enc, arms, nz)
        else:
            reg = self._regressor().fit(X, y)
        fit.reg = reg
        # uncertainty: per-arm spread of the training residuals (log scale); an optimistic floor
        res = y - reg.predict(X)
        fit.res_sd = {a: max(0.02, float(np.std([r for r, b in zip(res, cell_arm) if b == a])))
                      for a in set(cell_arm)}
        oks = np.array(oks, dtype=int)
        if not self.constraint.lossless and 0 < oks.sum() < len(oks):
            from sklearn.ensemble import RandomForestClassifier
            fit.clf = RandomForestClassifier(n_estimators=60, min_samples_leaf=2, random_state=self.seed,
                                             n_jobs=1).fit(X, oks)
        else:
            fit.ok_const = {a: float(np.mean([o for o, b in zip(oks, cell_arm) if b == a]))
                            for a in set(cell_arm)}

    def _predict(self, family, fam, x, arms):
        fit = fam.fit
        arms = [a for a in arms if a in fit.arms]
        if not arms or fit.reg is None:
            return []
        z = fam.z(x)
        X = np.array([np.concatenate([z, fit.enc(a)]) for a in arms])
        logs = fit.reg.predict(X)
        if self.kind == "forest" and not self.per_arm:
            per_tree = np.stack([t.predict(X) for t in fit.reg.estimators_])
            sd_log = per_tree.std(axis=0)
        else:
            sd_log = np.array([fit.res_sd.get(a, 0.1) for a in arms])
        if fit.clf is not None:
            p_ok = fit.clf.predict_proba(X)[:, list(fit.clf.classes_).index(1)]
        else:
            p_ok = np.array([fit.ok_const.get(a, 1.0) for a in arms])
        out = []
        for a, l, sl, p in zip(arms, logs, sd_log, p_ok):
            s = math.exp(l)
            out.append(Prediction(a, s, s * float(sl), float(p), s * float(p)))
        return out


class _PerArm:
    """Per-arm regressors behind the joint model's ``predict(X)`` interface (X = [z, arm code])."""

    def __init__(self, regs: dict[str, Any], enc: Callable[[str], np.ndarray], arms: list[str], nz: int):
        self.regs, self.nz = regs, nz
        self.code = {tuple(enc(a)): a for a in arms}

    def predict(self, X: np.ndarray) -> np.ndarray:
        out = np.zeros(len(X))
        for i, row in enumerate(X):
            r = self.regs.get(self.code.get(tuple(row[self.nz:])))
            if r is None:
                out[i] = 0.0                 # an arm never measured in training: no better than the baseline
            elif isinstance(r, float):
                out[i] = r
            else:
                out[i] = float(r.predict(row[None, :self.nz])[0])
        return out


class Ensemble(Selector):
    """The mean of member selectors' log utility estimates (their ``score``), per arm; speed-up,
    uncertainty and p_ok are the members' means too. Members with different errors (a joint
    forest, per-arm boosted trees, a pairwise ranker) cancel part of each other's mistakes.
    ``factory(name, **kw)`` builds a member (``models.make_selector``)."""

    def __init__(self, *, factory: Callable[..., Selector], members: Sequence[str] = ("gbm", "gbm-arm", "forest"),
                 **kw: Any):
        super().__init__(**kw)
        self.factory = factory
        self.member_names = tuple(members)
        self.name = "ens(" + "+".join(self.member_names) + ")"
        self._kw = kw

    def fit(self, table: PerfTable) -> "Ensemble":
        self.members = []
        for m in self.member_names:
            sel = self.factory(m, **self._kw)
            sel.constraint = self.constraint
            self.members.append(sel.fit(table))
        return super().fit(table)

    def _predict(self, family, fam, x, arms):
        per: dict[str, list[Prediction]] = {a: [] for a in arms}
        for sel in self.members:
            for p in sel._predict(family, sel._fam[family], x, arms):
                per[p.arm].append(p)
        out = []
        for a, ps in per.items():
            if not ps:
                continue
            score = math.exp(float(np.mean([math.log(max(p.score, 1e-6)) for p in ps])))
            out.append(Prediction(a, float(np.mean([p.speedup for p in ps])), float(np.mean([p.std for p in ps])),
                                  float(np.mean([p.p_ok for p in ps])), score))
        return out
