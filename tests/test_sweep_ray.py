"""`accelerando sweep --ray`: the sweep's cells as tasks on a local Ray cluster with 2 workers.

One cluster for the module (Ray takes seconds to start). The sweep runs fake samplers on tiny
random UNets; one worker is killed (SIGKILL) mid-cell, after the cell's first round was stored:
Ray retries the cell, which resumes, and the history ends with exactly the rows (keys) of a serial
sweep of the same grid, none twice.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

import bench_fakes as F
import ray_fakes
from accelerando.bench import runner as R
from accelerando.bench.history import open_history
from accelerando.bench.workloads import DiffusionWorkload
from accelerando.select import sweep as S

ray = pytest.importorskip("ray")   # the [ray] extra; `./run test` installs it (the [test] extra)
pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster():
    # workers are new processes: they find accelerando and the test helpers through PYTHONPATH
    old = os.environ.get("PYTHONPATH")
    src = str(TESTS.parent / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join([src, str(TESTS)] + ([old] if old else []))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _grid():
    return [DiffusionWorkload(model=f"rand-unet-c8x16-i8-s{i % 2}", steps=4, batch=1, seed=i) for i in range(3)]


def _keys(path):
    with open_history(path) as h:
        rows = h.rows()
    return [(r.row_key, r.workload["sweep_key"], r.method, tuple(sorted(r.knobs.items()))) for r in rows]


def test_claim_core_gives_each_cell_its_own_core():
    from accelerando.select.ray_sweep import claim_core
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        pytest.skip("one core")
    a, ca = claim_core()
    os.sched_setaffinity(0, cores)
    try:
        b, cb = claim_core()
        assert ca is not None and cb is not None and ca != cb and os.sched_getaffinity(0) == {cb}
        b.close()
    finally:
        a.close()
        os.sched_setaffinity(0, cores)


def test_cli_sweep_on_ray(cluster, tmp_path):
    # the user's command, on the module's local cluster (real samplers on a random UNet); runs
    # before the test below, whose fake set-up stays in the workers it used
    from typer.testing import CliRunner
    from accelerando import cli
    path = tmp_path / "h.sqlite"
    res = CliRunner().invoke(cli.get_app(), ["sweep", "--ray", "--llm", "0", "--diffusion", "2", "--no-zoo",
                                             "--methods", "dpmpp-2m", "--repeats", "1", "--reference-steps", "10",
                                             "--history", str(path), "--json"])
    assert res.exit_code == 0, res.output + str(res.exception)
    import json
    out = json.loads(res.stdout)
    assert out["workloads"] == 2 and out["errors"] == [] and out["rows"] > 0
    with open_history(path) as h:
        rows = h.rows()
    assert len(rows) == out["rows"] and all(r.row_key for r in rows)
    assert {r.method for r in rows} == {"ddim", "dpmpp-2m"}


def test_ray_sweep_survives_a_killed_worker_and_equals_serial(cluster, tmp_path, monkeypatch):
    from accelerando.select.ray_sweep import ray_sweep
    pidfile = tmp_path / "crash.pid"
    killed = []

    def killer():
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end and not pidfile.exists():
            time.sleep(0.05)
        time.sleep(0.2)
        pid = int(pidfile.read_text())
        killed.append(pid)
        os.kill(pid, signal.SIGKILL)
    th = threading.Thread(target=killer, daemon=True)
    th.start()
    path = str(tmp_path / "ray.sqlite")
    open_history(path).close()

    def setup(pidfile=str(pidfile)):
        os.environ[ray_fakes.PIDFILE] = pidfile
        ray_fakes.worker_setup()
    seen = []
    rep = ray_sweep(_grid(), history=path, knob_grid=ray_fakes.KNOB_GRID, repeats=1, warmup=0, reference_steps=6,
                    setup=setup, progress=lambda i, n, label, eta: seen.append((i, n)))
    th.join(5)
    assert killed, "the crash hook never ran"
    assert not rep.errors, rep.errors
    assert sorted(seen) == [(0, 3), (1, 3), (2, 3)]
    ray_rows = _keys(path)
    assert len({k for k, *_ in ray_rows}) == len(ray_rows)             # nothing twice
    # the same grid, serially, in this process
    F.fresh_registry(monkeypatch)
    ray_fakes.register()
    monkeypatch.setattr(R, "_diffusion_api", lambda: F.fake_make_schedule)
    serial = str(tmp_path / "serial.sqlite")
    with open_history(serial) as h:
        srep = S.run_sweep(_grid(), history=h, knob_grid=ray_fakes.KNOB_GRID, repeats=1, warmup=0, reference_steps=6)
    assert not srep.errors
    assert sorted(ray_rows) == sorted(_keys(serial))                    # nothing lost: the same rows
    # the killed attempt stored the cell's first round (its report died with it); the retry added the rest
    assert rep.rows < len(ray_rows)
    with open_history(path) as h:             # each row names the core its cell was pinned to
        assert all(r.metrics["cpu_core"] in os.sched_getaffinity(0) for r in h.rows())
