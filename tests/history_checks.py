"""Checks shared by the SQLite and PostgreSQL history tests."""

from accelerando.bench.history import Measurement, open_history

FIXED = dict(hardware={"cpu": "test", "cores": 1}, versions={"torch": "x"}, git_revision="abc")


def _writer(location, tag, n):
    with open_history(location) as h:
        for i in range(n):
            h.record(Measurement({"family": "llm"}, tag, {"i": i}, {"v": i}, **FIXED))


def assert_concurrent_writers_lose_nothing(location, ctx, n=25):
    """Two processes (from multiprocessing context `ctx`) each write n rows one by one to the same
    store; afterwards every row of both is there, exactly once."""
    procs = [ctx.Process(target=_writer, args=(location, tag, n)) for tag in ("p1", "p2")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with open_history(location) as h:
        rows = h.rows()
    assert len(rows) == 2 * n
    for tag in ("p1", "p2"):
        assert sorted(r.knobs["i"] for r in rows if r.method == tag) == list(range(n))
