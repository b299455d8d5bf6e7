"""The registered LLM methods build, run and agree with the baseline (greedy)."""

from __future__ import annotations

import pytest
import torch

from accelerando.bench.methods import LLMSetup, get_method
from llm_models import noisy_copy, tiny_lm


class _Tok:
    pad_token_id = 0


def _setup(batch: int) -> LLMSetup:
    target = tiny_lm("llama", seed=0, init_std=0.3)
    ids = torch.randint(3, 90, (batch, 10), generator=torch.Generator().manual_seed(0))
    ids[:, 5:] = ids[:, :5]
    return LLMSetup(target=target, tokenizer=_Tok(), input_ids=ids, attention_mask=torch.ones_like(ids),
                    max_new_tokens=12, drafts={"noisy": noisy_copy(target, 0.1)})


def test_methods_match_the_baseline():
    s = _setup(1)
    base = get_method("generate").build(s)()
    for name, knobs in [("hf-assisted", {}), ("hf-assisted", {"k": 3}), ("hf-prompt-lookup", {"k": 4}),
                        ("spec-draft", {"k": 3}), ("spec-draft", {"k": "adaptive"}), ("spec-prompt-lookup", {}),
                        ("engine-generate", {"compile": False}), ("spec-draft", {"k": 3, "engine": "static-eager"}),
                        ("spec-prompt-lookup", {"k": 3, "engine": "static-eager"})]:
        out = get_method(name).build(s, **knobs)()
        assert torch.equal(out.sequences, base.sequences), (name, knobs)
        assert out.stats["target_calls"] >= 1


def test_hf_assisted_is_batch_1_only_ours_is_not():
    s = _setup(2)
    with pytest.raises(ValueError, match="batch 1 only"):
        get_method("hf-assisted").build(s)
    base = get_method("generate").build(s)()
    assert torch.equal(get_method("spec-draft").build(s, k=2)().sequences, base.sequences)
    for name, knobs in [("engine-generate", {"compile": False}), ("spec-prompt-lookup", {"engine": "static-eager"})]:
        assert torch.equal(get_method(name).build(s, **knobs)().sequences, base.sequences), (name, knobs)
