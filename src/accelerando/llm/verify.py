"""Chain acceptance rules as pure, batched functions of tensors (no host syncs).

Speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding"; Chen et al. 2023): drafts ``x_i ~ q_i`` are accepted left to right with probability
``min(1, p_i(x_i) / q_i(x_i))``; at the first rejection ``n`` the next token is drawn from
``norm(max(0, p_n - q_n))``; if all k drafts pass, a bonus token is drawn from ``p_k``. Then
``P(token) = min(p, q) + (1 - sum min(p, q)) norm(max(0, p - q)) = p`` -- the output has the
target's distribution exactly.

Shapes (B rows, k drafts, V vocabulary):
  drafts   (B, k)        drafted tokens
  p        (B, k+1, V)   target's processed distribution after the last committed token and
                         after each draft (p[:, i] scores drafts[:, i]; p[:, k] is the bonus)
  q        (B, k, V)     draft distribution each draft was sampled from; None = deterministic
                         drafts (prompt lookup), i.e. q_i = one_hot(x_i)
  n_valid  (B,) or None  per-row number of real drafts (rows with shorter proposals); entries
                         past it are never accepted and count as "not proposed" (q = 0)
Returns (n_accepted (B,) long, next_tokens (B,) long), both on device.

A chain is the one-path case of a tree: both rules here are thin views of the batched tree rules
in ``accelerando.llm.tree_verify`` on ``TokenTree.chain(k)`` (one verifier for chains and trees).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from accelerando.llm.tree import TokenTree
from accelerando.llm.tree_verify import greedy_accept_tree, rejection_accept_tree, residual  # noqa: F401 (re-export)

# One verifier serves chains and trees: a chain of k drafts is the tree (root, x_1, ..., x_k) in
# which node i's only child is x_{i+1}; its accepted node index is the number of accepted drafts.


def _chain_nodes(drafts: torch.Tensor, n_valid: torch.Tensor | None) -> tuple[TokenTree, torch.Tensor, torch.Tensor | None]:
    B, k = drafts.shape
    tokens = torch.cat([drafts.new_zeros(B, 1), drafts], 1)                       # (B, k+1), root unused
    valid = None
    if n_valid is not None:                                                         # node i is draft i
        valid = torch.arange(k + 1, device=drafts.device)[None, :] <= n_valid[:, None]
    return _chain(k), tokens, valid


@lru_cache(maxsize=64)
def _chain(k: int) -> TokenTree:
    return TokenTree.chain(k)      # cached: its index tensors are built once per k


def greedy_accept(drafts: torch.Tensor, target_argmax: torch.Tensor,
                  n_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """temperature 0: accept the longest prefix of drafts equal to the target's argmax.

    ``target_argmax`` (B, k+1); the next token is the argmax after the last accepted draft, so
    the result is token for token what greedy decoding with the target alone would emit.
    """
    tree, tokens, valid = _chain_nodes(drafts, n_valid)
    return greedy_accept_tree(tree, tokens, target_argmax, valid)


def one_hot_q(drafts: torch.Tensor, vocab: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, k, V) distribution of deterministic drafts."""
    return torch.nn.functional.one_hot(drafts, vocab).to(dtype)


def speculative_accept(drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None,
                       generator: torch.Generator | None = None,
                       n_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling on a batch of chains (see the module docstring). Lossless.

    The tree rule with one child per node: node i's children are drawn from q_{i+1} (the draft's
    distribution for x_{i+1}); the last node has none (q = 0), so its next token is the bonus from p_k.
    """
    B, k = drafts.shape
    V = p.shape[-1]
    if q is None:
        q = one_hot_q(drafts, V, p.dtype)
    q_nodes = torch.cat([q.to(p.dtype), p.new_zeros(B, 1, V)], 1)                  # (B, k+1, V)
    tree, tokens, valid = _chain_nodes(drafts, n_valid)
    return rejection_accept_tree(tree, tokens, p, q_nodes, replacement=True, generator=generator, valid=valid)
