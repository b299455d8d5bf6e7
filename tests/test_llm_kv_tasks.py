"""The synthetic retrieval tasks: exact lengths, needle at the requested depth, answer recoverable."""
from __future__ import annotations

import pytest
import torch

from accelerando import zoo
from accelerando.llm.kv.tasks import HaystackBuilder


@pytest.fixture(scope="module")
def builder():
    tok = zoo.load_tokenizer()
    text = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 200
    return tok, HaystackBuilder(tok, torch.tensor(tok(text)["input_ids"]))


@pytest.mark.parametrize("task", ["passkey", "multikey"])
def test_sample_length_depth_and_answer(builder, task):
    tok, b = builder
    for depth in (0.0, 0.5, 1.0):
        ids, spans, s = b.sample(task, 1000, gen=torch.Generator().manual_seed(1), depth=depth, n_keys=4)
        assert len(s.prompt) == 1000 and s.prompt[0] == tok.eos_token_id
        assert abs(s.depth - depth) < 0.06        # other needles shift it a little
        text = tok.decode(s.prompt)
        assert tok.decode(s.answer) == " " + s.answer_text and len(s.answer) == 2     # two one-token words
        query = text.rsplit("\n", 1)[1]                          # "#@ <key>"
        assert query.startswith("#@ ") and f"\n{query} {s.answer_text}\n" in text   # its needle is in the haystack
        assert ids[spans[0][0]: spans[0][1]] == s.answer.tolist()
        # the answer's ids follow the key's ids in the haystack exactly (one induction step finds them)
        p, a = s.prompt.tolist(), s.answer.tolist()
        key = p[-len(tok(query, add_special_tokens=False)["input_ids"]) - 1:]
        hits = [i for i in range(len(p) - len(key) - len(a)) if p[i: i + len(key)] == key]
        assert any(p[i + len(key): i + len(key) + len(a)] == a for i in hits)


def test_keys_are_single_tokens(builder):
    tok, b = builder
    assert len(b.names) >= 16
    for w in b.names[:50]:
        assert tok(w, add_special_tokens=False)["input_ids"] == [tok.convert_tokens_to_ids(tok.tokenize(w))[0]]


def test_training_sequence_and_bad_input(builder):
    _, b = builder
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        ids, mask = b.training_sequence(256, gen=g)
        assert ids.shape == mask.shape == (257,) and 0 < int(mask.sum()) < 257
    with pytest.raises(ValueError, match="task must be one of"):
        b.sample("nope", 100, gen=g)
    with pytest.raises(ValueError, match="depth must be in"):
        b.sample("passkey", 100, gen=g, depth=1.5)
    with pytest.raises(ValueError, match="too short"):
        b.sample("multikey", 20, gen=g, n_keys=6)


def test_grow_appends_layers_that_leave_the_function_unchanged():
    """The long-context model's last cycle grows it by zero-output layers: same logits at step 0,
    and the new layers train (their other weights are random, not zero)."""
    from llm_models import tiny_lm

    from accelerando.zoo.long_context import Anneal, grow
    m = tiny_lm("llama", init_std=0.3).eval()
    big = grow(m, 1).eval()
    ids = torch.randint(1, 96, (2, 40), generator=torch.Generator().manual_seed(0))
    assert big.config.num_hidden_layers == m.config.num_hidden_layers + 1
    assert torch.allclose(big(input_ids=ids).logits, m(input_ids=ids).logits, atol=1e-6)
    new = big.model.layers[-1]
    assert new.self_attn.q_proj.weight.abs().sum() > 0 and new.mlp.down_proj.weight.abs().sum() == 0
    assert grow(m, 0) is m
    with pytest.raises(ValueError, match="grow_layers"):
        Anneal(grow_layers=-1)
    with pytest.raises(ValueError, match="steps"):
        Anneal(steps=0)
