"""History store: round trips, filters, transactions, row keys, concurrency, migration, refusal to
touch files that are not ours. Tests taking ``store`` run on SQLite and on PostgreSQL."""

import json
import multiprocessing as mp
import os
import sqlite3
from datetime import datetime, timedelta, timezone

import pytest

from accelerando.bench import history as H
from accelerando.bench.history import HistoryError, Measurement, open_history
from history_checks import FIXED, assert_concurrent_writers_lose_nothing


def m(method="base", family="llm", model="tiny", value=1.0, **kw):
    return Measurement({"family": family, "model": model}, method, {"k": 4}, {"median_s": value},
                       **{**FIXED, **kw})


def test_autofill_and_round_trip(store):
    auto = Measurement({"family": "diffusion", "model": "u"}, "ddim", {"steps": 10}, {"rmse": 0.5}, seed=3)
    assert auto.family == "diffusion"
    assert set(auto.hardware) >= {"cpu", "cores", "memory_bytes", "accelerator"}
    assert set(auto.versions) == {"torch", "transformers", "diffusers", "accelerando"}
    assert auto.git_revision and auto.timestamp
    with open_history(store) as h:
        (rid,) = h.record_many([auto])
        (back,) = h.rows()
    assert back.id == rid
    for f in ("workload", "method", "knobs", "metrics", "seed", "family", "hardware", "versions",
              "git_revision", "timestamp"):
        assert getattr(back, f) == getattr(auto, f), f


def test_numpy_and_torch_values_are_stored(store):
    import numpy as np
    import torch
    x = m(value=np.float32(0.25))
    x.metrics["hist"] = np.array([1, 2, 3])
    x.metrics["t"] = torch.tensor(7)
    x.metrics["nan"] = float("nan")
    with open_history(store) as h:
        h.record(x)
        (back,) = h.rows()
    assert back.metrics == {"median_s": 0.25, "hist": [1, 2, 3], "t": 7, "nan": "nan"}


def test_filters(store):
    old = (datetime.now(timezone.utc) - timedelta(days=3)).isoformat(timespec="microseconds")
    with open_history(store) as h:
        h.record_many([m("base"), m("spec", model="big"), m("ddim", family="diffusion"),
                       m("spec", timestamp=old)])
        assert [r.method for r in h.rows(method="spec")] == ["spec", "spec"]
        assert [r.method for r in h.rows(family="diffusion")] == ["ddim"]
        assert [r.method for r in h.rows(model="big")] == ["spec"]
        assert len(h.rows(method=["base", "ddim"])) == 2
        since = datetime.now(timezone.utc) - timedelta(days=1)
        assert len(h.rows(since=since)) == 3
        assert len(h.rows(since=since.isoformat(), method="spec")) == 1
        assert len(h.rows(limit=2)) == 2
        assert h.count() == 4


def test_interrupted_write_leaves_no_partial_rows(store):
    bad = m("bad")
    bad.metrics["oops"] = object()          # not storable: fails on the third insert
    with open_history(store) as h:
        h.record(m("before"))
        with pytest.raises(TypeError):
            h.record_many([m("a"), m("b"), bad, m("c")])
        assert [r.method for r in h.rows()] == ["before"]

        def gen():
            yield m("x")
            yield m("y")
            raise KeyboardInterrupt       # interrupted while producing rows
        with pytest.raises(KeyboardInterrupt):
            h.record_many(gen())
        assert h.count() == 1


def test_processes_write_concurrently(store):
    # N processes x M rows, 0 lost, 0 duplicated; on a fresh store they also race to create the schema
    assert_concurrent_writers_lose_nothing(store, mp.get_context("fork"), n=25, procs=4)


def test_row_key_is_stored_once(store):
    with open_history(store) as h:
        a, b = h.record_many([m("a", row_key="k1"), m("b", row_key="k2")])
        assert a and b and a != b
        # a retried job writes the same keys again: skipped (id None), rows without a key always go in
        again = h.record_many([m("a", value=9.0, row_key="k1"), m("c"), m("c")])
        assert again[0] is None and all(again[1:])
        assert h.count() == 4
        assert [r.metrics["median_s"] for r in h.rows(method="a")] == [1.0]
        assert h.rows(method="b")[0].row_key == "k2"
        assert h.has_keys(["k1", "k3", "k2"]) == {"k1", "k2"}


def test_check_writable(store, tmp_path):
    with open_history(store) as h:
        h.check_writable()                  # probes with a rolled-back insert: nothing is left
        assert h.count() == 0
    if store.startswith("postgresql"):
        return                              # a read-only role: test_history_postgres
    with open_history(store) as h:
        h.record(m())
    with open_history(f"sqlite:///file:{store}?mode=ro&uri=true") as ro:
        assert ro.count() == 1              # readable ...
        with pytest.raises(HistoryError, match="not writable.*readonly"):
            ro.check_writable()             # ... but found unwritable before anything is measured


def test_folder_that_does_not_exist_is_refused(tmp_path, monkeypatch):
    with pytest.raises(HistoryError, match="does not exist.*mkdir -p"):
        open_history(tmp_path / "nosuch" / "h.sqlite")
    assert not (tmp_path / "nosuch").exists()
    monkeypatch.setenv(H.ENV_VAR, str(tmp_path / "nosuch2" / "h.sqlite"))
    with pytest.raises(HistoryError, match="does not exist"):
        open_history()
    # only the default location (the user's cache folder) is created
    monkeypatch.delenv(H.ENV_VAR)
    monkeypatch.setattr(H, "default_location", lambda: str(tmp_path / "cache" / "acc" / "history.sqlite"))
    with open_history() as h:
        assert h.count() == 0
    assert (tmp_path / "cache" / "acc" / "history.sqlite").exists()


def test_migrates_v1_to_v2_and_keys_work(tmp_path):
    path = tmp_path / "v1.sqlite"
    with open_history(path) as h:
        h.record(m("old"))
    con = sqlite3.connect(path)             # back to the v1 layout: no row_key column
    con.execute(f"DROP INDEX IF EXISTS uq_{H.MEASUREMENTS}_row_key")
    con.execute(f"CREATE TABLE t AS SELECT id, timestamp, run_id, family, method, seed, workload, knobs, "
                f"metrics, hardware, versions, git_revision FROM {H.MEASUREMENTS}")
    con.execute(f"DROP TABLE {H.MEASUREMENTS}")
    con.execute(f"ALTER TABLE t RENAME TO {H.MEASUREMENTS}")
    con.execute(f"UPDATE {H.SCHEMA_TABLE} SET version = 1")
    con.commit()
    con.close()
    with open_history(path) as h:
        assert h.schema_version() == H.SCHEMA_VERSION
        assert h.rows()[0].method == "old" and h.rows()[0].row_key is None
        assert h.record_many([m("new", row_key="k"), m("new", row_key="k")]) [1] is None
        assert h.count() == 2


def test_corrupt_file_is_refused_and_untouched(tmp_path):
    path = tmp_path / "h.sqlite"
    data = os.urandom(4096)
    path.write_bytes(data)
    with pytest.raises(HistoryError, match="not an SQLite database"):
        open_history(path)
    assert path.read_bytes() == data
    # a valid header followed by garbage is also refused without a write
    bad = tmp_path / "h2.sqlite"
    data2 = b"SQLite format 3\x00" + os.urandom(4096)
    bad.write_bytes(data2)
    with pytest.raises(HistoryError):
        open_history(bad)
    assert bad.read_bytes() == data2


def test_foreign_sqlite_db_is_refused_and_untouched(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE customers (id INTEGER, name TEXT)")
    con.execute("INSERT INTO customers VALUES (1, 'a')")
    con.commit()
    con.close()
    data = path.read_bytes()
    with pytest.raises(HistoryError, match="something else.*customers"):
        open_history(path)
    assert path.read_bytes() == data
    assert sorted(os.listdir(tmp_path)) == ["other.db"]


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "h.sqlite"
    with open_history(path) as h:
        h.record(m())
    con = sqlite3.connect(path)
    con.execute(f"UPDATE {H.SCHEMA_TABLE} SET version = {H.SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    with pytest.raises(HistoryError, match="newer accelerando"):
        open_history(path)


def test_migrates_v0_to_current(tmp_path):
    path = tmp_path / "v0.sqlite"
    con = sqlite3.connect(path)
    con.execute(f"""CREATE TABLE {H.MEASUREMENTS} (id INTEGER PRIMARY KEY, timestamp VARCHAR(40),
        method VARCHAR(128), seed INTEGER, workload TEXT, knobs TEXT, metrics TEXT, hardware TEXT,
        versions TEXT, git_revision VARCHAR(64))""")
    for i, fam in enumerate(["llm", "diffusion"]):
        con.execute(f"INSERT INTO {H.MEASUREMENTS} VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (i + 1, f"2026-01-0{i + 1}T00:00:00+00:00", f"meth{i}", 0,
                     json.dumps({"family": fam}), "{}", json.dumps({"v": i}), "{}", "{}", "r0"))
    con.commit()
    con.close()
    with open_history(path) as h:
        assert h.schema_version() == H.SCHEMA_VERSION
        rows = h.rows()
        assert [(r.method, r.family, r.metrics["v"]) for r in rows] == [("meth0", "llm", 0), ("meth1", "diffusion", 1)]
        assert [r.method for r in h.rows(family="diffusion")] == ["meth1"]
        h.record(m("new"))                  # the upgraded table takes current rows
        assert h.count() == 3
    with open_history(path) as h:           # reopening does not migrate twice
        assert h.schema_version() == H.SCHEMA_VERSION and h.count() == 3


def test_export_csv_and_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    with open_history(tmp_path / "h.sqlite") as h:
        h.record_many([m("base", value=1.0), m("spec", value=0.5)])
        assert h.export(tmp_path / "out.csv") == 2
        df = pd.read_csv(tmp_path / "out.csv")
        assert list(df["method"]) == ["base", "spec"]
        assert list(df["metrics.median_s"]) == [1.0, 0.5]
        pytest.importorskip("pyarrow")
        assert h.export(tmp_path / "out.pq", format="parquet", method="spec") == 1
        assert list(pd.read_parquet(tmp_path / "out.pq")["method"]) == ["spec"]
        with pytest.raises(ValueError):
            h.export(tmp_path / "out.xlsx")


def test_password_is_masked_and_bad_driver_named(monkeypatch):
    with pytest.raises(HistoryError) as e:
        open_history("nosuchdialect://user:s3cret@db.example/x")
    assert "s3cret" not in str(e.value) and "***" in str(e.value)


def test_location_from_env_and_url(tmp_path, monkeypatch):
    monkeypatch.setenv(H.ENV_VAR, str(tmp_path / "env.sqlite"))
    with open_history() as h:
        h.record(m())
    assert (tmp_path / "env.sqlite").exists()
    with open_history(f"sqlite:///{tmp_path / 'url.sqlite'}") as h:
        assert h.count() == 0
    with pytest.raises(HistoryError):
        open_history("nosuchdialect://x/y")
    monkeypatch.delenv(H.ENV_VAR)
    assert H.default_location().endswith("history.sqlite")
