"""The speculative loop on the lean engine: greedy == target.generate token for token (every chain
drafter, batch 1 and 3 with left padding, with EOS), the sampled distribution is the target's
(chi-square), unsupported models fall back, and the cache's pointer bookkeeping is exact."""

from __future__ import annotations

import warnings

import pytest
import torch
from scipy.stats import chisquare

from accelerando.llm import DraftModel, PromptLookup, SamplingConfig, speculative_generate
from accelerando.llm.engine import Engine
from llm_models import noisy_copy, tiny_lm


def _prompts(batch: int, vocab: int = 96, length: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    ids[:, length // 2:] = ids[:, : length - length // 2]            # repetition for prompt lookup
    mask = torch.ones_like(ids)
    for b in range(1, batch):
        mask[b, : 2 * b + 1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def _drafters(draft):
    return {"draft-k3": DraftModel(draft, k=3), "bare-model": draft, "adaptive": DraftModel(draft, k="adaptive"),
            "heuristic": DraftModel(draft, k="heuristic"), "prompt-lookup": PromptLookup(ngram_sizes=(2, 1), k=4)}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_on_engine_equals_generate(arch, batch):
    target = tiny_lm(arch, seed=0, init_std=0.3)
    draft = noisy_copy(target, 0.1)
    ids, mask = _prompts(batch)
    ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
    for name, d in _drafters(draft).items():
        out = speculative_generate(target, ids, attention_mask=mask, draft=d, max_new_tokens=24,
                                   engine="engine-eager")
        assert torch.equal(out.sequences, ref), (arch, batch, name)
        if name == "draft-k3":
            assert out.stats["accepted_tokens"] > 0


def test_greedy_on_engine_with_eos_equals_generate():
    target = tiny_lm("llama", seed=0, init_std=0.3)
    draft = noisy_copy(target, 0.1)
    ids, mask = _prompts(3, seed=1)
    free = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    eos = int(free[0, ids.shape[1] + 6])
    ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20, eos_token_id=eos,
                          pad_token_id=0)
    for d in (DraftModel(draft, k=3), PromptLookup(ngram_sizes=(2, 1), k=4)):
        out = speculative_generate(target, ids, attention_mask=mask, draft=d, max_new_tokens=20, eos_token_id=eos,
                                   pad_token_id=0, engine="engine-eager")
        assert torch.equal(out.sequences, ref)


@pytest.mark.slow
def test_compiled_engine_equals_generate():
    # three compiled graphs: target verify width 4 (k = 3), draft widths 1 and 2
    target = tiny_lm("llama", seed=0, init_std=0.3)
    draft = noisy_copy(target, 0.1)
    ids, mask = _prompts(2)
    ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=20)
    out = speculative_generate(target, ids, attention_mask=mask, draft=DraftModel(draft, k=3), max_new_tokens=20,
                               engine="engine")
    assert torch.equal(out.sequences, ref)


def test_unsupported_models_fall_back_to_hf_cache():
    target = tiny_lm("gpt2", seed=0, init_std=0.3)                 # not Llama-family: HFCache, with a notice
    draft = noisy_copy(target, 0.1)
    ids, mask = _prompts(2)
    ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = speculative_generate(target, ids, attention_mask=mask, draft=DraftModel(draft, k=3),
                                   max_new_tokens=12, engine="engine-eager")
    assert torch.equal(out.sequences, ref)
    assert any("falling back" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="engine must be one of"):
        speculative_generate(target, ids, draft=PromptLookup(), max_new_tokens=4, engine="fast")


def test_sampled_tokens_on_engine_have_target_distribution():
    """First three tokens (prefill + one speculative step with k = 2) over 2000 rows of one batch."""
    V, N = 8, 2000
    target = tiny_lm("llama", vocab=V, seed=3, init_std=0.5)
    draft = noisy_copy(target, 0.6, seed=4)
    sampling = SamplingConfig(temperature=1.0, top_k=5)
    prompt = torch.tensor([[3, 7, 1, 2, 5]])
    with torch.no_grad():
        p1 = sampling.probs(target(prompt).logits[0, -1])
        e2 = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], 1)
        p2 = sampling.probs(target(e2).logits[:, -1])
        e3 = torch.cat([prompt.repeat(V * V, 1), torch.cartesian_prod(torch.arange(V), torch.arange(V))], 1)
        p3 = sampling.probs(target(e3).logits[:, -1]).reshape(V, V, V)
    exact = (p1[:, None, None] * p2[:, :, None] * p3).flatten().double()
    out = speculative_generate(target, prompt.repeat(N, 1), draft=DraftModel(draft, k=2), max_new_tokens=3,
                               temperature=1.0, top_k=5, seed=2, engine="engine-eager")
    g = out.sequences[:, -3:]
    obs = torch.bincount(g[:, 0] * V * V + g[:, 1] * V + g[:, 2], minlength=V ** 3).double()
    assert obs[exact == 0].sum() == 0
    keep = exact * N >= 5
    o = torch.cat([obs[keep], obs[~keep & (exact > 0)].sum()[None]])
    e = torch.cat([exact[keep], exact[~keep & (exact > 0)].sum()[None]]) * N
    assert chisquare(o.numpy(), e.numpy() * float(o.sum() / e.sum())).pvalue > 1e-3
    assert 0 < out.stats["acceptance_rate"] < 1


def _logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_spec_cache_rollback_per_row_and_room_making():
    """Row 0 keeps every appended column, row 1 none: each row continues exactly; when the host
    bound passes the buffer, the finished (over-budget) row is pulled back and row 1 stays exact."""
    model = tiny_lm("llama", seed=0)
    ids = torch.randint(3, 96, (2, 8))
    c = Engine(model, batch_size=2, max_len=24, compile=False)
    c.forward(ids)
    L = c.max_len
    row0 = [ids[0]]
    for step in range((L - 8) // 4 + 3):          # runs past the buffer for row 0
        start = c.mark()
        new = torch.randint(3, 96, (2, 4))
        logits = c.forward(new).logits
        c.rollback(start, torch.tensor([4, 0]), 4)
        row1 = torch.cat([ids[1], new[1]])[None]
        torch.testing.assert_close(logits[1], _logits_of(model, row1)[0, -4:], atol=1e-5, rtol=1e-5)
        if 8 + 4 * (step + 1) <= L:               # row 0 still within the buffer: exact too
            row0.append(new[0])
            ref0 = _logits_of(model, torch.cat(row0)[None])[0, -4:]
            torch.testing.assert_close(logits[0], ref0, atol=1e-5, rtol=1e-5)
    assert c.cache.lengths.tolist()[1] == 8
    assert int(c.cache.lengths[0]) <= L


def test_bench_methods_take_the_engine_knob():
    from accelerando.bench.methods import LLMSetup, get_method

    class _Tok:
        pad_token_id = 0
    target = tiny_lm("llama", seed=0, init_std=0.3)
    ids = torch.randint(3, 90, (2, 10), generator=torch.Generator().manual_seed(0))
    s = LLMSetup(target=target, tokenizer=_Tok(), input_ids=ids, attention_mask=torch.ones_like(ids),
                 max_new_tokens=10, drafts={"noisy": noisy_copy(target, 0.1)})
    base = get_method("generate").build(s)()
    for name in ("spec-draft", "spec-prompt-lookup"):
        out = get_method(name).build(s, k=3, engine="engine-eager")()
        assert torch.equal(out.sequences, base.sequences), name


def test_adaptive_drafters_take_plain_steps_and_stay_lossless():
    """Issue 22: an adaptive drafter times plain (k = 0) steps -- a prompt lookup without a match, a
    draft that rarely agrees -- and its output is still generate's."""
    target = tiny_lm("llama", seed=0, init_std=0.3)
    unrelated = tiny_lm("llama", seed=5, init_std=0.3)
    ids = torch.arange(3, 15)[None]                                   # no repeated n-gram to look up
    ref = target.generate(ids, do_sample=False, max_new_tokens=40)
    for d in (PromptLookup(k="adaptive"), DraftModel(unrelated, k="adaptive")):
        out = speculative_generate(target, ids, draft=d, max_new_tokens=40, engine="engine-eager")
        assert torch.equal(out.sequences, ref), type(d).__name__
        assert 0 in d.length.ctrl.t_verify


def test_a_useless_draft_backs_off_to_runs_of_plain_steps(monkeypatch):
    """Issue 22: a draft that never agrees costs a few one-token probes. The adaptive drafter asks
    the loop for runs of plain steps (no draft work per token: the controller's idle steps until
    the next probe, probes ever rarer), the draft reads the prompt only at its first probe and
    after a run reads only its last CATCH_UP tokens, in one forward computing the last logits
    (one step shape, one draft call per probe whatever the run's length), and the output is still
    generate's."""
    from accelerando.llm.drafters.draft_model import CATCH_UP
    import itertools
    import types
    # the controller learns from the wall clock: a clock that ticks once per reading makes a draft
    # step cost what a target step costs whatever the machine's load, so the probes are deterministic
    ticks = itertools.count()
    fake_time = types.SimpleNamespace(perf_counter=lambda: float(next(ticks)))
    monkeypatch.setattr("accelerando.llm.drafters.adaptive.time", fake_time)
    monkeypatch.setattr("accelerando.llm.speculative.time", fake_time)
    target = tiny_lm("llama", seed=0, init_std=0.3)
    unrelated = tiny_lm("llama", seed=5, init_std=0.3)
    ids = torch.arange(3, 15)[None]
    ref = target.generate(ids, do_sample=False, max_new_tokens=80)
    d = DraftModel(unrelated, k="adaptive", k_max=7)
    out = speculative_generate(target, ids, draft=d, max_new_tokens=80, engine="engine-eager")
    assert torch.equal(out.sequences, ref)
    probes = [i for i, k in enumerate(d.ctrl.history) if k]
    assert d.ctrl.history[:4] == [0] * 4 and max(d.ctrl.history) == 1   # a timed plain run, then 1-token probes
    gaps = [b - a for a, b in zip(probes, probes[1:] + [len(d.ctrl.history)])]
    assert len(probes) <= 8 and gaps[-1] >= 16 and gaps == sorted(gaps)    # ever rarer
    assert out.stats["drafted_tokens"] == len(probes) and out.stats["target_calls"] == 80
    assert out.stats["draft_calls"] == len(probes)                       # no eager prefill, one call per probe
    assert d.state.stats.shapes == {f"B1xT{CATCH_UP}xL128-last"}


@pytest.mark.parametrize("engine", ["engine-eager", "hf"])
def test_a_draft_that_skips_tokens_stays_lossless(engine):
    """Issue 22's bounded catch-up: after plain runs the draft reads only the last ``window``
    tokens (its cache has holes, rows of a padded batch differ): greedy output is still generate's,
    and the draft (the target itself) still agrees once it drafts."""
    target = tiny_lm("llama", seed=0, init_std=0.3)
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9], [3, 4, 5, 6, 7, 8, 9]])
    mask = (torch.arange(7)[None] >= torch.tensor([[2], [0]])).long()
    ref = target.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=40, pad_token_id=0)
    d = DraftModel(target, k=3, window=2)
    runs = iter([0, 5, 0, 0, 9, 0, 3] + [0] * 40)
    d.plain_steps = lambda budget: min(next(runs), budget)           # force plain runs between drafts
    out = speculative_generate(target, ids, attention_mask=mask, draft=d, max_new_tokens=40, engine=engine,
                               pad_token_id=0)
    assert torch.equal(out.sequences, ref)
    assert out.stats["accepted_tokens"] > 0
    with pytest.raises(ValueError, match="window"):
        DraftModel(target, window=1)


def test_prompt_lookup_without_matches_runs_plain_steps():
    """No n-gram repeats: prompt lookup proposes nothing, so the loop takes plain steps (runs that
    grow with the streak of misses), never a verification of a lone root; == generate."""
    target = tiny_lm("llama", seed=0, init_std=0.3)
    ids = torch.arange(3, 15)[None]
    ref = target.generate(ids, do_sample=False, max_new_tokens=30)
    for k in (4, "adaptive"):
        p = PromptLookup(ngram_sizes=(25,), k=k)
        out = speculative_generate(target, ids, draft=p, max_new_tokens=30, engine="engine-eager")
        assert torch.equal(out.sequences, ref), k
        assert out.stats["drafted_tokens"] == 0 and out.stats["mean_k"] == 0
        assert p._misses < 29                                             # later misses came in runs
