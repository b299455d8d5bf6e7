"""Fixtures shared by the whole suite (pytest loads this file first).

Lanes (docs/testing.md):
    ./run test                  everything, what CI runs (``.ci/run``)
    ./run test -m "not slow"    the quick lane: skips the tests marked ``@pytest.mark.slow``
                                (each over ~20 s on the 2-core CI machine)

Shared *fixtures* live here; shared *helpers* that tests call as functions stay in plain modules
beside the tests, imported by name: ``llm_models`` (tiny random-initialised causal LMs),
``bench_fakes`` (fake registered methods, tiny models on disk, a fake clock), ``tree_checks``
(the chi-square harness of the tree acceptance rules) and ``history_checks`` (history-store
checks, the PostgreSQL test server). Models are built in fixtures or tests, never at import.

LLM decoding in tests runs on the lean engine without torch.compile (seconds to minutes per graph on
2 cores): ``speculative_generate``'s default ``engine="auto"`` becomes ``"engine-eager"`` -- the
same engine code, eager. Tests of the compiled path ask for ``engine="engine"`` explicitly.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("ACCELERANDO_ENGINE", "engine-eager")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread for the whole run: the tiny models of the suite run several times faster
    on one thread of a shared 2-core machine (OpenMP threads wait on each other). Session-scoped,
    so module-scoped model fixtures are built under it too; the setting is restored at the end."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _keep_thread_count():
    """A test that changes torch's thread count (the CLI's ``--threads``) does not leak it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- models and fakes

@pytest.fixture(scope="module")
def llama_pair():
    """A tiny random Llama target (seed 0) and a one-layer draft (seed 1), shared by a module
    (more architectures and sizes: ``llm_models.tiny_lm``, ``tree_checks.tiny_llama``)."""
    from tree_checks import tiny_llama
    return tiny_llama(0), tiny_llama(1, layers=1)


@pytest.fixture
def fakes(monkeypatch):
    """Fake methods in a private registry (they never leak into the real one): an LLM baseline
    and exact / lossy / broken methods, a diffusion baseline and a shifted sampler, all on a fake
    clock that moves only when a fake method runs (returned), and the fake noise schedule."""
    import bench_fakes as F
    from accelerando.bench import runner
    F.fresh_registry(monkeypatch)
    clock = F.FakeClock()
    F.register_fake_llm(clock)
    F.register_fake_diffusion()
    monkeypatch.setattr(runner, "_diffusion_api", lambda: F.fake_make_schedule)
    return clock


# ----------------------------------------------------------------------------- history stores

@pytest.fixture
def pg_store():
    """A fresh database on the test PostgreSQL server (skipped, or failed where `./run test`
    promised a server, without one), dropped afterwards."""
    from history_checks import new_postgres_db, postgres_url
    url, drop = new_postgres_db(postgres_url())
    try:
        yield url
    finally:
        drop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    """A fresh, empty history location: once an SQLite file, once a PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "h.sqlite")
        return
    from history_checks import new_postgres_db, postgres_url
    url, drop = new_postgres_db(postgres_url())
    try:
        yield url
    finally:
        drop()
