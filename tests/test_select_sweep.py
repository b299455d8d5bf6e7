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
    # growing the diffusion grid keeps its first entries (the bundled history's sweep keys); the
    # entries past GRID_FIXED draw from the wider budgets and a fourth UNet shape
    wide = S.diffusion_grid(90, zoo_names=[])
    assert [S.sweep_key(w) for w in wide[:30]] == [S.sweep_key(w) for w in diff]
    assert len({S.sweep_key(w) for w in wide}) == 90
    assert {w.steps for w in wide[:S.GRID_FIXED]} <= set(S.GRID_STEPS)
    assert {w.steps for w in wide[S.GRID_FIXED:]} - set(S.GRID_STEPS) and \
        len({w.model for w in wide[S.GRID_FIXED:]}) == 4
    # from GRID_DIT on: DiT workloads on the zoo DiTs; the first 90 entries are unchanged by them
    dit = S.diffusion_grid(S.GRID_DIT + 2 * S.GRID_DIT_BLOCK, zoo_names=[])
    assert [S.sweep_key(w) for w in dit[:90]] == [S.sweep_key(w) for w in wide]
    if set(S.GRID_DIT_MODELS) <= set(S._zoo_names()):
        assert {w.model for w in dit[S.GRID_DIT:]} == set(S.GRID_DIT_MODELS)
        assert {w.steps for w in dit[S.GRID_DIT:]} <= set(S.GRID_STEPS_DIT)
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
        nfe = {(m.method, m.knobs.get("steps_frac", 1.0)): m.metrics["nfe"]
               for m in h.rows() if m.method == "fake-ddim" and m.metrics.get("nfe")}
    assert len(t) == 3
    assert {"fake-exact[k=2]", "fake-exact[k=4]", "fake-lossy", "fake-generate"} <= set(t.arms)
    # diffusion arms: every sampler (the baseline too) at each fraction of the NFE budget
    assert {"fake-ddim", "fake-ddim[steps_frac=0.5]", "fake-shifted[shift=0.25,steps_frac=0.25]"} <= set(t.arms)
    dw = t.wids("diffusion")[0]
    assert (dw, "fake-ddim[steps_frac=0.25]") in t.speedup           # timed (a speed-up is a timing: not asserted)
    assert nfe[("fake-ddim", 0.25)] == 1 and nfe[("fake-ddim", 1.0)] == 3  # a quarter of 3 steps: 1 model call
    assert t.loss[(dw, "fake-shifted[shift=0.25,steps_frac=1.0]")] > 0  # shifted samples are worse
    llm_w = [w for w in t.wids("llm")]
    feats = t.workloads[llm_w[0]]["features"]
    assert feats["rep2"] > 0.5 and 0 < feats["draft_ratio"] <= 1 and feats["mem_bw_gbs"] > 0
    assert "log_fwd_ms" in t.workloads[t.wids("diffusion")[0]]["features"]


# ----------------------------------------------------------------------------- re-timing

def test_interleaved_rounds_rotate_and_share_the_load():
    from accelerando.bench.harness import measure_interleaved
    clock, order = F.FakeClock(), []

    def method(name, cost):
        def call():
            order.append(name)
            clock.advance(cost * (1 + clock.now / 2))     # the machine gets slower as time goes on
            return name
        return call
    t = measure_interleaved({"a": method("a", 0.4), "b": method("b", 0.1)}, rounds=4, warmup_rounds=1,
                            clock=clock, sync=lambda: None)
    assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]     # warm-up, then rotated rounds
    assert t["a"].repeats == t["b"].repeats == 4 and t["a"].result == "a"
    # the load doubled over the run: times drift, per-round ratios stay near the true 4
    assert t["a"].samples[-1] > 1.8 * t["a"].samples[0]
    ratios = S.per_round_speedups(t["a"].samples, t["b"].samples)
    assert all(3.0 < r < 5.0 for r in ratios)
    with pytest.raises(ValueError):
        measure_interleaved({"a": method("a", 1)}, rounds=0)


def _timed_fakes(clock, refuse_below=0):
    """Fake samplers that take ``unit`` fake seconds per model call, scaled by a load that rises
    with the fake time; "fake-picky" refuses budgets below ``refuse_below`` (as F-PNDM does)."""
    from accelerando.bench.methods import MethodEntry, NotApplicable
    from accelerando.bench import methods as registry

    def timed(shift=0.0, picky=False):
        def build(s, **kw):
            if picky and s.steps < refuse_below:
                raise NotApplicable(f"needs {refuse_below} steps")

            def call():
                out = F._fake_sampler(s, shift=kw.get("shift", shift))
                clock.advance(0.01 * out.nfe * (1 + clock.now / 10))
                return out
            return call
        return build
    registry.register(MethodEntry("fake-ddim", "diffusion", timed(), lossless=False, is_baseline=True))
    registry.register(MethodEntry("fake-shifted", "diffusion", timed(), lossless=False, default_knobs={"shift": 0.25}))
    registry.register(MethodEntry("fake-picky", "diffusion", timed(picky=True), lossless=False))


def _old_rows(wl):
    """Sweep-style rows of one workload with wrong (noisy) speed-ups and a now-refused arm."""
    key = S.sweep_key(wl)
    wd = {**wl.key(), "reference_steps": 8, "sweep_key": key, "features": {"log_fwd_ms": 0.1}}
    def row(method, knobs, speedup, base=False):
        return {"workload": wd, "method": method, "knobs": knobs, "run_id": "old", "family": "diffusion",
                "metrics": {"speedup": speedup, "is_baseline": base, "lossless": False, "rmse_vs_reference": 1.0,
                            "median_s": 1.0, "iqr_s": 0.5}}
    return [row("fake-ddim", {}, 1.0, True), row("fake-ddim", {"steps_frac": 0.5}, 17.0),
            row("fake-shifted", {"shift": 0.25, "steps_frac": 1.0}, 0.3), row("fake-picky", {"steps_frac": 0.5}, 9.0)]


def test_retime_replaces_noisy_speedups_keeps_old_rows_and_resumes(monkeypatch, tmp_path):
    F.fresh_registry(monkeypatch)
    monkeypatch.setattr(R, "_diffusion_api", lambda: F.fake_make_schedule)
    clock = F.FakeClock()
    _timed_fakes(clock, refuse_below=4)                   # picky at half of 6 steps = 3: refused now
    wl = DiffusionWorkload(model="rand-unet-c8x16-i8-s0", steps=6, batch=1)
    old = _old_rows(wl)
    before = build_table(old)
    w = before.wids()[0]
    assert before.speedup[(w, "fake-ddim[steps_frac=0.5]")] == 17.0 and not before.refined
    seen = []
    with open_history(tmp_path / "h.sqlite") as h:
        rep = S.retime_diffusion(old, [wl], history=h, rounds=3, clock=clock, sync=lambda: None,
                                 progress=lambda i, n, label, eta: seen.append((i, n)))
        assert (rep.workloads, rep.rows, rep.skipped, rep.errors) == (1, 3, 0, []) and seen == [(0, 1)]
        assert len(rep.dropped) == 1 and "fake-picky" in rep.dropped[0]
        new = h.rows()
        assert {m.metrics["timing"] for m in new} == {"interleaved"} and all(m.metrics["rounds"] == 3 for m in new)
        # resumable: the workload is done; asking for 5 rounds in all tops it up by 2
        again = S.retime_diffusion(old + new, [wl], history=h, rounds=3, clock=clock, sync=lambda: None)
        assert (again.workloads, again.skipped) == (0, 1)
        assert S.retime_diffusion(old + new, [], history=h, rounds=3).missing == 1
        more = S.retime_diffusion(old + new, [wl], history=h, rounds=5, clock=clock, sync=lambda: None)
        assert more.workloads == 1 and {m.metrics["rounds"] for m in h.rows()[len(new):]} == {2}
        h_rows = h.rows()
        t = build_table(old + h_rows)
    assert t.refined == {w}
    # 3 of 6 model calls: speed-up 2 (per round; the rising load cancels), not the stored 17
    pooled = [r for m in h_rows if m.knobs == {"steps_frac": 0.5} for r in m.metrics["speedup_rounds"]]
    assert len(pooled) == 5 and all(1.8 < r < 2.2 for r in pooled)
    assert t.speedup[(w, "fake-ddim[steps_frac=0.5]")] == pytest.approx(sorted(pooled)[2])
    assert "fake-picky[steps_frac=0.5]" not in t.arms_on(w)           # the current code refuses it
    # quality recomputed from the same seeds: the shifted sampler is worse than the baseline
    assert t.loss[(w, "fake-shifted[shift=0.25,steps_frac=1.0]")] > 0 and t.loss[(w, "fake-ddim")] == 0
    assert t.speedup[(w, "fake-shifted[shift=0.25,steps_frac=1.0]")] == pytest.approx(1.0, rel=0.15)


def _old_llm_rows(wl):
    """Sweep-style rows of one greedy LLM workload in two sweep rounds (each with its baseline):
    noisy speed-ups, a lossless-registered method that is not exact, a method gone from the registry."""
    key = S.sweep_key(wl)
    wd = {**wl.key(), "sweep_key": key, "features": {"log_fwd_ms": 0.1}}

    def row(method, knobs, speedup, run, base=False):
        return {"workload": wd, "method": method, "knobs": knobs, "run_id": run, "family": "llm",
                "metrics": {"speedup": speedup, "is_baseline": base, "lossless": True, "token_agreement": 1.0,
                            "perplexity": 5.0, "median_s": 1.0, "iqr_s": 0.3}}
    return [row("fake-generate", {}, 1.0, "r0", True), row("fake-exact", {"k": 2}, 9.0, "r0"),
            row("fake-generate", {}, 1.0, "r1", True), row("fake-exact", {"k": 4}, 0.5, "r1"),
            row("fake-liar", {}, 2.0, "r1"), row("gone", {}, 3.0, "r1")]


def _register_liar(clock):
    """A method registered lossless whose last token differs from greedy's (1 fake second a call)."""
    import torch
    from accelerando.bench import methods as registry
    from accelerando.bench.methods import LLMOutput, MethodEntry

    def build(s):
        def call():
            clock.advance(1.0)
            with torch.no_grad():
                seq = s.target.generate(s.input_ids, attention_mask=s.attention_mask, do_sample=False,
                                        max_new_tokens=s.max_new_tokens, pad_token_id=s.tokenizer.pad_token_id)
            seq[:, -1] = (seq[:, -1] + 1) % 50 + 2
            return LLMOutput(seq, {"target_calls": s.max_new_tokens})
        return call
    registry.register(MethodEntry("fake-liar", "llm", build, lossless=True))


def test_retime_llm_rounds_check_exact_match_drop_gone_arms_and_resume(monkeypatch, tmp_path):
    F.fresh_registry(monkeypatch)
    clock = F.FakeClock()
    F.register_fake_llm(clock, base_s=2.0, fast_s=0.5)      # fake-exact: 4x the baseline, any k
    _register_liar(clock)
    wl = LLMWorkload(model="rand-llama-h32-l1-v100-s0", drafts=("rand-llama-h32-l1-v100-s1",),
                     prompts=("ab ab ab ab ab",), max_new_tokens=4, temperature=0.0, seed=0)
    old = _old_llm_rows(wl)
    w = build_table(old).wids()[0]
    with open_history(tmp_path / "h.sqlite") as h:
        rep = S.retime_llm(old, [wl], history=h, rounds=3, clock=clock, sync=lambda: None)
        assert (rep.workloads, rep.rows, rep.errors) == (1, 4, [])
        assert len(rep.dropped) == 1 and ": gone: " in rep.dropped[0]
        assert len(rep.not_exact) == 1 and "fake-liar" in rep.not_exact[0]
        new = h.rows()
        assert all(m.metrics["timing"] == "interleaved" and m.metrics["rounds"] == 3 for m in new)
        exact = {m.method: m.metrics for m in new}
        assert exact["fake-exact"]["lossless_verified"] and exact["fake-liar"]["lossless_verified"] is False
        assert exact["fake-generate"]["new_tokens"] == 4 and exact["fake-exact"]["perplexity"] > 0
        assert rep.max_quality_drift > 0                     # the stored perplexity (5.0) was made up
        # the diffusion pass does not touch LLM rows; resumable; a top-up runs the missing rounds
        assert S.retime_diffusion(old + new, [wl], history=h, rounds=3).workloads == 0
        assert S.retime_llm(old + new, [wl], history=h, rounds=3, clock=clock, sync=lambda: None).skipped == 1
        more = S.retime_llm(old + new, [wl], history=h, rounds=5, clock=clock, sync=lambda: None)
        assert more.workloads == 1 and {m.metrics["rounds"] for m in h.rows()[len(new):]} == {2}
        t = build_table(old + h.rows())
    assert t.refined == {w} and "gone" not in t.arms_on(w)
    # per-round speed-ups, not the stored 9 and 0.5; the liar is lossy now (one token in 4 differs)
    assert t.speedup[(w, "fake-exact[k=2]")] == pytest.approx(4.0) == t.speedup[(w, "fake-exact[k=4]")]
    assert t.speedup[(w, "fake-liar")] == pytest.approx(2.0) and t.loss[(w, "fake-liar")] == pytest.approx(0.25)
    assert t.loss[(w, "fake-exact[k=2]")] == 0


def _register_seed_dependent(clock):
    """Two sampling methods whose output length depends on the seed, as an EOS drawn early does:
    the baseline spends 2 fake seconds a token and writes 4 tokens on even seeds, 2 on odd ones;
    the arm spends 0.5 s a token and writes 4 tokens on odd seeds, 1 on even ones. Per token the
    arm is always 4x faster; its time ratio swings between 16x and 2x with the seed."""
    import torch
    from accelerando.bench import methods as registry
    from accelerando.bench.methods import LLMOutput, MethodEntry

    def make(per_token, length):
        def build(s):
            def call():
                n = length(s.seed)
                clock.advance(per_token * n)
                new = torch.full((s.input_ids.shape[0], n), 7, dtype=s.input_ids.dtype)
                return LLMOutput(torch.cat([s.input_ids, new], dim=1), {"target_calls": n})
            return call
        return build
    registry.register(MethodEntry("fake-sample", "llm", make(2.0, lambda g: 4 if g % 2 == 0 else 2),
                                  lossless=True, is_baseline=True))
    registry.register(MethodEntry("fake-seedy", "llm", make(0.5, lambda g: 4 if g % 2 else 1), lossless=True))


def test_retime_of_a_sampling_workload_draws_a_seed_per_round_and_compares_time_per_token(monkeypatch, tmp_path):
    F.fresh_registry(monkeypatch)
    clock = F.FakeClock()
    _register_seed_dependent(clock)
    wl = LLMWorkload(model="rand-llama-h32-l1-v100-s0", prompts=("ab ab ab",), max_new_tokens=4,
                     temperature=0.7, seed=3)
    wd = {**wl.key(), "sweep_key": S.sweep_key(wl), "features": {"log_fwd_ms": 0.1}}
    old = [{"workload": wd, "method": m, "knobs": {}, "run_id": "r0", "family": "llm",
            "metrics": {"speedup": s, "is_baseline": m == "fake-sample", "lossless": True, "perplexity": 5.0}}
           for m, s in (("fake-sample", 1.0), ("fake-seedy", 16.0))]
    w = build_table(old).wids()[0]
    with open_history(tmp_path / "h.sqlite") as h:
        # the old protocol, one seed in every round: the time ratio of seed 3 (odd) alone
        same = S.retime_llm(old, [wl], history=h, rounds=2, clock=clock, sync=lambda: None, seed_rounds=False)
        assert same.workloads == 1
        rows1 = h.rows()
        assert build_table(old + rows1).speedup[(w, "fake-seedy")] == pytest.approx(2.0)
        # rounds drawing seeds: the same-seed rounds do not count as done, new rows supersede them
        rep = S.retime_llm(old + rows1, [wl], history=h, rounds=3, clock=clock, sync=lambda: None)
        assert (rep.workloads, rep.skipped) == (1, 0)
        new = h.rows()[len(rows1):]
        assert {tuple(m.metrics["round_seeds"]) for m in new} == {(3, 4, 5)}
        seedy = next(m for m in new if m.method == "fake-seedy").metrics
        assert seedy["speedup_rounds"] == pytest.approx([4.0, 4.0, 4.0])      # time per token, every round
        t = build_table(old + h.rows())
        assert t.protocol[w] == 2 and t.speedup[(w, "fake-seedy")] == pytest.approx(4.0)
        assert all(t.reads(r) for r in new) and not any(t.reads(r) for r in old + rows1)
        # resumable under the new protocol; a top-up continues the seeds
        assert S.retime_llm(old + h.rows(), [wl], history=h, rounds=3, clock=clock, sync=lambda: None).skipped == 1
        n = len(h.rows())
        S.retime_llm(old + h.rows(), [wl], history=h, rounds=5, clock=clock, sync=lambda: None)
        assert {tuple(m.metrics["round_seeds"]) for m in h.rows()[n:]} == {(6, 7)}


def test_retime_covers_an_arm_swept_after_the_last_retiming(monkeypatch, tmp_path):
    F.fresh_registry(monkeypatch)
    clock = F.FakeClock()
    F.register_fake_llm(clock, base_s=2.0, fast_s=0.5)
    wl = LLMWorkload(model="rand-llama-h32-l1-v100-s0", prompts=("ab ab ab ab ab",), max_new_tokens=4,
                     temperature=0.0, seed=0)
    old = [r for r in _old_llm_rows(wl) if r["method"] != "fake-liar"]
    with open_history(tmp_path / "h.sqlite") as h:
        S.retime_llm(old, [wl], history=h, rounds=2, clock=clock, sync=lambda: None)
        first = h.rows()
        w = build_table(old + first).wids()[0]
        # "gone" was swept before the re-timing and dropped by it: no reason to re-time again
        assert S.retime_llm(old + first, [wl], history=h, rounds=2, clock=clock, sync=lambda: None).skipped == 1
        # a method swept after the re-timing: invisible in the table until the workload is re-timed
        later = {**old[1], "method": "fake-lossy", "knobs": {}, "timestamp": "2999-01-01T00:00:00+00:00",
                 "metrics": {**old[1]["metrics"], "lossless": False, "speedup": 7.0}}
        assert "fake-lossy" not in build_table(old + first + [later]).arms_on(w)
        rep = S.retime_llm(old + first + [later], [wl], history=h, rounds=2, clock=clock, sync=lambda: None)
        assert rep.workloads == 1 and rep.skipped == 0
        again = h.rows()[len(first):]
        assert {m.method for m in again} == {"fake-generate", "fake-exact", "fake-lossy"}
        assert all(m.metrics["rounds"] == 2 for m in again)
        t = build_table(old + h.rows() + [later])
    assert t.speedup[(w, "fake-lossy")] == pytest.approx(1.0) and t.speedup[(w, "fake-exact[k=2]")] == pytest.approx(4.0)


def test_llm_grid_long_context_entries_follow_the_fixed_ones():
    """Past the bundled history's first LLM_GRID_FIXED entries (unchanged), every other workload
    is long context: batch 1, prompts of >= 512 tokens, where the KV-cache arms apply."""
    base = S.llm_grid(S.LLM_GRID_FIXED, zoo_names=[])
    grown = S.llm_grid(S.LLM_GRID_FIXED + 6, zoo_names=[])
    assert [S.sweep_key(w) for w in grown[:S.LLM_GRID_FIXED]] == [S.sweep_key(w) for w in base]
    long = grown[S.LLM_GRID_FIXED::2]
    assert len(long) == 3 and all(w.domain == "long-code" and w.batch_size == 1 for w in long)
    assert all(len(w.prompts[0]) >= 512 for w in long)
    assert len({S.sweep_key(w) for w in grown}) == len(grown)
    assert {m for r in S.method_rounds("llm", ["kv-snapkv", "kv-triforce"]) for m in r} == {"kv-snapkv", "kv-triforce"}
    assert [r["kv-snapkv"]["ratio"] for r in S.method_rounds("llm", ["kv-snapkv"])] == [0.25, 0.5]
