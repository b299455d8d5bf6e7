"""The runner with fake registered methods: baseline first, ratios from one run, quality against
the baseline, failures isolated, rows in the history. Plus workload descriptions."""

import json

import pytest
import torch

import bench_fakes as F
from accelerando.bench import runner as R
from accelerando.bench.history import open_history
from accelerando.bench.workloads import (DEFAULT_CODE_PROMPTS, DiffusionWorkload, LLMWorkload,
                                         PromptsError, load_prompts)


@pytest.fixture(scope="module")
def llm_setups():
    wl = LLMWorkload(model="tiny", prompts=("def f(x):\n", "import os\nprint("), batch_size=2,
                     max_new_tokens=6)
    return wl, R.build_llm_setups(wl, target=F.make_llm(), tokenizer=F.make_tokenizer(), drafts={})


def test_llm_run_ratios_quality_history(fakes, llm_setups, tmp_path):
    wl, setups = llm_setups
    assert setups[0].input_ids.shape[0] == 2 and setups[0].attention_mask[0, 0] == 0   # left padded
    with open_history(tmp_path / "h.sqlite") as h:
        rows = R.run_methods(setups, ["fake-exact", "fake-lossy", "fake-broken"], workload=wl.key(),
                             repeats=3, warmup=1, history=h, sync=lambda: None, clock=fakes)
        stored = h.rows()
    by = {r.method: r for r in rows}
    assert [r.method for r in rows][0] == "fake-generate"        # the baseline is added and runs first
    base, exact, lossy = by["fake-generate"], by["fake-exact"], by["fake-lossy"]
    # times come from the fake clock: 2.0 s vs 0.5 s per call -> 4x, measured side by side
    assert base.metrics["median_s"] == 2.0 and exact.metrics["median_s"] == 0.5
    assert exact.metrics["speedup"] == pytest.approx(4.0)
    assert base.metrics["speedup"] == pytest.approx(1.0)
    # an independent greedy loop reproduces generate: exact match, lossless verified
    assert exact.metrics["exact_match"] == 1.0 and exact.metrics["lossless_verified"] is True
    assert lossy.metrics["exact_match"] == 0.0 and lossy.metrics["lossless_verified"] is None
    assert lossy.metrics["token_agreement"] == pytest.approx(5 / 6)
    assert exact.metrics["perplexity"] == pytest.approx(base.metrics["perplexity"])
    # raw counts beside rates
    assert exact.metrics["new_tokens"] == 12 and exact.metrics["target_calls"] == 1
    assert exact.metrics["tokens_per_s"] == pytest.approx(12 / 0.5)
    assert exact.knobs == {"k": 4}
    # a failing method is reported, not stored, and does not stop the others
    assert by["fake-broken"].error.startswith("RuntimeError: this method is broken")
    assert sorted(m.method for m in stored) == ["fake-exact", "fake-generate", "fake-lossy"]
    assert len({m.run_id for m in stored}) == 1
    assert all(m.workload == json.loads(json.dumps(wl.key())) for m in stored)
    assert {m.family for m in stored} == {"llm"}


def test_knob_overrides_and_stats_merge(fakes, llm_setups):
    _, setups = llm_setups
    rows = R.run_methods(setups * 2, ["fake-exact"], workload={"family": "llm"},
                         knobs={"fake-exact": {"k": 2}}, repeats=1, warmup=0, score_perplexity=False,
                         sync=lambda: None, clock=fakes)
    exact = rows[1]
    assert exact.knobs == {"k": 2}
    assert exact.metrics["target_calls"] == 2 * (6 // 2)            # ints summed over the 2 batches
    assert exact.metrics["acceptance_histogram"] == [2, 4]          # lists summed element-wise
    assert exact.metrics["rate"] == 0.5                             # floats averaged
    assert exact.metrics["median_s"] == pytest.approx(1.0)          # both batches in one timed call


def test_merge_stats():
    assert R.merge_stats([{"a": 1, "b": 0.5, "h": [1], "ok": True}, {"a": 2, "b": 1.5, "h": [1, 1], "ok": False}]) \
        == {"a": 3, "b": 1.0, "h": [2, 1], "ok": False}
    assert R.merge_stats([]) == {}


def test_diffusion_run(fakes, tmp_path, monkeypatch):
    monkeypatch.setattr(R, "_diffusion_api", lambda: F.fake_make_schedule)
    wl = DiffusionWorkload("tiny-unet", steps=3, batch=2, seed=5)
    setups = R.build_diffusion_setups(wl, unet=F.make_unet())
    # per-sample seeds: sample i is the same whatever the batch size (seed + i)
    one = R.build_diffusion_setups(DiffusionWorkload("tiny-unet", steps=3, batch=1, seed=6), unet=F.make_unet())
    assert torch.equal(setups[0].x_T[1], one[0].x_T[0])
    reference = R.diffusion_reference(setups, steps=6)
    with open_history(tmp_path / "h.sqlite") as h:
        rows = R.run_methods(setups, None, workload=wl.key(), repeats=2, warmup=1, history=h,
                             reference=reference, sync=lambda: None, clock=fakes)
        assert h.count() == 2
    base, shifted = rows
    assert base.method == "fake-ddim" and base.metrics["nfe"] == 3 and base.metrics["samples"] == 2
    assert base.metrics["rmse_vs_baseline"] == 0.0
    assert shifted.metrics["rmse_vs_baseline"] == pytest.approx(0.25, rel=1e-5)
    assert base.metrics["rmse_vs_reference"] > 0


def test_method_resolution_errors(fakes):
    with pytest.raises(KeyError, match="fake-generate"):         # the message lists valid methods
        R.resolve_methods("llm", ["nope"])
    with pytest.raises(R.RunnerError, match="diffusion method"):
        R.resolve_methods("llm", ["fake-ddim"])
    assert [e.name for e in R.resolve_methods("diffusion")] == ["fake-ddim", "fake-shifted"]


def test_model_kind_detection(tmp_path):
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    (tmp_path / "empty").mkdir()
    assert R.model_kind(tmp_path / "lm") == "llm"
    assert R.model_kind(tmp_path / "unet") == "diffusion"
    with pytest.raises(R.ModelError, match="BertModel"):
        R.model_kind(tmp_path / "bert")
    with pytest.raises(R.ModelError, match="no config.json"):
        R.model_kind(tmp_path / "empty")
    with pytest.raises(R.ModelError, match="no model directory"):
        R.resolve_model_dir(str(tmp_path / "missing"))


def test_workloads_validate_and_key(tmp_path):
    with pytest.raises(ValueError):
        LLMWorkload(model="m", batch_size=0)
    with pytest.raises(ValueError):
        LLMWorkload(model="m", temperature=-1)
    with pytest.raises(ValueError):
        LLMWorkload(model="m", top_p=1.5)
    with pytest.raises(ValueError):
        DiffusionWorkload(model="u", spacing="uniform")
    a = LLMWorkload(model="m", drafts=["d"])
    assert a.key() == LLMWorkload(model="m", drafts=("d",)).key()
    assert a.key()["family"] == "llm" and a.key()["drafts"] == ["d"]
    assert a.resolve_prompts() == list(DEFAULT_CODE_PROMPTS)
    assert a.key()["prompts_digest"] != LLMWorkload(model="m", prompts=("x",)).key()["prompts_digest"]
    json.dumps(a.key())
    assert DiffusionWorkload("u", steps=7).key()["steps"] == 7


def test_load_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond line\n")
    (tmp_path / "p.json").write_text(json.dumps(["a\nb", "c"]))
    (tmp_path / "bad.json").write_text("[1, 2")
    (tmp_path / "empty.txt").write_text("\n \n")
    assert load_prompts(tmp_path / "p.txt") == ["first", "second line"]
    assert load_prompts(tmp_path / "p.json") == ["a\nb", "c"]
    for name, msg in (("bad.json", "not valid"), ("empty.txt", "no prompts"), ("missing", "does not exist")):
        with pytest.raises(PromptsError, match=msg):
            load_prompts(tmp_path / name)


def test_run_workload_loads_once_and_runs(fakes, tmp_path, monkeypatch):
    lm = F.make_llm_dir(tmp_path / "lm")
    unet = F.make_unet_dir(tmp_path / "unet")
    monkeypatch.setattr(R, "_diffusion_api", lambda: F.fake_make_schedule)
    cache = R.ModelCache()
    for n in (2, 3):
        rows = R.run_workload(LLMWorkload(model=str(lm), prompts=("x = 1\n",), max_new_tokens=n),
                              ["fake-exact"], models=cache, repeats=1, warmup=0, sync=lambda: None,
                              clock=fakes)
        assert rows[1].metrics["exact_match"] == 1.0 and rows[1].metrics["new_tokens"] == n
    assert str(lm) in cache and str(unet) not in cache
    rows = R.run_workload(DiffusionWorkload(str(unet), steps=2, batch=1), models=cache, reference_steps=3,
                          repeats=1, warmup=0)
    assert [r.method for r in rows] == ["fake-ddim", "fake-shifted"]
    assert rows[0].metrics["rmse_vs_reference"] > 0 and str(unet) in cache
    assert rows[0].metrics["speedup_vs_reference"] > 0
