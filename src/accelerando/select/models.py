"""Selectors: rank method configurations ("arms") for a workload from its features.

Every selector is fitted on a ``PerfTable`` under one ``Constraint`` and answers ``rank(workload)``
with one ``Prediction`` per candidate arm: predicted speed-up, an uncertainty (one standard
deviation, in speed-up units), the predicted probability that the arm satisfies the constraint,
and the score the ranking uses (an estimate of the *utility*: speed-up if acceptable, else 0).
``select`` returns the best arm whose ``p_ok`` reaches ``min_p_ok``; the baseline (utility 1 by
definition) is always a candidate, so a selector can always answer "do nothing".

Here are the defaults (chosen by the held-out evaluation, BENCHMARKS.md "selector") and the
registry of every selector by name (``MODELS``, ``make_selector``); the others, the baselines of
MetaInf / ASlib practice they are compared with (SBS, kNN, ISAC, GBM / forest performance
models, an ensemble), are in ``baselines``; what all share is in ``base``.

* ``Pairwise``:   one logistic regression per pair of arms predicting which has the higher
                  utility (weighted by the utility difference); arms ranked by mean win probability;
* ``QualityMargin``: speed and quality predicted apart; the fastest arm whose predicted quality
                  keeps the budget with a safety margin learned by inner cross-validation (for
                  lossy budgets, where *whether the constraint holds* is the hard part); its
                  quality model is extra-trees (``qmargin``, ``qmargin-nfe``) or a per-arm kernel
                  regression over (spacing, log budget, model size) (``qkernel``; ``qkernel-cv``
                  also chooses its bandwidths by the inner cross-validation and breaks speed
                  near-ties by quality slack).

Each selector keeps what it learned for a family in a small dataclass on ``FamilyData.fit``.

sklearn is imported where used (the core imports only torch and numpy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .base import FamilyData, Prediction, Selector, arm_columns
from .baselines import ISAC, KNN, Ensemble, PerfModel, SingleBest
from .table import PerfTable

__all__ = ["ArmKernel", "Ensemble", "FamilyData", "ISAC", "KNN", "MODELS", "MarginFit", "Pairwise", "PairwiseFit",
           "PerfModel", "Prediction", "QualityMargin", "Selector", "SingleBest", "default_model", "make_selector"]


@dataclass
class PairwiseFit:
    pairs: dict[tuple[str, str], Any]     # (a, b) -> logistic regression of "a beats b", or a constant


class Pairwise(Selector):
    """Pairwise classification (ASlib's PAIRWISE): for every pair of arms a logistic regression on
    the workload features predicts which has the higher utility, each training workload weighted
    by the utility difference; arms are ranked by their mean predicted win probability. The
    speed-up and its uncertainty are the kNN estimates (a ranking model has no speed-up scale).
    With many arms only the ``max_arms`` best on average (and the baseline) duel; the others get
    a win rate of 0 and follow in kNN order."""

    name = "pairwise"

    def __init__(self, *, k: int = 5, C: float = 1.0, max_arms: int = 10, **kw: Any):
        super().__init__(**kw)
        self.C = C
        self.max_arms = max_arms
        self._knn = KNN(k=k, **kw)

    def fit(self, table: PerfTable) -> "Pairwise":
        self._knn.fit(table)
        return super().fit(table)

    def _fit_family(self, family, fam):
        from sklearn.linear_model import LogisticRegression
        arms = list(fam.candidates)      # the baseline too: "do nothing" must win its duels
        if len(arms) > self.max_arms:      # pairs grow quadratically: duel among the best on average
            mean_u = {a: np.mean([self._utility(w, a) for w in fam.wids if (w, a) in self.table.speedup] or [0.0])
                      for a in arms}
            top = sorted(arms, key=lambda a: -mean_u[a])[:self.max_arms]
            arms = [a for a in arms if a in top or a == fam.baseline]
        models: dict[tuple[str, str], Any] = {}
        fam.fit = PairwiseFit(models)
        for i, a in enumerate(arms):
            for b in arms[i + 1:]:
                rows = [j for j, w in enumerate(fam.wids)
                        if (w, a) in self.table.speedup and (w, b) in self.table.speedup]
                if not rows:
                    continue
                ua = np.array([self._utility(fam.wids[j], a) for j in rows])
                ub = np.array([self._utility(fam.wids[j], b) for j in rows])
                y = (ua > ub).astype(int)
                wt = np.abs(ua - ub) + 1e-6
                if y.min() == y.max():
                    models[(a, b)] = float(y[0])
                else:
                    models[(a, b)] = LogisticRegression(C=self.C, max_iter=500).fit(
                        fam.Z[rows], y, sample_weight=wt)

    def _win_rates(self, fam, x, arms):
        z = fam.z(x)[None]
        wins = {a: [] for a in arms}
        for (a, b), m in fam.fit.pairs.items():
            if a not in wins or b not in wins:
                continue
            p = m if isinstance(m, float) else float(m.predict_proba(z)[0, list(m.classes_).index(1)])
            wins[a].append(p)
            wins[b].append(1.0 - p)
        return {a: (float(np.mean(v)) if v else 0.0) for a, v in wins.items()}

    def _predict(self, family, fam, x, arms):
        knn = {p.arm: p for p in self._knn._predict(family, self._knn._fam[family], x, arms)}
        rates = self._win_rates(fam, x, [fam.baseline, *arms] if fam.baseline else arms)
        # the win rate ranks; the kNN utility (< 1e3) only breaks ties
        return [Prediction(a, k.speedup, k.std, k.p_ok, rates[a] * 1e3 + k.score) for a, k in knn.items()]

    def _baseline_prediction(self, family, fam, x, others):
        rate = self._win_rates(fam, x, [fam.baseline, *others])[fam.baseline]
        return Prediction(fam.baseline, 1.0, 0.0, 1.0, rate * 1e3 + 1.0)


class ArmKernel:
    """Per-arm kernel regression of quality over (grid, budget, model): a sampler's error at a budget
    is close to its error at a nearby budget on the same timestep grid and a similar denoiser.

    Rows are ``[arm index, trailing, linspace, log2 budget, log10 params, transformer]``. The
    prediction for a query is a weighted local-linear fit in log2 budget over the training cells of
    the *same arm*, with Gaussian weights in log2 budget (bandwidth ``h_steps``) and model size
    (``h_model``), a weight ``other_grid`` for a cell on another timestep spacing and ``other_arch``
    for a cell of the other denoiser architecture (default 1e-6, a last fallback: a DiT's error at
    half the budget says little about a UNet's, less than the same denoiser's on another spacing), and a ridge ``ridge`` on the slope (so one budget alone gives a flat,
    nearest-budget answer); an arm never seen: the mean of all."""

    COLUMNS = 6

    def __init__(self, *, h_steps: float = 0.5, h_model: float = 0.6, other_grid: float = 0.02,
                 other_arch: float = 1e-6, ridge: float = 0.01):
        if min(h_steps, h_model) <= 0 or not 0 <= other_grid <= 1 or not 0 <= other_arch <= 1 or ridge < 0:
            raise ValueError("ArmKernel needs h_steps, h_model > 0, 0 <= other_grid, other_arch <= 1, ridge >= 0")
        self.h_steps, self.h_model, self.other_grid, self.ridge = h_steps, h_model, other_grid, ridge
        self.other_arch = other_arch

    def fit(self, X: np.ndarray, y: np.ndarray) -> "ArmKernel":
        X, y = np.asarray(X, float), np.asarray(y, float)
        self.by_arm = {a: (X[X[:, 0] == a], y[X[:, 0] == a]) for a in np.unique(X[:, 0])}
        self.pooled = float(y.mean()) if len(y) else 0.0
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, float).reshape(-1, self.COLUMNS)
        out = np.full(len(X), self.pooled)
        for a in np.unique(X[:, 0]):
            if a not in self.by_arm:
                continue                                            # an arm never seen: the pooled mean
            Xa, ya = self.by_arm[a]
            rows = np.flatnonzero(X[:, 0] == a)
            Q = X[rows]
            d = Xa[None, :, 3] - Q[:, None, 3]                      # log2 budget offsets (query x cell)
            w = np.exp(-0.5 * (d / self.h_steps) ** 2 - 0.5 * ((Xa[None, :, 4] - Q[:, None, 4]) / self.h_model) ** 2)
            same = (Xa[None, :, 1] == Q[:, None, 1]) & (Xa[None, :, 2] == Q[:, None, 2])
            arch = Xa[None, :, 5] == Q[:, None, 5]                  # NaN (unknown) matches nothing
            w = w * np.where(same, 1.0, self.other_grid) * np.where(arch, 1.0, self.other_arch) + 1e-12
            sw = w.sum(1)
            md, my = (w * d).sum(1) / sw, (w * ya[None]).sum(1) / sw
            dc = d - md[:, None]
            den = (w * dc ** 2).sum(1) + self.ridge * sw
            num = (w * dc * (ya[None] - my[:, None])).sum(1)
            slope = np.where(den > 1e-12, num / np.where(den > 1e-12, den, 1.0), 0.0)   # one budget: flat
            out[rows] = my - slope * md                             # the local line at d = 0
        return out


@dataclass
class MarginFit:
    """What ``QualityMargin`` learned for a family."""

    enc: Callable[[str], np.ndarray]      # arm -> one-hot + numeric knobs (the trees' rows)
    arm_index: dict[str, int]             # arm -> its index (the kernel's rows)
    nfe: Callable[[float, str], float]    # (budget, arm) -> log2 of the model calls the arm runs
    steps_col: int | None                 # the budget's column in the features (None: no budget)
    log_speed: dict[str, tuple[float, float]] = field(default_factory=dict)   # arm -> median, sd of log speed-up
    qreg: Any = None                      # quality model (None: none needed, lossless budget)
    resid: np.ndarray = field(default_factory=lambda: np.zeros(1))           # out-of-fold quality residuals
    delta: float = 0.0                    # the margin, in residual standard deviations
    res_sd: dict[str, float] = field(default_factory=dict)                    # arm -> residual spread
    inner_utility: float | None = None    # the inner CV's mean utility at the chosen setting
    bandwidth: dict[str, float] | None = None                                 # the chosen ArmKernel setting


class QualityMargin(Selector):
    """Speed-up and quality loss predicted apart; pick the fastest arm predicted to keep the quality
    budget by a safety margin that an inner cross-validation on the training workloads chooses.

    Under a lossy budget the speed-up of a (sampler, fraction of the NFE budget) arm is roughly the
    NFE ratio, the same on every workload; what changes is whether its quality loss meets the
    budget. Regressing the utility (speed-up, or 0 when the budget breaks) or multiplying a speed-up
    by a classifier's P(ok) mixes the two; here:

    * quality ``q(w, a)`` = log of the error ratio to the baseline (``PerfTable.err_ratio``,
      unclipped, so "30% better than the baseline" is further from the threshold than "1% better";
      else ``log(1 + loss)``), regressed by extra-trees over (workload features, arm one-hot, the
      arm's numeric knobs, and log2 of the NFE it runs = budget x ``steps_frac``, the quantity
      solver error follows); the budget ``loss <= L`` is ``q <= log(1 + L)``;
    * speed (``speed="median"``): the median log speed-up of the arm over the training workloads
      (timing noise of 10-20% makes anything finer noise-fitting); ``speed="nfe"`` (``qmargin-nfe``)
      is structural: a sampler on the same denoiser costs about (model calls) x (cost of a call), so
      ``log s(w, a) = log(n / max(1, round(n f_a))) + b_a`` for budget ``n`` and the arm's fraction
      ``f_a``, where ``b_a`` (the median over the training workloads of the rest) carries what the
      step ratio does not: the sampler's per-call overhead and any extra or fewer model calls
      (warm-up stages, no call at t = 0);
    * ``quality="kernel"`` (``qkernel``) replaces the extra-trees by ``ArmKernel``: per arm, a
      kernel-weighted local line in log2 of the budget over that arm's cells on the same timestep
      spacing and similar model sizes. A solver's error is a smooth function of its steps on a
      given grid and denoiser; trees over every workload feature and a 34-way arm one-hot split that
      signal up and average across arms, and cannot extrapolate to a budget they did not see;
    * ``kernel_grid`` (``qkernel-cv``): candidate ``ArmKernel`` settings (bandwidths); the inner
      cross-validation below runs each and keeps the one whose rule, at its best margin, has the
      highest mean utility over the training workloads (ties: the earlier one); ``MarginFit.bandwidth``
      and ``MarginFit.inner_utility`` record the choice;
    * ``tie``: arms whose predicted speed-up is within that fraction of the fastest admitted arm's
      are equal up to timing noise; they share its score and the one with the most quality slack
      (``log(1 + L) - q_hat``, ``Prediction.slack``) ranks first, in the inner CV as at prediction;
    * margin: admit an arm when ``q_hat + delta * sigma_a <= log(1 + L)``, with ``sigma_a`` the
      spread of the arm's out-of-fold residuals (``folds``-fold cross-validation over the training
      workloads): a sampler whose quality the model predicts badly needs a wider margin than one it
      predicts well. ``delta`` is the value on the grid that maximises the mean utility of this
      rule over the training workloads with the out-of-fold ``q_hat`` (ties: the larger, safer one).

    ``p_ok`` is the fraction of those out-of-fold residuals ``r`` with ``q_hat + r <= log(1 + L)``.
    The score is the predicted speed-up of an admitted arm and 0 for a rejected one, so the
    baseline (1) beats every rejected arm; ``min_p_ok`` defaults to 0 (the margin is the gate).
    Under a lossless budget only lossless arms are candidates and the quality model is skipped.
    """

    name = "qmargin"
    MARGINS = tuple(0.25 * i for i in range(13))       # in residual standard deviations: 0 .. 3

    def __init__(self, *, n_estimators: int = 100, folds: int = 5, margin: float | None = None,
                 margins: Sequence[float] = MARGINS, min_p_ok: float = 0.0, speed: str = "median",
                 quality: str = "trees", kernel: Mapping[str, float] | None = None,
                 kernel_grid: Sequence[Mapping[str, float]] = (), tie: float = 0.0, **kw: Any):
        super().__init__(min_p_ok=min_p_ok, **kw)
        if folds < 2:
            raise ValueError(f"folds must be >= 2, got {folds}")
        if speed not in ("median", "nfe"):
            raise ValueError(f"speed must be 'median' or 'nfe', got {speed!r}")
        if quality not in ("trees", "kernel"):
            raise ValueError(f"quality must be 'trees' or 'kernel', got {quality!r}")
        if kernel_grid and quality != "kernel":
            raise ValueError("kernel_grid needs quality='kernel'")
        if not 0.0 <= tie < 1.0:
            raise ValueError(f"tie must be in [0, 1), got {tie}")
        self.speed, self.quality, self.tie = speed, quality, tie
        self.kernel = dict(kernel or {})
        self.kernel_grid = [dict(g) for g in kernel_grid]
        for g in self.kernel_grid:
            ArmKernel(**{**self.kernel, **g})                   # a bad setting fails here, not mid-fit
        if margin is not None and margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.n_estimators, self.folds, self.margin, self.margins = n_estimators, folds, margin, tuple(margins)

    def threshold(self) -> float:
        """The budget on the log error-ratio scale: ``loss <= L`` <=> ``q <= log(1 + L)``."""
        return math.log1p(self.constraint.max_loss or 0.0) + 1e-9

    def _quality(self, wid: str, arm: str) -> float | None:
        r = self.table.err_ratio.get((wid, arm))
        if r is not None and r > 0:
            return float(np.clip(math.log(r), -3.0, 3.0))       # a diverged sampler is just "very bad"
        loss = self.table.loss.get((wid, arm))
        return None if loss is None else float(min(math.log1p(loss), 3.0))

    def _rows(self, fam: FamilyData, i: int | None, x: np.ndarray, arms: list[str]) -> np.ndarray:
        if self.quality == "kernel":
            # (arm, grid, log2 budget, model size, architecture): what a solver's error depends on
            g = {n: float(x[j]) for j, n in enumerate(fam.names)}
            return np.array([[fam.fit.arm_index[a], g.get("spacing_trailing", 0.0), g.get("spacing_linspace", 0.0),
                              math.log2(max(1.0, g.get("steps", 1.0))), g.get("log_params", 0.0),
                              g.get("transformer", 0.0)] for a in arms])
        z = fam.Z[i] if i is not None else (x - fam.mu) / fam.sd
        steps = x[fam.fit.steps_col] if fam.fit.steps_col is not None else math.nan
        return np.array([np.concatenate([z, fam.fit.enc(a), [fam.fit.nfe(steps, a)]]) for a in arms])

    def _regressor(self, bandwidth: Mapping[str, float] | None = None):
        if self.quality == "kernel":
            return ArmKernel(**{**self.kernel, **(bandwidth or {})})
        from sklearn.ensemble import ExtraTreesRegressor
        return ExtraTreesRegressor(n_estimators=self.n_estimators, min_samples_leaf=2, random_state=self.seed, n_jobs=1)

    def _fit_family(self, family, fam):
        arms = [a for a in fam.candidates if a != fam.baseline]
        _, enc = arm_columns(self.table, arms)

        def nfe(steps: float, a: str) -> float:
            frac = self.table.arms[a].knob_dict().get("steps_frac", 1.0)
            if not isinstance(frac, (int, float)) or not steps == steps:
                return -1.0
            return math.log2(max(1.0, steps * float(frac)))
        fit = fam.fit = MarginFit(enc=enc, arm_index={a: j for j, a in enumerate(arms)}, nfe=nfe,
                                  steps_col=fam.names.index("steps") if "steps" in fam.names else None)
        # speed: the median over the training workloads of log speed-up ("median"), or of its excess
        # over the log step ratio budget / (budget x steps_frac) ("nfe", see step_ratio)
        steps_of = [fam.X[i][fam.fit.steps_col] if fam.fit.steps_col is not None else math.nan
                    for i in range(len(fam.wids))]
        logs = {a: [math.log(self.table.speedup[(w, a)]) - self._log_ratio(steps_of[i], a)
                    for i, w in enumerate(fam.wids) if (w, a) in self.table.speedup] for a in arms}
        fit.log_speed = {a: (float(np.median(v)), float(np.std(v))) for a, v in logs.items() if v}
        needs_quality = not self.constraint.lossless or any(not self.table.arms[a].lossless for a in arms)
        cells = [(i, a) for i, w in enumerate(fam.wids) for a in arms
                 if (w, a) in self.table.speedup and self._quality(w, a) is not None]
        if not needs_quality or not cells:
            return
        X = np.concatenate([self._rows(fam, i, fam.X[i], [a]) for i, a in cells])
        y = np.array([self._quality(fam.wids[i], a) for i, a in cells])
        # out-of-fold predictions over the training workloads (per candidate kernel setting): the
        # residuals for p_ok and the margin, and the inner utility that picks the setting
        cell_w = np.array([i for i, _ in cells])
        cell_a = np.array([a for _, a in cells], dtype=object)
        n = len(fam.wids)
        k = min(self.folds, n)
        fold = np.random.default_rng(self.seed).permutation(n) % k if k >= 2 else None
        best = None
        for bw in (self.kernel_grid or [None]):
            oof = np.full(len(y), np.nan)
            if fold is not None:
                for f in range(k):
                    test = fold[cell_w] == f
                    if test.any() and (~test).any():
                        oof[test] = self._regressor(bw).fit(X[~test], y[~test]).predict(X[test])
            have = ~np.isnan(oof)
            # a floor: an arm whose few residuals happen to agree still gets some margin
            res_sd = {a: max(0.02, float(np.std((y - oof)[have & (cell_a == a)])))
                      for a in set(cell_a[have].tolist())}
            if self.margin is not None:
                delta = float(self.margin)
                u = self._inner_utility(fam, self._inner_cells(fam, cells, oof), res_sd, delta) \
                    if len(self.kernel_grid) > 1 else 0.0
            elif have.any():
                delta, u = self._learn_margin(fam, cells, oof, res_sd)
            else:
                delta, u = max(self.margins), 0.0              # nothing to learn it from: the safest
            if best is None or u > best[0] + 1e-12:            # ties: the earlier setting in the grid
                best = (u, bw, delta, res_sd, (y - oof)[have] if have.any() else np.zeros(1))
        fit.inner_utility, fit.bandwidth, fit.delta, fit.res_sd, fit.resid = best
        fit.qreg = self._regressor(fit.bandwidth).fit(X, y)

    def _log_ratio(self, steps: float, arm: str) -> float:
        """``log(budget / arm's steps)`` under ``speed="nfe"`` (0 under "median" or without a budget)."""
        if self.speed != "nfe":
            return 0.0
        frac = self.table.arms[arm].knob_dict().get("steps_frac", 1.0)
        if not isinstance(frac, (int, float)) or not steps == steps or steps < 1:
            return 0.0
        return math.log(steps / max(1, round(steps * float(frac))))

    def log_speedup(self, fam: FamilyData, steps: float, arm: str) -> float:
        """Predicted log speed-up of ``arm`` on a workload with budget ``steps``."""
        return fam.fit.log_speed[arm][0] + self._log_ratio(steps, arm)

    def _choose(self, admitted: Sequence[tuple[str, float, float]]) -> str | None:
        """The rule's pick among ``(arm, predicted log speed-up, predicted quality)`` of the admitted
        arms faster than the baseline: the fastest; with ``tie > 0``, of the arms within that
        relative distance of the fastest (a difference timing noise makes up), the one with the most
        quality slack. None: no such arm (the baseline)."""
        if not admitted:
            return None
        floor = self._tie_floor(max(ls for _, ls, _ in admitted))
        near = [c for c in admitted if c[1] >= floor]
        return min(near, key=lambda c: (c[2], -c[1], c[0]))[0]

    def _tie_floor(self, top: float) -> float:
        """The lowest log speed-up that ties with ``top`` (within ``tie``; only ``top`` itself at 0)."""
        return top + math.log1p(-self.tie) - 1e-12

    def _inner_cells(self, fam: FamilyData, cells: list[tuple[int, str]],
                     oof: np.ndarray) -> dict[int, list[tuple[str, float, float]]]:
        """Per training workload, ``(arm, predicted log speed-up, out-of-fold quality)`` of the arms
        predicted faster than the baseline: what the rule chooses from at any margin."""
        sc = fam.fit.steps_col
        by_w: dict[int, list[tuple[str, float, float]]] = {}
        for (i, a), q in zip(cells, oof):
            if q == q and a in fam.fit.log_speed:
                steps = fam.X[i][sc] if sc is not None else math.nan
                by_w.setdefault(i, [])
                if (ls := self.log_speedup(fam, steps, a)) > 0:
                    by_w[i].append((a, ls, float(q)))
        return by_w

    def _inner_utility(self, fam: FamilyData, by_w: Mapping[int, Sequence[tuple[str, float, float]]],
                       res_sd: Mapping[str, float], delta: float) -> float:
        """Mean utility over the training workloads of the rule at margin ``delta``, with the
        out-of-fold quality predictions (``_inner_cells``)."""
        thr = self.threshold()
        sig_max = max(res_sd.values(), default=1.0)
        u = 0.0
        for i, cand in by_w.items():
            pick = self._choose([c for c in cand if c[2] + delta * res_sd.get(c[0], sig_max) <= thr])
            u += self._utility(fam.wids[i], pick) if pick is not None else 1.0
        return u / max(1, len(by_w))

    def _learn_margin(self, fam: FamilyData, cells: list[tuple[int, str]], oof: np.ndarray,
                      res_sd: Mapping[str, float]) -> tuple[float, float]:
        """The margin on the grid with the best inner utility (ties: the larger, safer one), and that utility."""
        by_w = self._inner_cells(fam, cells, oof)
        mean_u = [self._inner_utility(fam, by_w, res_sd, d) for d in self.margins]
        best = max(mean_u)
        return float(max(d for d, u in zip(self.margins, mean_u) if u >= best - 1e-12)), best

    @staticmethod
    def _sigma(fam: FamilyData, arm: str) -> float:
        """Spread of the arm's out-of-fold quality residuals (the largest of any arm if it had none)."""
        return fam.fit.res_sd.get(arm, max(fam.fit.res_sd.values(), default=1.0))

    def admitted(self, family: str, x: np.ndarray, arms: Sequence[str],
                 q: Mapping[str, float] | None = None) -> dict[str, bool]:
        """Whether each arm passes the rule ``q_hat + delta * sigma_a <= log(1 + L)`` (``q``: the
        predicted qualities, if already at hand)."""
        fam = self._fam[family]
        q = self.predict_quality(family, x, arms) if q is None else q
        if fam.fit.qreg is None:
            return {a: bool(self.table.arms[a].lossless) for a in arms}
        return {a: q[a] + fam.fit.delta * self._sigma(fam, a) <= self.threshold() for a in arms}

    def predict_quality(self, family: str, x: np.ndarray, arms: Sequence[str]) -> dict[str, float]:
        """Predicted log error ratio of each arm (0 for every arm when no quality model is needed)."""
        fam = self._fam[family]
        arms = list(arms)
        if fam.fit.qreg is None or not arms:
            return {a: 0.0 for a in arms}
        return dict(zip(arms, map(float, fam.fit.qreg.predict(self._rows(fam, None, x, arms)))))

    def _predict(self, family, fam, x, arms):
        arms = [a for a in arms if a in fam.fit.log_speed]
        q = self.predict_quality(family, x, arms)
        ok = self.admitted(family, x, arms, q)
        thr = self.threshold()
        steps = x[fam.fit.steps_col] if fam.fit.steps_col is not None else math.nan
        ls = {a: self.log_speedup(fam, steps, a) for a in arms}
        # within ``tie`` of the fastest admitted arm the estimated utility is the same (timing noise):
        # those arms share its score, and rank orders them by p_ok, then slack, i.e. by quality slack
        # (p_ok falls as the predicted quality rises; _choose)
        fast = [ls[a] for a in arms if ok[a] and ls[a] > 0]
        tied = self._tie_floor(max(fast)) if fast else math.inf
        top = math.exp(max(fast)) if fast else 1.0
        out = []
        for a in arms:
            sd = fam.fit.log_speed[a][1]
            s = math.exp(ls[a])
            if fam.fit.qreg is None:
                p_ok = 1.0 if self.table.arms[a].lossless else 0.0
            else:
                p_ok = float(np.mean(q[a] + fam.fit.resid <= thr))
            score = (top if ls[a] >= tied else s) if ok[a] else 0.0
            out.append(Prediction(a, s, s * sd, p_ok, score, thr - q[a] if fam.fit.qreg is not None else 0.0))
        return out


# qkernel-cv: the kernel's bandwidths are chosen per fit by the inner cross-validation (with the
# margin); another spacing is only a fallback (other_grid 1e-4: on the bundled history a sampler's
# error ratio at a budget is nearly the same on every denoiser of the same spacing, and far from its
# ratio on another spacing); arms within 5% of the fastest (the evaluation's timing-noise band,
# ``within5``) are told apart by quality slack
KERNEL_CV_BASE = {"other_grid": 1e-4}
KERNEL_CV_GRID = tuple({"h_steps": hs, "h_model": hm} for hs in (0.1, 0.2, 0.35, 0.5) for hm in (0.3, 0.6, 1.2, 3.0))
TIE_TOLERANCE = 0.05

MODELS: dict[str, Callable[..., Selector]] = {
    "sbs": SingleBest,
    "knn": KNN,
    "knn-w": lambda **kw: KNN(weighted=True, **kw),
    "isac": ISAC,
    "gbm": lambda **kw: PerfModel(kind="gbm", **kw),
    "forest": lambda **kw: PerfModel(kind="forest", **kw),
    "pairwise": Pairwise,
    "gbm-arm": lambda **kw: PerfModel(kind="gbm", per_arm=True, **kw),
    "forest-arm": lambda **kw: PerfModel(kind="forest", per_arm=True, **kw),
    "ens": lambda **kw: Ensemble(factory=make_selector, **kw),
    "qmargin": QualityMargin,
    "qmargin-nfe": lambda **kw: QualityMargin(speed="nfe", **kw),
    "qkernel": lambda **kw: QualityMargin(speed="nfe", quality="kernel", **kw),
    "qkernel-cv": lambda **kw: QualityMargin(**{"speed": "nfe", "quality": "kernel", "kernel": KERNEL_CV_BASE,
                                                "kernel_grid": KERNEL_CV_GRID, "tie": TIE_TOLERANCE, **kw}),
}

# chosen by the held-out evaluation (BENCHMARKS.md "selector"): the best mean closed gap over
# leave-one-workload-out and leave-one-model-out (diffusion: and both budgets). LLM, 60 workloads:
# pairwise 0.88 / 0.87 (gbm 0.84 / 0.75, knn-w 0.80 / 0.83, ens 0.82 / 0.72); diffusion, 90
# workloads: qkernel-cv 0.69 (qmargin-nfe 0.66, qkernel 0.63); chosen on those same folds
DEFAULT_MODEL = "forest"
DEFAULT_BY_FAMILY = {"llm": "pairwise", "diffusion": "qkernel-cv"}


def default_model(family: str) -> str:
    return DEFAULT_BY_FAMILY.get(family, DEFAULT_MODEL)


def make_selector(name: str = DEFAULT_MODEL, **kw: Any) -> Selector:
    try:
        factory = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown selector {name!r}; valid: {', '.join(MODELS)}") from None
    return factory(**kw)
