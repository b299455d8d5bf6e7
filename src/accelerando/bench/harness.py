"""One harness times every method, by the same rules.

Rules (DESIGN.md, "Measuring honestly"):

* warm-up calls run first and are never timed (they pay for lazy init, compilation, caches);
* the device is synchronised before *every* clock read, so queued GPU work is inside the
  interval it belongs to and nothing else is;
* the timed call is repeated; the summary is the median with min / max / inter-quartile range;
* peak memory is recorded beside the times.

Peak memory: on CUDA it is ``torch.cuda.max_memory_allocated()`` over the timed calls (the peak
counter is reset after warm-up), i.e. tensor memory held by the caching allocator's users.
On CPU there is no allocator counter for torch tensors (``tracemalloc`` does not see them), so we
report the process's resident-set high-water mark (``resource.getrusage().ru_maxrss``, in bytes)
at the end of the timed calls: an upper bound that includes everything loaded before (Python,
torch, the models), comparable between methods measured in one process only through its growth.
``Timing.peak_memory_kind`` says which of the two a number is.
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Timing:
    """Wall-clock summary of ``repeats`` timed calls (seconds) plus the last call's result."""

    median_s: float
    min_s: float
    max_s: float
    iqr_s: float                    # 75th - 25th percentile (linear interpolation)
    samples: tuple[float, ...]      # every timed call, in order
    peak_memory_bytes: int | None
    result: Any = None              # the return value of the last timed call
    peak_memory_kind: str = "none"  # "cuda_max_allocated" | "process_max_rss" | "none"
    warmup: int = 0

    @property
    def repeats(self) -> int:
        return len(self.samples)

    def summary(self) -> dict[str, Any]:
        """The numbers without the result, ready for a history row."""
        return {
            "median_s": self.median_s, "min_s": self.min_s, "max_s": self.max_s,
            "iqr_s": self.iqr_s, "repeats": self.repeats, "warmup": self.warmup,
            "samples_s": list(self.samples), "peak_memory_bytes": self.peak_memory_bytes,
            "peak_memory_kind": self.peak_memory_kind,
        }


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100], values sorted."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def default_sync() -> Callable[[], None]:
    """``torch.cuda.synchronize`` when CUDA is available, else a no-op."""
    if torch.cuda.is_available():
        return torch.cuda.synchronize
    return lambda: None


def _max_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:              # Windows
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)   # Linux reports KiB


def measure(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 3,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; summarise the times."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    sync = sync if sync is not None else default_sync()
    cuda = torch.cuda.is_available()

    for _ in range(warmup):
        fn()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    samples: list[float] = []
    result = None
    for _ in range(repeats):
        sync()
        start = clock()
        result = fn()
        sync()   # the call's queued device work belongs inside its interval
        samples.append(clock() - start)

    if cuda:
        peak, kind = int(torch.cuda.max_memory_allocated()), "cuda_max_allocated"
    else:
        peak = _max_rss_bytes()
        kind = "process_max_rss" if peak is not None else "none"
    return _timing(samples, result, warmup, peak, kind)


def _timing(samples: list[float], result: Any, warmup: int, peak: int | None, kind: str) -> Timing:
    """A ``Timing`` from the samples in call order (the summary statistics over them sorted)."""
    ordered = sorted(samples)
    return Timing(
        median_s=statistics.median(ordered),
        min_s=ordered[0],
        max_s=ordered[-1],
        iqr_s=percentile(ordered, 75) - percentile(ordered, 25),
        samples=tuple(samples),
        peak_memory_bytes=peak,
        result=result,
        peak_memory_kind=kind,
        warmup=warmup,
    )


def measure_interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    rounds: int = 5,
    warmup_rounds: int = 1,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Timing]:
    """Time several callables in interleaved rounds: each round calls every one once.

    On a shared machine the load drifts over seconds; timing method A's repeats and then method
    B's lets the drift land on one of them only. Here every round holds one call of each, the
    order rotated by one place per round (so none is always first after a pause), and the i-th
    sample of every ``Timing`` comes from round i: ratios are best taken per round (the same load
    hit both calls of a round). ``warmup_rounds`` untimed rounds run first; peak memory is not
    recorded (``measure`` does that per method).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if warmup_rounds < 0:
        raise ValueError(f"warmup_rounds must be >= 0, got {warmup_rounds}")
    sync = sync if sync is not None else default_sync()
    names = list(fns)
    for _ in range(warmup_rounds):
        for n in names:
            fns[n]()
    sync()
    samples: dict[str, list[float]] = {n: [] for n in names}
    results: dict[str, Any] = {}
    for r in range(rounds):
        k = r % len(names) if names else 0
        for n in names[k:] + names[:k]:
            sync()
            start = clock()
            results[n] = fns[n]()
            sync()
            samples[n].append(clock() - start)
    return {n: _timing(samples[n], results[n], warmup_rounds, None, "none") for n in names}
