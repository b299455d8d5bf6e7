"""Acceptance rules on a verified token tree, as pure functions of probability tensors.

One walk serves every drafter: starting at the root, pick an accepted child (by the rule), descend,
and stop where no child is accepted; then emit one more token from the target at the last accepted
node (the *correction* on rejection, the *bonus* at a leaf). A chain is the tree whose nodes have
one child, and on it ``rejection_tree_accept`` is exactly Leviathan et al.'s speculative sampling.

Inputs shared by the rules (N nodes, V vocabulary; node 0 = root, see ``accelerando.llm.tree``):
  tokens  (N,) the drafted token of each node (the root's entry is ignored)
  p       (N, V) target distribution *after* each node (the processed one: temperature, top-k/p)
  q       (N, V) the draft distribution each node's children were sampled from
Rules:
  greedy      temperature 0: longest path whose every token is the target's argmax (exact).
  rejection   SpecInfer (children i.i.d. from q, ``replacement=True``) or Recursive Speculative
              Decoding (children without replacement, ``replacement=False``): recursive rejection
              sampling over the siblings. Lossless.
  typical     Medusa's typical acceptance: p(x) > min(epsilon, alpha exp(-H(p))). Lossy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from accelerando.llm.tree import TokenTree


@dataclass(frozen=True)
class TreeVerdict:
    path: list[int]        # accepted nodes, root first (len 1 = nothing accepted)
    next_token: int        # token emitted after the path (correction or bonus)

    @property
    def n_accepted(self) -> int:
        return len(self.path) - 1


def accepted_tokens(verdict: TreeVerdict, tokens: Sequence[int]) -> list[int]:
    """Tokens emitted by one verification: the accepted drafts, then the next token."""
    return [int(tokens[i]) for i in verdict.path[1:]] + [verdict.next_token]


def _sample(p: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(p, 1, generator=generator))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)); falls back to p when the difference vanishes numerically.

    In exact arithmetic a rejection implies p != q, so the fallback only guards float round-off
    (an all-zero residual would give NaN and out-of-vocabulary ids -- a bug seen in peers).
    """
    r = (p - q).clamp_min(0)
    s = r.sum()
    return r / s if s > 1e-12 else p


def recursive_reject(p: torch.Tensor, q: torch.Tensor, candidates: Sequence[int], *, replacement: bool,
                     generator: torch.Generator | None = None) -> tuple[int | None, torch.Tensor]:
    """Try sibling drafts in order; return (index of the accepted one or None, final target dist).

    Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); on rejection
    p_{i+1} = norm(max(0, p_i - q_i)) and, without replacement (RSD),
    q_{i+1}(x) = q_i(x) 1[x != x_i] / (1 - q_i(x_i)); with replacement (SpecInfer) q stays.
    If every sibling is rejected the caller samples from the returned p.
    """
    for i, x in enumerate(candidates):
        qx = float(q[x])
        if qx <= 0.0:   # cannot have been drawn from q_i: the sibling list is exhausted
            break
        u = float(torch.rand((), generator=generator))
        if u * qx < float(p[x]):          # u < p/q without dividing
            return i, p
        p = residual(p, q)
        if not replacement:
            q = q.clone()
            q[x] = 0.0
            s = q.sum()
            if s <= 1e-12:
                break
            q = q / s
    return None, p


def rejection_tree_accept(tree: TokenTree, tokens: Sequence[int], p: torch.Tensor, q: torch.Tensor, *,
                          replacement: bool, generator: torch.Generator | None = None) -> TreeVerdict:
    """Lossless multi-draft verification (SpecInfer with replacement, RSD without)."""
    node, path = 0, [0]
    while True:
        kids = tree.children[node]
        if not kids:
            return TreeVerdict(path, _sample(p[node], generator))
        i, p_final = recursive_reject(p[node], q[node], [int(tokens[c]) for c in kids],
                                      replacement=replacement, generator=generator)
        if i is None:
            return TreeVerdict(path, _sample(p_final, generator))
        node = kids[i]
        path.append(node)


def _deepest(tree: TokenTree, ok: Sequence[bool]) -> list[int]:
    """Longest root path whose every non-root node is ok (ties: lowest node index = best ranks)."""
    alive = [True] + [False] * (len(tree) - 1)
    best = 0
    for i in range(1, len(tree)):   # topological order: parents come first
        alive[i] = alive[tree.parents[i]] and bool(ok[i])
        if alive[i] and tree.depths[i] > tree.depths[best]:
            best = i
    return tree.path_to(best)


def greedy_tree_accept(tree: TokenTree, tokens: Sequence[int], target_argmax: Sequence[int]) -> TreeVerdict:
    """Temperature 0: a node is accepted iff its token is the argmax after its parent (exact)."""
    ok = [i > 0 and int(tokens[i]) == int(target_argmax[tree.parents[i]]) for i in range(len(tree))]
    path = _deepest(tree, ok)
    return TreeVerdict(path, int(target_argmax[path[-1]]))


def typical_threshold(p: torch.Tensor, *, epsilon: float, alpha: float) -> torch.Tensor:
    """Medusa's typical-acceptance threshold per row: min(epsilon, alpha * exp(-H(p)))."""
    entropy = -(p * torch.log(p.clamp_min(1e-20))).sum(-1)
    return torch.minimum(torch.full_like(entropy, epsilon), alpha * torch.exp(-entropy))


def typical_tree_accept(tree: TokenTree, tokens: Sequence[int], p: torch.Tensor, *, epsilon: float = 0.09,
                        alpha: float = 0.3, generator: torch.Generator | None = None) -> TreeVerdict:
    """Medusa typical acceptance (lossy): longest path whose tokens are all 'typical' under the target."""
    thr = typical_threshold(p, epsilon=epsilon, alpha=alpha)                      # (N,)
    par = torch.tensor(tree.parents[1:], dtype=torch.long, device=p.device)
    tok = torch.as_tensor(list(tokens[1:]) if not torch.is_tensor(tokens) else tokens[1:], device=p.device)
    ok = [False] + (p[par, tok] > thr[par]).tolist()
    path = _deepest(tree, ok)
    return TreeVerdict(path, _sample(p[path[-1]], generator))


# ---------------------------------------------------------------------------------------------
# Drafting a tree: sibling sampling (with / without replacement) and stochastic beam search
# ---------------------------------------------------------------------------------------------

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
    return _finish(parents, ranks, tokens, qs)


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
    return _finish(parents, ranks, tokens, qs)


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


def _finish(parents, ranks, tokens, qs) -> DraftedTree:
    tree = TokenTree(tuple(parents), tuple(ranks))
    V = next(iter(qs.values())).shape[-1]
    q = torch.zeros(len(tokens), V, dtype=next(iter(qs.values())).dtype)
    for node, qn in qs.items():
        q[node] = qn
    return DraftedTree(tree, tokens, q)
