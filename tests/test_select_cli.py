"""recommend (library + CLI), select evaluate, sweep — on fake methods and tiny random models."""

from __future__ import annotations

import gzip
import json

import pytest
from typer.testing import CliRunner

import bench_fakes as F
from accelerando import cli
from accelerando.bench.history import Measurement, open_history
from accelerando.select import recommend as RC
from accelerando.select.table import Constraint
from test_select import _synthetic_history

runner = CliRunner()
LM = "rand-llama-h32-l1-v100-s0"
DRAFT = "rand-llama-h32-l1-v100-s1"


@pytest.fixture
def env(fakes, monkeypatch, tmp_path):
    monkeypatch.setattr(RC, "BUNDLED", tmp_path / "none.jsonl.gz")     # no bundled data in these tests
    monkeypatch.setattr(RC, "load_bundled", lambda path=None: [])
    monkeypatch.delenv("ACCELERANDO_HISTORY", raising=False)
    monkeypatch.delenv("ACCELERANDO_DEBUG", raising=False)
    return tmp_path / "h.sqlite"


def invoke(*args):
    return runner.invoke(cli.get_app(), [str(a) for a in args])


def _store(path, rows):
    with open_history(path) as h:
        h.record_many([Measurement(workload=r["workload"], method=r["method"], knobs=r["knobs"],
                                   metrics=r["metrics"], run_id=r["run_id"]) for r in rows])


def test_recommend_falls_back_without_history(env):
    rec = RC.recommend({"family": "llm", "features": {"rep3": 0.0}}, [])
    assert rec.fallback and rec.choice.arm == "fake-generate"
    assert "not enough to learn from" in rec.notes[0]


def test_recommend_ranks_by_features_from_a_history(env):
    rows = _synthetic_history(30)
    key = {"family": "llm", "drafts": ["d"], "temperature": 0.0,
           "features": {"rep3": 0.95, "draft_ratio": 0.8, "log_params": 6.0}}
    rec = RC.recommend(key, rows, registered_only=False)
    assert not rec.fallback and rec.choice.arm == "lookup" and rec.choice.speedup > 1.5
    assert len(rec.runners_up) == 2 and "lossy" not in [p.arm for p in rec.ranked]
    key["features"].update(rep3=0.05, draft_ratio=0.05)
    assert RC.recommend(key, rows, registered_only=False).choice.arm == "draft[k=4]"
    lossy = RC.recommend(key, rows, constraint=Constraint(0.05), registered_only=False)
    assert lossy.choice.arm == "lossy"                 # greedy: loss 0.02 fits the budget


def test_bundled_round_trip(tmp_path):
    rows = _synthetic_history(3)
    assert RC.save_bundled(rows, tmp_path / "b.jsonl.gz") == len(rows)
    assert RC.load_bundled(tmp_path / "b.jsonl.gz") == json.loads(json.dumps(rows))
    assert RC.load_bundled(tmp_path / "absent.gz") == []


def test_cli_recommend_fallback_then_verify_learns(env):
    res = invoke("--history", env, "recommend", LM, "--task", "refactor this code", "--max-new-tokens", 4)
    assert res.exit_code == 0, res.output
    assert "not enough to learn from" in " ".join(res.output.split()) and "recommended: fake-generate" in res.output
    res = invoke("--history", env, "recommend", LM, "--draft", DRAFT, "--max-new-tokens", 4, "--verify")
    assert res.exit_code == 0, res.output
    assert "on the model's own first tokens: prompt-lookup acceptance" in " ".join(res.output.split())
    with open_history(env) as h:
        rows = h.rows()
    assert rows and all(r.workload["features"]["draft_ratio"] == 1.0 for r in rows)
    # the continuation probe's facts are stored with the workload (a different random draft: < 1)
    assert all(0.0 <= r.workload["features"]["gen_draft_alpha"] < 1.0 for r in rows)
    assert {r.method for r in rows} == {"fake-generate"}     # the fallback's only candidate


def test_cli_select_evaluate_on_a_history(env, tmp_path):
    _store(env, _synthetic_history(12))
    out = tmp_path / "eval.json"
    res = invoke("--history", env, "select", "evaluate", "--models", "knn", "--scheme", "workload",
                 "--max-loss", 0.05, "--out", out)
    assert res.exit_code == 0, res.output
    assert "leave-one-workload-out" in res.output and "closed gap" in res.output
    data = json.loads(out.read_text())
    assert {d["policy"] for d in data} == {"knn", "sbs", "random"}
    assert {d["constraint"] for d in data} == {"lossless", "loss<=0.05"}
    assert all(d["n"] == 12 for d in data)


def test_cli_bad_inputs(env):
    res = invoke("--history", env, "select", "evaluate")
    assert res.exit_code == 1 and "no measured workloads" in res.stderr
    res = invoke("--history", env, "recommend", LM, "--max-loss", -1)
    assert res.exit_code == 1 and "max_loss" in res.stderr
    res = invoke("--history", env, "recommend", LM, "--selector", "oracle")
    assert res.exit_code == 1 and "unknown selector" in res.stderr


def test_cli_sweep_small_grid(env, monkeypatch):
    from accelerando.select import sweep as S
    from accelerando.bench.workloads import LLMWorkload
    wl = [LLMWorkload(model=LM, drafts=(DRAFT,), prompts=("a b a b a b",), max_new_tokens=3)]
    asked = []

    def grid(n, seed=0, zoo_names=None):
        asked.append(zoo_names)
        return wl[:n]
    monkeypatch.setattr(S, "llm_grid", grid)
    monkeypatch.setattr(S, "diffusion_grid", lambda n, seed=0, zoo_names=None: [])
    res = invoke("--history", env, "sweep", "--llm", 1, "--diffusion", 0, "--repeats", 1,
                 "--methods", "fake-exact,fake-lossy")
    assert res.exit_code == 0, res.output
    assert "[1/1]" in res.output and "1 workloads measured" in res.output
    invoke("--history", env, "sweep", "--no-zoo", "--llm", 1, "--diffusion", 0, "--methods", "fake-exact")
    assert asked == [None, []]             # the zoo's models by default; --no-zoo: random-init only
    res = invoke("--history", env, "sweep", "--llm", 1, "--diffusion", 0, "--methods", "fake-exact,fake-lossy")
    assert "0 workloads measured" in res.output and "1 already in the history" in res.output


def test_cli_sweep_bundle_adds_to_the_bundled_rows(env, monkeypatch, tmp_path):
    """--bundle adds the swept rows to the bundled file; the rows it held stay (it used to replace them)."""
    from accelerando.select import sweep as S
    from accelerando.bench.workloads import LLMWorkload
    wl = [LLMWorkload(model=LM, drafts=(DRAFT,), prompts=("a b a b a b",), max_new_tokens=3)]
    monkeypatch.setattr(S, "llm_grid", lambda n, seed=0, zoo_names=None: wl[:n])
    monkeypatch.setattr(S, "diffusion_grid", lambda n, seed=0, zoo_names=None: [])
    bundled = tmp_path / "bundled.jsonl.gz"
    old = {"workload": {"family": "llm", "model": "m-old"}, "method": "fake-exact", "knobs": {},
           "run_id": "old-run", "metrics": {"speedup": 1.5}, "family": "llm"}
    RC.save_bundled([old], bundled)
    monkeypatch.setattr(RC, "BUNDLED", bundled)

    def read(path=None):
        with gzip.open(path or bundled, "rt", encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    monkeypatch.setattr(RC, "load_bundled", read)      # the env fixture hides the bundled rows
    res = invoke("--history", env, "sweep", "--llm", 1, "--diffusion", 0, "--repeats", 1,
                 "--methods", "fake-exact", "--bundle")
    assert res.exit_code == 0, res.output
    rows = read()
    assert rows[0]["run_id"] == "old-run" and len(rows) > 1
    assert {r["method"] for r in rows[1:]} >= {"fake-exact"}
    n = len(rows)
    res = invoke("--history", env, "sweep", "--llm", 1, "--diffusion", 0, "--methods", "fake-exact", "--bundle")
    assert "added 0 rows" in res.output and len(read()) == n     # nothing twice


def test_cli_recommend_diffusion_verify(env):
    res = invoke("--history", env, "recommend", "rand-unet-c8x16-i8-s0", "--steps", 4, "--batch", 1,
                 "--max-loss", 0.5, "--verify")
    assert res.exit_code == 0, res.output
    assert "recommended: fake-ddim" in res.output and "loss<=0.5" in res.output
    with open_history(env) as h:
        rows = h.rows()
    assert rows and rows[0].family == "diffusion" and rows[0].metrics["is_baseline"]
    assert rows[0].workload["features"]["image_size"] == 8


def test_methods_that_need_a_draft_are_not_offered_without_one(env):
    from accelerando.bench import methods as registry
    from accelerando.bench.methods import MethodEntry
    registry.register(MethodEntry("draft-user", "llm", lambda s, draft=None: None, lossless=True))
    registry.register(MethodEntry("knob-draft", "llm", lambda s, **kw: None, lossless=True, default_knobs={"draft": None}))
    assert RC.needs_draft("draft-user") and RC.needs_draft("knob-draft")
    assert not RC.needs_draft("fake-exact") and not RC.needs_draft("not-registered")
    rows = []
    for i, (name, s) in enumerate([("draft-user", 3.0), ("fake-exact", 1.5)] * 6):
        wl = {"family": "llm", "model": f"m{i}", "drafts": ["d"], "prompts_digest": str(i)}
        rows += [_r(wl, "fake-generate", 1.0, True, f"r{i}"), _r(wl, name, s, False, f"r{i}")]
    with_draft = RC.recommend({"family": "llm", "drafts": ["d"], "features": {}}, rows)
    without = RC.recommend({"family": "llm", "drafts": [], "features": {}}, rows)
    assert with_draft.choice.arm == "draft-user"
    assert without.choice.arm == "fake-exact" and "draft-user" not in [p.arm for p in without.ranked]


def _r(wl, method, s, base, run):
    return {"workload": wl, "method": method, "knobs": {}, "run_id": run,
            "metrics": {"speedup": s, "lossless": True, "is_baseline": base}}


def test_cli_sweep_retime_then_resume_and_bundle(env, monkeypatch, tmp_path):
    from accelerando.select import sweep as S
    from accelerando.bench.workloads import DiffusionWorkload
    wl = [DiffusionWorkload(model="rand-unet-c8x16-i8-s0", steps=4, batch=1)]
    monkeypatch.setattr(S, "llm_grid", lambda n, seed=0, zoo_names=None: [])
    monkeypatch.setattr(S, "diffusion_grid", lambda n, seed=0, zoo_names=None: wl[:n])
    res = invoke("--history", env, "sweep", "--llm", 0, "--diffusion", 1, "--repeats", 1)
    assert res.exit_code == 0 and "1 workloads measured" in res.output, res.output
    res = invoke("--history", env, "sweep", "--retime", "--llm", 0, "--diffusion", 1, "--rounds", 2, "--bundle")
    assert res.exit_code == 0, res.output
    assert "1 workloads re-timed" in res.output and "[1/1]" in res.output
    with open_history(env) as h:
        new = [m for m in h.rows() if m.metrics.get("timing") == "interleaved"]
        swept = h.count() - len(new)
    assert len(new) == swept and all(len(m.metrics["speedup_rounds"]) == 2 for m in new)
    assert len(_read_gz(RC.BUNDLED)) == len(new)           # the env fixture points BUNDLED at tmp_path
    res = invoke("--history", env, "sweep", "--retime", "--llm", 0, "--diffusion", 1, "--rounds", 2)
    assert "0 workloads re-timed" in res.output and "1 already re-timed" in res.output


def _read_gz(path):
    import gzip
    with gzip.open(path, "rt") as fh:
        return [json.loads(x) for x in fh if x.strip()]


def test_cli_sweep_retime_llm_with_max_minutes_and_bundle(env, monkeypatch):
    from accelerando.select import sweep as S
    from accelerando.bench.workloads import LLMWorkload
    wl = [LLMWorkload(model=LM, drafts=(DRAFT,), prompts=("ab ab ab ab",), max_new_tokens=4, seed=0)]
    monkeypatch.setattr(S, "llm_grid", lambda n, seed=0, zoo_names=None: wl[:n])
    monkeypatch.setattr(S, "diffusion_grid", lambda n, seed=0, zoo_names=None: [])
    res = invoke("--history", env, "sweep", "--llm", 1, "--diffusion", 0, "--repeats", 1,
                 "--methods", "fake-exact")
    assert res.exit_code == 0 and "1 workloads measured" in res.output, res.output
    res = invoke("--history", env, "sweep", "--retime", "--llm", 1, "--diffusion", 0, "--rounds", 2,
                 "--max-minutes", 5, "--bundle")
    assert res.exit_code == 0, res.output
    assert "retime llm: 1 workloads re-timed" in res.output and "retime diffusion" not in res.output
    with open_history(env) as h:
        new = [m for m in h.rows() if m.metrics.get("timing") == "interleaved"]
    # the baseline and fake-exact, checked token for token
    assert len(new) == 2 and all(m.metrics.get("lossless_verified") for m in new if not m.metrics["is_baseline"])
    assert len(_read_gz(RC.BUNDLED)) == 2
    res = invoke("--history", env, "sweep", "--retime", "--llm", 1, "--diffusion", 0, "--rounds", 2)
    assert "0 workloads re-timed" in res.output and "1 already re-timed" in res.output


def test_cli_recommend_says_when_near_ties_rank_by_quality_slack(env, monkeypatch):
    """qkernel-cv counts speed-ups within 5% of the fastest as equal and ranks those by quality
    slack, so a slower arm can rank first: the table says why."""
    from test_select import _tie_history
    from accelerando.bench import methods as registry
    from accelerando.bench.methods import MethodEntry
    for name in ("ddim", "a", "b"):
        registry.register(MethodEntry(name, "diffusion", lambda s, **kw: None, lossless=False, is_baseline=name == "ddim"))
    monkeypatch.setattr(RC, "load_bundled", lambda path=None: _tie_history(1.94, fast_ratio=0.9))
    res = invoke("--history", env, "recommend", "rand-unet-c8x16-i8-s0", "--steps", 16, "--batch", 1,
                 "--max-loss", 0)
    assert res.exit_code == 0, res.output
    assert "qkernel-cv" in res.output and "recommended: b " in res.output
    assert "within timing noise of the fastest" in " ".join(res.output.split())


# ----------------------------------------------------------------------------- issue 21: the user's exact paths

@pytest.mark.slow
def test_readme_recommend_on_the_zoo_unet(monkeypatch, tmp_path):
    """`accelerando recommend digits-unet --steps 20 --max-loss 0.25`, as the README writes it, on
    the bundled history (it failed with 'too many values to unpack')."""
    monkeypatch.delenv("ACCELERANDO_HISTORY", raising=False)
    res = invoke("--history", tmp_path / "h.sqlite", "recommend", "digits-unet", "--steps", 20, "--max-loss", 0.25)
    assert res.exit_code == 0, res.output + res.stderr
    assert "workload: diffusion digits-unet" in res.output and "recommended:" in res.output


def test_recommend_on_a_local_unet_directory(env, tmp_path):
    unet = F.make_unet_dir(tmp_path / "my-unet")
    res = invoke("--history", env, "recommend", unet, "--steps", 8)
    assert res.exit_code == 0, res.output + res.stderr
    assert "workload: diffusion" in res.output and "recommended:" in res.output


def test_sweep_measures_a_zoo_unet_workload(env, monkeypatch, tmp_path):
    """The sweep used to drop every zoo-UNet workload ('0 workloads measured') and exit 0."""
    from accelerando import zoo
    from accelerando.bench.workloads import DiffusionWorkload
    from accelerando.select import sweep as S
    unet = F.make_unet_dir(tmp_path / "unet")
    real_path = zoo.path
    monkeypatch.setattr(zoo, "path", lambda n: str(unet) if n == "digits-unet" else real_path(n))
    monkeypatch.setattr(S, "llm_grid", lambda n, seed=0, zoo_names=None: [])
    monkeypatch.setattr(S, "diffusion_grid",
                        lambda n, seed=0, zoo_names=None: [DiffusionWorkload("digits-unet", steps=4, batch=1)][:n])
    res = invoke("--history", env, "sweep", "--llm", 0, "--diffusion", 1, "--repeats", 1, "--reference-steps", 8)
    assert res.exit_code == 0, res.output
    assert "1 workloads measured" in res.output


def test_sweep_with_a_failed_workload_exits_nonzero(env, monkeypatch):
    from accelerando.bench.workloads import DiffusionWorkload
    from accelerando.select import sweep as S
    monkeypatch.setattr(S, "llm_grid", lambda n, seed=0, zoo_names=None: [])
    monkeypatch.setattr(S, "diffusion_grid",
                        lambda n, seed=0, zoo_names=None: [DiffusionWorkload("no-such-unet", steps=4, batch=1)][:n])
    res = invoke("--history", env, "sweep", "--llm", 0, "--diffusion", 1, "--repeats", 1)
    assert res.exit_code == 1, res.output
    assert "no-such-unet" in res.output and "0 workloads measured" in res.output


def test_no_arm_predicted_slower_than_the_baseline_ranks_above_it(env, monkeypatch):
    """The baseline (speed-up 1, always allowed) ranked below an arm predicted at 0.59x."""
    from accelerando.select import models as SM
    from accelerando.select.models import Prediction
    rows = []
    for i in range(12):
        wl = {"family": "llm", "model": f"m{i}", "drafts": ["d"], "prompts_digest": str(i)}
        rows += [_r(wl, "fake-generate", 1.0, True, f"r{i}"), _r(wl, "fake-exact", 0.59, False, f"r{i}"),
                 _r(wl, "fake-lossy", 1.6, False, f"r{i}")]
    real = SM.make_selector

    def slow_first(name, **kw):
        sel = real(name, **kw)
        rank = sel.rank
        # a selector whose score disagrees with its own speed-up prediction (pairwise wins, tie rules)
        sel.rank = lambda *a, **k: sorted(rank(*a, **k), key=lambda p: p.arm != "fake-exact")
        return sel
    monkeypatch.setattr(RC, "make_selector", slow_first)
    rec = RC.recommend({"family": "llm", "drafts": ["d"], "features": {}}, rows)
    order = [p.arm for p in rec.ranked]
    assert order.index("fake-generate") < order.index("fake-exact")
    assert order[0] == "fake-lossy"                    # a faster arm stays above the baseline
    nan = float("nan")
    preds = [Prediction("x", 0.59, 0.1, 1.0, 9.0), Prediction("u", nan, nan, 1.0, 8.0),
             Prediction("b", 1.0, 0.0, 1.0, 1.0), Prediction("f", 1.3, 0.1, 1.0, 0.5)]
    assert [p.arm for p in RC.baseline_floor(preds, "b")] == ["f", "b", "x", "u"]
    assert RC.baseline_floor(preds, None) == preds


def test_verify_shows_the_baseline_and_each_candidate_once():
    from accelerando.bench.runner import RunRow
    rows = [RunRow("ddim", "diffusion", {}, is_baseline=True), RunRow("f-pndm", "diffusion", {"steps_frac": 1.0}),
            RunRow("ddim", "diffusion", {"steps_frac": 0.5}), RunRow("f-pndm", "diffusion", {"steps_frac": 0.5}),
            RunRow("ddim", "diffusion", {}, is_baseline=True),                 # the next round's baseline
            RunRow("prk", "diffusion", {"steps_frac": 0.5}, error="boom")]
    shown = RC.verified_rows(rows, ["f-pndm[steps_frac=0.5]", "prk[steps_frac=0.5]"], {"f-pndm", "prk"})
    assert [(r.method, r.knobs) for r in shown] == [("ddim", {}), ("f-pndm", {"steps_frac": 0.5}),
                                                    ("prk", {"steps_frac": 0.5})]


def test_cli_recommend_verify_table_lists_each_row_once(env):
    """After --verify the table showed the baseline and a method twice."""
    rows = []
    for i in range(12):
        wl = {"family": "llm", "model": f"m{i}", "drafts": [DRAFT], "prompts_digest": str(i)}
        rows += [{**_r(wl, "fake-generate", 1.0, True, f"r{i}"), "knobs": {}},
                 {**_r(wl, "fake-exact", 2.0, False, f"r{i}"), "knobs": {"k": 2}},
                 {**_r(wl, "fake-exact", 1.5, False, f"r{i}"), "knobs": {"k": 4}}]
    _store(env, rows)
    res = invoke("--history", env, "recommend", LM, "--draft", DRAFT, "--max-new-tokens", 3, "--verify")
    assert res.exit_code == 0, res.output
    table = res.output.split("measured now")[1]
    assert table.count("fake-generate (baseline)") == 1
    assert table.count("fake-exact") == 2              # k=2 and k=4, once each
