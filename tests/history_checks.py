"""Checks shared by the SQLite and PostgreSQL history tests (their fixtures ``store`` and
``pg_store`` are in conftest.py).

``store``: a fresh, empty history location, once on SQLite (a file) and once on PostgreSQL (a new
database on the server named by ``ACCELERANDO_TEST_POSTGRES_URL``, dropped afterwards). `./run test`
starts that server (``.ci/services.sh``) and sets ``ACCELERANDO_TEST_SERVICES=required``: then a
missing server fails the PostgreSQL tests instead of skipping them.
"""

import os
import uuid

import pytest

from accelerando.bench.history import Measurement, open_history

FIXED = dict(hardware={"cpu": "test", "cores": 1}, versions={"torch": "x"}, git_revision="abc")


def postgres_url() -> str:
    """The admin URL of the test server, or skip (fail where `./run test` promised a server)."""
    url = os.environ.get("ACCELERANDO_TEST_POSTGRES_URL")
    if not url:
        why = "no PostgreSQL server: set ACCELERANDO_TEST_POSTGRES_URL (./run test starts one)"
        if os.environ.get("ACCELERANDO_TEST_SERVICES") == "required":
            pytest.fail(why + "; .ci/services.sh could not start it", pytrace=False)
        pytest.skip(why)
    return url


def new_postgres_db(admin_url: str):
    """(url of a fresh database, drop()) on the server at ``admin_url``."""
    import sqlalchemy as sa
    admin = sa.make_url(admin_url)
    name = f"acc_test_{uuid.uuid4().hex[:12]}"
    eng = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))

    def drop():
        with eng.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        eng.dispose()
    return admin.set(database=name).render_as_string(hide_password=False), drop


def _writer(location, tag, n):
    with open_history(location) as h:
        for i in range(n):
            h.record(Measurement({"family": "llm"}, tag, {"i": i}, {"v": i}, **FIXED))


def assert_concurrent_writers_lose_nothing(location, ctx, n=25, procs=2):
    """``procs`` processes (from multiprocessing context `ctx`) each write n rows one by one to
    the same store; afterwards every row of each is there, exactly once."""
    tags = [f"p{i}" for i in range(procs)]
    ps = [ctx.Process(target=_writer, args=(location, tag, n)) for tag in tags]
    for p in ps:
        p.start()
    for p in ps:
        p.join(120)
        assert p.exitcode == 0
    with open_history(location) as h:
        rows = h.rows()
    assert len(rows) == procs * n
    for tag in tags:
        assert sorted(r.knobs["i"] for r in rows if r.method == tag) == list(range(n))
