"""The paired bootstrap behind the PNDM headline's FD-difference interval, on hand-made examples."""

import numpy as np
import pytest

from accelerando.diffusion.quality import fd_difference, paired_bootstrap, percentile_interval


def test_paired_bootstrap_two_pairs_by_hand():
    """a = [0, 2], b = [1, 5]: per-pair differences d = [1, 3]. A paired resample of 2 indices gives
    mean(d) = 1 (p = 1/4), 2 (p = 1/2) or 3 (p = 1/4); nothing else can occur."""
    a, b = np.array([0.0, 2.0]), np.array([1.0, 5.0])
    vals = paired_bootstrap(lambda idx, _: b[idx].mean() - a[idx].mean(), 2, reps=4000, seed=1)
    assert set(np.unique(vals)) == {1.0, 2.0, 3.0}
    assert np.mean(vals == 2.0) == pytest.approx(0.5, abs=0.03)
    assert np.mean(vals == 1.0) == pytest.approx(0.25, abs=0.03)
    assert percentile_interval(vals, 0.9) == (1.0, 3.0)


def test_paired_bootstrap_keeps_the_pairing():
    """b = a + 1 row by row: every paired replicate of mean(b) - mean(a) is exactly 1 (an unpaired one
    would spread with the spread of a)."""
    a = np.array([0.0, 10.0, -7.0, 3.0, 100.0])
    vals = paired_bootstrap(lambda idx, _: (a[idx] + 1).mean() - a[idx].mean(), len(a), reps=200)
    assert np.allclose(vals, 1.0)


def test_shared_indices_are_drawn_once_per_replicate():
    seen = []
    paired_bootstrap(lambda idx, shared: seen.append((len(idx), None if shared is None else len(shared))) or 0.0,
                     3, n_shared=7, reps=5)
    assert seen == [(3, 7)] * 5
    with pytest.raises(ValueError):
        paired_bootstrap(lambda i, s: 0.0, 0)


def test_percentile_interval_by_hand():
    assert percentile_interval(np.arange(101.0), 0.9) == pytest.approx((5.0, 95.0))
    with pytest.raises(ValueError):
        percentile_interval(np.arange(3.0), 1.0)


def test_fd_difference_identical_sets_is_zero_and_shifted_set_is_worse():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(200, 3))
    a = rng.normal(size=(150, 3))
    same = fd_difference(a, a.copy(), real, reps=50)
    assert same["diff"] == 0 and same["diff_ci"] == (0.0, 0.0)
    worse = fd_difference(a, a + 0.5, real, reps=50)   # mean shift 0.5 in 3 dims: FD grows by ~0.75
    assert worse["diff"] > 0 and worse["diff_ci"][0] > 0
