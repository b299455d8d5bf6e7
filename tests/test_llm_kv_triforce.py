"""TriForce (retrieval-cache self-drafting) on the speculative loop: greedy == generate, sampled
tokens have the target's distribution (chi-square), the retrieval press keeps whole chunks."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from accelerando.llm import SamplingConfig, speculative_generate
from accelerando.llm.kv.generate import prefill
from accelerando.llm.kv.presses import RetrievalChunkPress
from accelerando.llm.kv.triforce import TriForce
from llm_models import tiny_lm


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_greedy_equals_generate(arch, ratio):
    m = tiny_lm(arch, init_std=0.3, ctx=256)
    ids = torch.randint(1, 96, (2, 90), generator=torch.Generator().manual_seed(1))
    ref = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    out = speculative_generate(m, ids, draft=TriForce(m, k=3, ratio=ratio, chunk=8), max_new_tokens=16)
    assert torch.equal(out.sequences, ref)
    if ratio == 1.0:         # the draft reads the whole cache: it is the target, every draft accepted
        assert out.stats["acceptance_rate"] == 1.0


def test_sampled_tokens_have_target_distribution():
    V, N = 8, 1500
    target = tiny_lm("llama", vocab=V, seed=3, init_std=0.5)
    sampling = SamplingConfig(temperature=1.0)
    prompt = torch.arange(V).repeat(5)[None]                          # 40 tokens: 5 chunks of 8
    with torch.no_grad():
        p1 = sampling.probs(target(prompt).logits[0, -1])
        e2 = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], 1)
        p2 = sampling.probs(target(e2).logits[:, -1])
    exact = (p1[:, None] * p2).flatten().double()
    out = speculative_generate(target, prompt.repeat(N, 1), draft=TriForce(target, k=2, ratio=0.4, chunk=8),
                               max_new_tokens=3, temperature=1.0, seed=0)
    g = out.sequences[:, -3:-1]            # the prefill's token and the first verified one
    obs = torch.bincount(g[:, 0] * V + g[:, 1], minlength=V * V).double()
    keep = exact * N >= 5
    o = torch.cat([obs[keep], obs[~keep].sum()[None]])
    e = torch.cat([exact[keep], exact[~keep].sum()[None]]) * N
    assert chisquare(o.numpy(), e.numpy() * float(o.sum() / e.sum())).pvalue > 1e-3
    assert 0 < out.stats["acceptance_rate"] < 1


def test_retrieval_press_keeps_whole_chunks_first_and_last():
    m = tiny_lm("llama", init_std=0.3, ctx=256)
    ids = torch.randint(1, 96, (1, 100), generator=torch.Generator().manual_seed(2))
    _, run = prefill(m, ids, press=RetrievalChunkPress(ratio=0.33, chunk=8))
    _, full = prefill(m, ids)
    for lp, lf in zip(run.cache.layers, full.cache.layers):
        kept = lp.keys.shape[2]
        assert kept == 4 * 8 - 4          # 4 chunks (33 // 8), the last one partial (100 = 12*8 + 4)
        assert torch.equal(lp.keys[:, :, :8], lf.keys[:, :, :8])
        assert torch.equal(lp.keys[:, :, -4:], lf.keys[:, :, -4:])


def test_triforce_bad_input():
    m = tiny_lm("llama", init_std=0.3, ctx=256)
    other = tiny_lm("llama", init_std=0.3, ctx=256, seed=1)
    ids = torch.randint(1, 96, (1, 40))
    with pytest.raises(ValueError, match="TriForce drafts with the target itself"):
        speculative_generate(m, ids, draft=TriForce(other), max_new_tokens=4)
    with pytest.raises(ValueError, match="ratio must be in"):
        TriForce(m, ratio=0)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="unpadded"):
        speculative_generate(m, ids, attention_mask=mask, draft=TriForce(m, ratio=0.5), max_new_tokens=4)


@pytest.mark.parametrize("engine", ["hf", "engine-eager"])
def test_draft_cache_is_cut_from_the_targets_prefill(engine):
    """No second prefill: the draft's prompt columns are whole chunks of the target's own prompt
    cache (transformers' or the lean engine's), still lossless."""
    m = tiny_lm("llama", init_std=0.3, ctx=256)
    ids = torch.randint(1, 96, (2, 100), generator=torch.Generator().manual_seed(4))
    ref = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    d = TriForce(m, k=3, ratio=0.33, chunk=8)
    out = speculative_generate(m, ids, draft=d, max_new_tokens=12, engine=engine)
    assert torch.equal(out.sequences, ref) and d.shared_prefill
    _, full = prefill(m, ids)
    # on the engine the draft decodes on its own small static cache (the prompt part in slots 0..27)
    layers = [(l.k if engine != "hf" else l.keys) for l in d.state.cache.layers]
    if engine != "hf":
        assert int(d.state.cache.pos_shift[0]) == 100 - 28     # 28 slots kept stand for the 100-token prompt
    for kd_all, lf in zip(layers, full.cache.layers):
        kd = kd_all[:, :, : 4 * 8 - 4]                        # the prompt part: 4 chunks, the last partial
        B, H, m_, D = kd.shape
        # every kept column is one of the target's prompt columns (chunk-aligned runs of 8)
        dist = torch.cdist(kd.reshape(B * H, m_, D), lf.keys.reshape(B * H, -1, D))
        j = dist.argmin(-1)
        assert float(dist.min(-1).values.max()) < 1e-2      # cdist rounding; other columns are ~1 apart
        assert torch.equal(j[:, :8], torch.arange(8).expand(B * H, 8))           # the first chunk stays
        assert bool((j[:, 8:24].view(B * H, 2, 8).diff(dim=-1) == 1).all())     # whole chunks


def test_benchmark_widened_model_computes_the_same_function():
    """benchmarks/llm_kvcache.py times TriForce on a trained model zero-padded into a wider one:
    its logits (so its acceptance) must be the trained model's."""
    import importlib.util
    from pathlib import Path

    import transformers as tf
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_kvcache.py"
    spec = importlib.util.spec_from_file_location("bench_llm_kvcache", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch.manual_seed(0)
    small = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=4, head_dim=8,
                                               max_position_embeddings=256)).eval()
    with torch.no_grad():
        for p in small.parameters():
            p.normal_(0, 0.3)      # sharp logits, non-trivial norms
    big = bench.widened(small, hidden=96, heads=6, head_dim=16, intermediate=80)
    assert big.config.hidden_size == 96 and big.config.num_key_value_heads == 6
    ids = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(big(input_ids=ids).logits, small(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
