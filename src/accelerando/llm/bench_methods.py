"""LLM decoding methods in the bench registry: plain generate, transformers' assisted generation and
prompt lookup, and ours (``engine-generate``, ``spec-draft``, ``spec-prompt-lookup``).

Every builder returns a zero-argument callable producing an ``LLMOutput``; the target's forward
calls are counted with a hook for every method, so tokens per target call compare across them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from accelerando.bench.methods import LLMOutput, LLMSetup, MethodEntry, register


def _count_calls(model: Any) -> tuple[list[int], Callable[[], None]]:
    box = [0]

    def hook(*_):
        box[0] += 1
    h = model.register_forward_pre_hook(hook)
    return box, h.remove


def _hf_kwargs(s: LLMSetup) -> dict[str, Any]:
    pad = s.tokenizer.pad_token_id if s.tokenizer is not None and s.tokenizer.pad_token_id is not None else None
    kw: dict[str, Any] = dict(attention_mask=s.attention_mask, max_new_tokens=s.max_new_tokens, pad_token_id=pad)
    if s.eos_token_id is not None:
        kw["eos_token_id"] = s.eos_token_id
    if s.temperature > 0:
        kw.update(do_sample=True, temperature=s.temperature, top_k=s.top_k or 0, top_p=s.top_p or 1.0)
    else:
        kw.update(do_sample=False)
    return kw


def _plain_output(out: torch.Tensor, input_ids: torch.Tensor, calls: int) -> LLMOutput:
    """A non-speculative decode's output with its counts (one target call per step for every row)."""
    new = int((out.shape[1] - input_ids.shape[1]) * out.shape[0])
    return LLMOutput(out, dict(target_calls=calls, new_tokens=new,
                               tokens_per_target_call=new / max(1, calls * out.shape[0])))


def _hf_run(s: LLMSetup, extra: dict[str, Any]) -> Callable[[], LLMOutput]:
    kw = {**_hf_kwargs(s), **extra}

    def run() -> LLMOutput:
        torch.manual_seed(s.seed)
        box, remove = _count_calls(s.target)
        try:
            with torch.no_grad():
                out = s.target.generate(s.input_ids, **kw)
        finally:
            remove()
        return _plain_output(out, s.input_ids, box[0])
    return run


def _draft(s: LLMSetup, name: str | None) -> Any:
    if not s.drafts:
        raise ValueError("this method needs a draft model; the setup has none (LLMWorkload.drafts)")
    if name is None:
        name = next(iter(s.drafts))
    if name not in s.drafts:
        raise ValueError(f"unknown draft {name!r}; the setup has {', '.join(s.drafts)}")
    return s.drafts[name]


def _batch1(s: LLMSetup, what: str) -> None:
    if s.input_ids.shape[0] != 1:
        raise ValueError(f"{what} runs batch 1 only in transformers (got batch {s.input_ids.shape[0]})")


def build_generate(s: LLMSetup) -> Callable[[], LLMOutput]:
    return _hf_run(s, {})


def build_engine_generate(s: LLMSetup, compile: bool = True) -> Callable[[], LLMOutput]:
    """Plain decoding on our lean engine (static cache, compiled step): no drafts, the fast
    baseline speculation on the engine must beat. Greedy output equals ``generate``'s."""
    from accelerando.llm import engine as eng
    pad = s.tokenizer.pad_token_id if s.tokenizer is not None else None

    def run() -> LLMOutput:
        st: dict[str, Any] = {}
        g = None
        if s.temperature > 0:
            g = torch.Generator(device=s.input_ids.device).manual_seed(s.seed)
        out = eng.generate(s.target, s.input_ids, s.attention_mask, max_new_tokens=s.max_new_tokens,
                           eos_token_id=s.eos_token_id, pad_token_id=pad, compile=compile,
                           temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, generator=g, stats=st)
        return _plain_output(out, s.input_ids, int(st.get("target_calls", 0)))
    return run


def build_hf_assisted(s: LLMSetup, draft: str | None = None, k: int | None = None) -> Callable[[], LLMOutput]:
    """transformers' assisted generation; ``k=None`` = its defaults (20 tokens, confidence
    threshold 0.4), an int = that many tokens with the constant schedule. Batch 1 only."""
    _batch1(s, "assisted generation")
    extra: dict[str, Any] = dict(assistant_model=_draft(s, draft))
    if k is not None:
        extra.update(num_assistant_tokens=int(k), num_assistant_tokens_schedule="constant",
                     assistant_confidence_threshold=0.0)
    return _hf_run(s, extra)


def build_hf_prompt_lookup(s: LLMSetup, k: int = 10, ngram: int = 2) -> Callable[[], LLMOutput]:
    _batch1(s, "prompt lookup decoding")
    return _hf_run(s, dict(prompt_lookup_num_tokens=int(k), max_matching_ngram_size=int(ngram)))


# knob values of rows recorded before the engine vocabulary was unified (the bundled history has them)
_LEGACY_ENGINE = {"static": "engine", "static-eager": "engine-eager"}


def _ours(s: LLMSetup, drafter_fn: Callable[[], Any], engine: str = "hf") -> Callable[[], LLMOutput]:
    from accelerando.llm.engine import check_engine
    from accelerando.llm.speculative import speculative_generate
    pad = s.tokenizer.pad_token_id if s.tokenizer is not None else None
    engine = check_engine(_LEGACY_ENGINE.get(engine, engine))

    def run() -> LLMOutput:
        out = speculative_generate(s.target, s.input_ids, draft=drafter_fn(), attention_mask=s.attention_mask,
                                   max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_k=s.top_k,
                                   top_p=s.top_p, eos_token_id=s.eos_token_id, pad_token_id=pad, seed=s.seed,
                                   engine=engine)
        return LLMOutput(out.sequences, out.stats)
    return run


def build_spec_draft(s: LLMSetup, draft: str | None = None, k: int | str = 4, k_max: int = 12,
                     engine: str = "hf") -> Callable[[], LLMOutput]:
    """``engine``: "hf" (transformers' cache), "engine" / "engine-eager" (the lean engine), "auto"."""
    from accelerando.llm.drafters.draft_model import DraftModel
    model = _draft(s, draft)
    return _ours(s, lambda: DraftModel(model, k=k, k_max=k_max), engine)


def build_spec_prompt_lookup(s: LLMSetup, ngram_sizes: tuple[int, ...] | list[int] = (3, 2, 1),
                             k: int | str = 8, engine: str = "hf") -> Callable[[], LLMOutput]:
    from accelerando.llm.drafters.prompt_lookup import PromptLookup
    sizes = tuple(ngram_sizes)
    return _ours(s, lambda: PromptLookup(ngram_sizes=sizes, k=k), engine)


register(MethodEntry("generate", "llm", build_generate, lossless=True, is_baseline=True,
                     description="plain transformers target.generate (the baseline)"))
register(MethodEntry("engine-generate", "llm", build_engine_generate, lossless=True,
                     description="plain decoding on accelerando's lean engine (static KV cache, compiled step)"))
register(MethodEntry("hf-assisted", "llm", build_hf_assisted, lossless=True,
                     description="transformers assisted generation with a draft model (batch 1 only)",
                     default_knobs={"draft": None, "k": None}))
register(MethodEntry("hf-prompt-lookup", "llm", build_hf_prompt_lookup, lossless=True,
                     description="transformers prompt lookup decoding (batch 1 only)",
                     default_knobs={"k": 10, "ngram": 2}))
register(MethodEntry("spec-draft", "llm", build_spec_draft, lossless=True,
                     description="accelerando speculative decoding with a draft model (k int or 'adaptive')",
                     default_knobs={"draft": None, "k": 4}))
register(MethodEntry("spec-prompt-lookup", "llm", build_spec_prompt_lookup, lossless=True,
                     description="accelerando speculative decoding with prompt lookup (n-gram copy)",
                     default_knobs={"ngram_sizes": (3, 2, 1), "k": 8}))
