"""Fake methods for the Ray sweep tests, set up the same way in the test process and in each Ray
worker (``worker_setup``: workers are fresh processes, so the registry is replaced there too)."""

from __future__ import annotations

import os
import time

import bench_fakes as F
from accelerando.bench import methods as registry
from accelerando.bench import runner as R
from accelerando.bench.methods import MethodEntry

PIDFILE = "ACCELERANDO_TEST_CRASH_PIDFILE"


def _crashy(s, n=0):
    """A sampler that, the first time it runs with n=1 anywhere, writes its process id to the file
    named by $ACCELERANDO_TEST_CRASH_PIDFILE and sleeps, so the test can kill that worker mid-cell."""
    def call():
        path = os.environ.get(PIDFILE)
        if n == 1 and path:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                time.sleep(60)          # killed here
        return F._fake_sampler(s)
    return call


def register() -> None:
    F.register_fake_diffusion()
    registry.register(MethodEntry("fake-crashy", "diffusion", _crashy, lossless=False, default_knobs={"n": 0}))


def worker_setup() -> None:
    """Runs in a Ray worker before each cell: only the fake methods, the fake schedule."""
    registry._REGISTRY = {}
    registry._loaded = True
    register()
    R._diffusion_api = lambda: F.fake_make_schedule


KNOB_GRID = {"fake-crashy": [{"n": 0}, {"n": 1}]}     # n=1 (the crash) is in the second round
