"""KV-cache presses and decode-time selection (accelerando.llm.kv) on tiny random models."""
from __future__ import annotations

import pytest
import torch

from llm_models import tiny_lm

from accelerando.llm.kv.dynamic import RecycledAttention, TokenSelect
from accelerando.llm.kv.generate import kv_continuation_logits, kv_generate, prefill
from accelerando.llm.kv.presses import (ElasticCachePress, H2OPress, SnapKVPress, StreamingLLMPress, kv_bytes)

N, NEW = 80, 8


def _setup(arch: str = "llama", batch: int = 2):
    m = tiny_lm(arch, init_std=0.2, ctx=256)
    ids = torch.randint(1, 96, (batch, N), generator=torch.Generator().manual_seed(0))
    ref = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    return m, ids, ref


def _all_methods(ratio: float) -> list[dict]:
    return [dict(press=StreamingLLMPress(ratio=ratio)), dict(press=SnapKVPress(ratio=ratio, window=8)),
            dict(press=H2OPress(ratio=ratio)), dict(press=ElasticCachePress(ratio=ratio)),
            dict(policy=TokenSelect(ratio=ratio)), dict(policy=RecycledAttention(ratio=ratio))]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ratio_one_equals_full_cache(arch):
    m, ids, ref = _setup(arch)
    for meth in _all_methods(1.0):
        out, _ = kv_generate(m, ids, max_new_tokens=NEW, **meth)
        assert torch.equal(out, ref), meth


def test_recycled_stride_one_is_full_attention():
    m, ids, ref = _setup()
    out, st = kv_generate(m, ids, max_new_tokens=NEW, policy=RecycledAttention(ratio=0.25, stride=1))
    assert torch.equal(out, ref)
    assert st["policy_recycled_steps"] == 0


def test_tokenselect_keeping_all_but_sinks_window_matches():
    # budget = whole cache minus nothing: a ratio that rounds to L keeps every token
    m, ids, ref = _setup()
    out, _ = kv_generate(m, ids, max_new_tokens=NEW, policy=TokenSelect(ratio=0.999))
    assert torch.equal(out, ref)


def test_press_memory_is_actually_freed_and_policies_keep_it():
    m, ids, _ = _setup()
    for ratio in (0.25, 0.5):
        for meth in _all_methods(ratio):
            _, st = kv_generate(m, ids, max_new_tokens=NEW, **meth)
            held_prompt = st["kv_bytes_prefill"] / st["kv_bytes_full"]
            if "press" in meth:
                assert abs(held_prompt - ratio) < 0.03, (meth, held_prompt)
                assert st["kv_bytes_masked"] == 0
            else:        # decode-time selection keeps the whole cache in memory and says so
                assert held_prompt == 1.0 and st["kv_bytes_masked"] == st["kv_bytes_full"]


def test_streaming_keeps_sinks_and_recent_window():
    m, ids, _ = _setup(batch=1)
    press = StreamingLLMPress(ratio=0.25, sinks=4)
    _, run = prefill(m, ids, press=press)
    _, full = prefill(m, ids)
    k = round(0.25 * N)
    for lp, lf in zip(run.cache.layers, full.cache.layers):
        assert lp.keys.shape[2] == k
        assert torch.equal(lp.keys[:, :, :4], lf.keys[:, :, :4])
        assert torch.equal(lp.keys[:, :, 4:], lf.keys[:, :, N - (k - 4):])


def test_snapkv_keeps_its_window_and_per_head_selection():
    m, ids, _ = _setup(batch=1)
    press = SnapKVPress(ratio=0.5, window=8)
    _, run = prefill(m, ids, press=press)
    _, full = prefill(m, ids)
    lp, lf = run.cache.layers[0], full.cache.layers[0]
    assert torch.equal(lp.keys[:, :, -8:], lf.keys[:, :, -8:])
    # each kv head chose its own columns: find every kept key among the full cache's keys
    for h in range(lp.keys.shape[1]):
        rows = (lp.keys[0, h][:, None] == lf.keys[0, h][None]).all(-1).float().argmax(1)
        assert torch.all(rows[1:] > rows[:-1])            # ascending original order


def test_h2o_keeps_heavy_hitter_it_should():
    # a key that every query attends to must survive H2O: make column 3 a heavy hitter by scoring
    press = H2OPress(ratio=0.25, recent=0.5)
    press.reset()
    scores = torch.zeros(1, 1, 40)
    scores[..., 3] = 10.0
    press.scores[0] = scores
    idx = press.select(0, torch.zeros(1, 1, 40, 4))
    assert 3 in idx[0, 0].tolist()
    assert idx[0, 0, -5:].tolist() == list(range(35, 40))           # recent half of the 10 kept


def test_elastic_merges_into_nearest_anchor():
    press = ElasticCachePress(ratio=0.5)
    keys = torch.arange(6, dtype=torch.float32).view(1, 1, 6, 1)
    idx = torch.tensor([[[0, 3, 5]]])
    k, v = press._reduce(0, keys, keys.clone(), idx)
    # owners: 0->0, 1->0 (tie left), 2->3, 3->3, 4->3 (tie left) / 5, 5->5
    assert k.flatten().tolist() == pytest.approx([0.5, 3.0, 5.0])


def test_teacher_forced_logits_full_cache_match_forward():
    m, ids, _ = _setup()
    with torch.no_grad():
        full = m(ids).logits
    got = kv_continuation_logits(m, ids[:, :60], ids[:, 60:], press=SnapKVPress(ratio=1.0, window=8))
    assert torch.allclose(got, full[:, 59:-1], atol=1e-4)
    got = kv_continuation_logits(m, ids[:, :60], ids[:, 60:], policy=TokenSelect(ratio=1.0))
    assert torch.allclose(got, full[:, 59:-1], atol=1e-4)


def test_bad_knobs_one_line_errors():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio must be in"):
            SnapKVPress(ratio=bad)
        with pytest.raises(ValueError, match="ratio must be in"):
            TokenSelect(ratio=bad)
    with pytest.raises(ValueError, match="stride"):
        RecycledAttention(stride=0)
    m, ids, _ = _setup()
    with pytest.raises(ValueError, match=r"window=128 is larger than the context \(80 tokens\)"):
        kv_generate(m, ids, press=SnapKVPress(ratio=0.5, window=128))
    with pytest.raises(ValueError, match="sinks"):
        kv_generate(m, ids, press=StreamingLLMPress(ratio=0.01, sinks=4))


def test_unsupported_architecture_one_line_error():
    class NotHF(torch.nn.Module):
        config = None
    with pytest.raises(TypeError, match="does not support NotHF"):
        kv_generate(NotHF(), torch.ones(1, 4, dtype=torch.long), press=SnapKVPress())


def test_kv_bytes_counts_layers():
    m, ids, _ = _setup(batch=1)
    _, run = prefill(m, ids)
    cfg = m.config
    per = 2 * cfg.num_key_value_heads * N * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert kv_bytes(run.cache) == per * cfg.num_hidden_layers


def test_streaming_equals_kvpress_streaming():
    """Independent reference: kvpress's StreamingLLMPress (4 sinks + recent) keeps the same tokens
    (in its own order, which attention does not see): same continuation logits."""
    pytest.importorskip("kvpress")
    from accelerando.llm.kv.anchor import KVPressAnchor
    m, ids, _ = _setup()
    for ratio in (0.25, 0.5):
        ours = kv_continuation_logits(m, ids[:, :64], ids[:, 64:], press=StreamingLLMPress(ratio=ratio, sinks=4))
        theirs = kv_continuation_logits(m, ids[:, :64], ids[:, 64:], press=KVPressAnchor("kvpress-streaming", ratio=ratio))
        assert torch.allclose(ours, theirs, atol=1e-5)


def test_kvpress_anchor_ratio_one_is_full_cache_and_bad_name():
    pytest.importorskip("kvpress")
    from accelerando.llm.kv.anchor import KVPressAnchor
    m, ids, ref = _setup()
    out, st = kv_generate(m, ids, max_new_tokens=NEW, press=KVPressAnchor("kvpress-snapkv", ratio=1.0))
    assert torch.equal(out, ref)
    _, st = kv_generate(m, ids, max_new_tokens=NEW, press=KVPressAnchor("kvpress-snapkv", ratio=0.5))
    assert st["kv_bytes_prefill"] == st["kv_bytes_full"] // 2
    with pytest.raises(ValueError, match="unknown kvpress anchor 'nope'"):
        KVPressAnchor("nope")


def test_chunked_attention_probs_match_dense_reference():
    from accelerando.llm.kv.attention import attention_probs
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 300, 8, generator=g), torch.randn(1, 2, 300, 8, generator=g)
    kk = k.repeat_interleave(2, 1)                                      # GQA: 2 query heads per kv head
    ref = ((q @ kk.transpose(-1, -2)) * 0.3).masked_fill(torch.ones(300, 300, dtype=torch.bool).triu(1),
                                                          float("-inf")).softmax(-1)
    for s, p in attention_probs(q, k, scaling=0.3, q_offset=0, chunk=64):
        assert torch.allclose(p, ref[:, :, s: s + 64, : p.shape[-1]], atol=1e-6)
        assert float(ref[:, :, s: s + 64, p.shape[-1]:].sum()) == 0.0       # what a chunk skips is masked
    (s, p), = attention_probs(q[:, :, -10:], k, scaling=0.3, q_offset=290)   # SnapKV's window
    assert torch.allclose(p, ref[:, :, 290:], atol=1e-6)


@pytest.mark.parametrize("press", [StreamingLLMPress(ratio=0.5), SnapKVPress(ratio=0.5, window=8),
                                   H2OPress(ratio=0.25), ElasticCachePress(ratio=0.5)], ids=repr)
def test_presses_on_the_lean_engine_match_transformers(press):
    """The pressed cache moved into the engine's static cache (physically smaller, positions
    shifted to the true ones): the same greedy tokens as decoding the pressed DynamicCache, and
    ratio 1 equals plain generate."""
    m = tiny_lm("llama", init_std=0.2, ctx=512)
    ids = torch.randint(1, 96, (2, 300), generator=torch.Generator().manual_seed(0))
    hf, _ = kv_generate(m, ids, max_new_tokens=NEW, press=press)
    eng, st = kv_generate(m, ids, max_new_tokens=NEW, press=press, engine="engine-eager")
    assert torch.equal(eng, hf)
    assert st["kv_slots_engine"] < 300 and st["kv_bytes_prefill"] < st["kv_bytes_full"]
    ref = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False)
    full, _ = kv_generate(m, ids, max_new_tokens=NEW, press=type(press)(ratio=1.0), engine="engine-eager")
    assert torch.equal(full, ref)


def test_engine_bad_input():
    m, ids, _ = _setup()
    with pytest.raises(ValueError, match="engine must be one of"):
        kv_generate(m, ids, press=StreamingLLMPress(ratio=0.5), engine="vllm")
    with pytest.raises(ValueError, match="prefill presses only"):
        kv_generate(m, ids, policy=TokenSelect(ratio=0.5), engine="engine-eager")
    g = tiny_lm("gpt2", init_std=0.2, ctx=256)
    with pytest.raises(TypeError, match="engine= cannot run GPT2LMHeadModel"):
        kv_generate(g, ids, press=StreamingLLMPress(ratio=0.5), engine="engine-eager")


def test_sliding_window_architecture_one_line_error():
    """A press on sliding-window attention layers (Mistral with a window) would cut a cache the
    model already windows: refused, naming the architecture."""
    import transformers as tf
    cfg = tf.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=16)
    m = tf.MistralForCausalLM(cfg).eval()
    ids = torch.randint(1, 96, (1, 40))
    for meth in (dict(press=SnapKVPress(ratio=0.5, window=8)), dict(policy=TokenSelect(ratio=0.5))):
        with pytest.raises(TypeError, match="does not support MistralForCausalLM: sliding-window") as e:
            kv_generate(m, ids, max_new_tokens=2, **meth)
        assert "\n" not in str(e.value)
