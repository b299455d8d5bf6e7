"""Padding through the user's path (issue 21 item 2): the zoo tokenizer pads on the left, and a
batch it pads gives ``generate``'s tokens; a right-padded batch, a mask of the wrong shape, a
non-0/1 mask or an all-zero row is refused with a one-line error instead of silently wrong output."""

from __future__ import annotations

import pytest
import torch

from accelerando import zoo
from accelerando.llm import DraftModel, PromptLookup, engine, speculative_generate
from llm_models import tiny_lm

TEXTS = ["def add(a, b):\n    return", "import os\nfor name in os.listdir(path):\n    if name.endswith('.py'):"]


@pytest.fixture(scope="module")
def zoo_models():
    return zoo.load("code-target"), zoo.load("code-draft-tiny"), zoo.load_tokenizer("code-target")


@pytest.mark.parametrize("cache", ["hf", "engine-eager"])
def test_zoo_tokenizer_pads_left_and_the_batch_equals_generate(zoo_models, cache):
    target, draft, tok = zoo_models
    assert tok.padding_side == "left"
    enc = tok(TEXTS, return_tensors="pt", padding=True)
    assert enc.attention_mask[0, 0] == 0 and enc.attention_mask[0, -1] == 1       # row 0 is the short one
    ref = target.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    for d in (DraftModel(draft, k=3), PromptLookup(k=4)):
        out = speculative_generate(target, enc.input_ids, attention_mask=enc.attention_mask, draft=d,
                                   max_new_tokens=12, pad_token_id=tok.pad_token_id, engine=cache)
        assert torch.equal(out.sequences, ref), type(d).__name__
    assert torch.equal(engine.generate(target, enc.input_ids, enc.attention_mask, max_new_tokens=12, compile=False,
                                       pad_token_id=tok.pad_token_id), ref)


def test_right_padding_is_refused(zoo_models):
    target, draft, tok = zoo_models
    tok_r = zoo.load_tokenizer("code-target")
    tok_r.padding_side = "right"
    enc = tok_r(TEXTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="right padding"):
        speculative_generate(target, enc.input_ids, attention_mask=enc.attention_mask, draft=DraftModel(draft),
                             max_new_tokens=4, engine="hf")
    with pytest.raises(ValueError, match="padding_side"):
        engine.generate(target, enc.input_ids, enc.attention_mask, max_new_tokens=4, compile=False)


def test_bad_masks_are_refused():
    target = tiny_lm("llama", seed=0)
    ids = torch.randint(3, 90, (2, 6))
    bad = {"input_ids' shape": torch.ones(2, 5, dtype=torch.long),
           "only 0": torch.full((2, 6), 2),
           "row 1 is all zeros": torch.tensor([[1] * 6, [0] * 6]),
           "row 0 has padding after": torch.tensor([[1, 1, 0, 1, 1, 1], [1] * 6])}
    for msg, mask in bad.items():
        with pytest.raises(ValueError, match=msg):
            speculative_generate(target, ids, attention_mask=mask, draft=PromptLookup(), max_new_tokens=4, engine="hf")
        with pytest.raises(ValueError, match=msg):
            engine.generate(target, ids, mask, max_new_tokens=4, compile=False)
