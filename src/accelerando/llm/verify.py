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

A chain is the one-path case of a tree (``accelerando.llm.tree_verify`` walks trees with the same
rule, one row at a time); this module is the batched fast path the chain loop uses.
"""

from __future__ import annotations

import torch

from accelerando.llm.sampling import sample


def greedy_accept(drafts: torch.Tensor, target_argmax: torch.Tensor,
                  n_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """temperature 0: accept the longest prefix of drafts equal to the target's argmax.

    ``target_argmax`` (B, k+1); the next token is the argmax after the last accepted draft, so
    the result is token for token what greedy decoding with the target alone would emit.
    """
    B, k = drafts.shape
    ok = drafts == target_argmax[:, :k]
    if n_valid is not None:
        ok &= torch.arange(k, device=drafts.device)[None, :] < n_valid[:, None]
    n = ok.long().cumprod(-1).sum(-1)                                  # (B,) leading run of accepts
    return n, target_argmax.gather(1, n[:, None]).squeeze(1)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) over the last dim; rows whose residual vanishes fall back to p.

    In exact arithmetic a rejection implies the residual has mass; in floats it can round to zero
    (p == q up to round-off). Normalising zeros would give NaN and out-of-vocabulary tokens (a
    bug seen in peers), so such rows use p itself -- the limit of the formula as q -> p.
    """
    r = (p - q).clamp_min(0.0)
    s = r.sum(-1, keepdim=True)
    ok = s > 1e-9
    return torch.where(ok, r / s.clamp_min(1e-30), p)


def one_hot_q(drafts: torch.Tensor, vocab: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, k, V) distribution of deterministic drafts."""
    return torch.nn.functional.one_hot(drafts, vocab).to(dtype)


def speculative_accept(drafts: torch.Tensor, p: torch.Tensor, q: torch.Tensor | None,
                       generator: torch.Generator | None = None,
                       n_valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling on a batch of chains (see the module docstring). Lossless."""
    B, k = drafts.shape
    V = p.shape[-1]
    if q is None:
        q = one_hot_q(drafts, V, p.dtype)
    q = q.to(p.dtype)
    dev = p.device
    p_x = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)          # (B, k) p_i(x_i)
    q_x = q.gather(-1, drafts[..., None]).squeeze(-1)                 # (B, k) q_i(x_i)
    u = torch.rand(B, k, device=dev, generator=generator, dtype=p.dtype)
    # u < p/q  <=>  u q < p (q > 0 for a token drawn from q); no division, so q = 0 never accepts
    ok = u * q_x < p_x
    if n_valid is not None:
        ok &= torch.arange(k, device=dev)[None, :] < n_valid[:, None]
    n = ok.long().cumprod(-1).sum(-1)                                  # (B,) first rejection index
    p_n = p.gather(1, n[:, None, None].expand(B, 1, V)).squeeze(1)     # (B, V)
    q_pad = torch.cat([q, q.new_zeros(B, 1, V)], 1)                   # q_k = 0: the bonus is drawn from p_k
    q_n = q_pad.gather(1, n[:, None, None].expand(B, 1, V)).squeeze(1)
    if n_valid is not None:                                            # stopped at an unproposed slot: from p
        q_n = torch.where((n >= n_valid)[:, None], torch.zeros_like(q_n), q_n)
    return n, sample(residual(p_n, q_n), generator)
