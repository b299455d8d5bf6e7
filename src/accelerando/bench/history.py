"""The history store: every measurement is one row, kept in a SQL database.

Where it lives: ``open_history(x)`` with ``x`` a path or any SQLAlchemy URL; else the environment
variable ``ACCELERANDO_HISTORY``; else ``platformdirs.user_cache_dir("accelerando")/history.sqlite``.
SQLite is the embedded default (WAL journal + a busy timeout so several processes can write at
once); a PostgreSQL URL (``postgresql://user:password@host/db``, driver psycopg 3 from the
``[postgres]`` extra) lets many machines share one. A path whose folder does not exist is refused
(a typo would otherwise scatter histories); only the default location's folder is created.

Safety: a file that is not SQLite, or a SQLite database that holds other tables, raises
``HistoryError`` before anything is written to it; every ``record_many`` is one transaction.
Passwords in a URL are shown masked (``***``) in every message and in ``History.location``.

Row keys: a row written with ``Measurement.row_key`` (a deterministic id of what it measures, e.g.
a sweep cell's) is stored at most once: a second write of the same key is skipped (``ON CONFLICT
DO NOTHING``), so a retried or re-run job never duplicates a row.

Schema versions: ``accelerando_schema`` holds the version number. ``SCHEMA_VERSION`` is current;
``MIGRATIONS[v]`` upgrades a database from version ``v`` to ``v + 1`` in one transaction.
Version 0 is the pre-release layout (no version table, no ``family`` / ``run_id`` columns);
version 1 has no ``row_key`` column.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import subprocess
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

SCHEMA_VERSION = 2
ENV_VAR = "ACCELERANDO_HISTORY"
MEASUREMENTS = "accelerando_measurements"
SCHEMA_TABLE = "accelerando_schema"
_SQLITE_MAGIC = b"SQLite format 3\x00"


class HistoryError(RuntimeError):
    """The history store cannot be used (not a database, someone else's database, newer schema)."""


# ----------------------------------------------------------------------------- auto-filled facts

@functools.lru_cache(maxsize=1)
def hardware_info() -> dict[str, Any]:
    """CPU model, logical cores, total memory, accelerator name (cached per process)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = None
    accel = "none"
    try:
        import torch
        if torch.cuda.is_available():
            accel = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "accelerator": accel,
            "platform": platform.platform(), "python": platform.python_version()}


@functools.lru_cache(maxsize=1)
def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a measurement depends on (without importing them)."""
    from importlib.metadata import PackageNotFoundError, version
    out = {}
    for name in ("torch", "transformers", "diffusers", "accelerando"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "absent"
    return out


@functools.lru_cache(maxsize=1)
def git_revision() -> str:
    """HEAD of the accelerando checkout this code runs from, or "unknown" (e.g. a wheel)."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = res.stdout.strip()
    return rev if res.returncode == 0 and rev else "unknown"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# ----------------------------------------------------------------------------- the row

@dataclass
class Measurement:
    """One measurement: a method with its knobs on a workload, and what came out.

    ``workload`` is a workload's ``key()`` (it should carry ``"family"``); ``metrics`` holds
    times, raw counts and quality numbers. Hardware, versions, git revision and timestamp are
    filled in when left as ``None``. ``id`` is set on rows read back from the store.
    """

    workload: dict[str, Any]
    method: str
    knobs: dict[str, Any]
    metrics: dict[str, Any]
    seed: int = 0
    family: str | None = None
    hardware: dict[str, Any] | None = None
    versions: dict[str, str] | None = None
    git_revision: str | None = None
    timestamp: str | None = None
    run_id: str | None = None
    row_key: str | None = None
    id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ValueError("Measurement.method must be a non-empty string")
        for name in ("workload", "knobs", "metrics"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"Measurement.{name} must be a dict, got {type(getattr(self, name)).__name__}")
        if self.family is None:
            self.family = str(self.workload.get("family", ""))
        if self.hardware is None:
            self.hardware = dict(hardware_info())
        if self.versions is None:
            self.versions = dict(library_versions())
        if self.git_revision is None:
            self.git_revision = git_revision()
        if self.timestamp is None:
            self.timestamp = _now()

    def flat(self) -> dict[str, Any]:
        """One flat dict (``workload.model``, ``metrics.median_s``, ...) for tables and exports."""
        out: dict[str, Any] = {"id": self.id, "timestamp": self.timestamp, "run_id": self.run_id,
                               "family": self.family, "method": self.method, "seed": self.seed,
                               "git_revision": self.git_revision}
        for group in ("workload", "knobs", "metrics", "hardware", "versions"):
            for k, v in (getattr(self, group) or {}).items():
                out[f"{group}.{k}"] = json.dumps(v) if isinstance(v, (list, dict)) else v
        return out


def _jsonable(obj: Any) -> Any:
    """json.dumps default: numpy / torch scalars and arrays; anything else is an error."""
    if hasattr(obj, "tolist"):            # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot store a {type(obj).__name__} in the history: {obj!r}")


def _dumps(value: Any) -> str:
    # NaN / inf are not JSON; store them as strings so PostgreSQL and other readers accept the row
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v
    return json.dumps(clean(json.loads(json.dumps(value, default=_jsonable))), sort_keys=True)


# ----------------------------------------------------------------------------- schema

_meta = sa.MetaData()
_schema_table = sa.Table(SCHEMA_TABLE, _meta, sa.Column("version", sa.Integer, nullable=False))
_table = sa.Table(
    MEASUREMENTS, _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("timestamp", sa.String(40), nullable=False, index=True),
    sa.Column("run_id", sa.String(64)),
    sa.Column("family", sa.String(32), nullable=False, index=True),
    sa.Column("method", sa.String(128), nullable=False, index=True),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("workload", sa.Text, nullable=False),
    sa.Column("knobs", sa.Text, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),
    sa.Column("hardware", sa.Text, nullable=False),
    sa.Column("versions", sa.Text, nullable=False),
    sa.Column("git_revision", sa.String(64), nullable=False),
    sa.Column("row_key", sa.String(64), nullable=True, unique=True),
)
V0_COLUMNS = {"id", "timestamp", "method", "seed", "workload", "knobs", "metrics", "hardware",
              "versions", "git_revision"}


def _migrate_0_to_1(conn: Connection) -> None:
    """v0 -> v1: add ``family`` (from the workload JSON) and ``run_id``; add the version table."""
    conn.execute(sa.text(f"ALTER TABLE {MEASUREMENTS} ADD COLUMN family VARCHAR(32) NOT NULL DEFAULT ''"))
    conn.execute(sa.text(f"ALTER TABLE {MEASUREMENTS} ADD COLUMN run_id VARCHAR(64)"))
    for row_id, workload in conn.execute(sa.text(f"SELECT id, workload FROM {MEASUREMENTS}")).all():
        family = str(json.loads(workload).get("family", ""))
        conn.execute(sa.text(f"UPDATE {MEASUREMENTS} SET family = :f WHERE id = :i"), {"f": family, "i": row_id})
    _schema_table.create(conn)
    conn.execute(_schema_table.insert().values(version=0))


def _migrate_1_to_2(conn: Connection) -> None:
    """v1 -> v2: add ``row_key`` (NULL on old rows: NULLs never conflict) with a unique index."""
    conn.execute(sa.text(f"ALTER TABLE {MEASUREMENTS} ADD COLUMN row_key VARCHAR(64)"))
    conn.execute(sa.text(f"CREATE UNIQUE INDEX uq_{MEASUREMENTS}_row_key ON {MEASUREMENTS} (row_key)"))


MIGRATIONS: dict[int, Callable[[Connection], None]] = {0: _migrate_0_to_1, 1: _migrate_1_to_2}


# ----------------------------------------------------------------------------- the store

def default_location() -> str:
    """``$ACCELERANDO_HISTORY`` or the per-user cache file."""
    env = os.environ.get(ENV_VAR)
    if env:
        return env
    import platformdirs
    return str(Path(platformdirs.user_cache_dir("accelerando")) / "history.sqlite")


def _to_url(url_or_path: str | os.PathLike) -> sa.URL:
    text = os.fspath(url_or_path)
    if "://" in text:
        try:
            return sa.make_url(text)
        except sa.exc.ArgumentError as exc:
            raise HistoryError(f"history URL is not a valid database URL: {exc}") from None
    return sa.URL.create("sqlite", database=str(Path(text).expanduser().resolve()))


def _check_sqlite_file(path: Path, shown: str) -> None:
    if path.is_dir():
        raise HistoryError(f"history {shown} is a directory, not a database file")
    if path.exists() and path.stat().st_size > 0:
        with open(path, "rb") as fh:
            head = fh.read(len(_SQLITE_MAGIC))
        if head != _SQLITE_MAGIC:
            raise HistoryError(f"history file {shown} is not an SQLite database (corrupt or another "
                               f"kind of file); left untouched — pass --history with another path")


def _sqlite_engine(url: sa.URL) -> Engine:
    engine = sa.create_engine(url, connect_args={"timeout": 60})

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _rec):   # pragma: no cover - exercised through every sqlite test
        dbapi_conn.isolation_level = None       # we emit BEGIN ourselves (below)
        dbapi_conn.execute("PRAGMA busy_timeout = 60000")

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):
        # IMMEDIATE takes the write lock up front: two writers queue on the busy timeout instead
        # of one failing with "database is locked" when it upgrades a read lock mid-transaction.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class History:
    """A handle on the store; use as a context manager or call ``close()``."""

    def __init__(self, engine: Engine, shown: str, secret: str | None = None):
        self.engine = engine
        self.location = shown          # password masked
        self._secret = secret

    # -- lifecycle
    def __enter__(self) -> "History":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    # -- writing
    def record(self, m: Measurement) -> int:
        return self.record_many([m])[0]

    def record_many(self, measurements: Iterable[Measurement]) -> list[int | None]:
        """Insert all rows in one transaction: on any error none of them is stored. Returns the
        new rows' ids; a row whose ``row_key`` is in the store already is skipped (its id is
        ``None``), so retrying a job that was killed after its write stores nothing twice."""
        ids: list[int | None] = []
        try:
            with self.engine.begin() as conn:
                for m in measurements:
                    if not isinstance(m, Measurement):
                        raise TypeError(f"record_many takes Measurement objects, got {type(m).__name__}")
                    ids.append(conn.execute(_insert(conn.dialect.name, _to_row(m))).scalar_one_or_none())
        except sa.exc.DBAPIError as exc:
            raise HistoryError(f"could not write to history {self.location}: {_mask_text(str(exc.orig), self._secret)}") from exc
        return ids

    def check_writable(self) -> None:
        """Raise ``HistoryError`` now if a row could not be written (a read-only file or URL, a
        role without INSERT): a test row is inserted and rolled back. Call it before a long
        measurement, so its results are not thrown away at the end."""
        probe = Measurement({"family": "probe"}, "probe", {}, {}, hardware={}, versions={}, git_revision="")
        try:
            with self.engine.connect() as conn:
                tx = conn.begin()
                try:
                    conn.execute(_insert(conn.dialect.name, _to_row(probe)))
                finally:
                    tx.rollback()
        except sa.exc.DBAPIError as exc:
            raise HistoryError(f"history {self.location} is not writable: {_mask_text(str(exc.orig), self._secret)}") from None

    def has_keys(self, keys: Iterable[str]) -> set[str]:
        """The ``row_key`` values among ``keys`` that are in the store."""
        keys = list(keys)
        found: set[str] = set()
        with self.engine.connect() as conn:
            for i in range(0, len(keys), 500):
                q = sa.select(_table.c.row_key).where(_table.c.row_key.in_(keys[i:i + 500]))
                found.update(conn.execute(q).scalars())
        return found

    # -- reading
    def rows(self, *, method: str | Iterable[str] | None = None, family: str | None = None,
             since: str | datetime | None = None, until: str | datetime | None = None,
             run_id: str | None = None, limit: int | None = None,
             **workload: Any) -> list[Measurement]:
        """Rows matching every filter, oldest first. Extra keywords filter workload fields
        (``model="code-target"``); ``since`` / ``until`` take datetimes or ISO strings."""
        q = sa.select(_table).order_by(_table.c.id)
        if method is not None:
            names = [method] if isinstance(method, str) else list(method)
            q = q.where(_table.c.method.in_(names))
        if family is not None:
            q = q.where(_table.c.family == family)
        if since is not None:
            q = q.where(_table.c.timestamp >= _iso(since))
        if until is not None:
            q = q.where(_table.c.timestamp < _iso(until))
        if run_id is not None:
            q = q.where(_table.c.run_id == run_id)
        try:
            with self.engine.connect() as conn:
                found = [_from_row(r) for r in conn.execute(q).mappings()]
        except sa.exc.DBAPIError as exc:
            raise HistoryError(f"could not read history {self.location}: {exc.orig}") from exc
        # workload fields live in JSON; filtering them here keeps the SQL portable
        found = [m for m in found if all(_matches(m.workload.get(k), v) for k, v in workload.items())]
        return found[-limit:] if limit else found

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(_table)).scalar_one())

    def schema_version(self) -> int:
        with self.engine.connect() as conn:
            return _read_version(conn)

    # -- export
    def dataframe(self, **filters: Any):
        import pandas as pd
        return pd.DataFrame([m.flat() for m in self.rows(**filters)])

    def export(self, out: str | os.PathLike, *, format: str | None = None, **filters: Any) -> int:
        """Write matching rows to CSV or Parquet (format from the suffix if not given)."""
        out = Path(out)
        fmt = (format or out.suffix.lstrip(".")).lower()
        if fmt not in ("csv", "parquet"):
            raise ValueError(f"unknown export format {fmt!r}; use csv or parquet")
        df = self.dataframe(**filters)
        if fmt == "csv":
            df.to_csv(out, index=False)
        else:
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise HistoryError("Parquet export needs pyarrow: pip install 'accelerando[export]'") from None
            # mixed-type columns (a knob that is an int in one row, a string in another) -> strings
            for col in df.columns:
                if df[col].dtype == object:
                    df[col] = df[col].map(lambda v: v if v is None or isinstance(v, str) else str(v))
            df.to_parquet(out, index=False)
        return len(df)


class KeepOnFailure:
    """A ``History`` for a long measurement: a write that fails (the server went away, the disk
    filled) does not throw the measured rows away. They go to a fallback SQLite history (a new
    file in the system's temporary folder, or ``fallback``) and ``note()`` says where; the caller
    prints its results as usual. Everything else is passed to the wrapped history."""

    def __init__(self, history: History, fallback: str | os.PathLike | None = None):
        self._h = history
        self._fallback = fallback
        self.saved_to: str | None = None
        self.failed: list[str] = []
        self.rows_elsewhere = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._h, name)

    def __enter__(self) -> "KeepOnFailure":
        return self

    def __exit__(self, *exc) -> None:
        self._h.close()

    def record(self, m: Measurement) -> int | None:
        return self.record_many([m])[0]

    def record_many(self, measurements: Iterable[Measurement]) -> list[int | None]:
        ms = list(measurements)
        try:
            return self._h.record_many(ms)
        except HistoryError as exc:
            self.failed.append(str(exc))
        if self.saved_to is None:
            import tempfile
            self.saved_to = os.fspath(self._fallback) if self._fallback else tempfile.mkstemp(
                prefix="accelerando-unsaved-", suffix=".sqlite")[1]
        with open_history(self.saved_to) as other:
            ids = other.record_many(ms)
        self.rows_elsewhere += len(ms)
        return ids

    def note(self) -> str | None:
        """One line for the user when some rows could not go to the history, else ``None``."""
        if not self.failed:
            return None
        return (f"{self.failed[0]} — the {self.rows_elsewhere} measured rows were saved to {self.saved_to} "
                f"instead (read them with --history {self.saved_to}: history list / history export)")


def _matches(actual: Any, wanted: Any) -> bool:
    if actual == wanted:
        return True
    return actual is not None and str(actual) == str(wanted)   # CLI filters arrive as strings


def _iso(t: str | datetime) -> str:
    if isinstance(t, datetime):
        if t.tzinfo is None:
            t = t.replace(tzinfo=timezone.utc)
        return t.astimezone(timezone.utc).isoformat(timespec="microseconds")
    return str(t)


def _to_row(m: Measurement) -> dict[str, Any]:
    return {"timestamp": m.timestamp, "run_id": m.run_id, "family": m.family or "",
            "method": m.method, "seed": int(m.seed), "workload": _dumps(m.workload),
            "knobs": _dumps(m.knobs), "metrics": _dumps(m.metrics), "hardware": _dumps(m.hardware),
            "versions": _dumps(m.versions), "git_revision": m.git_revision, "row_key": m.row_key}


def _insert(dialect: str, row: dict[str, Any]):
    """INSERT ... RETURNING id; with a row key, ON CONFLICT (row_key) DO NOTHING (no id back)."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:   # other databases: a duplicate key fails the transaction instead of being skipped
        return _table.insert().values(**row).returning(_table.c.id)
    stmt = insert(_table).values(**row)
    if row.get("row_key") is not None:
        stmt = stmt.on_conflict_do_nothing(index_elements=["row_key"])
    return stmt.returning(_table.c.id)


def _from_row(r: Any) -> Measurement:
    return Measurement(workload=json.loads(r["workload"]), method=r["method"],
                       knobs=json.loads(r["knobs"]), metrics=json.loads(r["metrics"]),
                       seed=r["seed"], family=r["family"], hardware=json.loads(r["hardware"]),
                       versions=json.loads(r["versions"]), git_revision=r["git_revision"],
                       timestamp=r["timestamp"], run_id=r["run_id"], row_key=r["row_key"], id=r["id"])


def _read_version(conn: Connection) -> int:
    return int(conn.execute(sa.select(sa.func.max(_schema_table.c.version))).scalar_one())


_PG_LOCK_KEY = 0x61636365   # "acce": the advisory lock that serialises schema set-up


def _prepare(engine: Engine, shown: str) -> None:
    """Check what is in the database; create, migrate or refuse. Writes nothing to a foreign DB."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # processes opening a fresh database at once would race to create the tables (SQLite
            # serialises them with BEGIN IMMEDIATE): one creates, the others wait and find them
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        tables = set(sa.inspect(conn).get_table_names())
        if not tables:
            _meta.create_all(conn)
            conn.execute(_schema_table.insert().values(version=SCHEMA_VERSION))
            return
        if MEASUREMENTS not in tables:
            listed = ", ".join(sorted(tables)[:5])
            raise HistoryError(f"history {shown} is a database of something else (tables: {listed}); "
                               f"left untouched — pass --history with another path")
        if SCHEMA_TABLE in tables:
            version = _read_version(conn)
        else:
            cols = {c["name"] for c in sa.inspect(conn).get_columns(MEASUREMENTS)}
            if cols != V0_COLUMNS:
                raise HistoryError(f"history {shown} has an {MEASUREMENTS} table of unknown layout "
                                   f"(no schema version); left untouched")
            version = 0
        if version > SCHEMA_VERSION:
            raise HistoryError(f"history {shown} has schema v{version}, written by a newer accelerando; "
                               f"this version reads up to v{SCHEMA_VERSION} — upgrade accelerando")
        for v in range(version, SCHEMA_VERSION):
            MIGRATIONS[v](conn)
            conn.execute(_schema_table.update().values(version=v + 1))


def _use_wal(engine: Engine, shown: str, patience_s: float = 60.0) -> None:
    """Switch a SQLite history to WAL (readers run while one process writes); set only once the DB
    is known ours, on a raw autocommit connection (the journal mode cannot change inside a
    transaction). The switch needs an exclusive lock, and SQLite may answer "database is locked"
    at once, without waiting on the busy timeout, while another process is mid-write (e.g. two
    processes creating a fresh file): retry with backoff for up to ``patience_s``."""
    import sqlite3
    import time
    raw = engine.raw_connection()
    try:
        con = raw.driver_connection
        give_up, pause = time.monotonic() + patience_s, 0.005
        while True:
            try:
                if str(con.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    con.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as exc:
                if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > give_up:
                    raise HistoryError(f"cannot switch history {shown} to WAL: {exc}") from None
                time.sleep(pause)
                pause = min(2 * pause, 0.2)
    finally:
        raw.close()


# a server that does not answer must fail fast, not hang a benchmark (or a test) on TCP timeouts
CONNECT_TIMEOUT_S = 5


def _mask_text(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _server_engine(url: sa.URL, shown: str) -> Engine:
    """An engine for a database server (PostgreSQL, ...): a connect timeout, pre-ping, and a
    missing driver named with the extra that installs it."""
    args = {"connect_timeout": CONNECT_TIMEOUT_S} if url.get_backend_name() == "postgresql" else {}
    try:
        return sa.create_engine(url, pool_pre_ping=True, connect_args=args)
    except ImportError as exc:
        hint = " — pip install 'accelerando[postgres]'" if url.get_backend_name() == "postgresql" else ""
        raise HistoryError(f"cannot use history URL {shown}: database driver missing ({exc}){hint}") from None
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise HistoryError(f"cannot use history URL {shown}: {exc}") from None


def open_history(url_or_path: str | os.PathLike | None = None) -> History:
    """Open (creating or upgrading if needed) the history at a path or SQLAlchemy URL."""
    default = url_or_path is None and not os.environ.get(ENV_VAR)
    raw = os.fspath(url_or_path) if url_or_path is not None else default_location()
    url = _to_url(raw)
    secret = url.password if isinstance(url.password, str) and url.password else None
    shown = url.render_as_string(hide_password=True) if "://" in raw else raw
    if url.get_backend_name() == "sqlite":
        db = url.database
        if db and db != ":memory:" and not db.startswith("file:"):
            path = Path(db)
            _check_sqlite_file(path, shown)
            if not path.parent.is_dir():
                if not default:
                    raise HistoryError(f"history {shown}: folder {path.parent} does not exist; create it "
                                       f"first (mkdir -p {path.parent}) or pass another --history")
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise HistoryError(f"cannot create the folder for history {shown}: {exc}") from None
        engine = _sqlite_engine(url)
    else:
        engine = _server_engine(url, shown)
    try:
        _prepare(engine, shown)
        if url.get_backend_name() == "sqlite":
            _use_wal(engine, shown)
    except HistoryError:
        engine.dispose()
        raise
    except sa.exc.DBAPIError as exc:
        engine.dispose()
        raise HistoryError(f"cannot open history {shown}: {_one_line(_mask_text(str(exc.orig), secret))}") from None
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        raise HistoryError(f"cannot open history {shown}: {_one_line(_mask_text(str(exc), secret))}") from None
    return History(engine, shown, secret)


def _one_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return "; ".join(lines[:2]) if lines else text


__all__ = ["History", "HistoryError", "KeepOnFailure", "Measurement", "open_history", "default_location",
           "hardware_info", "library_versions", "git_revision", "SCHEMA_VERSION", "MIGRATIONS"]
