"""Drawing a token tree from a draft: siblings with replacement (SpecInfer), without (RSD:
Gumbel-top-k) or greedy, level by level (``draft_tree``) or by stochastic beam search
(``stochastic_beam_tree``, RSD-S). Shared by ``DraftTree`` and Medusa's lossless sampling; the
matching recursive rejection rule (``accelerando.llm.tree_verify``) keeps the target's
distribution exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from accelerando.llm.tree import TokenTree


def gumbel_topk(q: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k distinct tokens sampled without replacement from q: top-k of log q + Gumbel noise."""
    g = -torch.log(-torch.log(torch.rand(q.shape, generator=generator, device=q.device).clamp_min(1e-20)))
    k = min(k, int((q > 0).sum()))
    return torch.topk(torch.log(q) + g, k).indices


def sample_siblings(q: torch.Tensor, k: int, *, replacement: bool,
                    generator: torch.Generator | None = None, deterministic: bool = False) -> torch.Tensor:
    """k sibling tokens from q: i.i.d. (replacement), Gumbel-top-k (without), or q's top-k (greedy)."""
    if deterministic:
        return q.topk(min(k, q.shape[-1])).indices
    if replacement:
        return torch.multinomial(q, k, replacement=True, generator=generator)
    return gumbel_topk(q, k, generator)


@dataclass
class DraftedTree:
    tree: TokenTree
    tokens: list[int]            # (N,) root token first
    q: torch.Tensor              # (N, V) distribution each node's children were drawn from (0 rows: unexpanded)


Expand = Callable[[TokenTree, list[int], list[int]], torch.Tensor]
"""expand(tree_so_far, tokens_so_far, frontier_nodes) -> (len(frontier), V) draft distributions."""


def draft_tree(expand: Expand, root_token: int, branching: Sequence[int], *, replacement: bool,
               generator: torch.Generator | None = None, deterministic: bool = False) -> DraftedTree:
    """Grow a tree level by level: every frontier node gets ``branching[d]`` children from q.

    ``deterministic``: children are q's top tokens (for greedy verification, where q is not used).
    """
    parents, ranks, tokens = [-1], [0], [int(root_token)]
    frontier, qs = [0], {}
    for b in branching:
        tree = TokenTree(tuple(parents), tuple(ranks))
        dists = expand(tree, tokens, frontier)
        new = []
        for node, qn in zip(frontier, dists):
            qs[node] = qn
            kids = sample_siblings(qn, b, replacement=replacement, generator=generator, deterministic=deterministic)
            for r, x in enumerate(kids.tolist()):
                parents.append(node); ranks.append(r); tokens.append(int(x)); new.append(len(tokens) - 1)
        frontier = new
    return drafted_tree(TokenTree(tuple(parents), tuple(ranks)), tokens, qs)


def stochastic_beam_tree(expand: Expand, root_token: int, width: int, depth: int, *,
                         generator: torch.Generator | None = None, deterministic: bool = False) -> DraftedTree:
    """RSD-S: stochastic beam search (Kool et al. 2019) over draft sequences; the kept beams form the tree.

    Each beam carries phi (log-probability of its sequence) and G (its perturbed score). A child's
    score is a Gumbel(phi_child) conditioned so that the children's maximum equals the parent's G;
    the ``width`` best children over all beams survive. Siblings are ordered by score, which is a
    sampling-without-replacement order for each parent (that is what the RSD verifier needs).
    """
    parents, ranks, tokens = [-1], [0], [int(root_token)]
    frontier, phi, G, qs = [0], [0.0], [0.0], {}
    for _ in range(depth):
        tree = TokenTree(tuple(parents), tuple(ranks))
        dists = expand(tree, tokens, frontier)
        cands = []   # (score, parent, token, phi)
        for node, qn, ph, g_par in zip(frontier, dists, phi, G):
            qs[node] = qn
            sup = (qn > 0).nonzero().flatten()
            lp = ph + torch.log(qn[sup])
            if deterministic:
                cands += [(l, node, x, l) for x, l in zip(sup.tolist(), lp.tolist())]
                continue
            gum = lp - torch.log(-torch.log(torch.rand(lp.shape, generator=generator).clamp_min(1e-20)))
            z = gum.max()
            # condition the children's maximum to equal the parent's score (numerically stable form)
            v = g_par - gum + torch.log1p(-torch.exp(gum - z).clamp(max=1 - 1e-12))
            scores = g_par - v.clamp_min(0) - torch.log1p(torch.exp(-v.abs()))
            for s, x, l in zip(scores.tolist(), sup.tolist(), lp.tolist()):
                cands.append((s, node, x, l))
        cands.sort(key=lambda c: -c[0])
        kept = sorted(cands[:width], key=lambda c: (c[1], -c[0]))   # group by parent, best first
        frontier, phi, G = [], [], []
        count: dict[int, int] = {}
        for s, node, x, l in kept:
            r = count.get(node, 0); count[node] = r + 1
            parents.append(node); ranks.append(r); tokens.append(x)
            frontier.append(len(tokens) - 1); phi.append(l); G.append(s)
        # restore breadth-first order with parents before children (already true: parents are older)
    return drafted_tree(TokenTree(tuple(parents), tuple(ranks)), tokens, qs)


def sample_tree_tokens(tree: TokenTree, root_token: int, q: torch.Tensor, *, replacement: bool = False,
                       generator: torch.Generator | None = None) -> list[int]:
    """Fill a fixed tree shape: each node's children are sampled from q[node] (Medusa, lossless mode)."""
    tokens = [int(root_token)] + [0] * (len(tree) - 1)
    for n, kids in enumerate(tree.children):
        if kids:
            xs = sample_siblings(q[n], len(kids), replacement=replacement, generator=generator).tolist()
            for c, x in zip(kids, xs + [xs[-1]] * (len(kids) - len(xs))):   # pad if q has fewer tokens
                tokens[c] = int(x)
    return tokens


def drafted_tree(tree: TokenTree, tokens: list[int], qs: dict[int, torch.Tensor]) -> DraftedTree:
    """A drafted tree with its (N, V) q: row n = the draft distribution n's children came from
    (zeros for a node without children)."""
    first = next(iter(qs.values()))
    q = torch.zeros(len(tokens), first.shape[-1], dtype=first.dtype, device=first.device)
    for node, qn in qs.items():
        q[node] = qn
    return DraftedTree(tree, tokens, q)
