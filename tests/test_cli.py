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
from accelerando.diffusion import bench_methods as diffusion_methods

runner = CliRunner()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    d = {"lm": F.make_llm_dir(root / "lm", seed=0), "draft": F.make_llm_dir(root / "draft", seed=1, hidden=16, layers=1),
         "unet": F.make_unet_dir(root / "unet"), "bert": root / "bert"}
    d["bert"].mkdir()
    (d["bert"] / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    return d


@pytest.fixture
def env(fakes, monkeypatch, models, tmp_path):
    """Fake methods (conftest), zoo names mapped to the tiny models, a tmp history."""
    zoo_map = {"code-target": models["lm"], "code-draft-small": models["draft"], "digits-unet": models["unet"]}
    from accelerando import zoo
    real_path = zoo.path
    monkeypatch.setattr(zoo, "path", lambda n: str(zoo_map[n]) if n in zoo_map else real_path(n))
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
    # fake-broken fails: every table is printed, then its full message, and the exit status is 1
    assert res.exit_code == 1, res.output
    for name in ("fake-generate (baseline)", "fake-exact", "fake-lossy", "fake-ddim", "fake-shifted"):
        assert name in res.output
    assert "exact 100%" in res.output and "failed" in res.output
    assert "fake-broken" in res.output.split("In short:")[1]
    assert "RuntimeError: this method is broken" in res.output.split("method(s) failed:")[1]
    short = res.output.split("In short:")[1].split("method(s) failed")[0]
    assert "LLM:" in short                              # which line it is depends on timings: see below
    assert "diffusion:" in short and "fewer model calls" in short   # diffusion's gain is at fewer model calls
    with open_history(env) as h:
        llm, diff = h.rows(family="llm"), h.rows(family="diffusion")
    assert sorted({r.method for r in llm}) == ["fake-exact", "fake-generate", "fake-lossy"]
    assert sorted(r.workload["steps"] for r in diff) == [2, 2, 3, 3]
    assert all(r.workload["model"] == "code-target" and r.workload["drafts"] == ["code-draft-small"] for r in llm)
    md = (tmp_path / "BENCHMARKS.md").read_text()
    assert "<!-- BEGIN demo -->" in md and "| fake-exact |" in md and "--steps 2,3" in md


def test_demo_takeaway_names_the_fastest_at_no_loss():
    from accelerando.bench.runner import RunRow

    def row(method, nfe, s, rmse, base=False):
        return RunRow(method, "diffusion", {}, {"nfe": nfe, "median_s": s, "rmse_vs_reference": rmse}, is_baseline=base)
    llm = [RunRow("generate", "llm", {}, {"speedup": 1.0, "exact_match": 1.0}, is_baseline=True),
           RunRow("typical", "llm", {}, {"speedup": 3.0, "exact_match": 0.5}),
           RunRow("spec", "llm", {}, {"speedup": 1.8, "exact_match": 1.0})]
    diff = [("10", "diffusion", [row("ddim", 10, 1.0, 0.30, True), row("f-pndm", 10, 1.0, 0.05)]),
            ("20", "diffusion", [row("ddim", 20, 2.0, 0.10, True), row("f-pndm", 20, 2.0, 0.01)])]
    lines = cli_demo.takeaway([("llm", "llm", llm)] + diff)
    assert len(lines) == 3
    assert "spec, 1.80x" in lines[0]                       # not the lossy one, though it is faster
    assert "f-pndm with 10 model calls" in lines[1] and "ddim with 20" in lines[1]
    assert "2.0x faster" in lines[1] and "2.0x fewer model calls" in lines[1]
    assert "gain is the fewer model calls" in lines[1]


def test_demo_refuses_budgets_the_unet_lacks_before_running(env):
    assert_one_line_error(invoke("demo", "--history", env, "--steps", "5,10", "--reference-steps", 5000),
                          "1000 timesteps")
    assert_one_line_error(invoke("demo", "--history", env, "--steps", "5,10", "--reference-steps", 10), "no finer")
    assert not env.exists() or open_history(env).count() == 0


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


# ----------------------------------------------------------------------------- issue 21: failures are failures

def test_bench_refuses_limits_and_knobs_before_anything_runs(env, models, tmp_path):
    h = ["--history", env]
    assert_one_line_error(invoke("bench", models["lm"], "--knob", "nosuch.k=3", *h), "nosuch", "not selected")
    assert_one_line_error(invoke("bench", models["lm"], "--methods", "fake-lossy", "--knob", "fake-exact.k=3", *h),
                          "fake-exact", "not selected")
    assert_one_line_error(invoke("bench", models["lm"], "--knob", "fake-exact.kk=3", *h), "has no knob 'kk'", "k")
    # 256 positions (bench_fakes.make_llm): refused before the baseline spends any time
    assert_one_line_error(invoke("bench", models["lm"], "--max-new-tokens", 5000, *h),
                          "max_new_tokens (5000)", "has 256")
    assert_one_line_error(invoke("bench", models["unet"], "--steps", "2000", "--reference-steps", 0, *h),
                          "2000", "1000 training timesteps")
    assert_one_line_error(invoke("bench", models["unet"], "--steps", "10", "--reference-steps", 5000, *h),
                          "--reference-steps 5000", "1000 training timesteps")
    assert_one_line_error(invoke("bench", models["unet"], "--steps", "10,20", "--reference-steps", 1, *h),
                          "--reference-steps 1", "no finer")
    assert not env.exists() or open_history(env).count() == 0


def test_bench_refuses_a_draft_with_another_vocabulary(env, models, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")
    F.make_tokenizer().save_pretrained(tmp_path / "other")
    assert_one_line_error(invoke("bench", models["lm"], "--draft", tmp_path / "other", "--methods", "fake-exact",
                                 "--history", env), "vocabulary of 300 tokens", "112")
    assert not env.exists() or open_history(env).count() == 0


def test_bench_with_a_failed_method_prints_the_table_then_the_message_and_exits_1(env, models):
    res = invoke("bench", models["lm"], "--methods", "fake-exact,fake-broken", "--max-new-tokens", 2,
                 "--repeats", 1, "--warmup", 0, "--history", env)
    assert res.exit_code == 1, res.output
    table, below = res.output.split("method(s) failed:")
    assert "fake-exact" in table and "exact 100%" in table
    assert "fake-broken: RuntimeError: this method is broken" in below
    with open_history(env) as h:                       # what did run is kept
        assert sorted(r.method for r in h.rows()) == ["fake-exact", "fake-generate"]


def test_bench_diffusion_spacing_knob(env, models, monkeypatch):
    """``--knob dpmpp-2m.spacing=leading`` used to be a TypeError (duplicate keyword)."""
    from accelerando.bench.methods import MethodEntry, register
    from accelerando.diffusion import make_schedule
    F.fresh_registry(monkeypatch)                       # the real samplers' builders, nothing else
    register(MethodEntry("ddim", "diffusion", diffusion_methods._ours("ddim"), lossless=False, is_baseline=True))
    register(MethodEntry("dpmpp-2m", "diffusion", diffusion_methods._ours("dpmpp-2m"), lossless=False))
    monkeypatch.setattr(R, "_diffusion_api", lambda: make_schedule)
    res = invoke("bench", models["unet"], "--methods", "dpmpp-2m", "--steps", "4", "--samples", 1,
                 "--reference-steps", 8, "--repeats", 1, "--knob", "dpmpp-2m.spacing=leading", "--history", env)
    assert res.exit_code == 0, res.output
    with open_history(env) as h:
        row = [r for r in h.rows() if r.method == "dpmpp-2m"][0]
    assert row.knobs == {"spacing": "leading"}
    assert_one_line_error(invoke("bench", models["unet"], "--methods", "dpmpp-2m", "--knob", "dpmpp-2m.order=3",
                                 "--history", env), "dpmpp-2m has no knob 'order'", "spacing")


def test_run_script_keeps_the_callers_directory(tmp_path):
    """``./run history export --out rel.csv`` wrote into the clone: the script changed into the
    repository root. The accelerando command now runs where it was called (``./run test`` still
    runs from the root). A stand-in repository with a fake installed command records its cwd."""
    import shutil
    import subprocess
    from pathlib import Path
    repo = tmp_path / "clone"
    (repo / ".venv" / "bin").mkdir(parents=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "run", repo / "run")
    (repo / "pyproject.toml").write_text("")
    for exe in ("python", "accelerando"):
        f = repo / ".venv" / "bin" / exe
        f.write_text('#!/bin/sh\necho "cwd=$(pwd) args=$*"\n')
        f.chmod(0o755)
    (repo / ".venv" / ".accelerando-installed").touch()
    os.utime(repo / "pyproject.toml", (1, 1))                # the install stamp is newer: no pip
    work = tmp_path / "work"
    work.mkdir()
    out = subprocess.run(["../clone/run", "history", "export", "--out", "rel.csv"], cwd=work,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"cwd={work} args=history export --out rel.csv"


def test_zoo_list_and_info_show_the_medusa_heads():
    res = invoke("zoo", "list")
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if "code-target-medusa" in x)
    assert "medusa" in line.replace("code-target-medusa", "") and "yes" in line
    res = invoke("zoo", "info", "code-target-medusa")
    assert res.exit_code == 0 and '"role": "medusa"' in res.output and "code-target-medusa" in res.output
    assert_one_line_error(invoke("zoo", "train", "code-target-medusa"), "medusa train")
    assert_one_line_error(invoke("bench", "code-target-medusa"), "Medusa heads for code-target", "not a model")


def test_medusa_train_refuses_zero_steps(tmp_path):
    res = invoke("medusa", "train", "--steps", 0, "--out", tmp_path / "h")
    assert res.exit_code == 2 and "--steps" in res.output + res.stderr and "Traceback" not in res.output
    assert not (tmp_path / "h").exists()


def test_history_since_parses_dates_and_ages_or_refuses(env):
    from datetime import datetime, timedelta, timezone
    from accelerando.cli.history import parse_since
    now = datetime(2026, 12, 3, 8, 30, tzinfo=timezone.utc)
    assert parse_since("yesterday", now=now) == datetime(2026, 12, 2, tzinfo=timezone.utc)
    assert parse_since("today", now=now) == datetime(2026, 12, 3, tzinfo=timezone.utc)
    assert parse_since("12h", now=now) == now - timedelta(hours=12)
    assert parse_since("2026-11-28T17:00", now=now) == datetime(2026, 11, 28, 17, tzinfo=timezone.utc)
    _fill(env)                                              # rows stamped now
    res = invoke("history", "list", "--since", "yesterday", "--history", env)
    assert res.exit_code == 0 and "spec" in res.output and "ddim" in res.output
    res = invoke("history", "list", "--since", "1h", "--history", env)
    assert res.exit_code == 0 and "spec" in res.output
    res = invoke("history", "list", "--since", "2999-01-01", "--history", env)
    assert res.exit_code == 0 and "match" in res.output
    assert_one_line_error(invoke("history", "list", "--since", "last tuesday", "--history", env),
                          "--since 'last tuesday' is not a date", "yesterday")


def test_medusa_train_on_a_random_spec_writes_readable_weights(tmp_path):
    """`medusa train` resolves its target like every command (here a rand-llama spec), and the
    weights it writes are 0644 under umask 022 (safetensors created them 0600)."""
    from accelerando.llm.drafters import Medusa
    text = tmp_path / "a.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 200)
    old = os.umask(0o022)
    try:
        res = invoke("medusa", "train", "--target", "rand-llama-h32-l1-v100-s0", "--data", text, "--out", tmp_path / "h",
                     "--steps", 3, "--heads", 2, "--batch-tokens", 64, "--tree-nodes", 2)
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "h" / "medusa.safetensors").stat().st_mode & 0o777 == 0o644
    assert Medusa.load(tmp_path / "h").config.n_heads == 2


def test_results_table_keeps_not_applicable_rows_short():
    from rich.console import Console
    from accelerando.bench.runner import RunRow
    from accelerando.cli.tables import results_table
    rows = [RunRow("prk", "diffusion", {}, error="n/a: prk needs at least 3 steps = 11 model calls: a Runge-Kutta "
                   "step across a third or more of the interval is unstable", not_applicable=True)]
    con = Console(width=200, record=True)
    con.print(results_table("t", "diffusion", rows))
    text = con.export_text()
    assert "prk needs at least 3 steps = 11 model calls" in text and "Runge-Kutta" not in text
