"""Medusa heads: structure, training (Medusa-1), save/load, compatibility errors, sparse trees."""

import itertools
import math

import pytest
import torch

from accelerando.llm.drafters import Medusa
from accelerando.llm.drafters.medusa import best_sparse_tree, expected_accept_length, target_picks
from accelerando.llm.tree import TokenTree


def _tiny(seed=0, hidden=32, vocab=64):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model("llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=256)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg).eval()


def test_heads_are_separate_and_start_as_lm_head():
    t = _tiny()
    for proj in ("shared", "lowrank", "own"):
        m = Medusa.for_target(t, n_heads=3, n_layers=2, projection=proj)
        blocks = [b for h in m.heads for b in h.blocks]
        assert len({id(b) for b in blocks}) == 6                       # no [m] * n weight sharing
        h = torch.randn(5, 32)
        ref = t.get_output_embeddings()(h)
        for k in range(3):
            torch.testing.assert_close(m(h)[k], ref)                   # zero-init W: identity ResBlocks
    m = Medusa.for_target(t, projection="shared")
    assert not any(k.startswith("_lm_head") or "lm_head" in k for k in m.state_dict())


def _stream(t, n=2400, seed=0):
    """Text the target itself writes (sampled), so heads have something learnable."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (8, 4), generator=g)
    torch.manual_seed(seed)
    out = t.generate(ids, max_new_tokens=n // 8, do_sample=True, temperature=0.7, pad_token_id=0, eos_token_id=None)
    return out.flatten()


def test_training_improves_heads_and_save_load_roundtrip(tmp_path):
    t = _tiny()
    ids = _stream(t)
    untrained = Medusa.for_target(t, n_heads=2)
    from accelerando.llm.drafters.medusa import _hidden_states
    H, X = _hidden_states(t, ids, 100)
    before = untrained.top_k_accuracy(H[-2:], X[-2:], top_k=3)
    m = Medusa.train(t, ids, n_heads=2, steps=60, batch_tokens=256, lr=3e-3, seq_len=100, top_k=3, tree_nodes=6)
    after = m.config.top_k_accuracy
    assert after[0][0] > before[0][0]                       # learnt something about x_{t+2}
    assert len(m.config.tree) == 6
    m.save(tmp_path / "heads")
    m2 = Medusa.load(tmp_path / "heads", target=t)
    h = torch.randn(4, 32)
    torch.testing.assert_close(m(h), m2(h))
    assert m2.config.tree == m.config.tree and m2.tree == TokenTree.from_paths(m.config.tree)
    m2.train(False)                                         # nn.Module.train still works on instances
    assert not m2.training


def test_distilled_heads_learn_the_targets_own_predictions():
    """Distilled heads (``distill=True``) minimise the cross-entropy to the *target's* next-token
    distribution at position t+k+1, corpus-trained heads the one to the corpus token: on held-out
    rows the distilled head is the closer one to the target (soft cross-entropy), and its reported
    accuracy is its agreement with the target's argmax."""
    t = _tiny(seed=1)
    ids = _stream(t, n=3200, seed=2)
    kw = dict(n_heads=1, steps=80, batch_tokens=256, lr=3e-3, seq_len=100, top_k=1, tree_nodes=1)
    plain = Medusa.train(t, ids, **kw)
    distilled = Medusa.train(t, ids, distill=True, **kw)
    assert distilled.config.distilled and not plain.config.distilled
    from accelerando.llm.drafters.medusa import _hidden_states
    H, X = _hidden_states(t, ids, 100)
    H, X = H[-3:], X[-3:]                                                   # the held-out rows
    lm_head = t.get_output_embeddings()
    with torch.no_grad():
        p_target = torch.softmax(lm_head(H[:, 1:]), -1)                       # target's dist. of x_{t+2}

        def soft_ce(m):
            return -(p_target * torch.log_softmax(m(H[:, :-1])[0], -1)).sum(-1).mean().item()
        assert soft_ce(distilled) < soft_ce(plain)
        greedy = torch.cat([X[:, :1], lm_head(H).argmax(-1)[:, :-1]], 1)     # the target's own picks
    assert torch.equal(greedy, target_picks(lm_head, H, X))
    agree = distilled.top_k_accuracy(H, greedy, top_k=1)[0][0]
    assert distilled.config.top_k_accuracy[0][0] == pytest.approx(agree, abs=1e-6)


def test_mismatched_target_is_refused(tmp_path):
    m = Medusa.for_target(_tiny(hidden=32), n_heads=2)
    m.save(tmp_path / "h")
    with pytest.raises(ValueError, match="hidden size"):
        Medusa.load(tmp_path / "h", target=_tiny(hidden=48))
    with pytest.raises(ValueError, match="vocabulary"):
        Medusa.load(tmp_path / "h", target=_tiny(vocab=80))
    with pytest.raises(FileNotFoundError):
        Medusa.load(tmp_path / "nothing")


def test_sparse_tree_is_optimal_for_its_budget():
    acc = [[0.6, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.1, 0.05]]
    all_paths = [list(p) for d in (1, 2, 3) for p in itertools.product(range(3), repeat=d)]
    for n in (1, 3, 5):
        got = best_sparse_tree(acc, n)
        TokenTree.from_paths(got)                               # a valid (prefix-closed) tree
        best = 0.0                                              # brute force over prefix-closed sets
        for subset in itertools.combinations(all_paths, n):
            s = {tuple(p) for p in subset}
            if all(p[:-1] in s or len(p) == 1 for p in s):
                best = max(best, expected_accept_length(subset, acc))
        assert math.isclose(expected_accept_length(got, acc), best)


def test_batched_draft_logits_equal_the_per_head_forward():
    """draft_logits (heads stacked: one bmm per ResBlock layer, one projection matmul) == forward,
    for every projection; the stacked weights follow in-place updates of the parameters."""
    t = _tiny()
    for proj in ("shared", "lowrank", "own"):
        torch.manual_seed(1)
        m = Medusa.for_target(t, n_heads=3, n_layers=2, projection=proj, rank=4)
        with torch.no_grad():
            for p in m.parameters():                 # leave the zero init: heads must differ
                p.add_(0.1 * torch.randn_like(p))
            h = torch.randn(32)
            torch.testing.assert_close(m.draft_logits(h), m(h))
            m.heads[1].blocks[0].linear.weight.mul_(2.0)     # in place: the stack must be rebuilt
            torch.testing.assert_close(m.draft_logits(h), m(h))


def test_medusa_picks_match_the_tree_and_greedy_proposal():
    """The per-tree index (head = depth - 1, rank) gives the tokens of the direct definition."""
    from accelerando.llm.drafters.medusa import medusa_picks
    from accelerando.llm.sampling import SamplingConfig
    t = _tiny()
    m = Medusa.for_target(t, n_heads=3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tree = TokenTree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    head, rank, R = medusa_picks(tree)
    assert head.tolist() == [d - 1 for d in tree.depths[1:]] and rank.tolist() == list(tree.ranks[1:]) and R == 3
    assert medusa_picks(tree)[0] is head                      # cached on the tree
    h = torch.randn(32)
    prop = m.use_tree(tree).draft(7, hidden=h, sampling=SamplingConfig(0.0))
    top = m(h).topk(3, dim=-1).indices.tolist()
    assert prop.tokens[0].tolist() == [7] + [top[tree.depths[i] - 1][tree.ranks[i]] for i in range(1, len(tree))]


@pytest.mark.parametrize("proj", ["shared", "lowrank", "own"])
def test_step_hook_drafts_equal_the_eager_heads(proj):
    """Medusa's StepHook (heads inside the target's engine step, at the node greedy verification
    accepts) gives the drafts the eager heads give from that node's hidden state; padding columns
    of the step do not change them."""
    from accelerando.llm.engine import VERDICT_COLUMNS, Engine
    from accelerando.llm.sampling import SamplingConfig
    from accelerando.llm.tree_verify import greedy_accept_tree
    t = _tiny(seed=3)
    torch.manual_seed(4)
    m = Medusa.for_target(t, n_heads=3, n_layers=2, projection=proj, rank=4)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    tree = TokenTree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]])    # 8 nodes
    greedy = SamplingConfig(0.0)
    hook = m.use_tree(tree).step_hook(greedy)
    assert hook is m.step_hook(greedy) and m.step_hook(SamplingConfig(0.7)) is None
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(5))
    cont = t.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None)[0, 9:]
    tokens = torch.randint(0, 64, (1, len(tree)), generator=torch.Generator().manual_seed(6))
    tokens[0, 0] = ids[0, -1]                                   # root: the last token, not cached yet
    tokens[0, [1, 4, 7]] = cont                                 # path [0, 0, 0] = the target's greedy tokens
    caches = [Engine(t, batch_size=1, max_len=40, compile=False, role=f"hook-{proj}-{i}") for i in range(2)]
    for c in caches:
        c.forward(ids[:, :-1])                                  # prefill
    step = caches[0].forward(tokens, tree=tree, hook=hook)
    out, logits = step.hook, step.logits
    node, nxt = greedy_accept_tree(tree, tokens, logits.argmax(-1))
    assert int(node) == 7                                       # a deep accepted node, not the root
    # the hook's verdict columns are greedy verification's (node, next token, all finite)
    assert hook.verdict and out[0, 0, -VERDICT_COLUMNS:].tolist() == [int(node), int(nxt), 0]
    drafts = out[..., :-VERDICT_COLUMNS]
    step = caches[1].forward(tokens, tree=tree, hidden=True)
    h, logits2 = step.hidden, step.logits
    torch.testing.assert_close(logits2, logits)
    eager = m.draft(int(nxt), hidden=h[0, int(node)], sampling=greedy).tokens
    prop = m.draft(int(nxt), drafts=drafts[0, int(node)], sampling=greedy)
    assert torch.equal(prop.tokens, eager) and prop.tree is m.tree
    # a compiled step pads the block to a fixed width: extra columns do not change the drafts
    pad = lambda x, v: torch.cat([x, v.expand(1, 3, *x.shape[2:])], 1)          # noqa: E731
    padded = hook(pad(h, h[:, :1] + 1.0), pad(logits2, logits2[:, :1]), pad(tokens, tokens.new_zeros(1, 1)))
    assert padded.shape == (1, len(tree) + 3, len(tree) - 1 + VERDICT_COLUMNS)
    assert torch.equal(padded[0, int(node)], out[0, int(node)])
    # non-finite logits at any node raise the verdict's flag
    bad_logits = logits2.clone()
    bad_logits[0, 2, 5] = float("nan")
    assert hook(h, bad_logits, tokens)[0, 0, -1] == 1


def test_config_tree_is_cached_and_equals_a_fresh_build():
    t = _tiny()
    m = Medusa.for_target(t, n_heads=3)
    assert m.tree == TokenTree.chain(3)                         # no stored tree: a chain over the heads
    m.config.tree = [[0], [1], [0, 0]]
    tree = m.tree
    assert tree == TokenTree.from_paths([[0], [1], [0, 0]]) and m.tree is tree
    m.config.tree = [[0], [1], [2], [0, 0]]                     # a new list: rebuilt
    assert m.tree == TokenTree.from_paths([[0], [1], [2], [0, 0]]) and m.tree is not tree
    m.use_tree(2)
    assert m.tree == m.sparse_tree(2)
