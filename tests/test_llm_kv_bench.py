"""KV methods as bench arms: registered, run through the runner, n/a where they do not apply."""
from __future__ import annotations

import pytest
import torch

from accelerando.bench.methods import LLMSetup, NotApplicable, get_method
from llm_models import tiny_lm

ARMS = ("kv-streaming", "kv-snapkv", "kv-h2o", "kv-elastic", "kv-tokenselect", "kv-recycled", "kv-triforce")


def _setup(n: int = 300, batch: int = 1) -> LLMSetup:
    m = tiny_lm("llama", init_std=0.3, ctx=512)
    ids = torch.randint(1, 96, (batch, n), generator=torch.Generator().manual_seed(0))
    return LLMSetup(target=m, tokenizer=None, input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6)


def test_arms_run_and_ratio_one_reproduces_generate():
    s = _setup()
    ref = s.target.generate(s.input_ids, attention_mask=s.attention_mask, max_new_tokens=6, do_sample=False)
    for name in ARMS:
        e = get_method(name)
        assert e.lossless == (name == "kv-triforce")
        out = e.build(s, ratio=1.0)()
        assert torch.equal(out.sequences, ref), name
        out = e.build(s, **e.default_knobs)()
        assert out.sequences.shape == ref.shape


def test_not_applicable_short_padded_or_unsupported():
    short = _setup(n=40)
    for name in ARMS:
        with pytest.raises(NotApplicable, match="long-context"):
            get_method(name).build(short)
    s = _setup(batch=2)
    s.attention_mask[1, :3] = 0
    with pytest.raises(NotApplicable, match="unpadded"):
        get_method("kv-snapkv").build(s)
    with pytest.raises(ValueError, match="ratio must be in"):
        get_method("kv-snapkv").build(_setup(), ratio=1.5)
