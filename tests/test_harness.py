"""The harness's timing rules, checked with a fake clock and a recorded event log."""

import statistics

import numpy as np
import pytest

from accelerando.bench.harness import measure, percentile


class FakeWorld:
    """A clock that only moves when the fake function runs; logs every call."""

    def __init__(self, durations):
        self.durations = list(durations)
        self.now = 100.0
        self.log = []
        self.calls = 0

    def fn(self):
        self.log.append("fn")
        self.now += self.durations[self.calls]
        self.calls += 1
        return self.calls

    def clock(self):
        self.log.append("clock")
        return self.now

    def sync(self):
        self.log.append("sync")


def test_warmup_excluded_and_median_spread():
    # the warm-up call is very slow; it must not appear in the samples
    world = FakeWorld([50.0, 3.0, 1.0, 2.0, 5.0, 4.0])
    t = measure(world.fn, warmup=1, repeats=5, sync=world.sync, clock=world.clock)
    assert t.samples == (3.0, 1.0, 2.0, 5.0, 4.0)
    assert t.median_s == statistics.median([3.0, 1.0, 2.0, 5.0, 4.0])
    assert t.min_s == 1.0 and t.max_s == 5.0
    q75, q25 = np.percentile(t.samples, [75, 25])
    assert t.iqr_s == pytest.approx(q75 - q25)
    assert t.result == 6            # the last timed call's return value
    assert t.repeats == 5 and t.warmup == 1
    assert world.calls == 6


def test_sync_before_every_clock_read():
    world = FakeWorld([1.0] * 4)
    measure(world.fn, warmup=1, repeats=3, sync=world.sync, clock=world.clock)
    log = world.log
    assert log.count("clock") == 6
    for i, ev in enumerate(log):
        if ev == "clock":
            assert log[i - 1] == "sync", log
    # and the function always runs between a start read and an end read
    first_clock = log.index("clock")
    assert log[:first_clock].count("fn") == 1          # only the warm-up before timing starts
    timed = log[first_clock:]
    assert timed == ["clock", "fn", "sync", "clock", "sync"] * 2 + ["clock", "fn", "sync", "clock"]


def test_no_warmup_even_repeats():
    world = FakeWorld([2.0, 4.0, 6.0, 8.0])
    t = measure(world.fn, warmup=0, repeats=4, sync=world.sync, clock=world.clock)
    assert t.samples == (2.0, 4.0, 6.0, 8.0)
    assert t.median_s == 5.0
    assert t.iqr_s == pytest.approx(np.percentile(t.samples, 75) - np.percentile(t.samples, 25))


def test_bad_arguments():
    with pytest.raises(ValueError):
        measure(lambda: None, repeats=0)
    with pytest.raises(ValueError):
        measure(lambda: None, warmup=-1)


def test_real_clock_and_peak_memory_reported():
    t = measure(lambda: sum(range(1000)), warmup=1, repeats=3)
    assert t.result == sum(range(1000))
    assert 0 <= t.min_s <= t.median_s <= t.max_s
    assert t.peak_memory_bytes is None or t.peak_memory_bytes > 0
    s = t.summary()
    assert s["repeats"] == 3 and "result" not in s


def test_percentile_matches_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 10):
        v = sorted(rng.random(n).tolist())
        for q in (0, 25, 50, 75, 100):
            assert percentile(v, q) == pytest.approx(np.percentile(v, q))
