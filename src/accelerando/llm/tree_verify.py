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


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim; rows whose difference vanishes fall back to p.

    In exact arithmetic a rejection implies p != q, so the fallback only guards float round-off
    (an all-zero residual would give NaN and out-of-vocabulary ids -- a bug seen in peers).
    """
    r = (p - q).clamp_min(0)
    s = r.sum(-1, keepdim=True)
    return torch.where(s > 1e-9, r / s.clamp_min(1e-30), p)


def _sample(p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator).reshape(p.shape[:-1])


# ---------------------------------------------------------------------------------------------
# Batched rules: (B, N) trees, no host sync. Every internal node runs its sibling recursion at
# once (one iteration per sibling rank), then the accepted path is the chain of accepted children.
# A chain (one child per node) needs one iteration: this *is* batched speculative sampling.
# ---------------------------------------------------------------------------------------------

def _deepest_alive(tree: TokenTree, ok: torch.Tensor) -> torch.Tensor:
    """(B,) deepest node whose ancestors-or-self (root excluded) are all ok; ties: lowest index."""
    if tree.is_chain():   # one path in depth order: the accepted prefix (same answer, a fraction of the work)
        return ok[:, 1:].long().cumprod(1).sum(1)
    t = tree.tensors(ok.device)
    return deepest_alive_node(ok, t["fail_of"], t["score"])


def deepest_alive_node(ok: torch.Tensor, fail_of: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
    """``_deepest_alive`` on a tree's index tensors (``TokenTree.tensors``: ``fail_of``, ``score``),
    pure tensor code (it also runs inside a compiled step, see ``medusa_step_drafts``)."""
    # failed[b, i] = how many non-root ancestors-or-self of node i are not ok: one small matmul
    # (exact: counts <= N in float) instead of a (B, N, N) mask; score = depth, then lowest index
    failed = (~ok).to(fail_of.dtype) @ fail_of                                           # (B, N)
    return torch.where(failed == 0, score, -1).argmax(-1)


def greedy_accept_tree(tree: TokenTree, tokens: torch.Tensor, target_argmax: torch.Tensor,
                       valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature 0 (exact): a node is accepted iff its token is the target's argmax after its parent.

    tokens, target_argmax (B, N); valid (B, N) marks real nodes. Returns (last node (B,), next (B,)).
    """
    par = tree.tensors(tokens.device)["parent"]
    ok = tokens == target_argmax[:, par]
    if valid is not None:
        ok &= valid
    last = _deepest_alive(tree, ok)
    return last, target_argmax.gather(1, last[:, None]).squeeze(1)


def rejection_accept_tree(tree: TokenTree, tokens: torch.Tensor, p: torch.Tensor, q: torch.Tensor, *,
                          replacement: bool, generator: torch.Generator | None = None,
                          valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Lossless multi-draft verification: SpecInfer (``replacement=True``) or RSD (``False``).

    At every node the children x_1, x_2, ... are tried in rank order: accept x_i with probability
    min(1, p_i(x_i) / q_i(x_i)); on rejection p_{i+1} = norm(max(0, p_i - q_i)) and, without
    replacement, q_{i+1}(x) = q_i(x) 1[x != x_i] / (1 - q_i(x_i)). The path follows accepted
    children; the next token is drawn from the last node's final p (its residual after rejected
    children, or p itself at a leaf). A child with q_i(x_i) = 0 (or marked not valid) ends its
    node's list: it cannot have been drawn from q_i.
    p, q (B, N, V): target distribution after each node, draft distribution of its children.
    """
    t = tree.tensors(tokens.device)
    B, N, V = p.shape
    kids = t["kids"]                                                                # (N, R), -1 = none
    u = torch.rand(B, N, generator=generator, device=p.device, dtype=p.dtype)     # one uniform per child
    p_cur, q_cur = p, q.to(p.dtype)
    acc_child = torch.full((B, N), -1, dtype=torch.long, device=p.device)
    open_ = torch.ones(B, N, dtype=torch.bool, device=p.device)                   # still trying children
    for r in range(kids.shape[1]):
        c = kids[:, r]
        cc = c.clamp(min=0)
        x = tokens[:, cc]                                                           # (B, N) r-th child's token
        px = p_cur.gather(-1, x[..., None]).squeeze(-1)
        qx = q_cur.gather(-1, x[..., None]).squeeze(-1)
        tried = open_ & (c >= 0)[None] & (qx > 0)
        if valid is not None:
            tried &= valid[:, cc]
        open_ &= tried                                                              # a missing child ends the list
        acc = tried & (u[:, cc] * qx < px)                                          # u < p/q without dividing
        acc_child = torch.where(acc, c[None].expand(B, N), acc_child)
        rej = tried & ~acc
        open_ &= rej
        p_cur = torch.where(rej[..., None], residual(p_cur, q_cur), p_cur)
        if not replacement:
            q_new = q_cur.scatter(-1, x[..., None], 0.0)
            mass = q_new.sum(-1, keepdim=True)
            open_ &= mass.squeeze(-1) > 1e-9
            q_cur = torch.where(rej[..., None], q_new / mass.clamp_min(1e-30), q_cur)
    ok = acc_child[:, t["parent"]] == torch.arange(N, device=p.device)[None]
    last = _deepest_alive(tree, ok)
    final = p_cur.gather(1, last[:, None, None].expand(B, 1, V)).squeeze(1)
    return last, _sample(final, generator)


def typical_threshold(p: torch.Tensor, *, epsilon: float, alpha: float) -> torch.Tensor:
    """Medusa's typical-acceptance threshold per row: min(epsilon, alpha * exp(-H(p)))."""
    entropy = -(p * torch.log(p.clamp_min(1e-20))).sum(-1)
    return torch.minimum(torch.full_like(entropy, epsilon), alpha * torch.exp(-entropy))


def typical_accept_tree(tree: TokenTree, tokens: torch.Tensor, p: torch.Tensor, *, epsilon: float = 0.09,
                        alpha: float = 0.3, generator: torch.Generator | None = None,
                        valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Medusa typical acceptance (lossy): longest path of tokens with p(x) > min(eps, alpha e^{-H(p)})."""
    par = tree.tensors(tokens.device)["parent"]
    thr = typical_threshold(p, epsilon=epsilon, alpha=alpha)                        # (B, N)
    ok = p[:, par].gather(-1, tokens[..., None]).squeeze(-1) > thr[:, par]
    if valid is not None:
        ok &= valid
    last = _deepest_alive(tree, ok)
    B, N, V = p.shape
    return last, _sample(p.gather(1, last[:, None, None].expand(B, 1, V)).squeeze(1), generator)


# ---------------------------------------------------------------------------------------------
# One-tree (batch 1) views returning the accepted path, used by the tree loop
# ---------------------------------------------------------------------------------------------

def _verdict(tree: TokenTree, last: torch.Tensor, nxt: torch.Tensor) -> TreeVerdict:
    last_i, nxt_i = torch.stack([last[0], nxt[0]]).tolist()          # the one host sync per verification
    return TreeVerdict(tree.path_to(last_i), nxt_i)


def _row(tokens: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(tokens, device=device).reshape(1, -1)


def greedy_tree_accept(tree: TokenTree, tokens: Sequence[int], target_argmax: Sequence[int] | torch.Tensor
                       ) -> TreeVerdict:
    """Temperature 0: a node is accepted iff its token is the argmax after its parent (exact)."""
    am = _row(target_argmax, torch.device("cpu") if not torch.is_tensor(target_argmax) else target_argmax.device)
    return _verdict(tree, *greedy_accept_tree(tree, _row(tokens, am.device), am))


def rejection_tree_accept(tree: TokenTree, tokens: Sequence[int], p: torch.Tensor, q: torch.Tensor, *,
                          replacement: bool, generator: torch.Generator | None = None) -> TreeVerdict:
    """Lossless multi-draft verification of one tree (SpecInfer with replacement, RSD without)."""
    return _verdict(tree, *rejection_accept_tree(tree, _row(tokens, p.device), p[None], q[None],
                                                 replacement=replacement, generator=generator))


def typical_tree_accept(tree: TokenTree, tokens: Sequence[int], p: torch.Tensor, *, epsilon: float = 0.09,
                        alpha: float = 0.3, generator: torch.Generator | None = None) -> TreeVerdict:
    """Medusa typical acceptance (lossy) on one tree."""
    return _verdict(tree, *typical_accept_tree(tree, _row(tokens, p.device), p[None], epsilon=epsilon,
                                               alpha=alpha, generator=generator))


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
