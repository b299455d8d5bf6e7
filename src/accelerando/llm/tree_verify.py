"""Acceptance rules on a verified token tree, as pure functions of probability tensors.

One walk serves every drafter: starting at the root, pick an accepted child (by the rule), descend,
and stop where no child is accepted; then emit one more token from the target at the last accepted
node (the *correction* on rejection, the *bonus* at a leaf). A chain is the tree whose nodes have
one child, and on it ``rejection_accept_tree`` is exactly Leviathan et al.'s speculative sampling.

Inputs shared by the rules (B rows, N nodes, V vocabulary; node 0 = root, see ``accelerando.llm.tree``):
  tokens  (B, N) the drafted token of each node (the root's entry is ignored)
  p       (B, N, V) target distribution *after* each node (the processed one: temperature, top-k/p)
  q       (B, N, V) the draft distribution each node's children were sampled from
  valid   (B, N) | None real nodes (rows with shorter proposals)
``verify`` applies the rule a ``Proposal`` asks for to the target's logits: the loop's one call.
Drafting (how trees are drawn) lives in ``accelerando.llm.drafters``; this module only verifies.
Rules:
  greedy      temperature 0: longest path whose every token is the target's argmax (exact).
  rejection   SpecInfer (children i.i.d. from q, ``replacement=True``) or Recursive Speculative
              Decoding (children without replacement, ``replacement=False``): recursive rejection
              sampling over the siblings. Lossless.
  typical     Medusa's typical acceptance: p(x) > min(epsilon, alpha exp(-H(p))). Lossy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from accelerando.llm.sampling import SamplingConfig, checked_argmax, checked_probs
from accelerando.llm.tree import TokenTree

if TYPE_CHECKING:   # the record only; drafters import this module
    from accelerando.llm.drafters.base import Proposal


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




def verify(logits: torch.Tensor, prop: Proposal, sampling: SamplingConfig, generator: torch.Generator | None,
           rule: str = "exact", epsilon: float = 0.09, alpha: float = 0.3
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One acceptance step for chains and trees: logits (B, N, V) are the target's after each node.

    Returns (last accepted node (B,), next token (B,), bad (B,)). ``rule``: "exact" (greedy at
    temperature 0, recursive rejection sampling otherwise -- lossless) or "typical" (Medusa, lossy).
    A proposal of the root alone (no drafts) is plain decoding: the next token from p, no walk.
    """
    if prop.tokens.shape[1] == 1:
        last = logits[:, 0]
        if sampling.greedy:
            nxt, bad = checked_argmax(last)
        else:
            p, bad = checked_probs(last, sampling)
            nxt = _sample(p, generator)
        node = torch.zeros_like(nxt)
        return node, nxt, bad if prop.bad is None else bad | prop.bad
    if sampling.greedy:
        arg, bad = checked_argmax(logits)
        node, nxt = greedy_accept_tree(prop.tree, prop.tokens, arg, prop.valid)
    else:
        p, bad = checked_probs(logits, sampling)
        if rule == "typical":
            node, nxt = typical_accept_tree(prop.tree, prop.tokens, p, epsilon=epsilon, alpha=alpha,
                                            generator=generator, valid=prop.valid)
        else:
            q = prop.q.to(p.dtype) if prop.q is not None else _one_hot_q(prop, p)
            node, nxt = rejection_accept_tree(prop.tree, prop.tokens, p, q, replacement=prop.replacement,
                                              generator=generator, valid=prop.valid)
    bad = bad.any(-1)
    return node, nxt, bad if prop.bad is None else bad | prop.bad


def _one_hot_q(prop: Proposal, p: torch.Tensor) -> torch.Tensor:
    """Deterministic drafts (prompt lookup): node i's children distribution is one-hot on its child."""
    if not prop.chain:
        raise ValueError("lossless sampling of a tree needs the draft distributions q of the proposal")
    B, N, V = p.shape
    kids = torch.nn.functional.one_hot(prop.tokens[:, 1:], V).to(p.dtype)                 # (B, N-1, V)
    return torch.cat([kids, p.new_zeros(B, 1, V)], 1)
