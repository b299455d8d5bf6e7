"""sampling.py (same processing as transformers' warpers, clear errors), prompt lookup, draft length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accelerando.llm.drafters.prompt_lookup import NgramIndex, lookup
from accelerando.llm.sampling import (NonFiniteLogitsError, SamplingConfig, bad_rows, check_finite, checked_argmax,
                                      checked_probs, process_logits)
from accelerando.llm.speculative import AdaptiveK, HeuristicK, best_k, expected_tokens


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8),
                                                     (0.5, 20, 0.9), (1.0, 1, None)])
def test_processing_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)
    procs = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k is not None:
        procs.append(TopKLogitsWarper(top_k))
    if top_p is not None:
        procs.append(TopPLogitsWarper(top_p))
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    ref = procs(torch.zeros(6, 1, dtype=torch.long), logits.clone())
    ours = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(torch.isinf(ref), torch.isinf(ours))
    assert torch.allclose(ref.softmax(-1), ours.softmax(-1), atol=1e-6)


def test_config_validation():
    for bad in (dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_k=0), dict(top_p=0.0),
                dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)
    assert SamplingConfig().greedy and not SamplingConfig(temperature=0.5).greedy


def test_non_finite_logits_are_flagged_not_sampled():
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("nan"), 0.0, 0.0], [float("-inf")] * 3, [0.0, float("inf"), 0.0]])
    p, bad = checked_probs(logits, SamplingConfig(temperature=1.0))
    assert bad.tolist() == [False, True, True, True]
    assert torch.isfinite(p).all()                      # sampling on device cannot crash before the check
    with pytest.raises(NonFiniteLogitsError, match="3 row"):
        check_finite(logits)
    check_finite(logits[:1])


def test_checked_argmax_equals_argmax_and_bad_rows():
    inf, nan = float("inf"), float("nan")
    logits = torch.tensor([[0.0, 2.0, 2.0, 1.0], [nan, 0.0, 5.0, 0.0], [-inf] * 4, [0.0, inf, 0.0, inf],
                           [-inf, 3.0, -inf, 3.0], [1.0, 1.0, 1.0, 1.0]])
    logits = torch.cat([logits, torch.randn(50, 4)]).view(2, 28, 4)
    arg, bad = checked_argmax(logits)
    assert torch.equal(bad, bad_rows(logits))
    assert torch.equal(arg[~bad], logits.argmax(-1)[~bad])      # ties: the first index, like argmax


def test_prompt_lookup_copies_the_most_recent_continuation():
    h = np.array([1, 2, 3, 4, 5, 9, 1, 2, 3, 7, 8, 1, 2, 3])
    assert lookup(h, (3, 2, 1), 4).tolist() == [7, 8, 1, 2]         # most recent earlier "1 2 3"
    assert lookup(h, (3,), 1).tolist() == [7]
    assert lookup(np.array([5, 6, 7]), (2, 1), 4).tolist() == []     # no earlier occurrence
    assert lookup(np.array([4, 6, 4]), (3, 1), 4).tolist() == [6, 4]  # falls back to the 1-gram
    assert lookup(np.array([9] + [7] * 8), (2,), 4).tolist() == [7, 7, 7, 7]   # a run: full-length copy


def test_incremental_ngram_index_answers_like_lookup():
    """The drafter's incremental index against the rescanning reference, on growing random
    histories over small vocabularies (many repeats and runs), several k and n-gram orders."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        vocab = int(rng.integers(2, 6))
        sizes = [(3, 2, 1), (2,), (1,), (4, 1)][trial % 4]
        toks = rng.integers(0, vocab, int(rng.integers(1, 6))).tolist()
        ix = NgramIndex(toks, sizes)
        for _ in range(25):
            for k in (1, 3, 8):
                assert ix.lookup(k) == lookup(np.array(toks), sizes, k).tolist(), (toks, sizes, k)
            new = rng.integers(0, vocab, int(rng.integers(1, 4))).tolist()
            toks += new
            ix.extend(new)


def test_best_k_maximises_tokens_per_cost():
    assert expected_tokens(0.0, 5) == 1.0 and expected_tokens(1.0, 5) == 6.0
    assert abs(expected_tokens(0.5, 2) - 1.75) < 1e-12
    for alpha in (0.3, 0.6, 0.9):
        for c in (0.0, 0.05, 0.3, 1.0):
            k = best_k(alpha, c, 16)
            brute = max(range(0, 17), key=lambda j: expected_tokens(alpha, j) / (1 + j * c))
            assert abs(expected_tokens(alpha, k) / (1 + k * c) - expected_tokens(alpha, brute) / (1 + brute * c)) < 1e-12
    assert best_k(0.9, 0.0, 16) == 16 and best_k(0.3, 1.0, 16) == 0 and best_k(0.3, 1.0, 16, k_min=1) == 1
    assert best_k(0.9, 0.05, 16) > best_k(0.6, 0.05, 16) > best_k(0.3, 0.05, 16)


def test_adaptive_k_tracks_acceptance_and_cost():
    rng = np.random.default_rng(0)
    for true_alpha in (0.3, 0.9):
        ctl = AdaptiveK(16, cost_ratio=None)
        for _ in range(200):
            k = 4                                                    # feed the estimator a fixed k
            n = 0
            while n < k and rng.random() < true_alpha:
                n += 1
            ctl.update(k, [n], t_draft=0.1 * k, t_target=1.0)   # c = 0.1
        assert abs(ctl.alpha - true_alpha) < 0.2 and abs(ctl.c - 0.1) < 1e-6
        # slow start: k <= 2 (longest accepted run) + 1; here runs of 4 were seen -> k <= 9
        assert ctl.ramp == (9 if true_alpha == 0.9 else ctl.ramp) and ctl.ramp <= 9
        assert ctl.choose() == best_k(ctl.alpha, ctl.c, min(16, ctl.ramp))
    slow = AdaptiveK(8, cost_ratio=5.0, probe_every=4)              # drafting never pays: plain decoding,
    assert [slow.choose() for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]   # with a probe every 4th step
    h = HeuristicK(5, 32)
    h.update(5, [5], 0, 0)
    assert h.choose() == 7
    h.update(7, [2], 0, 0)
    assert h.choose() == 6


def test_adaptive_k_drops_to_plain_decoding_when_verification_costs_more_than_it_returns():
    """Issue 22: with a timed plain step, k > 0 must beat it in tokens per second. Wide steps that
    cost 3x a plain one at acceptance 0.3 lose -> k = 0 (a probe every 4th step); at acceptance
    0.95 the same costs pay -> k > 0. The costs of unmeasured k are linear in k."""
    def fed(alpha, t_wide):
        ctl = AdaptiveK(8, cost_ratio=0.0, probe_every=4)
        rng = np.random.default_rng(0)
        for _ in range(60):
            ctl.update(0, [0], 0.0, 1.0)                                # a plain step: 1 time unit
            n = 0
            while n < 8 and rng.random() < alpha:
                n += 1
            ctl.update(8, [n], 0.0, t_wide)                             # an 8-draft step
        return ctl
    poor = fed(0.3, 3.0)
    assert abs(poor.verify_time(4) - 2.0) < 0.05                        # halfway between k = 0 and k = 8
    assert [poor.choose() for _ in range(8)] == [0, 0, 0, 1, 0, 0, 0, 1]
    assert poor.rate(0) > max(poor.rate(k) for k in range(1, 9))
    good = fed(0.95, 3.0)
    assert good.choose() > 0 and good.rate(good.choose()) > good.rate(0)


def test_adaptive_k_asks_for_a_timed_plain_step_then_runs_of_plain_steps():
    """Issue 22: before drafting, a run of plain steps is timed (not assumed; a lone step would
    carry a host sync of its own); while k = 0 is best the loop is asked for the whole run of plain
    steps up to the next probe; drafting starts at k = 1 and widens only with accepted runs (k <= 2 n + 1)."""
    ctl = AdaptiveK(8, cost_ratio=0.0, probe_every=4)
    assert ctl.plain_run() == AdaptiveK.FIRST_PLAIN == 4
    assert AdaptiveK(8, cost_ratio=0.0, probe_every=2).plain_run() == 2     # never past the first probe
    ctl.update_plain(4, 4.0)
    assert ctl.plain_run() == 0 and ctl.choose() == 1                   # slow start: one draft first
    ctl.update(1, [1], 0.0, 1.0)
    assert ctl.ramp == 3 and ctl.choose() == 3
    slow = AdaptiveK(8, cost_ratio=0.0, probe_every=4)
    slow.update_plain(1, 1.0)
    slow.choose()
    for _ in range(3):
        slow.update(1, [0], 0.0, 3.0)                                   # rejected and dearer than plain
    assert slow._best() == 0 and slow.plain_run() == 4                  # a run up to the next probe
    slow.update_plain(4, 4.0)
    assert slow.plain_run() == 0 and slow.choose() == 1                 # the probe
    assert AdaptiveK(8, k_min=1).plain_run() == 0
    with pytest.raises(ValueError, match="probe_every"):
        AdaptiveK(8, probe_every=0)


def test_adaptive_k_probes_less_often_while_drafting_does_not_pay():
    ctl = AdaptiveK(8, cost_ratio=0.0, probe_every=2)
    ctl.update(0, [0], 0.0, 1.0)                                        # a timed plain step
    gaps, last = [], 0
    for step in range(1, 200):
        k = ctl.choose()
        if k:                                                           # a probe: rejected, and dearer
            gaps.append(step - last)
            last = step
            ctl.update(k, [0], 0.0, 3.0)
        else:
            ctl.update(0, [0], 0.0, 1.0)
    probes = gaps[gaps.index(2):]                                        # after the prior's first drafting steps
    # a probe costs 3 plain steps (2 more than the step it replaces): at most 3% of the time goes
    # to probing, so after the first re-probe the gap is >= 2 / 0.03 steps, capped at 128
    assert probes[0] == 2 and probes[1] == 67 and set(probes[2:]) == {128} and len(gaps) < 8
