"""Token tree structure, tree attention (4D mask + positions) on HF models, accepted-path cache keeping."""

import pytest
import torch

from accelerando.llm.cache import cache_kwarg
from accelerando.llm.tree import (TokenTree, check_tree_support, keep_accepted_path,
                                  tree_attention_mask, tree_position_ids)

MEDUSA_PATHS = [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def test_from_paths_structure():
    t = TokenTree.from_paths(MEDUSA_PATHS)
    assert t.parents == (-1, 0, 0, 0, 1, 1, 2, 4)
    assert t.depths == (0, 1, 1, 1, 2, 2, 2, 3)
    assert t.children[0] == (1, 2, 3) and t.children[1] == (4, 5)
    assert sorted(t.paths()) == sorted(MEDUSA_PATHS)
    assert t.path_to(7) == [0, 1, 4, 7]
    assert TokenTree.from_paths(t.paths()) == t


def test_from_paths_rejects_orphans_and_bad_order():
    with pytest.raises(ValueError, match="no parent"):
        TokenTree.from_paths([[0], [1, 0]])
    with pytest.raises(ValueError, match="earlier node"):
        TokenTree((-1, 2, 0), (0, 0, 0))


def test_chain_and_chains_and_full():
    c = TokenTree.chain(4)
    assert c.is_chain() and c.parents == (-1, 0, 1, 2, 3) and c.max_depth == 4
    s = TokenTree.chains(3, 2)
    assert len(s) == 1 + 3 * 2 and len(s.children[0]) == 3 and not s.is_chain()
    f = TokenTree.full(2, 3)
    assert len(f) == 1 + 2 + 4 + 8 and len(f.leaves()) == 8


def test_ancestor_mask_matches_definition():
    t = TokenTree.from_paths(MEDUSA_PATHS)
    m = t.ancestor_mask()
    for i in range(len(t)):
        for j in range(len(t)):
            assert bool(m[i, j]) == (j in t.path_to(i))


def test_mask_and_positions_with_padding():
    t = TokenTree.from_paths([[0], [1], [0, 0]])
    prefix = torch.tensor([[0, 1, 1], [1, 1, 1]])
    m = tree_attention_mask(t, prefix)
    assert m.shape == (2, 1, 4, 7)
    neg = torch.finfo(torch.float32).min
    assert (m[0, 0, :, 0] == neg).all() and (m[1, 0, :, 0] == 0).all()
    assert m[0, 0, 3, 3 + 1] == 0 and m[0, 0, 3, 3 + 2] == neg      # node 3's parent is 1, not 2
    pos = tree_position_ids(t, prefix.sum(-1))
    assert pos.tolist() == [[2, 3, 3, 4], [3, 4, 4, 5]]


def _tiny(model_type):
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "mistral"])
def test_hf_tree_forward_matches_paths(model_type):
    """One tree forward over a cache == running each root-to-node path as a plain sequence."""
    from transformers import DynamicCache
    model = _tiny(model_type)
    t = TokenTree.from_paths(MEDUSA_PATHS)
    g = torch.Generator().manual_seed(1)
    prefix = torch.randint(0, 64, (1, 6), generator=g)
    toks = torch.randint(0, 64, (1, len(t)), generator=g)
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(prefix, **{cache_kwarg(model): cache}, use_cache=True)
        L = prefix.shape[1]
        out = model(toks, attention_mask=tree_attention_mask(t, torch.ones(1, L)),
                    position_ids=tree_position_ids(t, torch.tensor([L])), **{cache_kwarg(model): cache},
                    use_cache=True).logits[0]
        for i in range(len(t)):
            ref = model(torch.cat([prefix, toks[:, t.path_to(i)]], 1)).logits[0, -1]
            torch.testing.assert_close(out[i], ref, atol=1e-4, rtol=1e-4)
        # keep the accepted path 0 -> 1 -> 4 and continue: same as a cache built on that path
        keep_accepted_path(cache, L, torch.tensor([0, 1, 4]))
        assert cache.get_seq_length() == L + 3
        nxt = torch.tensor([[5]])
        got = model(nxt, **{cache_kwarg(model): cache}, use_cache=True).logits[0, -1]
        ref = model(torch.cat([prefix, toks[:, [0, 1, 4]], nxt], 1)).logits[0, -1]
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_errors():
    class M:
        class config:
            model_type = "bloom"
    with pytest.raises(ValueError, match="4D attention masks"):
        check_tree_support(M())


def test_padded_mask_equals_a_freshly_built_one():
    """The cached (width, width) step mask == the ancestor mask padded with self-only nodes."""
    tree = TokenTree.from_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]])
    for width in (len(tree), 8, 16):
        fresh = torch.eye(width, dtype=torch.bool)
        fresh[: len(tree), : len(tree)] = tree.ancestor_mask()
        assert torch.equal(tree.padded_mask(width), fresh)
        assert tree.padded_mask(width) is tree.padded_mask(width)     # built once
    with pytest.raises(ValueError):
        tree.padded_mask(len(tree) - 1)


def test_is_chain_is_cached_and_equals_a_fresh_check():
    for t in (TokenTree.chain(0), TokenTree.chain(3), TokenTree.chains(2, 2), TokenTree.full(2, 2),
              TokenTree.from_paths([[0], [0, 0], [0, 0, 0]]), TokenTree.from_paths([[0], [1], [0, 0]])):
        fresh = all(len(c) <= 1 for c in t.children)
        assert t.is_chain() == fresh and t.is_chain() == fresh
        assert t == TokenTree(t.parents, t.ranks)               # the cache is not part of the value
