"""The history store on a real PostgreSQL server: the same behaviour as on SQLite.

Runs only when ``ACCELERANDO_TEST_POSTGRES_URL`` names a server we may create databases on
(e.g. ``postgresql+psycopg2://user@localhost:5432/postgres``) and psycopg2 is installed
(``pip install -e .[postgres]``); each test gets a fresh database, dropped afterwards.
CI has no server, so there these tests are skipped.
"""

import multiprocessing as mp
import os
import uuid

import pytest

from accelerando.bench.history import HistoryError, Measurement, open_history
from history_checks import FIXED, assert_concurrent_writers_lose_nothing

URL = os.environ.get("ACCELERANDO_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not URL, reason="set ACCELERANDO_TEST_POSTGRES_URL to test on a PostgreSQL server")


@pytest.fixture
def pg_url():
    sa = pytest.importorskip("sqlalchemy")
    pytest.importorskip("psycopg2")
    admin_url = sa.make_url(URL)
    name = f"acc_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _m(method, **kw):
    return Measurement({"family": "llm", "model": "tiny"}, method, {"k": 4}, {"median_s": 1.0, "nan": float("nan")},
                       **{**FIXED, **kw})


def test_round_trip_filters_and_transactions(pg_url):
    with open_history(pg_url) as h:
        h.record_many([_m("base"), _m("spec", seed=3)])
        assert sorted(r.method for r in h.rows()) == ["base", "spec"]
        (spec,) = h.rows(method="spec")
        assert spec.seed == 3 and spec.knobs == {"k": 4} and spec.metrics["nan"] == "nan"
        bad = _m("bad")
        bad.metrics["oops"] = object()                  # not storable: the whole batch rolls back
        with pytest.raises(TypeError):
            h.record_many([_m("a"), bad])
        assert h.count() == 2
    with open_history(pg_url) as h:                     # reopening finds the schema, not a foreign db
        assert h.count() == 2


def test_two_processes_write_concurrently(pg_url):
    assert_concurrent_writers_lose_nothing(pg_url, mp.get_context("spawn"), n=20)


def test_foreign_database_is_refused_and_untouched(pg_url):
    import sqlalchemy as sa
    eng = sa.create_engine(pg_url)
    with eng.begin() as c:
        c.execute(sa.text("CREATE TABLE payroll (id int)"))
    with pytest.raises(HistoryError):
        open_history(pg_url)
    with eng.connect() as c:
        tables = set(sa.inspect(c).get_table_names())
    eng.dispose()
    assert tables == {"payroll"}
