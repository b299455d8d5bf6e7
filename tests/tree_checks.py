"""Shared losslessness checks for token trees (tests/test_llm_tree_*.py).

Toy model: a first-order Markov "LM" on a 4-token vocabulary, target p and draft q fixed random
tables that disagree a lot. One verification from ROOT emits >= 1 tokens; the first two emitted
tokens must follow p(x1 | ROOT) p(x2 | x1) (chi-square on 16 cells). And the same property end to
end on tiny random Llamas through ``tree_speculative_generate``.
"""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from accelerando.llm.tree_verify import accepted_tokens

V, ROOT, N_SAMPLES, ALPHA_SIG = 4, 0, 2500, 1e-3


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


def end_to_end_pair_pvalue(make_drafter, backend, vocab=6, n=1000):
    """Sample 2 tokens n times with ``tree_speculative_generate`` at T=1 (target a peaked tiny Llama,
    far from the draft ``make_drafter(target, draft)`` is built from); chi-square p-value of the
    pairs against the target's joint distribution (practically impossible cells must stay empty)."""
    from accelerando.llm.tree_speculative import tree_speculative_generate
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
        out = tree_speculative_generate(t, ids, drafter=drafter, max_new_tokens=2, temperature=1.0, generator=g,
                                        backend=backend)
        counts[out[0, 3] * vocab + out[0, 4]] += 1
    keep = expected * n >= 1
    assert counts[~keep].sum() <= 3
    obs, exp = counts[keep], expected[keep] / expected[keep].sum() * counts[keep].sum()
    return chisquare(obs.numpy(), exp.numpy()).pvalue
