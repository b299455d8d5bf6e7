"""Acceptance rules: exactness of greedy trees, statistical losslessness of multi-draft rules.

Toy model: a first-order Markov "LM" on a 4-token vocabulary; target p(x | prev) and draft q(x | prev)
are fixed random tables that disagree a lot. One verification from root token r emits >= 1 tokens;
the first two emitted tokens (the second drawn from the target when only one was emitted) must
follow p(x1 | r) p(x2 | x1). Chi-square on the 16 cells at a fixed significance with fixed seeds.
A deliberately wrong rule must fail the same test.
"""

import pytest
import torch
from scipy.stats import chisquare

from accelerando.llm.tree import TokenTree
from accelerando.llm.drafters.tree_draws import draft_tree, gumbel_topk, stochastic_beam_tree
from accelerando.llm.tree_verify import rejection_accept_tree, typical_threshold
from tree_checks import (ALPHA_SIG, ROOT, V, accepted_tokens, greedy_tree_accept, rejection_tree_accept,
                         two_token_pvalue, typical_tree_accept)
from tree_checks import expand as _expand

_run = two_token_pvalue


def _rej(replacement):
    return lambda d, p, g: rejection_tree_accept(d.tree, d.tokens, p, d.q, replacement=replacement, generator=g)


def test_specinfer_with_replacement_is_lossless():
    draft = lambda g: draft_tree(_expand, ROOT, [3, 2], replacement=True, generator=g)
    assert _run(draft, _rej(True)) > ALPHA_SIG


def test_rsd_without_replacement_is_lossless():
    draft = lambda g: draft_tree(_expand, ROOT, [3, 2], replacement=False, generator=g)
    assert _run(draft, _rej(False)) > ALPHA_SIG


def test_rsd_stochastic_beam_is_lossless():
    draft = lambda g: stochastic_beam_tree(_expand, ROOT, width=3, depth=2, generator=g)
    assert _run(draft, _rej(False), seed=1) > ALPHA_SIG


def test_chain_is_speculative_sampling():
    draft = lambda g: draft_tree(_expand, ROOT, [1, 1, 1], replacement=True, generator=g)
    assert _run(draft, _rej(True), seed=2) > ALPHA_SIG


def test_wrong_rule_is_detected():
    """Without-replacement siblings verified as if drawn with replacement (q not renormalised): biased."""
    draft = lambda g: draft_tree(_expand, ROOT, [3, 3], replacement=False, generator=g)
    assert _run(draft, _rej(True), seed=3) < ALPHA_SIG


def test_rejection_edge_cases():
    t = TokenTree.from_paths([[0], [1]])
    p = torch.tensor([[0.5, 0.5, 0.0]] * 3)
    q = torch.tensor([[0.0, 0.0, 1.0]] * 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):   # child 1 (token 2) is always rejected; q is then exhausted: child 2 is never tried
        v = rejection_tree_accept(t, [0, 2, 0], p, q, replacement=False, generator=g)
        assert v.path == [0] and v.next_token in (0, 1)
    v = rejection_tree_accept(t, [0, 1, 0], p, p.clone(), replacement=True, generator=g)   # p == q accepts
    assert v.path == [0, 1]


def test_batched_rows_are_independent_trees():
    """Row b of a batch gives the same law as the one-tree view: check the batch's path frequencies."""
    t = TokenTree.from_paths([[0], [1], [0, 0]])
    g = torch.Generator().manual_seed(0)
    B = 4000
    tokens = torch.tensor([[0, 1, 2, 3]]).expand(B, 4)
    p = torch.softmax(torch.randn(4, V, generator=g, dtype=torch.float64), -1)[None].expand(B, 4, V)
    q = torch.softmax(torch.randn(4, V, generator=g, dtype=torch.float64), -1)[None].expand(B, 4, V)
    last, nxt = rejection_accept_tree(t, tokens, p, q, replacement=False, generator=g)
    # P(accept child 1) = min(1, p0(1)/q0(1)) exactly
    a1 = min(1.0, float(p[0, 0, 1] / q[0, 0, 1]))
    n1 = int(((last == 1) | (last == 3)).sum())
    assert abs(n1 / B - a1) < 4 * (a1 * (1 - a1) / B) ** 0.5 + 1e-9


def test_greedy_tree_accept_longest_path():
    t = TokenTree.from_paths([[0], [1], [0, 0], [1, 0], [1, 0, 0]])
    # nodes: 0 root, 1 [0], 2 [1], 3 [0,0], 4 [1,0], 5 [1,0,0]
    tokens = [9, 5, 6, 7, 8, 3]
    argmax = [6, 7, 8, 1, 2, 4]          # after root: 6 (node 2), after node 2: 8 (node 4), after 4: 2 != 3
    v = greedy_tree_accept(t, tokens, argmax)
    assert v.path == [0, 2, 4] and v.next_token == 2
    assert accepted_tokens(v, tokens) == [6, 8, 2]


def test_typical_acceptance_threshold_and_walk():
    p = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]])
    thr = typical_threshold(p, epsilon=0.09, alpha=0.3)
    H = -(p * p.log()).sum(-1)
    torch.testing.assert_close(thr, torch.minimum(torch.tensor(0.09), 0.3 * torch.exp(-H)))
    t = TokenTree.chain(2)
    probs = torch.tensor([[0.01, 0.99, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    v = typical_tree_accept(t, [0, 1, 2], probs, generator=torch.Generator().manual_seed(0))
    assert v.path == [0, 1] and v.next_token in (0, 1)   # token 2 has p = 0 after node 1: rejected


def test_gumbel_topk_distinct_and_first_is_a_sample():
    g = torch.Generator().manual_seed(0)
    q = torch.tensor([0.6, 0.3, 0.1, 0.0])
    firsts = torch.zeros(4)
    for _ in range(3000):
        s = gumbel_topk(q, 4, g)
        assert len(set(s.tolist())) == len(s) == 3
        firsts[s[0]] += 1
    assert chisquare(firsts[:3].numpy(), (q[:3] * 3000).numpy()).pvalue > ALPHA_SIG


def test_deepest_alive_on_chains_equals_the_tree_walk():
    """The chain shortcut (accepted prefix length) against a direct walk, for chains built both ways."""
    from accelerando.llm.tree_verify import _deepest_alive
    g = torch.Generator().manual_seed(0)
    for k in range(0, 7):
        for chain in (TokenTree.chain(k), TokenTree.from_paths([[0] * d for d in range(1, k + 1)])):
            assert chain.is_chain() and len(chain) == k + 1
            ok = torch.rand(64, k + 1, generator=g) < 0.7
            want = []
            for row in ok.tolist():
                node = 0
                while node + 1 <= k and row[node + 1]:
                    node += 1
                want.append(node)
            assert _deepest_alive(chain, ok).tolist() == want


def test_deepest_alive_on_trees_equals_the_tree_walk():
    """The matmul form (failed ancestors counted) against a direct walk on random trees and oks:
    the deepest node whose non-root ancestors-or-self are all ok, ties to the lowest index."""
    from accelerando.llm.tree_verify import _deepest_alive
    g = torch.Generator().manual_seed(0)
    trees = [TokenTree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [1, 0, 0]]),
             TokenTree.full(3, 2), TokenTree.chains(2, 3)]
    for tree in trees:
        ok = torch.rand(64, len(tree), generator=g) < 0.6
        want = []
        for row in ok.tolist():
            alive = [i for i in range(len(tree)) if all(row[j] for j in tree.path_to(i)[1:])]
            want.append(max(alive, key=lambda i: (tree.depths[i], -i)))
        assert _deepest_alive(tree, ok).tolist() == want
