"""Shared losslessness checks for token trees (tests/test_llm_tree_*.py).

Toy model: a first-order Markov "LM" on a 4-token vocabulary, target p and draft q fixed random
tables that disagree a lot. One verification from ROOT emits >= 1 tokens; the first two emitted
tokens must follow p(x1 | ROOT) p(x2 | x1) (chi-square on 16 cells). And the same property end to
end on tiny random Llamas through ``speculative_generate``. Also one-tree and chain views of the
batched acceptance rules (``tree_verify``), the shapes the tests state their cases in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from scipy.stats import chisquare

from accelerando.llm.tree import TokenTree
from accelerando.llm.tree_verify import greedy_accept_tree, rejection_accept_tree, typical_accept_tree

V, ROOT, N_SAMPLES, ALPHA_SIG = 4, 0, 2500, 1e-3


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


# One-tree (batch 1) views of the batched rules, returning the accepted path (test helpers)

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

# Chains as the one-path case of the tree rules (test helpers): drafts (B, k), p (B, k+1, V),
# q (B, k, V) | None (deterministic drafts), n_valid (B,) | None. Returns (n_accepted, next).
def _chain_nodes(drafts, n_valid):
    B, k = drafts.shape
    tokens = torch.cat([drafts.new_zeros(B, 1), drafts], 1)                       # (B, k+1), root unused
    valid = None
    if n_valid is not None:                                                         # node i is draft i
        valid = torch.arange(k + 1, device=drafts.device)[None, :] <= n_valid[:, None]
    return TokenTree.chain(k), tokens, valid


def greedy_accept(drafts, target_argmax, n_valid=None):
    """temperature 0: the longest prefix of drafts equal to the target's argmax."""
    tree, tokens, valid = _chain_nodes(drafts, n_valid)
    return greedy_accept_tree(tree, tokens, target_argmax, valid)


def speculative_accept(drafts, p, q, generator=None, n_valid=None):
    """Speculative sampling on a batch of chains (Leviathan et al.): the tree rule, one child per node."""
    B, k = drafts.shape
    V = p.shape[-1]
    if q is None:
        q = torch.nn.functional.one_hot(drafts, V).to(p.dtype)
    q_nodes = torch.cat([q.to(p.dtype), p.new_zeros(B, 1, V)], 1)                  # (B, k+1, V)
    tree, tokens, valid = _chain_nodes(drafts, n_valid)
    return rejection_accept_tree(tree, tokens, p, q_nodes, replacement=True, generator=generator, valid=valid)


def _tables():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(2.0 * torch.randn(V, V, generator=g, dtype=torch.float64), -1)
    q = torch.softmax(2.0 * torch.randn(V, V, generator=g, dtype=torch.float64), -1)
    return p, q


P, Q = _tables()


def expand(tree, tokens, frontier):
    """The toy draft: a node's children distribution is Q's row of its token."""
    return Q[[tokens[f] for f in frontier]]


def two_token_pvalue(draft, verify, seed=0, n=N_SAMPLES):
    """Chi-square p-value of the first two tokens emitted by ``verify(drafted, p, generator)`` on
    trees ``draft(generator)`` against p(x1 | ROOT) p(x2 | x1)."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V, V)
    for _ in range(n):
        d = draft(g)
        out = accepted_tokens(verify(d, P[d.tokens], g), d.tokens)     # P[tokens]: target dist after each node
        if len(out) == 1:
            out.append(int(torch.multinomial(P[out[0]], 1, generator=g)))
        counts[out[0], out[1]] += 1
    expected = (P[ROOT][:, None] * P) * n
    return chisquare(counts.flatten().numpy(), expected.flatten().numpy()).pvalue


def tiny_llama(seed, vocab=64, layers=2):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def end_to_end_pair_pvalue(make_drafter, engine, vocab=6, n=1000):
    """Sample 2 tokens n times with ``speculative_generate`` at T=1 (target a peaked tiny Llama,
    far from the draft ``make_drafter(target, draft)`` is built from); chi-square p-value of the
    pairs against the target's joint distribution (practically impossible cells must stay empty)."""
    from accelerando.llm import speculative_generate
    t, d = tiny_llama(2, vocab=vocab), tiny_llama(3, vocab=vocab, layers=1)
    with torch.no_grad():
        t.get_output_embeddings().weight.mul_(8.0)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        p1 = t(ids).logits[0, -1].softmax(-1)
        p2 = torch.stack([t(torch.cat([ids, torch.tensor([[x]])], 1)).logits[0, -1].softmax(-1)
                          for x in range(vocab)])
    expected = (p1[:, None] * p2).flatten()
    drafter = make_drafter(t, d)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(vocab * vocab)
    for _ in range(n):
        out = speculative_generate(t, ids, draft=drafter, max_new_tokens=2, temperature=1.0, generator=g,
                                   eos_token_id=[], engine=engine).sequences
        counts[out[0, 3] * vocab + out[0, 4]] += 1
    keep = expected * n >= 1
    assert counts[~keep].sum() <= 3
    obs, exp = counts[keep], expected[keep] / expected[keep].sum() * counts[keep].sum()
    return chisquare(obs.numpy(), exp.numpy()).pvalue


def tree_generate(target, ids, *, drafter, max_new_tokens, stats=None, backend="engine-eager", eos_token_id=None,
                  **kw):
    """``speculative_generate`` of one sequence with no EOS by default; returns the sequences and
    fills ``stats`` with the loop's counters (``accept_hist``: the acceptance histogram)."""
    from accelerando.llm import speculative_generate
    out = speculative_generate(target, ids, draft=drafter, max_new_tokens=max_new_tokens, pad_token_id=0,
                               eos_token_id=[] if eos_token_id is None else eos_token_id, engine=backend, **kw)
    if stats is not None:
        stats.update(out.stats, accept_hist=out.stats["acceptance_histogram"])
    return out.sequences
