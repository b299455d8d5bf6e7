"""The sweep on a Ray cluster: each workload is one Ray task (a cell), writing to a shared history.

A cell is ``sweep.sweep_cell``: every method round of one workload, in one process, because a
speed-up is a ratio to the baseline measured in the same round on the same core (cells finer than
a workload would divide times taken on different machines). The cells run as Ray tasks, each
reserving one CPU (``num_cpus=1``) and pinning itself to one core of its node that no other cell
holds (an exclusive lock file per core, ``claim_core``), with one torch thread: two timing cells
never share a core. Each row records its core (``metrics["cpu_core"]``). Ray's own processes are not pinned; on a node that must also run other work,
start Ray with ``--num-cpus`` below the core count.

Faults: a cell writes each round's rows in one transaction, each row with a deterministic row key
(``sweep.row_key``; stored with ``ON CONFLICT DO NOTHING``). When a worker dies mid-cell, Ray runs
the task again (``max_retries``); the new attempt reads the history, skips the rounds already
there and writes the rest, so nothing is lost and nothing is stored twice. The rows (their keys)
are those a serial ``run_sweep`` writes.

Multi-node: every node must reach the history, so use a PostgreSQL URL (an SQLite file works on a
single machine only); install accelerando (``pip install 'accelerando[ray,postgres]'``) on every
node, start the cluster (``ray start --head`` on one node, ``ray start --address HEAD:6379`` on the
others) and pass ``--ray HEAD:6379`` (or ``auto`` on a cluster node).
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any, Callable, Sequence

from .sweep import ModelCache, SweepReport, _label_of, _merge, sweep_cell

LOCK_DIR = os.path.join(tempfile.gettempdir(), "accelerando-cores")


def claim_core() -> tuple[Any, int | None]:
    """Pin this process to a core of its node that no other cell holds; returns (the held lock
    file, the core), or (None, None) where affinity is not available. The lock goes with the
    process: a killed worker frees its core."""
    import fcntl
    if not hasattr(os, "sched_setaffinity"):
        return None, None
    os.makedirs(LOCK_DIR, exist_ok=True)
    for core in sorted(os.sched_getaffinity(0)):
        fh = open(os.path.join(LOCK_DIR, f"core-{core}.lock"), "w")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.close()
            continue
        os.sched_setaffinity(0, {core})
        return fh, core
    return None, None


def run_cell(wl: Any, history: str, options: dict[str, Any], setup: Callable[[], None] | None = None) -> SweepReport:
    """One cell in a Ray worker: claim a core, open the shared history, run ``sweep_cell``."""
    import torch
    from accelerando.bench.history import open_history
    if setup is not None:
        setup()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    lock, core = claim_core()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with open_history(history) as h:
            part = sweep_cell(wl, history=h, cache=ModelCache(options.get("device", "cpu")),
                              note={"cpu_core": core} if core is not None else None, **options)
        part.stopped_early = False
        return part
    finally:
        torch.set_num_threads(threads)
        if lock is not None:              # the worker process is reused by later tasks
            os.sched_setaffinity(0, cores)
            lock.close()


def ray_sweep(workloads: Sequence[Any], *, history: str, address: str | None = None, num_cpus: int | None = None,
              methods: Sequence[str] | None = None, knob_grid: dict[str, list[dict[str, Any]]] | None = None,
              repeats: int = 2, warmup: int = 1, reference_steps: int = 100, device: str = "cpu",
              max_retries: int = 3, setup: Callable[[], None] | None = None,
              progress: Callable[[int, int, str, float | None], None] | None = None) -> SweepReport:
    """``run_sweep`` with the cells as Ray tasks (see the module docstring). ``history``: a path or
    URL every node can reach. ``address``: a running cluster (``HOST:PORT`` or ``auto``); None
    starts a local one with ``num_cpus`` CPUs (default: all). An already initialised Ray session
    is used as it is. ``setup`` runs in the worker before each cell (tests register fake methods
    with it). ``progress(i, n, label, eta_s)`` is called as cells finish."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")     # no phoning home from a benchmark
    import ray
    if not ray.is_initialized():
        kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
        if address:
            ray.init(address=address, **kw)
        else:
            ray.init(num_cpus=num_cpus, **kw)
    options = dict(methods=list(methods) if methods else None, knob_grid=knob_grid, repeats=repeats,
                   warmup=warmup, reference_steps=reference_steps, device=device)
    task = ray.remote(num_cpus=1, max_retries=max_retries, retry_exceptions=False)(run_cell)
    t0 = time.perf_counter()
    pending = {task.remote(wl, history, options, setup): wl for wl in workloads}
    rep, n, finished = SweepReport(), len(pending), 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        wl = pending.pop(ready[0])
        try:
            _merge(rep, ray.get(ready[0]))
        except Exception as exc:    # noqa: BLE001 - a cell that failed for good (retries used up)
            rep.errors.append(f"{_label_of(wl)}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        finished += 1
        if progress:
            elapsed = time.perf_counter() - t0
            progress(finished - 1, n, _label_of(wl), elapsed / finished * (n - finished))
    rep.seconds = time.perf_counter() - t0
    return rep


def cluster_nodes() -> int:
    """Alive nodes of the Ray cluster this process is connected to."""
    import ray
    return sum(1 for x in ray.nodes() if x.get("Alive"))
