"""The chain acceptance rule (the tree rules on one-path trees) as a pure function: exact distribution
(chi-square), guards, greedy."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from accelerando.llm.tree_verify import residual
from tree_checks import greedy_accept, speculative_accept


SIGNIFICANCE = 1e-3      # a correct rule fails a test with this probability (seeds are fixed, so never)
V, M, N = 5, 3, 30000    # vocabulary, tokens compared, samples


def _world(seed: int):
    """A Markov 'target' P[a] and a different 'draft' Q[a] (rows: distribution of the next token)."""
    g = torch.Generator().manual_seed(seed)
    P = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    Q = torch.softmax(torch.randn(V, V, generator=g) * 1.5, -1)
    Q[:, 0] = 0.0                       # the draft never proposes 0: the residual must supply it
    Q = Q / Q.sum(-1, keepdim=True)
    return P, Q


def _wrong_rule(drafts, p, q, generator=None, n_valid=None):
    """Deliberately wrong: on rejection resample from p instead of norm(max(0, p - q))."""
    n, _ = speculative_accept(drafts, p, q, generator)
    B, V_ = p.shape[0], p.shape[-1]
    p_n = p.gather(1, n[:, None, None].expand(B, 1, V_)).squeeze(1)
    return n, torch.multinomial(p_n, 1, generator=generator).squeeze(1)


def _run_chains(rule, k: int, seed: int) -> torch.Tensor:
    """Speculative decoding on the Markov world with N independent rows; returns first M tokens (N, M)."""
    P, Q = _world(seed)
    g = torch.Generator().manual_seed(seed + 100)
    last = torch.zeros(N, dtype=torch.long)
    out = torch.full((N, M + k + 1), -1, dtype=torch.long)
    filled = torch.zeros(N, dtype=torch.long)
    while int(filled.min()) < M:
        drafts, q, x = [], [], last
        for _ in range(k):
            qi = Q[x]
            x = torch.multinomial(qi, 1, generator=g).squeeze(1)
            drafts.append(x)
            q.append(qi)
        drafts_t = torch.stack(drafts, 1)                                # (N, k)
        ctx = torch.cat([last[:, None], drafts_t], 1)                    # p after last and each draft
        p = P[ctx]                                                       # (N, k+1, V)
        n, nxt = rule(drafts_t, p, torch.stack(q, 1), g)
        emitted = torch.cat([drafts_t, nxt[:, None]], 1)
        for j in range(k + 1):                                           # write accepted + next
            take = (j <= n) & (filled < M)
            tok = torch.where(j < n, emitted[:, j], nxt) if j < k else nxt
            tok = torch.where(j == n, nxt, tok)
            out[take, filled[take]] = tok[take]
            filled = filled + take.long()
        last = nxt
    return out[:, :M]


def _pvalue(samples: torch.Tensor, seed: int) -> float:
    P, _ = _world(seed)
    exact = torch.zeros([V] * M)
    for idx in torch.cartesian_prod(*[torch.arange(V)] * M):
        pr, prev = 1.0, 0
        for t in idx.tolist():
            pr *= float(P[prev, t])
            prev = t
        exact[tuple(idx.tolist())] = pr
    flat = samples[:, 0] * V * V + samples[:, 1] * V + samples[:, 2]
    obs = torch.bincount(flat, minlength=V ** M).double()
    exp = exact.flatten().double() * N
    keep = exp >= 5                                                      # pool sparse cells
    o = torch.cat([obs[keep], obs[~keep].sum()[None]])
    e = torch.cat([exp[keep], exp[~keep].sum()[None]])
    return float(chisquare(o.numpy(), e.numpy() * o.sum().item() / e.sum().item()).pvalue)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_speculative_sampling_has_target_distribution(k):
    seed = 10 + k
    assert _pvalue(_run_chains(speculative_accept, k, seed), seed) > SIGNIFICANCE


@pytest.mark.parametrize("k", [1, 3])
def test_chi_square_detects_a_wrong_rule(k):
    seed = 10 + k
    assert _pvalue(_run_chains(_wrong_rule, k, seed), seed) < SIGNIFICANCE


def test_residual_guards_zero_mass():
    p = torch.tensor([[0.2, 0.8], [0.5, 0.5]])
    q = torch.tensor([[0.2, 0.8], [0.1, 0.9]])                           # row 0: p == q, residual 0
    r = residual(p, q)
    assert torch.isfinite(r).all()
    assert torch.allclose(r[0], p[0]) and torch.allclose(r[1], torch.tensor([1.0, 0.0]))


def test_acceptance_counts_and_bonus():
    # p == q: every draft accepted, bonus from p_k
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(64, 4, 6, generator=g), -1)
    drafts = torch.multinomial(p[:, :3].reshape(-1, 6), 1, generator=g).reshape(64, 3)
    n, nxt = speculative_accept(drafts, p, p[:, :3], g)
    assert (n == 3).all() and ((nxt >= 0) & (nxt < 6)).all()
    # deterministic drafts (q = None) the target gives zero probability: all rejected, never the draft
    p2 = p.clone()
    p2[:, 0].scatter_(-1, drafts[:, :1], 0.0)
    p2 = p2 / p2.sum(-1, keepdim=True)
    n, nxt = speculative_accept(drafts, p2, None, g)
    assert (n == 0).all() and (nxt != drafts[:, 0]).all()
    # n_valid caps acceptance; the stop token then comes from p (q = 0 there)
    n, _ = speculative_accept(drafts, p, p[:, :3], g, n_valid=torch.full((64,), 1))
    assert (n == 1).all()


def test_greedy_accept_is_longest_matching_prefix():
    drafts = torch.tensor([[5, 6, 7], [5, 9, 7], [1, 6, 7]])
    amax = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 7, 8]])
    n, nxt = greedy_accept(drafts, amax)
    assert n.tolist() == [3, 1, 0] and nxt.tolist() == [8, 6, 5]
    n, nxt = greedy_accept(drafts, amax, n_valid=torch.tensor([2, 3, 3]))
    assert n.tolist() == [2, 1, 0] and nxt.tolist() == [7, 6, 5]
