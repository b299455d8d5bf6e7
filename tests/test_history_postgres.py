"""The history store on a real PostgreSQL server (`./run test` starts one: ``.ci/services.sh``).

The behaviour shared with SQLite is tested on both by ``tests/test_history.py`` (its ``store``
fixture); here what only a server has: a foreign database, a role that may read but not write,
an unreachable server, a password in the URL, the default driver. (N writers at once: the
``store`` test there.)
"""

import subprocess
import sys
import time

import pytest

from accelerando.bench.history import HistoryError, Measurement, open_history
from history_checks import FIXED, postgres_url


def _m(method, **kw):
    return Measurement({"family": "llm", "model": "tiny"}, method, {"k": 4}, {"median_s": 1.0, "nan": float("nan")},
                       **{**FIXED, **kw})


def test_round_trip_filters_and_transactions(pg_store):
    with open_history(pg_store) as h:
        h.record_many([_m("base"), _m("spec", seed=3)])
        assert sorted(r.method for r in h.rows()) == ["base", "spec"]
        (spec,) = h.rows(method="spec")
        assert spec.seed == 3 and spec.knobs == {"k": 4} and spec.metrics["nan"] == "nan"
        bad = _m("bad")
        bad.metrics["oops"] = object()                  # not storable: the whole batch rolls back
        with pytest.raises(TypeError):
            h.record_many([_m("a"), bad])
        assert h.count() == 2
    with open_history(pg_store) as h:                   # reopening finds the schema, not a foreign db
        assert h.count() == 2


def test_foreign_database_is_refused_and_untouched(pg_store):
    import sqlalchemy as sa
    eng = sa.create_engine(pg_store)
    with eng.begin() as c:
        c.execute(sa.text("CREATE TABLE payroll (id int)"))
    with pytest.raises(HistoryError):
        open_history(pg_store)
    with eng.connect() as c:
        tables = set(sa.inspect(c).get_table_names())
    eng.dispose()
    assert tables == {"payroll"}


def test_read_only_role_is_found_before_writing(pg_store):
    import sqlalchemy as sa
    with open_history(pg_store) as h:
        h.record(_m("base"))
    url = sa.make_url(pg_store)
    role = f"reader_{url.database[-12:]}"
    eng = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(sa.text(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'"))
        c.execute(sa.text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"))
    try:
        ro_url = url.set(username=role, password=f"pw-{role}").render_as_string(hide_password=False)
        with open_history(ro_url) as ro:
            assert ro.count() == 1
            with pytest.raises(HistoryError, match="not writable.*permission denied") as e:
                ro.check_writable()
            assert f"pw-{role}" not in str(e.value) and f"pw-{role}" not in ro.location
    finally:
        with eng.connect() as c:
            c.execute(sa.text(f"DROP OWNED BY {role}"))
            c.execute(sa.text(f"DROP ROLE {role}"))
        eng.dispose()


def test_unreachable_server_is_one_line_within_seconds():
    postgres_url()                      # the driver and a server's port range are there
    t0 = time.monotonic()
    # a port nothing listens on, and a non-routable address (TEST-NET-1: packets go nowhere)
    for url in ("postgresql://acc:hunter2@127.0.0.1:1/x", "postgresql://acc:hunter2@192.0.2.1:5432/x"):
        with pytest.raises(HistoryError) as e:
            open_history(url)
        msg = str(e.value)
        assert "\n" not in msg and "hunter2" not in msg and "***" in msg, msg
    assert time.monotonic() - t0 < 15


def test_default_driver_is_the_extras(pg_store):
    # `postgresql://` (no +driver) uses psycopg 3, which the [postgres] extra installs
    assert pg_store.startswith("postgresql://")
    with open_history(pg_store) as h:
        assert h.engine.dialect.driver == "psycopg"


def test_cli_error_masks_the_password():
    postgres_url()
    res = subprocess.run([sys.executable, "-m", "accelerando.cli", "history", "list", "--history",
                          "postgresql://acc:hunter2@127.0.0.1:1/x"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "hunter2" not in res.stdout + res.stderr and res.stderr.startswith("error: ")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
