"""The CLI end to end with typer's CliRunner: every command's success path and its bad-input
errors (one line on stderr, exit status 1, no traceback, files left untouched)."""

import json
import os
import sys
import types

import pytest
import typer
from typer.testing import CliRunner

import bench_fakes as F
from accelerando import cli
from accelerando.cli import demo as cli_demo
from accelerando.bench import runner as R
from accelerando.bench.history import Measurement, open_history

runner = CliRunner()


@pytest.fixture(autouse=True)
def _single_thread():
    yield from F.one_thread()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    d = {"lm": F.make_llm_dir(root / "lm", seed=0), "draft": F.make_llm_dir(root / "draft", seed=1, hidden=16, layers=1),
         "unet": F.make_unet_dir(root / "unet"), "bert": root / "bert"}
    d["bert"].mkdir()
    (d["bert"] / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    return d


@pytest.fixture
def env(monkeypatch, models, tmp_path):
    """Fake methods, zoo names mapped to the tiny models, the fake schedule, a tmp history."""
    F.fresh_registry(monkeypatch)
    F.register_fake_llm()
    F.register_fake_diffusion()
    zoo_map = {"code-target": models["lm"], "code-draft-small": models["draft"], "digits-unet": models["unet"]}
    real_resolve = R.resolve_model_dir
    monkeypatch.setattr(R, "resolve_model_dir", lambda n: zoo_map[n] if n in zoo_map else real_resolve(n))
    monkeypatch.setattr(R, "_diffusion_api", lambda: F.fake_make_schedule)
    monkeypatch.setattr(cli_demo, "_zoo_has", lambda n: n in zoo_map)
    monkeypatch.delenv("ACCELERANDO_HISTORY", raising=False)
    monkeypatch.delenv("ACCELERANDO_DEBUG", raising=False)
    return tmp_path / "h.sqlite"


def invoke(*args, **kw):
    return runner.invoke(cli.get_app(), [str(a) for a in args], **kw)


def assert_one_line_error(res, *needles):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), res.stderr
    for n in needles:
        assert n in err[0], err[0]


@pytest.mark.parametrize("args", [[], ["demo"], ["bench"], ["history"], ["history", "list"],
                                  ["history", "export"], ["zoo", "list"], ["zoo", "info"], ["zoo", "train"]])
def test_help(args):
    res = invoke(*args, "--help")
    assert res.exit_code == 0 and "Usage" in res.output


def test_demo_runs_both_families_and_stores_rows(env, monkeypatch, tmp_path):
    from accelerando.bench import report
    monkeypatch.setattr(report, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    res = invoke("demo", "--history", env, "--max-new-tokens", 4, "--steps", "2,3", "--samples", 2,
                 "--reference-steps", 4, "--repeats", 1, "--write-benchmarks")
    assert res.exit_code == 0, res.output
    for name in ("fake-generate (baseline)", "fake-exact", "fake-lossy", "fake-ddim", "fake-shifted"):
        assert name in res.output
    assert "exact 100%" in res.output and "failed" in res.output and "RuntimeError" in res.output
    with open_history(env) as h:
        llm, diff = h.rows(family="llm"), h.rows(family="diffusion")
    assert sorted({r.method for r in llm}) == ["fake-exact", "fake-generate", "fake-lossy"]
    assert sorted(r.workload["steps"] for r in diff) == [2, 2, 3, 3]
    assert all(r.workload["model"] == "code-target" and r.workload["drafts"] == ["code-draft-small"] for r in llm)
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- BEGIN demo -->" in md and "| fake-exact |" in md and "--steps 2,3" in md


def test_demo_degrades_without_methods_or_models(env, monkeypatch):
    F.fresh_registry(monkeypatch)                      # nothing registered
    res = invoke("demo", "--history", env)
    assert res.exit_code == 0 and "no methods registered yet" in res.output
    F.register_fake_llm()
    monkeypatch.setattr(cli_demo, "_zoo_has", lambda n: False)
    res = invoke("demo", "--history", env, "--family", "llm")
    assert res.exit_code == 0 and "not available yet" in res.output


def test_bench_llm_with_prompts_and_draft(env, models, tmp_path):
    (tmp_path / "p.txt").write_text("def add(a, b):\nclass Stack:\n")
    res = invoke("bench", models["lm"], "--draft", models["draft"], "--methods", "fake-exact",
                 "--prompts", tmp_path / "p.txt", "--max-new-tokens", 3, "--batch-size", 2,
                 "--repeats", 1, "--warmup", 0, "--knob", "fake-exact.k=2", "--history", env)
    assert res.exit_code == 0, res.output
    with open_history(env) as h:
        rows = h.rows()
    assert [r.method for r in rows] == ["fake-generate", "fake-exact"]
    assert rows[1].knobs == {"k": 2} and rows[1].metrics["exact_match"] == 1.0
    assert rows[1].workload["batch_size"] == 2 and rows[1].workload["prompts_file"] == "p.txt"
    assert rows[1].workload["drafts"] == [str(models["draft"])]
    (tmp_path / "p.json").write_text(json.dumps(["x = [", "for i in"]))
    res = invoke("bench", models["lm"], "--prompts", tmp_path / "p.json", "--max-new-tokens", 2,
                 "--repeats", 1, "--methods", "fake-lossy", "--history", env)
    assert res.exit_code == 0, res.output
    assert "fake-lossy" in res.output


def test_bench_diffusion(env, models):
    res = invoke("bench", models["unet"], "--steps", "2", "--samples", 2, "--reference-steps", 3,
                 "--repeats", 1, "--history", env)
    assert res.exit_code == 0, res.output
    with open_history(env) as h:
        rows = h.rows(family="diffusion")
    assert [r.method for r in rows] == ["fake-ddim", "fake-shifted"]
    assert rows[1].metrics["rmse_vs_baseline"] == pytest.approx(0.25, rel=1e-4)


def test_bench_bad_input(env, models, tmp_path):
    h = ["--history", env]
    assert_one_line_error(invoke("bench", tmp_path / "missing", *h), "no model directory", "missing")
    assert_one_line_error(invoke("bench", models["lm"], "--methods", "nope", *h),
                          "unknown method 'nope'", "fake-exact")
    assert_one_line_error(invoke("bench", models["lm"], "--methods", "fake-ddim", *h), "diffusion method")
    assert_one_line_error(invoke("bench", models["bert"], *h), "not a causal LM or a diffusers UNet", "BertModel")
    assert_one_line_error(invoke("bench", models["lm"], "--draft", models["unet"], *h), "not a causal LM")
    assert_one_line_error(invoke("bench", models["lm"], "--prompts", tmp_path / "nope.txt", *h), "does not exist")
    (tmp_path / "bad.json").write_text('["unterminated')
    assert_one_line_error(invoke("bench", models["lm"], "--prompts", tmp_path / "bad.json", *h), "not valid")
    assert_one_line_error(invoke("bench", models["unet"], "--prompts", tmp_path / "bad.json", *h), "causal LMs")
    assert_one_line_error(invoke("bench", models["lm"], "--knob", "nonsense", *h), "METHOD.NAME=VALUE")
    assert not env.exists() or open_history(env).count() == 0


def _fill(path):
    with open_history(path) as h:
        h.record_many([
            Measurement({"family": "llm", "model": "code-target"}, "spec", {"k": 4},
                        {"median_s": 0.5, "speedup": 2.0, "exact_match": 1.0}),
            Measurement({"family": "diffusion", "model": "digits-unet", "steps": 10}, "ddim", {},
                        {"median_s": 0.1, "rmse_vs_reference": 0.05}),
        ])


def test_history_list_and_export(env, tmp_path):
    _fill(env)
    res = invoke("history", "list", "--history", env)
    assert res.exit_code == 0 and "spec" in res.output and "ddim" in res.output and "2.00x" in res.output
    res = invoke("history", "list", "--history", env, "--family", "diffusion")
    assert res.exit_code == 0 and "ddim" in res.output and "spec" not in res.output
    res = invoke("history", "list", "--history", env, "--method", "nothing")
    assert res.exit_code == 0 and "match" in res.output
    res = invoke("history", "export", "--history", env, "--format", "csv", "--out", tmp_path / "o.csv")
    assert res.exit_code == 0 and "wrote 2 row(s)" in res.output
    import pandas as pd
    assert list(pd.read_csv(tmp_path / "o.csv")["method"]) == ["spec", "ddim"]
    res = invoke("history", "export", "--history", env, "--format", "parquet", "--out", tmp_path / "o.pq",
                 "--method", "spec")
    assert res.exit_code == 0 and list(pd.read_parquet(tmp_path / "o.pq")["method"]) == ["spec"]
    assert_one_line_error(invoke("history", "export", "--history", env, "--format", "xls", "--out",
                                 tmp_path / "o.xls"), "csv or parquet")


def test_history_location_from_root_option_and_env(env, monkeypatch):
    _fill(env)
    res = invoke("--history", env, "history", "list")
    assert res.exit_code == 0 and "spec" in res.output
    monkeypatch.setenv("ACCELERANDO_HISTORY", str(env))
    res = invoke("history", "list")
    assert res.exit_code == 0 and "spec" in res.output and str(env) in res.output.replace("\n", "")


def test_corrupt_and_foreign_history_are_one_line_errors(env, tmp_path, models):
    bad = tmp_path / "bad.sqlite"
    data = os.urandom(2048)
    bad.write_bytes(data)
    for args in (["history", "list"], ["demo"], ["bench", models["lm"]],
                 ["history", "export", "--out", tmp_path / "x.csv"]):
        assert_one_line_error(invoke(*args, "--history", bad), "not an SQLite database")
    assert bad.read_bytes() == data
    import sqlite3
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE photos (id INTEGER)")
    con.commit()
    con.close()
    before = foreign.read_bytes()
    assert_one_line_error(invoke("history", "list", "--history", foreign), "something else", "photos")
    assert foreign.read_bytes() == before


def test_zoo_commands(monkeypatch, tmp_path):
    from accelerando import zoo
    cards = {"code-target": {"role": "target", "parameters": 1234567}, "digits-unet": {"role": "unet"}}
    monkeypatch.setattr(zoo, "names", lambda: list(cards), raising=False)
    monkeypatch.setattr(zoo, "card", lambda n: cards[n], raising=False)
    monkeypatch.setattr(zoo, "path", lambda n: tmp_path / n, raising=False)
    calls = []
    fake_train = types.ModuleType("accelerando.zoo.train")

    def train(name, *, seed=0, steps=None, out_dir=None, progress=None):
        progress(1, 2)
        calls.append((name, seed, steps, out_dir))
        return {"role": "unet", "metrics": {"heldout_loss": 0.125}}
    fake_train.train = train
    monkeypatch.setitem(sys.modules, "accelerando.zoo.train", fake_train)

    res = invoke("zoo", "list")
    assert res.exit_code == 0 and "code-target" in res.output and "1,234,567" in res.output
    res = invoke("zoo", "info", "code-target")
    assert res.exit_code == 0 and '"role": "target"' in res.output
    res = invoke("zoo", "train", "digits-unet", "--seed", 3, "--steps", 5, "--out-dir", tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert calls == [("digits-unet", 3, 5, tmp_path / "o")]
    assert "heldout_loss 0.125" in res.output
    assert_one_line_error(invoke("zoo", "info", "nope"), "unknown zoo model 'nope'", "code-target")
    assert_one_line_error(invoke("zoo", "train", "nope"), "unknown zoo model")


def test_every_command_is_mounted():
    res = invoke("--help")
    assert res.exit_code == 0
    for name in ("demo", "bench", "recommend", "sweep", "history", "zoo", "select", "medusa"):
        assert name in res.output


def test_a_command_module_that_fails_to_import_fails_the_cli():
    """Sub-commands are imported directly: a broken module is an ImportError, not a missing command."""
    import subprocess
    code = ("import sys; sys.modules['accelerando.llm.medusa_cli'] = None\n"
            "try:\n    import accelerando.cli\nexcept ImportError as e:\n    print('ImportError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ})
    assert out.stdout.startswith("ImportError"), out.stdout + out.stderr


def test_a_command_error_is_one_line():
    fresh = typer.Typer(cls=cli.Group, no_args_is_help=True)

    @fresh.command()
    def recommend():
        raise cli.CLIError("no history yet")

    @fresh.command()
    def other():
        pass
    assert_one_line_error(runner.invoke(fresh, ["recommend"]), "no history yet")
