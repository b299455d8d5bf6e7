"""Cheaper forward passes: weight quantisation (int8 / int4 RTN / BitMoD), CoreInfer, layer skipping
and self-speculation, SageAttention-style attention. Exact where the method should be exact (all
neurons kept == original, self-speculation greedy == generate, sampled distribution == target's by
chi-square), error bounds where lossy, one-line errors on bad knobs."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from scipy.stats import chisquare

from accelerando.llm import speculative_generate
from accelerando.llm.compute import coreinfer as C
from accelerando.llm.compute import layerskip as L
from accelerando.llm.compute import quant as Q
from accelerando.llm.compute import sage as S
from accelerando.llm.compute import selfspec as SS
from llm_models import tiny_lm

# the eager lean engine, in either engine vocabulary (core renames static-eager -> engine-eager)
EAGER = "engine-eager" if hasattr(__import__("accelerando.llm.engine").llm.engine, "ENGINES") else "static-eager"


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama", hidden=64, layers=4, seed=0, init_std=0.2)


def _prompts(batch: int = 2, length: int = 10, vocab: int = 96):
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        mask[b, : 2 * b] = 0
    ids[mask == 0] = 0
    return ids, mask


def _greedy(model, ids, mask, n=10):
    return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False)


# ----------------------------------------------------------------------------------- quantisation
def test_quant_bad_knobs_are_one_line_errors(lm):
    with pytest.raises(ValueError, match="method must be one of"):
        Q.QuantConfig(method="int2")
    with pytest.raises(ValueError, match="bitmod bits must be 3 or 4"):
        Q.QuantConfig(method="bitmod", bits=5)
    with pytest.raises(ValueError, match="bits=3 is not supported"):
        Q.QuantConfig(method="int4", bits=3)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        Q.QuantConfig(method="int4", group_size=0)
    m = copy.deepcopy(lm)
    before = m.model.layers[0].mlp.up_proj.weight.clone()
    with pytest.raises(ValueError, match="group_size 48 does not divide the input dimension 64"):
        Q.quantize_model(m, Q.QuantConfig(method="bitmod", group_size=48))
    assert torch.equal(m.model.layers[0].mlp.up_proj.weight, before)      # nothing changed on error


def test_rtn_error_bounds():
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1))
    q, s = Q.int8_quantize(w)
    assert (q.float() * s[:, None] - w).abs().le(s[:, None] / 2 + 1e-6).all()
    q4, s4, z4 = Q.int4_quantize(w, 32)
    deq = Q.int4_dequantize(q4, s4, z4, 32)
    assert (deq - w).abs().reshape(32, 4, 32).le(s4[..., None] / 2 + 1e-5).all()
    assert q4.min() >= 0 and q4.max() <= 15


def test_bitmod_picks_the_best_datatype_per_group():
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(2))
    for bits in (3, 4):
        codes, ids, scales = Q.bitmod_quantize(w, 64, bits)
        grids = Q.bitmod_datatypes(bits)
        assert grids.shape == (4, 2 ** bits) and ids.max() <= 3 and codes.max() < 2 ** bits
        deq = Q.bitmod_dequantize(codes, ids, scales, bits, 64).reshape(16, 4, 64)
        err = ((deq - w.reshape(16, 4, 64)) ** 2).sum(-1)
        wg = w.reshape(16, 4, 64)
        hi, lo = wg.amax(-1).clamp(min=0), wg.amin(-1).clamp(max=0)
        for d, grid in enumerate(grids):          # no (datatype, candidate scale) beats the chosen one on any group
            fit = torch.maximum(hi / grid.max(), lo / grid.min())    # the grid's ends reach the group's ends
            assert (fit * grid.max() >= hi - 1e-6).all() and (fit * grid.min() <= lo + 1e-6).all()
            for r in Q.CLIP_RATIOS:
                s = (fit * r).half().float()
                one = grid[(wg / s[..., None] - grid[:, None, None, None]).abs().argmin(0)] * s[..., None]
                assert (err <= ((one - wg) ** 2).sum(-1) + 1e-5).all()
        plain = Q.bitmod_dequantize(*Q.bitmod_quantize(w, 64, bits, scale_search=False), bits, 64)
        assert err.sum() <= ((plain - w) ** 2).sum() + 1e-6          # searching the scale never hurts
        # each dequantised value lies on its group's grid
        vals = deq / scales.float()[..., None]
        assert torch.allclose(vals, grids[ids.long()].gather(-1, codes.reshape(16, 4, 64).long()), atol=1e-4)
    # the paper's point: at the same group size BitMoD-4 beats symmetric INT4 RTN (Gaussian weights)
    e_bm = (Q.fake_quantize(w, Q.QuantConfig(method="bitmod", group_size=64)) - w).pow(2).mean()
    e_i4 = (Q.fake_quantize(w, Q.QuantConfig(method="int4-sym", group_size=64)) - w).pow(2).mean()
    assert e_bm < e_i4


@pytest.mark.parametrize("method,bits", [("int8", None), ("int4", None), ("bitmod", 4), ("bitmod", 3)])
def test_packed_matches_simulated_and_reports_bits(lm, method, bits):
    ids, mask = _prompts()
    sim = Q.quantize_model(copy.deepcopy(lm), Q.QuantConfig(method=method, group_size=32, bits=bits))
    packed = Q.quantize_model(copy.deepcopy(lm), Q.QuantConfig(method=method, group_size=32, bits=bits, packed=True))
    with torch.no_grad():
        a, b, ref = sim(ids, attention_mask=mask).logits, packed(ids, attention_mask=mask).logits, lm(ids, attention_mask=mask).logits
    # bitmod's packed path dequantises to the same fp32 weights; int8 / int4 run bf16 activations
    tol = 1e-4 if method == "bitmod" else 0.05 * ref.abs().max().item()
    assert (a - b).abs().max() <= tol
    assert (a - ref).abs().max() > 0                                  # lossy
    nbits = {"int8": 8 + 16 / 64, "int4": 4 + 32 / 32, "bitmod": (bits or 4) + 18 / 32}[method]
    # int8's scale is per output row: (8 N K + 16 N) / (N K) for every linear; in=64 or 128 here
    got = Q.bits_per_weight(packed)
    assert got == pytest.approx(Q.bits_per_weight(sim))
    if method != "int8":
        assert got == pytest.approx(nbits)
    assert Q.bits_per_weight(lm) == 32


def test_packed_int8_runs_inside_the_lean_engine(lm):
    """The engine fuses packed int8 projections and multiplies them with the same kernel:
    greedy tokens equal the quantised model's own ``generate``."""
    from accelerando.llm import engine as E
    m = Q.quantize_model(copy.deepcopy(lm), Q.QuantConfig(method="int8", packed=True))
    ids, mask = _prompts(2)
    got = E.generate(m, ids, attention_mask=mask, max_new_tokens=10, compile=False)
    assert torch.equal(got, _greedy(m, ids, mask))
    dec = E.Engine(m, batch_size=2, max_len=64, compile=False).decoder
    assert dec.wqkv0.dtype == torch.int8 and dec.sqkv0 is not None and dec.sd3 is not None


def test_more_bits_less_error(lm):
    ids, mask = _prompts()
    with torch.no_grad():
        ref = lm(ids, attention_mask=mask).logits
        err = {}
        for name, cfg in [("int8", Q.QuantConfig(method="int8")), ("bitmod4", Q.QuantConfig(method="bitmod", group_size=32)),
                          ("bitmod3", Q.QuantConfig(method="bitmod", group_size=32, bits=3))]:
            out = Q.quantize_model(copy.deepcopy(lm), cfg)(ids, attention_mask=mask).logits
            err[name] = (out - ref).pow(2).mean().item()
    assert err["int8"] < err["bitmod4"] < err["bitmod3"]


def test_torchao_anchor_when_installed(lm):
    pytest.importorskip("torchao")
    m = Q.torchao_int8(copy.deepcopy(lm))
    ids, mask = _prompts()
    with torch.no_grad():
        ref = lm(ids, attention_mask=mask).logits
        out = m(ids, attention_mask=mask).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


# ----------------------------------------------------------------------------------- CoreInfer
def test_coreinfer_with_every_neuron_is_the_original(lm):
    ids, mask = _prompts(3)
    m = C.apply_coreinfer(copy.deepcopy(lm), C.CoreInferConfig(alpha=1.0, beta=0.0))
    assert torch.equal(_greedy(m, ids, mask), _greedy(lm, ids, mask))
    assert C.core_fraction(m) == 1.0


def test_coreinfer_decodes_with_a_smaller_matmul_equal_to_the_masked_mlp(lm):
    ids, mask = _prompts(2)
    m = C.apply_coreinfer(copy.deepcopy(lm), C.CoreInferConfig(alpha=0.3, beta=0.3))
    with torch.no_grad():
        m(ids, attention_mask=mask)                                    # prefill picks the core neurons
    layer = m.model.layers[1].mlp
    inner = layer.mlp
    I = inner.down_proj.in_features
    assert all(0 < n < I for n in layer.n_core) and C.core_fraction(m) < 1
    assert layer._w[0].shape[-1] == 2 * max(layer.n_core)              # gathered weights, not a mask
    x = torch.randn(2, 1, 64)
    with torch.no_grad():
        got = layer(x)
        a = inner.act_fn(inner.gate_proj(x)) * inner.up_proj(x)
        keep = torch.zeros(2, 1, I)
        for b, c in enumerate(layer.core):
            keep[b, 0, c] = 1
        want = inner.down_proj(a * keep)
    assert torch.allclose(got, want, atol=1e-5)
    # the core set ignores left padding: row 1's padded positions do not vote
    a_full = inner.act_fn(inner.gate_proj(torch.randn(1, 4, 64))) * inner.up_proj(torch.randn(1, 4, 64))
    m1 = C.core_neurons(a_full.repeat(2, 1, 1), torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]]), C.CoreInferConfig(0.3, 0.5))
    m2 = C.core_neurons(a_full[:, 2:], None, C.CoreInferConfig(0.3, 0.5))
    assert torch.equal(m1[1], m2[0])


def test_coreinfer_bad_input():
    with pytest.raises(ValueError, match="alpha must be in"):
        C.CoreInferConfig(alpha=0)
    with pytest.raises(ValueError, match="beta must be in"):
        C.CoreInferConfig(beta=1.5)
    with pytest.raises(ValueError, match="CoreInfer supports gated"):
        C.apply_coreinfer(_ungated())


def _ungated():
    m = tiny_lm("llama", hidden=32, layers=1)
    m.model.layers[0].mlp = torch.nn.Sequential(torch.nn.Linear(32, 32))
    return m


# ----------------------------------------------------------------------------------- layer skipping
def test_skip_schedules_and_errors():
    assert L.balanced_keep(4, 1) == (0, 1, 3) and L.balanced_keep(4, 2) == (0, 3)
    assert L.balanced_keep(8, 3) == (0, 1, 3, 5, 7)
    assert L.balanced_keep(8, 0) == tuple(range(8))
    assert L.SkipConfig(speedup=2.0).kept_layers(8) == L.balanced_keep(8, 4)
    assert L.SkipConfig(exit_layer=3).kept_layers(8) == (0, 1, 2)
    with pytest.raises(ValueError, match="every one of the 4 layers"):
        L.balanced_keep(4, 4)
    with pytest.raises(ValueError, match="exceeds the 2 intermediate layers"):
        L.SkipConfig(skip=3).kept_layers(4)
    with pytest.raises(ValueError, match="keep is empty"):
        L.SkipConfig(keep=())
    with pytest.raises(ValueError, match="exit_layer must be >= 1"):
        L.SkipConfig(exit_layer=0)
    with pytest.raises(ValueError, match="exactly one of"):
        L.SkipConfig(exit_layer=1, skip=1)
    with pytest.raises(ValueError, match="outside 0..3"):
        L.SkipConfig(keep=(0, 4)).kept_layers(4)


def test_skip_view_shares_weights_and_leaves_the_target_alone(lm):
    v = L.skip_view(lm, L.SkipConfig(keep=(0, 2)))
    assert len(v.model.layers) == 2 and len(lm.model.layers) == 4
    assert v.model.layers[1].mlp.up_proj.weight is lm.model.layers[2].mlp.up_proj.weight
    assert [l.self_attn.layer_idx for l in v.model.layers] == [0, 1]
    assert [l.self_attn.layer_idx for l in lm.model.layers] == [0, 1, 2, 3]
    ids, mask = _prompts(1)
    ref = copy.deepcopy(lm)                                  # an independent truncation
    ref.model.layers = torch.nn.ModuleList([ref.model.layers[0], ref.model.layers[2]])
    ref.model.layers[1].self_attn.layer_idx = 1
    ref.config.num_hidden_layers = 2
    assert torch.equal(_greedy(v, ids, mask), _greedy(ref, ids, mask))


@pytest.mark.parametrize("engine", ["hf", EAGER])
@pytest.mark.parametrize("cfg", [L.SkipConfig(exit_layer=2), L.SkipConfig(skip=1)])
def test_self_speculation_greedy_equals_generate(lm, cfg, engine):
    ids, mask = _prompts(3)
    out = speculative_generate(lm, ids, draft=SS.self_speculative_draft(lm, cfg, k=3), attention_mask=mask,
                               max_new_tokens=12, engine=engine)
    assert torch.equal(out.sequences, _greedy(lm, ids, mask, 12))
    assert out.stats["accepted_tokens"] > 0


def test_self_draft_shares_the_target_cache_on_the_engine_and_falls_back_on_hf(lm):
    from accelerando.llm.compute.selfspec import SelfDraft
    ids, mask = _prompts(2)
    d = SS.self_speculative_draft(lm, L.SkipConfig(exit_layer=2), k=3)
    assert isinstance(d, SelfDraft)
    out = speculative_generate(lm, ids, draft=d, attention_mask=mask, max_new_tokens=12, engine=EAGER)
    assert d.shared and d.state is None and out.stats["draft_calls"] > 0     # no cache of its own
    assert torch.equal(out.sequences, _greedy(lm, ids, mask, 12))
    ad = SS.self_speculative_draft(lm, L.SkipConfig(exit_layer=1), k="adaptive")      # may take plain runs
    out_a = speculative_generate(lm, ids, draft=ad, attention_mask=mask, max_new_tokens=24, engine=EAGER)
    assert ad.shared and torch.equal(out_a.sequences, _greedy(lm, ids, mask, 24))
    d2 = SS.self_speculative_draft(lm, L.SkipConfig(exit_layer=2), k=3)
    with pytest.warns(UserWarning, match="keeps its own KV cache"):
        out2 = speculative_generate(lm, ids, draft=d2, attention_mask=mask, max_new_tokens=12, engine="hf")
    assert not d2.shared and torch.equal(out2.sequences, out.sequences)
    with pytest.raises(ValueError, match="needs a skip view"):
        SelfDraft(lm)


def test_exit_head_starts_as_the_plain_exit_trains_and_stays_lossless(lm):
    from accelerando.llm.compute.exit_head import ExitHead
    ids, mask = _prompts(1, length=12)
    head = ExitHead(lm.config.hidden_size, 2)
    with torch.no_grad():   # zero-initialised: exactly the plain early exit
        a = L.skip_view(lm, L.SkipConfig(exit_layer=2), exit_head=head)(ids).logits
        b = L.skip_view(lm, L.SkipConfig(exit_layer=2))(ids).logits
    assert torch.equal(a, b)
    stream = torch.randint(3, 96, (2048,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():   # train on the target's own greedy continuations: learnable agreement
        stream = _greedy(lm, stream[:8][None], torch.ones(1, 8, dtype=torch.long), 248)[0].repeat(8)
    head = ExitHead.fit(lm, stream, exit_layer=2, steps=60, batch_tokens=256, seq_len=64)
    assert head.info["heldout_top1_agreement"] >= head.info["heldout_top1_agreement_untrained"]
    d = SS.self_speculative_draft(lm, L.SkipConfig(exit_layer=2), k=3, exit_head=head)
    ids, mask = _prompts(3)
    out = speculative_generate(lm, ids, draft=d, attention_mask=mask, max_new_tokens=12, engine=EAGER)
    assert torch.equal(out.sequences, _greedy(lm, ids, mask, 12))
    with pytest.raises(ValueError, match="trained for exit_layer 2"):
        L.skip_view(lm, L.SkipConfig(exit_layer=3), exit_head=head)
    with pytest.raises(ValueError, match="exit_layer must be in 1..3"):
        ExitHead.fit(lm, stream, exit_layer=4)


def test_searched_schedule_keeps_the_most_agreeing_layers(lm):
    ids, _ = _prompts(2, length=16)
    keep = L.search_schedule(lm, ids, 2)
    assert len(keep) == 2 and list(keep) == sorted(keep)
    with torch.no_grad():
        ref = lm(ids).logits.argmax(-1)
        agree = lambda k: (L.skip_view(lm, L.SkipConfig(keep=k))(ids).logits.argmax(-1) == ref).float().mean()  # noqa: E731
    keep3 = L.search_schedule(lm, ids, 3)        # one drop from 4 layers: the search is exhaustive
    assert set(keep) < set(keep3)
    assert agree(keep3) == max(agree(tuple(i for i in range(4) if i != j)) for j in range(4))
    with pytest.raises(ValueError, match="n_keep must be in 1..4"):
        L.search_schedule(lm, ids, 0)


def test_self_speculation_samples_the_target_distribution():
    V, N = 8, 2000
    target = tiny_lm("llama", vocab=V, layers=3, seed=3, init_std=0.5)
    prompt = torch.arange(V)[None]
    from accelerando.llm.sampling import SamplingConfig
    sampling = SamplingConfig(temperature=1.0)
    with torch.no_grad():
        p1 = sampling.probs(target(prompt).logits[0, -1])
        e2 = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], 1)
        p2 = sampling.probs(target(e2).logits[:, -1])
    exact = (p1[:, None] * p2).flatten().double()
    out = speculative_generate(target, prompt.repeat(N, 1), draft=SS.self_speculative_draft(target, L.SkipConfig(skip=1), k=2),
                               max_new_tokens=2, temperature=1.0, seed=0)
    g = out.sequences[:, -2:]
    obs = torch.bincount(g[:, 0] * V + g[:, 1], minlength=V * V).double()
    keep = exact * N >= 5
    o = torch.cat([obs[keep], obs[~keep].sum()[None]])
    e = torch.cat([exact[keep], exact[~keep].sum()[None]]) * N
    assert chisquare(o.numpy(), e.numpy() * float(o.sum() / e.sum())).pvalue > 1e-3


# ----------------------------------------------------------------------------------- sage attention
def test_sage_attention_is_close_and_falls_back_with_a_warning(lm):
    ids, mask = _prompts(2, length=24)
    m = S.use_sage_attention(copy.deepcopy(lm))
    cos = S.attention_cosine(m, ids, mask)
    assert len(cos) == 4 and min(cos) > 0.99
    m4 = S.use_sage_attention(copy.deepcopy(lm), qk="int4")
    assert min(S.attention_cosine(m4, ids, mask)) < min(cos)            # INT4 is coarser than INT8
    q = torch.randn(1, 2, 5, 1100)
    mod = type("M", (), {"training": False})()
    with pytest.warns(UserWarning, match="head_dim 1100"):
        out, _ = S.sage_attention_forward(mod, q, q, q, None, scaling=0.1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, scale=0.1).transpose(1, 2)
    assert torch.allclose(out, ref, atol=1e-5)
    with pytest.raises(ValueError, match="qk must be"):
        S.SageConfig(qk="int2")
    with pytest.raises(ValueError, match="pv must be"):
        S.SageConfig(pv="bf16")


def test_sage_attention_generates_like_the_original(lm):
    ids, mask = _prompts(2, length=16)
    m = S.use_sage_attention(copy.deepcopy(lm), pv="fp16")
    with torch.no_grad():
        a, b = m(ids, attention_mask=mask).logits, lm(ids, attention_mask=mask).logits
    valid = mask.bool()
    cos = torch.nn.functional.cosine_similarity(a[valid], b[valid], dim=-1)
    assert cos.min() > 0.99


# ----------------------------------------------------------------------------------- bench arms
def test_bench_arms_run_and_report_quality(lm):
    from accelerando.bench.methods import LLMSetup
    from accelerando.bench.runner import run_methods

    class Tok:
        pad_token_id = 0
    ids, mask = _prompts(1)
    s = LLMSetup(target=lm, tokenizer=Tok(), input_ids=ids, attention_mask=mask, max_new_tokens=8)
    names = ["quant-int8", "quant-int4", "quant-bitmod", "coreinfer", "layer-skip", "self-spec", "hf-early-exit", "sage-attn"]
    rows = run_methods(s, names, workload={"family": "llm"}, knobs={"quant-int4": {"group_size": 32},
                       "quant-bitmod": {"group_size": 32}, "self-spec": {"exit_layer": 2, "k": 3}},
                       repeats=1, warmup=0, score_perplexity=False)
    by = {r.method: r for r in rows}
    assert all(by[n].error is None for n in names), {n: by[n].error for n in names}
    assert by["self-spec"].metrics["exact_match"] == 1.0 and by["self-spec"].metrics["lossless_verified"]
    assert by["hf-early-exit"].metrics["exact_match"] == 1.0
    assert 0 <= by["quant-bitmod"].metrics["token_agreement"] <= 1
    assert lm.model.layers[0].mlp.__class__.__name__ == "LlamaMLP"       # the target itself is untouched
    bad = run_methods(s, ["quant-bitmod"], workload={"family": "llm"}, knobs={"quant-bitmod": {"group_size": 48}},
                      repeats=1, warmup=0, score_perplexity=False)
    assert bad[-1].not_applicable and "does not divide" in bad[-1].error


# ----------------------------------------------------------------------------------- the selector
def test_recommend_picks_a_compute_arm_only_within_max_loss():
    """The compute arms in a history: lossless self-speculation when no loss is allowed, the lossy
    arm whose measured loss fits the budget otherwise -- never one that breaks it."""
    import accelerando.llm.compute.bench_methods  # noqa: F401  (registers the arms)
    from accelerando.select import recommend as RC
    from accelerando.select.table import Constraint

    def row(wl, method, speedup, run, *, lossless=True, loss=None, base=False, knobs=None):
        m = {"speedup": speedup, "lossless": lossless, "is_baseline": base}
        if loss is not None:
            m["quality_loss"] = loss
        return {"workload": wl, "method": method, "knobs": knobs or {}, "metrics": m, "run_id": run}
    rows = []
    for i in range(12):
        wl = {"family": "llm", "model": f"m{i % 4}", "temperature": 0.0, "batch_size": 1, "max_new_tokens": 32,
              "drafts": [], "prompts_digest": f"p{i}", "features": {"log_params": 6.0 + 0.1 * i}}
        rows += [row(wl, "generate", 1.0, f"r{i}", base=True),
                 row(wl, "self-spec", 1.2, f"r{i}", knobs={"exit_layer": 2, "k": 3}),
                 row(wl, "quant-int8", 1.4, f"r{i}", lossless=False, loss=0.03),
                 row(wl, "quant-bitmod", 1.8, f"r{i}", lossless=False, loss=0.4, knobs={"bits": 3, "group_size": 32})]
    key = {"family": "llm", "temperature": 0.0, "batch_size": 1, "drafts": [], "features": {"log_params": 6.5}}
    losses = {"self-spec": 0.0, "quant-int8": 0.03, "quant-bitmod": 0.4, "generate": 0.0}
    for budget, want in [(None, "self-spec"), (0.05, "quant-int8"), (0.5, "quant-bitmod")]:
        rec = RC.recommend(key, rows, constraint=Constraint(budget), hardware={})
        assert rec.choice.arm.split("[")[0] == want
        assert losses[want] <= (budget or 0.0)


# ----------------------------------------------------------------------- BitMoD under a bit budget
def test_bit_fields_pack_and_unpack_exactly():
    g = torch.Generator().manual_seed(3)
    widths = torch.randint(2, 9, (200,), generator=g)
    vals = (torch.rand(200, generator=g) * (2 ** widths)).long()
    buf = Q.pack_fields(vals, widths)
    assert buf.dtype == torch.uint8 and buf.numel() == -(-int(widths.sum()) // 8)      # no bit wasted but the last byte's
    assert torch.equal(Q.unpack_fields(buf, widths, 200), vals)
    assert torch.equal(Q.unpack_fields(Q.pack_fields(vals % 8, 3), 3, 200), vals % 8)


def test_bitmod_budget_mixes_widths_under_the_budget_and_packs_exactly(lm):
    ids, mask = _prompts()
    err = {}
    for budget, sb in ((3.6, 6), (4.2, 6), (4.0, 16)):
        cfg = Q.QuantConfig(method="bitmod", group_size=32, budget=budget, scale_bits=sb)
        sim = Q.quantize_model(copy.deepcopy(lm), cfg, calibration=ids)
        packed = Q.quantize_model(copy.deepcopy(lm), Q.QuantConfig(method="bitmod", group_size=32, budget=budget,
                                                                   scale_bits=sb, packed=True), calibration=ids)
        got = Q.bits_per_weight(packed)
        assert got == pytest.approx(Q.bits_per_weight(sim))
        # at most one group's upgrade (32 bits) short of the budget, never over it
        n_w = sum(m.in_features * m.out_features for m in packed.modules() if isinstance(m, Q.BitMoDLinear))
        assert budget - 32 / n_w <= got <= budget
        mods = [m for m in packed.modules() if isinstance(m, Q.BitMoDLinear)]
        # every stored bit is counted: the buffers hold the format plus < 1 byte of padding per stream
        for m in mods:
            assert 0 <= m.buffer_bits() - m.stored_bits() < 8 * 4
            _, dt, _ = m.unpacked()
            assert dt.max() <= 7
        with torch.no_grad():
            a, b = sim(ids, attention_mask=mask).logits, packed(ids, attention_mask=mask).logits
        assert (a - b).abs().max() <= 1e-4
        with torch.no_grad():
            err[budget, sb] = (a - lm(ids, attention_mask=mask).logits).pow(2).mean().item()
    assert err[3.6, 6] > err[4.2, 6]                              # more bits, less error
    with pytest.raises(ValueError, match="bitmod budget 3.1 is below this format's minimum"):
        Q.quantize_model(copy.deepcopy(lm), Q.QuantConfig(method="bitmod", group_size=32, budget=3.1))


def test_bitmod_budget_bad_knobs_are_one_line_errors(lm):
    with pytest.raises(ValueError, match="give bits or budget, not both"):
        Q.QuantConfig(method="bitmod", bits=4, budget=4.0)
    with pytest.raises(ValueError, match="budget is a bitmod knob"):
        Q.QuantConfig(method="int4", budget=4.0)
    with pytest.raises(ValueError, match="bitmod budget must be in"):
        Q.QuantConfig(method="bitmod", budget=2.5)
    with pytest.raises(ValueError, match="scale_bits must be 16"):
        Q.QuantConfig(method="bitmod", scale_bits=12)
    with pytest.raises(ValueError, match="sensitivity must be"):
        Q.QuantConfig(method="bitmod", budget=4.0, sensitivity="hessian")
    with pytest.raises(ValueError, match="calibration is used by a bitmod budget only"):
        Q.quantize_model(copy.deepcopy(lm), Q.QuantConfig(method="int8"), calibration=torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="allocated over a whole model"):
        Q.fake_quantize(torch.randn(4, 64), Q.QuantConfig(method="bitmod", group_size=32, budget=4.0))


def test_bitmod_allocation_upgrades_the_groups_with_the_largest_error_drop():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(4))
    w[:2] *= 10                                       # two rows with 100x the squared error at either width
    c = Q.bitmod_candidates(w, 32)
    four, = Q.bitmod_allocate([c], 32, 3.2 + (3 + 16) / 32, 16)     # the all-3-bit cost + 0.2 bits / weight
    n_up = int(0.2 * w.numel() // 32)
    assert int(four.sum()) == n_up
    gain = (c.err3 - c.err4).flatten()
    assert gain[four.flatten()].min() >= gain[~four.flatten()].max()
    assert four[:2].sum() == min(n_up, 8)


def test_fused_self_draft_chain_drafts_the_same_tokens(lm):
    """The fused draft (k greedy steps in one call) is the same draft: same tokens as generate,
    and the same drafts / acceptance as the step-by-step SelfDraft; sampling falls back to steps."""
    ids, mask = _prompts(2)
    outs = {}
    for fused in (False, True):
        d = SS.self_speculative_draft(lm, L.SkipConfig(exit_layer=2), k=3, fused=fused)
        outs[fused] = speculative_generate(lm, ids, draft=d, attention_mask=mask, max_new_tokens=16, engine=EAGER)
        assert d.shared and (d._chain is not None) == fused
    assert torch.equal(outs[True].sequences, _greedy(lm, ids, mask, 16))
    assert outs[True].stats["acceptance_histogram"] == outs[False].stats["acceptance_histogram"]
    d = SS.self_speculative_draft(lm, L.SkipConfig(exit_layer=2), k=3, fused=True)
    speculative_generate(lm, ids, draft=d, attention_mask=mask, max_new_tokens=4, engine=EAGER, temperature=1.0, seed=0)
    assert d._chain is None


# ------------------------------------------------------------- LayerSkip reuse: one call per round
def test_lean_decoder_runs_layers_in_pieces_like_one_forward(lm):
    """The engine hook ``reuse_generate`` builds on: prepare + run_layers(0, E) + run_layers(E, L)
    is the one forward (same logits, same K/V written)."""
    from accelerando.llm.engine import Engine
    ids, mask = _prompts(2)
    engs = [Engine(lm, batch_size=2, max_len=32, compile=False, role=f"pieces-{i}") for i in range(2)]
    for e in engs:
        e.prefill(ids, mask)
    x = torch.tensor([[5, 7, 9], [11, 13, 15]])
    ref = engs[0].step(x).logits
    dec, c = engs[1].decoder, engs[1].cache
    with torch.no_grad():
        block = dec.prepare(x, torch.ones_like(x, dtype=torch.bool), c)
        h = dec.run_layers(dec.run_layers(dec.embed(x), 0, 2, block, c), 2, 4, block, c)
        got = dec.norm(h) @ dec.lm_head_t
    assert torch.allclose(got, ref, atol=1e-5)
    for a, b in zip(engs[0].cache.layers, c.layers):
        assert torch.allclose(a.k, b.k, atol=1e-6) and torch.allclose(a.v, b.v, atol=1e-6)


@pytest.mark.parametrize("k,exit_layer", [(1, 2), (3, 1), (2, 3)])
def test_reuse_generate_greedy_equals_generate_and_drafts_like_self_draft(lm, k, exit_layer):
    """LayerSkip reuse (verification = the late layers on the draft's states, one call per round) is
    lossless at batch 3 with left padding; its drafts are the early exit's: on the rounds both
    paths run with k drafts (the speculative loop shortens the last ones to the budget) they
    accept the same tokens."""
    from accelerando.llm.compute.selfspec import reuse_generate
    ids, mask = _prompts(3)
    st: dict = {}
    out = reuse_generate(lm, ids, mask, exit_layer=exit_layer, k=k, max_new_tokens=16, compile=False, stats=st)
    assert torch.equal(out, _greedy(lm, ids, mask, 16))
    ref = speculative_generate(lm, ids, draft=SS.self_speculative_draft(lm, L.SkipConfig(exit_layer=exit_layer), k=k),
                               attention_mask=mask, max_new_tokens=16, engine=EAGER)
    hist = ref.stats["acceptance_histogram"]
    assert st["accepted_tokens"] >= ref.stats["accepted_tokens"] > 0 and st["steps"] <= ref.stats["steps"]
    assert st["accepted_tokens"] <= ref.stats["accepted_tokens"] + 3 * k and sum(hist.values()) > 0


def test_reuse_generate_with_an_exit_head_stops_at_eos_and_rejects_bad_knobs(lm, monkeypatch):
    from accelerando.llm import engine as E
    from accelerando.llm.compute.exit_head import ExitHead
    from accelerando.llm.compute.selfspec import reuse_generate
    ids, mask = _prompts(2)
    head = ExitHead(lm.config.hidden_size, 2)
    with torch.no_grad():
        head.block.linear.weight.normal_(0, 0.05)
    ref = _greedy(lm, ids, mask, 12)
    eos = int(ref[0, ids.shape[1] + 4])           # row 0 stops there; generate pads it afterwards
    want = lm.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    got = reuse_generate(lm, ids, mask, exit_layer=2, exit_head=head, k=2, max_new_tokens=12, eos_token_id=eos,
                         pad_token_id=0, compile=False)
    assert torch.equal(got, want)
    for kw, msg in ((dict(exit_layer=0), "exit_layer must be an int in 1..3"), (dict(exit_layer=4), "in 1..3"),
                    (dict(exit_layer=2, k=0), "k \\(drafts per round\\) must be"),
                    (dict(exit_layer=3, exit_head=head), "trained for exit_layer 2")):
        with pytest.raises(ValueError, match=msg):
            reuse_generate(lm, ids, mask, max_new_tokens=4, **kw)
    from accelerando.bench.methods import LLMSetup, NotApplicable
    from accelerando.llm.compute.bench_methods import build_self_spec
    s = LLMSetup(target=lm, tokenizer=None, input_ids=ids, attention_mask=mask, max_new_tokens=12)
    arm = build_self_spec(s, exit_layer=2, k=2, reuse=True, engine="engine-eager")()    # the sweep arm
    assert torch.equal(arm.sequences, ref) and arm.stats["steps"] > 0
    with pytest.raises(NotApplicable, match="needs an early exit"):
        build_self_spec(s, skip=1, k=2, reuse=True, engine="engine-eager")
    assert build_self_spec(replace(s, temperature=1.0), exit_layer=2, k=2, reuse=True, engine="engine-eager")().stats["steps"]
    monkeypatch.setattr(E, "unsupported_reason", lambda m: "pretend")       # the stated fallback
    with pytest.warns(UserWarning, match="falling back to speculative_generate"):
        out = reuse_generate(lm, ids, mask, exit_layer=2, k=2, max_new_tokens=12)
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_reuse_generate_compiled_is_lossless(lm):
    """The compiled round (one graph per k and exit; ~20-40 s to compile on CPU)."""
    from accelerando.llm.compute.selfspec import reuse_generate
    ids, mask = _prompts(2)
    out = reuse_generate(lm, ids, mask, exit_layer=2, k=2, max_new_tokens=16, compile=True)
    assert torch.equal(out, _greedy(lm, ids, mask, 16))


@pytest.mark.parametrize("warp", [dict(temperature=1.0), dict(temperature=0.8, top_k=5)])
def test_reuse_generate_samples_the_target_distribution(warp):
    """Sampling with reuse (the chain rule on device, the round's uniforms drawn outside the call):
    the joint distribution of two sampled tokens is the target's, by chi-square."""
    from accelerando.llm.compute.selfspec import reuse_generate
    from accelerando.llm.sampling import SamplingConfig
    V, N = 8, 2000
    target = tiny_lm("llama", vocab=V, layers=3, seed=3, init_std=0.5)
    prompt = torch.arange(V)[None]
    sampling = SamplingConfig(**warp)
    with torch.no_grad():
        p1 = sampling.probs(target(prompt).logits[0, -1])
        e2 = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], 1)
        p2 = sampling.probs(target(e2).logits[:, -1])
        e3 = torch.cat([e2.repeat_interleave(V, 0), torch.arange(V).repeat(V)[:, None]], 1)
        p3 = sampling.probs(target(e3).logits[:, -1])                        # (V * V, V): given (t1, t2)
    joint12 = (p1[:, None] * p2).flatten()
    st: dict = {}
    out = reuse_generate(target, prompt.repeat(N, 1), exit_layer=2, k=2, max_new_tokens=3, seed=0, compile=False,
                         stats=st, **warp)
    assert st["accepted_tokens"] > 0
    g = out[:, -3:]
    # tokens 1-2 jointly (a draft position and the bonus / residual), token 3 marginally (deeper drafts)
    for obs, exact in ((torch.bincount(g[:, 0] * V + g[:, 1], minlength=V * V), joint12),
                       (torch.bincount(g[:, 2], minlength=V), (joint12[:, None] * p3).sum(0))):
        obs, exact = obs.double(), exact.double()
        keep = exact * N >= 5
        o, e = obs[keep], exact[keep] * N
        if exact[~keep].sum() > 0:           # the rare cells pooled; cells top-k removed must stay empty
            o, e = torch.cat([o, obs[~keep].sum()[None]]), torch.cat([e, exact[~keep].sum()[None] * N])
        assert obs[exact == 0].sum() == 0
        assert chisquare(o.numpy(), e.numpy() * float(o.sum() / e.sum())).pvalue > 1e-3
