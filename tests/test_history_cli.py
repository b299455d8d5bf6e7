"""What a user sees when the history cannot take the rows (issue 21, item 4): an unwritable
history is found before anything is measured; a write that fails after the measurement keeps
the rows (saved elsewhere, the place named) and the results are printed all the same."""

import pytest
from typer.testing import CliRunner

import bench_fakes as F
from accelerando import cli
from accelerando.bench import history as H
from accelerando.bench import runner as R
from accelerando.bench.history import HistoryError, open_history


@pytest.fixture
def unet(monkeypatch, tmp_path):
    F.fresh_registry(monkeypatch)
    F.register_fake_diffusion()
    monkeypatch.setattr(R, "_diffusion_api", lambda: F.fake_make_schedule)
    monkeypatch.delenv("ACCELERANDO_HISTORY", raising=False)
    monkeypatch.delenv("ACCELERANDO_DEBUG", raising=False)
    return F.make_unet_dir(tmp_path / "unet")


def bench(*args):
    return CliRunner().invoke(cli.get_app(), ["bench", *map(str, args), "--steps", "2", "--samples", "2",
                                              "--reference-steps", "3", "--repeats", "1"])


def test_read_only_history_is_refused_before_measuring(unet, tmp_path, monkeypatch):
    path = tmp_path / "h.sqlite"
    with open_history(path):
        pass
    ran = []
    monkeypatch.setattr(R, "run_methods", lambda *a, **k: ran.append(1) or [])
    res = bench(unet, "--history", f"sqlite:///file:{path}?mode=ro&uri=true")
    assert res.exit_code == 1 and not ran
    (err,) = res.stderr.strip().splitlines()
    assert "not writable" in err and "nothing was measured" in err and "--history" in err


def test_failed_write_keeps_rows_and_prints_results(unet, tmp_path, monkeypatch):
    import tempfile
    target = str(tmp_path / "h.sqlite")
    real = H.History.record_many

    def gone(self, ms):          # the store passes the check, then goes away mid-run
        if self.location == target:
            raise HistoryError(f"could not write to history {self.location}: server closed the connection")
        return real(self, ms)
    monkeypatch.setattr(H.History, "record_many", gone)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    res = bench(unet, "--history", target)
    assert res.exit_code == 1
    assert "fake-shifted" in res.stdout                     # the table is printed
    (err,) = res.stderr.strip().splitlines()
    assert "server closed the connection" in err and "saved to" in err
    saved = err.split("saved to ")[1].split(" ")[0]
    monkeypatch.undo()
    with open_history(saved) as h:
        assert sorted(r.method for r in h.rows()) == ["fake-ddim", "fake-shifted"]


def test_history_folder_that_does_not_exist(unet, tmp_path):
    res = CliRunner().invoke(cli.get_app(), ["history", "list", "--history", str(tmp_path / "nope" / "h.sqlite")])
    assert res.exit_code == 1 and "does not exist" in res.stderr and not (tmp_path / "nope").exists()
