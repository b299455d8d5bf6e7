"""The lean engine equals the HF model: logits (float32, ~1e-5) and greedy tokens (exactly)."""

import warnings

import pytest
import torch
import transformers

from accelerando.llm import engine
from accelerando.llm.static_cache import StaticKVCache


V = 96


def _tiny(kind: str, seed: int = 0, hidden: int = 32):
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=V, max_position_embeddings=256,
                  eos_token_id=None, bos_token_id=None, pad_token_id=0)
    if kind == "llama":
        cfg, cls = transformers.LlamaConfig(**common, attention_bias=True), transformers.LlamaForCausalLM
    elif kind == "qwen2":
        cfg, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    elif kind == "mistral":   # a window shorter than the sequences, so it matters
        cfg, cls = transformers.MistralConfig(**common, sliding_window=6), transformers.MistralForCausalLM
    else:
        raise ValueError(kind)
    return cls(cfg).eval()


def _prompts(batch: int, length: int = 9, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for b in range(1, batch):          # left padding of different widths
        mask[b, : 2 * b] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("chunk", [engine.PREFILL_CHUNK, 4, 3])
def test_prefill_logits_equal_hf_forward(kind, chunk):
    # chunk < prompt: the prefill runs in chunks of queries, each over the slots written so far
    # (row 2's first chunk is all padding; the Mistral window of 6 spans chunks)
    model = _tiny(kind)
    ids, mask = _prompts(3)
    eng = engine.Engine(model, batch_size=3, max_len=32, compile=False)
    eng.prefill_chunk = chunk
    out = eng.prefill(ids, mask, last_only=False, return_hidden=True)
    hidden, ours = out.hidden, out.logits
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hidden[real], ref.hidden_states[-1][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_generate_equals_hf_generate(kind, batch):
    model = _tiny(kind)
    ids, mask = _prompts(batch)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=14, do_sample=False, pad_token_id=0)
    out = engine.generate(model, ids, mask, max_new_tokens=14, compile=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_chunked_prefill_then_decode_equals_hf_generate(monkeypatch):
    monkeypatch.setattr(engine.Engine, "prefill_chunk", 4)     # a 9-token prompt in 3 chunks
    model = _tiny("mistral")
    ids, mask = _prompts(3)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert torch.equal(engine.generate(model, ids, mask, max_new_tokens=10, compile=False, pad_token_id=0), ref)


def test_eos_stops_rows_like_hf():
    model = _tiny("llama")
    ids, mask = _prompts(3)
    free = engine.generate(model, ids, mask, max_new_tokens=12, compile=False, pad_token_id=0)
    eos = int(free[1, ids.shape[1] + 3])            # a token row 1 emits early: it must stop there
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    out = engine.generate(model, ids, mask, max_new_tokens=12, compile=False, eos_token_id=eos,
                          pad_token_id=0, check_every=2)
    assert torch.equal(out, ref)


@pytest.mark.slow
def test_compiled_steps_equal_hf_generate_for_two_same_depth_models():
    # same layer count, different widths: each engine must get its own compiled graphs
    for model in (_tiny("qwen2"), _tiny("llama", seed=3, hidden=48)):
        ids, mask = _prompts(2)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
        stats = {}
        out = engine.generate(model, ids, mask, max_new_tokens=10, compile=True, pad_token_id=0, stats=stats)
        assert torch.equal(out, ref)
        assert stats["compile_s"], "the first compiled call's cost is reported"


def _chain_logits(model, ids, mask, cont):
    """Reference: HF forward over prompt + continuation, logits of the continuation positions."""
    full = torch.cat([ids, cont], 1)
    full_mask = torch.cat([mask, torch.ones_like(cont)], 1)
    with torch.no_grad():
        return model(full, attention_mask=full_mask).logits[:, ids.shape[1]:]


def test_rollback_is_a_pointer_move():
    model = _tiny("llama")
    ids, mask = _prompts(2)
    eng = engine.Engine(model, batch_size=2, max_len=32, compile=False)
    eng.prefill(ids, mask)
    P = ids.shape[1]
    eng.step(torch.randint(1, V, (2, 4)))                      # 4 drafts
    before = [t.clone() for t in eng.cache.k]
    ptrs = [t.data_ptr() for t in eng.cache.k]
    eng.cache.rollback(torch.tensor([P, P + 2]))               # row 1 keeps two of them
    assert eng.cache.lengths.tolist() == [P, P + 2]
    assert [t.data_ptr() for t in eng.cache.k] == ptrs
    assert all(torch.equal(a, b) for a, b in zip(before, eng.cache.k))   # nothing was copied


def test_rollback_then_rewrite_equals_fresh_chain():
    model = _tiny("mistral")
    ids, mask = _prompts(2)
    drafts = torch.randint(1, V, (2, 5))
    eng = engine.Engine(model, batch_size=2, max_len=32, compile=False)
    eng.prefill(ids, mask)
    P = ids.shape[1]
    eng.step(drafts)
    n_keep = torch.tensor([1, 3])
    eng.cache.rollback(P + n_keep)
    nxt = torch.randint(1, V, (2, 2))
    ours = eng.step(nxt).logits
    for b in range(2):
        cont = torch.cat([drafts[b, : n_keep[b]], nxt[b]])[None]
        ref = _chain_logits(model, ids[b:b + 1], mask[b:b + 1], cont)[:, -2:]
        torch.testing.assert_close(ours[b:b + 1], ref, atol=1e-5, rtol=1e-5)


def _tree():
    """Root-relative tree of 5 nodes: 0 -> {1, 2}, 1 -> 3, 2 -> 4 (parents [-1, 0, 0, 1, 2])."""
    parents = [-1, 0, 0, 1, 2]
    T = len(parents)
    anc = torch.zeros(T, T, dtype=torch.bool)
    for n in range(T):
        m = n
        while m >= 0:
            anc[n, m] = True
            m = parents[m]
    return parents, anc


def test_tree_mask_and_keep_path_equal_chain():
    model = _tiny("qwen2")
    ids, mask = _prompts(2)
    parents, anc = _tree()
    nodes = torch.randint(1, V, (2, len(parents)))
    eng = engine.Engine(model, batch_size=2, max_len=32, compile=False)
    eng.prefill(ids, mask)
    P = ids.shape[1]
    tree_logits = eng.step(nodes, tree_mask=anc).logits
    paths = {3: [0, 1, 3], 4: [0, 2, 4]}
    for leaf, path in paths.items():       # every node's logits == running its path as a chain
        for b in range(2):
            ref = _chain_logits(model, ids[b:b + 1], mask[b:b + 1], nodes[b:b + 1, path])
            torch.testing.assert_close(tree_logits[b, path], ref[0], atol=1e-5, rtol=1e-5)
    # accept path 0->2->4 in row 0, 0->1 in row 1; then continue and compare with the chain
    eng.cache.rollback(P)
    eng.cache.keep_path(torch.tensor([[0, 2, 4], [0, 1, 0]]), n_keep=torch.tensor([3, 2]))
    assert eng.cache.lengths.tolist() == [P + 3, P + 2]
    nxt = torch.randint(1, V, (2, 1))
    ours = eng.step(nxt).logits
    for b, path in enumerate([[0, 2, 4], [0, 1]]):
        cont = torch.cat([nodes[b, path], nxt[b]])[None]
        ref = _chain_logits(model, ids[b:b + 1], mask[b:b + 1], cont)[:, -1:]
        torch.testing.assert_close(ours[b:b + 1], ref, atol=1e-5, rtol=1e-5)


def test_cache_validation_and_crop():
    with pytest.raises(ValueError):
        StaticKVCache.allocate(n_layers=0, batch=1, n_kv_heads=1, max_len=4, head_dim=2)
    c = StaticKVCache.allocate(n_layers=1, batch=2, n_kv_heads=1, max_len=8, head_dim=2)
    c.advance(6)
    c.crop(-2)
    assert c.lengths.tolist() == [4, 4]
    c.crop(3)
    assert c.get_seq_length() == 3


def test_unsupported_architecture_falls_back_with_notice():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=V, n_positions=64,
                                  eos_token_id=None, bos_token_id=None)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    assert engine.unsupported_reason(model) is not None
    ids, mask = _prompts(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = engine.generate(model, ids, mask, max_new_tokens=5, pad_token_id=0)
    assert any("falling back" in str(w.message) for w in caught)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)


def test_sampled_generate_has_target_distribution():
    """Joint distribution of the first two sampled tokens over 3000 rows of one batch == the
    target's processed distribution (temperature, top-k), chi-square."""
    from scipy.stats import chisquare

    from accelerando.llm.sampling import SamplingConfig
    Vs, N = 8, 3000
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=Vs, max_position_embeddings=64,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    sampling = SamplingConfig(temperature=0.9, top_k=6)
    prompt = torch.tensor([[3, 7, 1, 2]])
    with torch.no_grad():
        p1 = sampling.probs(model(prompt).logits[0, -1])
        p2 = sampling.probs(model(torch.cat([prompt.repeat(Vs, 1), torch.arange(Vs)[:, None]], 1)).logits[:, -1])
    exact = (p1[:, None] * p2).flatten().double()
    g = torch.Generator().manual_seed(0)
    out = engine.generate(model, prompt.repeat(N, 1), max_new_tokens=2, compile=False, temperature=0.9, top_k=6,
                          generator=g, eos_token_id=[])[:, -2:]
    obs = torch.bincount(out[:, 0] * Vs + out[:, 1], minlength=Vs * Vs).double()
    assert obs[exact == 0].sum() == 0
    keep = exact * N >= 5
    o = torch.cat([obs[keep], obs[~keep & (exact > 0)].sum()[None]])
    e = torch.cat([exact[keep], exact[~keep & (exact > 0)].sum()[None]]) * N
    assert chisquare(o.numpy(), e.numpy() * float(o.sum() / e.sum())).pvalue > 1e-3


def test_keep_path_unmasked_move_equals_masked():
    """keep_path without n_keep (every row keeps its whole path) == with n_keep = P for every row."""
    a = StaticKVCache.allocate(n_layers=2, batch=2, n_kv_heads=2, max_len=16, head_dim=3)
    for buf in (*a.k, *a.v):
        buf.copy_(torch.randn_like(buf))
    a.valid.copy_(torch.rand(2, 16) > 0.3)
    a.advance(5)
    b = StaticKVCache.allocate(n_layers=2, batch=2, n_kv_heads=2, max_len=16, head_dim=3)
    for x, y in zip((*b.k, *b.v, b.valid, b.lengths), (*a.k, *a.v, a.valid, a.lengths)):
        x.copy_(y)
    path = torch.tensor([[0, 2, 5], [0, 1, 4]])
    a.keep_path(path)
    b.keep_path(path, n_keep=torch.tensor([3, 3]))
    for x, y in zip((*a.k, *a.v, a.valid, a.lengths), (*b.k, *b.v, b.valid, b.lengths)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fused_weights_equal_the_modules_and_follow_weight_changes(kind):
    """The engine multiplies by fused, transposed copies of q/k/v, gate/up, o, down and lm_head:
    the same logits as the HF modules (prefill and a step), rebuilt when a weight changes in place."""
    model = _tiny(kind)
    ids, mask = _prompts(2)
    fused = engine.Engine(model, batch_size=2, max_len=32, compile=False)
    real = mask.bool()
    for change in (False, True):
        if change:
            with torch.no_grad():
                model.model.layers[0].mlp.up_proj.weight.mul_(1.5)
                model.model.layers[1].self_attn.k_proj.weight.add_(0.05)
        a = fused.prefill(ids, mask, last_only=False).logits
        with torch.no_grad():
            ref = model(ids, attention_mask=mask).logits
        torch.testing.assert_close(a[real], ref[real], atol=1e-5, rtol=1e-5)
        step = torch.randint(1, V, (2, 3), generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(fused.step(step).logits, _chain_logits(model, ids, mask, step), atol=1e-5, rtol=1e-5)


def test_transposed_weight_is_shared_and_follows_in_place_changes():
    w = torch.nn.Parameter(torch.randn(6, 4))
    t1 = engine.transposed(w)
    assert torch.equal(t1, w.detach().t()) and t1.is_contiguous() and engine.transposed(w) is t1
    with torch.no_grad():
        w.mul_(2.0)
    t2 = engine.transposed(w)
    assert t2 is not t1 and torch.equal(t2, w.detach().t())


def _ctx_model(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=V, max_position_embeddings=1024,
                                   eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_a_stream_of_prompt_lengths_meets_a_few_step_shapes():
    """20 prompts of random lengths 8-400 through one model and batch size: the pooled engine grows
    its cache by powers of two, so its steps take at most 3 shapes (= compiled graphs), not one per
    length; every output still equals generate's."""
    model = _ctx_model()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 401, (20,), generator=g).tolist()
    for i, n in enumerate(lengths):
        ids = torch.randint(1, V, (1, n), generator=g)
        out = engine.generate(model, ids, max_new_tokens=4, compile=False, eos_token_id=[])
        if i % 7 == 0:
            ref = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
            assert torch.equal(out, ref)
    eng = engine.Engine.open(model, batch_size=1, max_len=8, compile=False, role="target")
    assert len(eng.stats.shapes) <= 3 and eng.max_len == engine.length_bucket(max(lengths) + 4)
    assert engine.length_bucket(1) == engine.MIN_LEN and engine.length_bucket(129) == 256


@pytest.mark.slow
def test_compiled_stream_compiles_a_few_graphs():
    model = _ctx_model(1)
    g = torch.Generator().manual_seed(1)
    for n in (300, 12, 77, 150, 9):       # the longest first: one cache length for the whole stream
        ids = torch.randint(1, V, (1, n), generator=g)
        st = {}
        out = engine.generate(model, ids, max_new_tokens=3, compile=True, eos_token_id=[], stats=st)
        assert torch.equal(out, model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                               eos_token_id=None))
    assert st["graphs"] == 1


def test_dot_product_projection_equals_matmul_when_compiled():
    # steps of <= DOT_MAX_ROWS rows multiply by per-row dot products over the (out, in) weight
    # (compiled only); they must give x @ W up to float rounding, for one row and several, with a bias
    from accelerando.llm.engine import DOT_MAX_ROWS, _linear_t
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g)                 # (out, in)
    b = torch.randn(24, generator=g)
    f = torch.compile(lambda x: _linear_t(x, w.t().contiguous(), b, None, w), fullgraph=True, dynamic=False)
    for shape in [(1, 1, 40), (2, 3, 40), (1, DOT_MAX_ROWS, 40)]:
        x = torch.randn(*shape, generator=g)
        torch.testing.assert_close(f(x), x @ w.t() + b, rtol=1e-5, atol=1e-5)
