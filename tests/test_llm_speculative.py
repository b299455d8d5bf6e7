"""speculative_generate: greedy == target.generate token for token (4 architectures, every drafter,
batch 1 and 3 with left padding, with and without EOS), caches kept across steps (call counter),
sampled output has the target's distribution (chi-square), clear errors on bad input."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from accelerando.llm import DraftModel, NonFiniteLogitsError, PromptLookup, SamplingConfig, speculative_generate
from llm_models import ARCHS, noisy_copy, tiny_lm


@pytest.fixture(autouse=True)
def _hf_caches(monkeypatch):
    """These tests run on transformers' caches (any architecture; the engine has its own file)."""
    from accelerando.llm import engine
    monkeypatch.setattr(engine, "DEFAULT_ENGINE", "hf")

SIGNIFICANCE = 1e-3


def _prompts(batch: int, vocab: int = 96, length: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    ids[:, length // 2:] = ids[:, : length - length // 2]            # some repetition for prompt lookup
    mask = torch.ones_like(ids)
    for b in range(1, batch):                                        # left padding of different lengths
        mask[b, : 2 * b + 1] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(scope="module", params=ARCHS)
def models(request):
    target = tiny_lm(request.param, seed=0, init_std=0.3)
    return request.param, target, noisy_copy(target, 0.1)


def _drafters(draft):
    return {"draft-k3": DraftModel(draft, k=3), "bare-model": draft, "adaptive": DraftModel(draft, k="adaptive"),
            "prompt-lookup": PromptLookup(ngram_sizes=(2, 1), k=4)}


@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_equals_generate(models, batch):
    arch, target, draft = models
    ids, mask = _prompts(batch)
    ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16)
    for name, d in _drafters(draft).items():
        out = speculative_generate(target, ids, attention_mask=mask, draft=d, max_new_tokens=16)
        assert torch.equal(out.sequences, ref), (arch, batch, name)
    # the noisy draft agrees partly: rows accepted different numbers of tokens (the batch path is exercised)
    assert 0 < out.stats["accepted_tokens"] or name == "prompt-lookup"


def test_each_row_of_a_padded_batch_accepts_as_at_batch_1(models):
    """A draft that sees the wrong context in some rows (per-row holes, masks, positions) keeps the
    greedy output right but loses acceptance there -- invisible to the equality tests. A self-draft
    must be accepted everywhere; a noisy draft must need, in every row of a left-padded batch, as
    many target calls as that prompt alone (the batch then runs as long as its slowest row)."""
    arch, target, draft = models
    ids, mask = _prompts(4, seed=2)
    out = speculative_generate(target, ids, attention_mask=mask, draft=DraftModel(target, k=3), max_new_tokens=16)
    assert out.stats["accepted_tokens"] == out.stats["drafted_tokens"] > 0, arch
    out = speculative_generate(target, ids, attention_mask=mask, draft=DraftModel(draft, k=3), max_new_tokens=16)
    alone = [speculative_generate(target, ids[b: b + 1, mask[b].bool()], draft=DraftModel(draft, k=3),
                                  max_new_tokens=16).stats for b in range(4)]
    assert out.stats["target_calls_per_row"] == [s["target_calls"] for s in alone], arch
    assert out.stats["target_calls"] == max(s["target_calls"] for s in alone)


def test_plain_decoding_steps_keep_caches_in_step(models):
    """k = 0 steps (adaptive k when drafting does not pay) and probes mixed in: still == generate."""
    from accelerando.llm.drafters.adaptive import AdaptiveK
    arch, target, draft = models
    ids, mask = _prompts(2)
    ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16)
    out = speculative_generate(target, ids, attention_mask=mask, draft=DraftModel(draft, k="adaptive", cost_ratio=3.0),
                               max_new_tokens=16)
    assert torch.equal(out.sequences, ref)
    assert out.stats["mean_k"] < 1 and out.stats["drafted_tokens"] > 0


def test_greedy_with_eos_equals_generate(models):
    arch, target, draft = models
    ids, mask = _prompts(3, seed=1)
    free = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    eos = int(free[0, ids.shape[1] + 6])                              # row 0 stops early, others maybe not
    ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, eos_token_id=eos,
                          pad_token_id=0)
    for name in ("draft-k3", "prompt-lookup"):
        d = _drafters(draft)[name]
        out = speculative_generate(target, ids, attention_mask=mask, draft=d, max_new_tokens=20, eos_token_id=eos,
                                   pad_token_id=0)
        assert torch.equal(out.sequences, ref), (arch, name)


def test_target_runs_once_per_step_on_k_plus_1_positions():
    target = tiny_lm("llama", seed=0, init_std=0.3)
    draft = noisy_copy(target, 0.1)
    calls = []
    h = target.register_forward_pre_hook(lambda m, a, kw: calls.append(tuple(kw["input_ids"].shape)), with_kwargs=True)
    try:
        ids, mask = _prompts(2)
        out = speculative_generate(target, ids, attention_mask=mask, draft=DraftModel(draft, k=4), max_new_tokens=30)
    finally:
        h.remove()
    assert len(calls) == out.stats["target_calls"] == out.stats["steps"] + 1
    assert calls[0] == (2, ids.shape[1])                              # the only prefill
    widths = [c[1] for c in calls[1:]]
    assert all(w <= 5 for w in widths) and widths.count(5) >= len(widths) - 2   # k+1, shorter only near the end
    assert out.stats["accepted_tokens"] > 0


def test_kv_caches_roll_back_exactly():
    """After a run, the target cache holds exactly the kept columns: prompt + accepted per step."""
    from accelerando.llm.cache import HFCache
    target = tiny_lm("gpt2", seed=0, init_std=0.3)
    st = HFCache(target)
    ids, mask = _prompts(2)
    st.forward(ids, mask.bool())
    start = st.mark()
    st.forward(torch.randint(3, 96, (2, 5)))
    st.rollback(start, torch.tensor([2, 4]), 4)
    assert st.cache.get_seq_length() == start + 4 == st.valid.shape[1]
    assert st.lengths.tolist() == [int(mask[0].sum()) + 2, int(mask[1].sum()) + 4]
    assert st.valid[0, -2:].tolist() == [False, False] and st.valid[1, -4:].all()


def test_sampled_tokens_have_target_distribution():
    """End to end: joint distribution of the first three generated tokens (the first from the
    prefill, the next two from one speculative step) over 2000 seeds-in-a-batch, chains k = 1..3 and prompt lookup."""
    V, N = 8, 2000
    target = tiny_lm("llama", vocab=V, seed=3, init_std=0.5)
    draft = noisy_copy(target, 0.6, seed=4)
    sampling = SamplingConfig(temperature=1.0, top_k=5)
    prompt = torch.arange(V).repeat(2)[None]                     # every token has a continuation to look up
    with torch.no_grad():
        p1 = sampling.probs(target(prompt).logits[0, -1])                               # (V,)
        e2 = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], 1)
        p2 = sampling.probs(target(e2).logits[:, -1])                                  # (V, V)
        e3 = torch.cat([prompt.repeat(V * V, 1), torch.cartesian_prod(torch.arange(V), torch.arange(V))], 1)
        p3 = sampling.probs(target(e3).logits[:, -1]).reshape(V, V, V)
    exact = (p1[:, None, None] * p2[:, :, None] * p3).flatten().double()
    drafters = {1: DraftModel(draft, k=1), 2: DraftModel(draft, k=2), 3: DraftModel(draft, k=3),
                4: PromptLookup(ngram_sizes=(1,), k=2),          # deterministic drafts (q = one-hot)
                5: DraftModel(draft, k="adaptive")}              # a timed plain step first, then a probe
    for k, d in drafters.items():
        out = speculative_generate(target, prompt.repeat(N, 1), draft=d, max_new_tokens=3,
                                   temperature=1.0, top_k=5, seed=k)
        g = out.sequences[:, -3:]
        obs = torch.bincount(g[:, 0] * V * V + g[:, 1] * V + g[:, 2], minlength=V ** 3).double()
        assert obs[exact == 0].sum() == 0                                       # top-k respected
        keep = exact * N >= 5
        o = torch.cat([obs[keep], obs[~keep & (exact > 0)].sum()[None]])
        e = torch.cat([exact[keep], exact[~keep & (exact > 0)].sum()[None]]) * N
        assert chisquare(o.numpy(), e.numpy() * float(o.sum() / e.sum())).pvalue > SIGNIFICANCE, k
        assert 0 < out.stats["acceptance_rate"] < 1 or k == 5


def test_sampling_is_reproducible_with_a_seed():
    target = tiny_lm("qwen2", seed=0, init_std=0.3)
    draft = noisy_copy(target, 0.2)
    ids, mask = _prompts(2)
    kw = dict(attention_mask=mask, draft=DraftModel(draft, k=3), max_new_tokens=16, temperature=0.8, top_p=0.9)
    a = speculative_generate(target, ids, seed=5, **kw).sequences
    b = speculative_generate(target, ids, seed=5, **kw).sequences
    assert torch.equal(a, b)


# -- bad input -------------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    target = tiny_lm("llama", vocab=96, seed=0, ctx=64)
    other = tiny_lm("llama", vocab=80, seed=1)
    ids = torch.randint(3, 80, (1, 8))
    with pytest.raises(ValueError, match="target vocab size 96, draft vocab size 80"):
        speculative_generate(target, ids, draft=other, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(target, ids, draft=PromptLookup(), max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(target, ids, draft=PromptLookup(), max_new_tokens=4, temperature=-0.5)
    with pytest.raises(ValueError, match="exceeds the target's context of 64"):
        speculative_generate(target, torch.randint(3, 80, (1, 60)), draft=PromptLookup(), max_new_tokens=8)
    with pytest.raises(TypeError, match="past_key_values"):
        speculative_generate(target, ids, draft=DraftModel(torch.nn.Linear(4, 4)), max_new_tokens=4)
    out = speculative_generate(target, ids, draft=PromptLookup(), max_new_tokens=0)
    assert torch.equal(out.sequences, ids)


class _Tok:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_tokenizers_compared_when_given():
    target = tiny_lm("llama", vocab=96, seed=0)
    padded = tiny_lm("llama", vocab=112, seed=1)                   # same tokenizer, padded vocabulary
    tok = _Tok({f"t{i}": i for i in range(90)})
    ids = torch.randint(3, 90, (1, 8))
    out = speculative_generate(target, ids, draft=DraftModel(padded, k=2, tokenizer=tok), tokenizer=tok,
                               max_new_tokens=6)
    assert torch.equal(out.sequences, target.generate(ids, do_sample=False, max_new_tokens=6))
    with pytest.raises(ValueError, match="different tokenizers"):
        speculative_generate(target, ids, draft=DraftModel(padded, tokenizer=_Tok({"a": 0})), tokenizer=tok,
                             max_new_tokens=4)


def test_non_finite_logits_raise():
    target = tiny_lm("llama", seed=0)
    draft = tiny_lm("llama", seed=1)
    with torch.no_grad():
        draft.lm_head.weight[5] = float("nan")
    ids = torch.randint(3, 90, (1, 8))
    for temp in (0.0, 1.0):
        with pytest.raises(NonFiniteLogitsError, match="non-finite"):
            speculative_generate(target, ids, draft=DraftModel(draft, k=2), max_new_tokens=6, temperature=temp, seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_greedy_equals_generate_on_cuda():
    target = tiny_lm("llama", seed=0, init_std=0.3).cuda()
    draft = noisy_copy(target.cpu(), 0.1).cuda()
    target = target.cuda()
    ids, mask = _prompts(3)
    ids, mask = ids.cuda(), mask.cuda()
    ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=16)
    for d in (DraftModel(draft, k=3), DraftModel(draft, k="adaptive"), PromptLookup()):
        out = speculative_generate(target, ids, attention_mask=mask, draft=d, max_new_tokens=16)
        assert torch.equal(out.sequences, ref)
    out = speculative_generate(target, ids, attention_mask=mask, draft=DraftModel(draft, k=3), max_new_tokens=16,
                               temperature=0.8, seed=0)
    assert out.sequences.is_cuda


def test_no_deprecated_cache_argument():
    """transformers 5.2x takes the KV cache as ``cache=`` (``past_key_values`` is deprecated, to be
    removed in 5.40): the HF cache path must not pass the old name (issue 21 item 7)."""
    import warnings

    from accelerando.llm.cache import cache_kwarg
    for arch in ("llama", "gpt2"):
        target = tiny_lm(arch, seed=0)
        ids, mask = _prompts(2)
        assert cache_kwarg(target) == "cache"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            speculative_generate(target, ids, attention_mask=mask, draft=DraftModel(target, k=2), max_new_tokens=6,
                                 engine="hf")
        assert not [w for w in caught if "past_key_values" in str(w.message)], arch
