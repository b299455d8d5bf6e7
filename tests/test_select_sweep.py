"""The sweep (fake registered methods, random-init models): rows, features, resumability."""

from __future__ import annotations

import random

import pytest

import bench_fakes as F
from accelerando.bench import runner as R
from accelerando.bench.history import open_history
from accelerando.bench.workloads import DiffusionWorkload, LLMWorkload
from accelerando.select import sweep as S
from accelerando.select.features import ngram_repetition
from accelerando.select.table import build_table


@pytest.fixture(autouse=True)
def _threads():
    yield from F.one_thread()


@pytest.fixture
def fakes(monkeypatch):
    F.fresh_registry(monkeypatch)
    F.register_fake_llm()
    F.register_fake_diffusion()
    monkeypatch.setattr(R, "_diffusion_api", lambda: F.fake_make_schedule)


def test_prompts_domains_differ_in_repetition():
    rng = random.Random(0)
    tok = S.char_tokenizer()
    rep = lambda d: ngram_repetition(tok(S.make_prompts(d, n=1, length=120, rng=rng)[0])["input_ids"], 3)  # noqa: E731
    assert rep("repetitive") > 0.5 > rep("random")
    with pytest.raises(ValueError):
        S.make_prompts("poetry", n=1, length=10, rng=rng)


def test_grids_have_distinct_workloads():
    llm = S.llm_grid(60, zoo_names=[])
    diff = S.diffusion_grid(30, zoo_names=[])
    assert len({S.sweep_key(w) for w in llm}) == 60
    assert len({S.sweep_key(w) for w in diff}) == 30
    assert {w.domain for w in llm} == {"code", "prose", "repetitive", "random"}
    assert len({w.temperature for w in llm}) >= 3 and len({w.steps for w in diff}) >= 4
    m = S.rand_llm("rand-llama-h64-l2-v128-s0")
    assert (m.config.hidden_size, m.config.num_hidden_layers, m.config.vocab_size) == (64, 2, 128)
    with pytest.raises(ValueError):
        S.rand_llm("llama-64")


def test_sweep_records_rows_with_features_and_resumes(fakes, tmp_path):
    wls = [LLMWorkload(model="rand-llama-h32-l1-v100-s0", drafts=("rand-llama-h32-l1-v100-s1",),
                       prompts=("ab ab ab ab ab",), max_new_tokens=4, temperature=0.0, seed=i) for i in range(2)]
    wls.append(DiffusionWorkload(model="rand-unet-c8x16-i8-s0", steps=3, batch=1))
    grid = {"fake-exact": [{"k": 2}, {"k": 4}]}
    seen = []
    with open_history(tmp_path / "h.sqlite") as h:
        rep = S.run_sweep(wls, history=h, knob_grid=grid, repeats=1, warmup=0, reference_steps=6,
                          progress=lambda i, n, label, eta: seen.append((i, n, eta)))
        n_rows = h.count()
        assert rep.workloads == 3 and rep.rows == n_rows > 0
        assert any("this method is broken" in e for e in rep.errors)
        assert [s[:2] for s in seen] == [(0, 3), (1, 3), (2, 3)] and seen[0][2] is None and seen[1][2] > 0
        again = S.run_sweep(wls, history=h, knob_grid=grid, repeats=1, warmup=0, reference_steps=6)
        # resumed: only the broken method (no row) is retried, with its baseline; nothing twice
        assert again.rounds_run == 2 and again.rounds_skipped == rep.rounds_run - 2   # one per LLM workload
        assert {m.method for m in h.rows()[n_rows:]} == {"fake-generate"}
        assert S.run_sweep(wls, history=h, methods=["fake-exact", "fake-lossy"], knob_grid=grid).rounds_run == 0
        t = build_table(h.rows())
    assert len(t) == 3
    assert {"fake-exact[k=2]", "fake-exact[k=4]", "fake-lossy", "fake-generate"} <= set(t.arms)
    # diffusion arms: every sampler (the baseline too) at each fraction of the NFE budget
    assert {"fake-ddim", "fake-ddim[steps_frac=0.5]", "fake-shifted[shift=0.25,steps_frac=0.25]"} <= set(t.arms)
    dw = t.wids("diffusion")[0]
    assert t.speedup[(dw, "fake-ddim[steps_frac=0.25]")] > 1.5        # 1 step instead of 3
    assert t.loss[(dw, "fake-shifted[shift=0.25,steps_frac=1.0]")] > 0  # shifted samples are worse
    llm_w = [w for w in t.wids("llm")]
    feats = t.workloads[llm_w[0]]["features"]
    assert feats["rep2"] > 0.5 and 0 < feats["draft_ratio"] <= 1 and feats["mem_bw_gbs"] > 0
    assert "log_fwd_ms" in t.workloads[t.wids("diffusion")[0]]["features"]
