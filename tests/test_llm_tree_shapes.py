"""DraftTree's budgeted shapes: static sparse trees and best-first (dynamic) trees.

Toy model as in test_llm_tree_verify: a first-order Markov "LM" on a 4-token vocabulary, target p
and draft q fixed random tables that disagree a lot. One verification from the root emits >= 1
tokens; the first two emitted tokens must follow p(x1 | r) p(x2 | x1) (chi-square on 16 cells).
The dynamic shape depends on the draft's probabilities (how many children a node gets depends on
what was drawn elsewhere), so its losslessness is an argument (drafters/tree.py docstring) checked
here; a rule that peeks at a child before deciding whether to keep it must fail the same test.
"""

import math

import pytest
import torch
from accelerando.llm.drafters.tree import best_first_tree, draft_shape, sparse_shape, sparse_widths
from accelerando.llm.tree import TokenTree
from accelerando.llm.drafters.tree_draws import DraftedTree, gumbel_topk
from tree_checks import (ALPHA_SIG, N_SAMPLES, Q, ROOT, V, end_to_end_pair_pvalue, rejection_tree_accept, tiny_llama,
                         tree_generate, two_token_pvalue)
from tree_checks import expand as _expand

def _pvalue(draft, replacement, seed=0, n=N_SAMPLES):
    return two_token_pvalue(draft, lambda d, p, g: rejection_tree_accept(d.tree, d.tokens, p, d.q, replacement=replacement,
                                                                      generator=g), seed=seed, n=n)


@pytest.mark.parametrize("replacement", [False, True])
@pytest.mark.parametrize("nodes,width", [(4, 3), (6, 2)])
def test_best_first_tree_is_lossless(replacement, nodes, width):
    draft = lambda g: best_first_tree(_expand, ROOT, nodes, width=width, depth=3, replacement=replacement, generator=g)
    shapes = {draft(torch.Generator().manual_seed(s)).tree.parents for s in range(50)}
    assert len(shapes) > 2                   # the shape really varies with the draws
    assert _pvalue(draft, replacement, seed=nodes) > ALPHA_SIG


@pytest.mark.parametrize("replacement", [False, True])
def test_sparse_tree_is_lossless(replacement):
    draft = lambda g: draft_shape(_expand, ROOT, sparse_shape([3, 2, 1]), replacement=replacement, generator=g)
    assert _pvalue(draft, replacement, seed=7) > ALPHA_SIG


def _peeking_tree(g):
    """EAGLE-2's rerank-and-prune at T > 0: draw 3 root children (Gumbel order) and 2 under each,
    then keep the 4 nodes of highest path probability (a subtree). Which siblings survive depends on
    their own values, so the kept ones are no longer a without-replacement sample in rank order."""
    kids = gumbel_topk(Q[ROOT], 3, g).tolist()
    cands = [((k,), Q[ROOT, k]) for k in kids]
    for k in kids:
        cands += [((k, c), Q[ROOT, k] * Q[k, c]) for c in gumbel_topk(Q[k], 2, g).tolist()]
    kept = sorted(cands, key=lambda c: -float(c[1]))[:4]
    keep = {c[0] for c in kept}
    keep = [c for c in keep if len(c) == 1 or (c[0],) in keep]
    level1 = [k for k in kids if (k,) in keep]
    parents, ranks, tokens = [-1], [0], [ROOT]
    for r, k in enumerate(level1):
        parents.append(0); ranks.append(r); tokens.append(k)
    for i, k in enumerate(level1):
        for r, c in enumerate([c[1] for c in keep if len(c) == 2 and c[0] == k]):
            parents.append(1 + i); ranks.append(r); tokens.append(c)
    q = torch.zeros(len(tokens), V, dtype=torch.float64)
    q[0] = Q[ROOT]
    for i, k in enumerate(level1):
        q[1 + i] = Q[k]
    return DraftedTree(TokenTree(tuple(parents), tuple(ranks)), tokens, q)


@pytest.mark.slow
def test_peeking_rule_is_detected():
    assert _pvalue(_peeking_tree, False, seed=11, n=8000) < ALPHA_SIG


def _top_paths(nodes, width, depth):
    """Brute force: all token paths (each node's children = q's top-``width``), best ``nodes`` by
    cumulative draft probability."""
    scored = []
    frontier = [((), 0.0)]
    for _ in range(depth):
        nxt = []
        for path, lp in frontier:
            last = path[-1] if path else ROOT
            for x in Q[last].topk(width).indices.tolist():
                nxt.append((path + (x,), lp + math.log(float(Q[last, x]))))
        scored += nxt
        frontier = nxt
    return sorted(lp for _, lp in scored)[::-1][:nodes]


@pytest.mark.parametrize("nodes,width,depth", [(4, 2, 4), (8, 3, 5), (7, 4, 2)])
def test_greedy_best_first_is_the_top_nodes_by_path_probability(nodes, width, depth):
    d = best_first_tree(_expand, ROOT, nodes, width=width, depth=depth, replacement=False, deterministic=True)
    assert len(d.tree) == nodes + 1 and d.tree.max_depth <= depth
    lps = sorted((sum(math.log(float(Q[d.tokens[d.tree.parents[j]], d.tokens[j]])) for j in d.tree.path_to(i)[1:])
                  for i in range(1, len(d.tree))), reverse=True)
    assert lps == pytest.approx(_top_paths(nodes, width, depth))
    for i, kids in enumerate(d.tree.children):       # each node's children are its q's top tokens, in order
        top = Q[d.tokens[i]].topk(width).indices.tolist()
        assert [d.tokens[c] for c in kids] == top[: len(kids)]


def test_sparse_widths_and_shape():
    assert sparse_widths(4) == [2, 1, 1] and sparse_widths(8) == [2, 2, 1, 1, 1, 1] and sparse_widths(3) == [1, 1, 1]
    t = sparse_shape([2, 2, 1])
    assert len(t) == 6 and t.max_depth == 3 and t.paths() == [[0], [1], [0, 0], [0, 1], [0, 0, 0]]
    with pytest.raises(ValueError):
        sparse_shape([2, 0])


# --- end to end on tiny random Llamas ----------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    target, draft = tiny_llama(0), tiny_llama(1, layers=1)
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    ref = target.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=None)
    return target, draft, ids, ref


@pytest.fixture(autouse=True)
def _eager_engine(monkeypatch):
    from accelerando.llm import engine
    monkeypatch.setattr(engine, "DEFAULT_ENGINE", "engine-eager")


@pytest.mark.parametrize("kw", [dict(shape="sparse", nodes=4), dict(shape="sparse", widths=[3, 1, 2]),
                                dict(shape="dynamic", nodes=6, width=2), dict(shape="dynamic", nodes=8, width=3, depth=3),
                                dict(shape="dynamic", nodes=5, replacement=True)])
@pytest.mark.parametrize("backend,draft_backend", [("hf", "hf"), ("engine-eager", "engine-eager")])
def test_greedy_equals_generate(models, kw, backend, draft_backend):
    from accelerando.llm.drafters import DraftTree
    target, draft, ids, ref = models
    st = {}
    out = tree_generate(target, ids, drafter=DraftTree(draft, engine=draft_backend, **kw),
                        max_new_tokens=24, stats=st, backend=backend)
    assert torch.equal(out, ref)
    assert st["target_calls"] == st["steps"] + 1 and max(st["accept_hist"]) <= kw.get("nodes", 6)


@pytest.mark.parametrize("shape,draft_backend", [("dynamic", "engine-eager"), ("dynamic", "hf"), ("sparse", "engine-eager")])
def test_self_draft_accepts_the_whole_main_path(models, shape, draft_backend):
    """Drafted by the target itself at T = 0, every step accepts the path of rank-0 children: its
    length is the depth of the top path (sparse: the main chain), so the draft cache and positions
    are right whatever the shape."""
    from accelerando.llm.drafters import DraftTree
    target, _, ids, ref = models
    st = {}
    drafter = DraftTree(target, shape=shape, nodes=6, width=2, engine=draft_backend)
    main_depths = []
    propose = drafter.propose

    def recording(*a, **kw):
        prop = propose(*a, **kw)
        node, depth = 0, 0
        while prop.tree.children[node]:
            node, depth = prop.tree.children[node][0], depth + 1
        main_depths.append(depth)
        return prop
    drafter.propose = recording
    out = tree_generate(target, ids, drafter=drafter, max_new_tokens=40, stats=st, backend="engine-eager")
    assert torch.equal(out[:, : ref.shape[1]], ref)
    assert st["accepted_tokens"] == sum(main_depths)


@pytest.mark.slow
def test_dynamic_sampling_is_lossless_end_to_end():
    """First two sampled tokens follow the target's joint distribution (chi-square, vocab 6, T=1)."""
    from accelerando.llm.drafters import DraftTree
    make = lambda t, d: DraftTree(d, shape="dynamic", nodes=4, width=3)
    assert end_to_end_pair_pvalue(make, "engine-eager") > 1e-3


def test_bad_knobs_raise_clear_errors(models):
    from accelerando.llm.drafters import DraftTree
    _, draft, _, _ = models
    for kw, msg in ((dict(shape="dynamic"), "budget"), (dict(shape="sparse"), "widths"),
                    (dict(shape="sparse", widths=[2, 0]), "widths"), (dict(shape="sparse", widths=[2, 1], nodes=5), "nodes"),
                    (dict(shape="sparse", widths=[2, 1], depth=3), "depth"),
                    (dict(shape="chains", nodes=4), "sparse and dynamic"), (dict(shape="dynamic", nodes=4, width=0), "width"),
                    (dict(shape="tall"), "shape")):
        with pytest.raises(ValueError, match=msg):
            DraftTree(draft, **kw)


def test_registry_entries(models):
    from accelerando.bench.methods import LLMSetup, get_method
    target, draft, ids, ref = models
    s = LLMSetup(target=target, tokenizer=None, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                 drafts={"d": draft})
    for name, knobs in (("rsd-sparse", {"nodes": 4}), ("rsd-dyn", {"nodes": 4, "width": 2})):
        assert get_method(name).lossless
        out = get_method(name).build(s, **knobs)()
        assert torch.equal(out.sequences, ref) and out.stats["target_calls"] >= 1
