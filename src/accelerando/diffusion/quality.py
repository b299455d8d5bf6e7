"""Paired bootstrap of a sample-quality difference between two samplers run from the same x_T.

Two samplers started from the same noise give *paired* samples: sample i of each comes from x_T[i]. A
bootstrap that resamples the indices i once and takes those rows from both sets keeps the pairing, so
the noise the two sets share (which x_T were drawn) cancels in the difference (Efron & Tibshirani 1993,
ch. 13, percentile interval). A reference set common to both (held-out data) is resampled once per
replicate and used by both statistics, so its finite size enters the interval too.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


def paired_bootstrap(stat: Callable[[np.ndarray, np.ndarray | None], float], n: int, *, n_shared: int = 0,
                     reps: int = 1000, seed: int = 0) -> np.ndarray:
    """``stat(idx, shared_idx)`` on ``reps`` resamples: ``idx`` draws n of the n paired rows with
    replacement (the same rows of both sample sets), ``shared_idx`` n_shared of the set common to both
    (None when ``n_shared == 0``). Returns the ``reps`` values."""
    if n < 1 or reps < 1 or n_shared < 0:
        raise ValueError("need n >= 1, reps >= 1, n_shared >= 0")
    rng = np.random.default_rng(seed)
    out = np.empty(reps)
    for r in range(reps):
        idx = rng.integers(0, n, n)
        shared = rng.integers(0, n_shared, n_shared) if n_shared else None
        out[r] = stat(idx, shared)
    return out


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap values (percentile method)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    lo, hi = np.quantile(np.asarray(values, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def fd_difference(feats_a: Any, feats_b: Any, real: Any, *, reps: int = 1000, level: float = 0.95, seed: int = 0,
                  resample_real: bool = True) -> dict[str, Any]:
    """Frechet distances of two paired feature sets (rows i of ``feats_a`` and ``feats_b`` from the same
    x_T) to ``real``, and a paired-bootstrap percentile interval of ``FD(b) - FD(a)``.

    ``resample_real``: also resample the real set (once per replicate, shared by both), so the interval
    covers the reference set's finite size; otherwise it is conditional on this real set.
    """
    from accelerando.bench.metrics import frechet_distance
    a, b, r = (np.asarray(v, dtype=np.float64) for v in (feats_a, feats_b, real))
    if a.shape != b.shape:
        raise ValueError(f"paired feature sets need the same shape, got {a.shape} and {b.shape}")
    fd_a, fd_b = frechet_distance(a, r), frechet_distance(b, r)
    pairs: list[tuple[float, float]] = []       # (FD(a), FD(b)) of each replicate

    def stat(idx: np.ndarray, shared: np.ndarray | None) -> float:
        rr = r if shared is None else r[shared]
        pairs.append((frechet_distance(a[idx], rr), frechet_distance(b[idx], rr)))
        return pairs[-1][1] - pairs[-1][0]
    diffs = paired_bootstrap(stat, len(a), n_shared=len(r) if resample_real else 0, reps=reps, seed=seed)
    fa, fb = np.array(pairs).T
    # no interval for each FD alone: resampling with replacement duplicates rows, which biases a bootstrap
    # FD upwards (the replicates can lie above the full-set FD); the paired difference carries the bias of
    # both and is reported with its bootstrap mean next to the full-set difference
    return dict(fd_a=fd_a, fd_b=fd_b, diff=fd_b - fd_a, diff_ci=percentile_interval(diffs, level),
                diff_boot_mean=float(diffs.mean()), fd_a_boot_mean=float(fa.mean()), fd_b_boot_mean=float(fb.mean()),
                reps=reps, level=level, n=len(a), n_real=len(r), resample_real=resample_real,
                diff_sd=float(diffs.std(ddof=1)) if reps > 1 else float("nan"))
