"""KV-cache methods in the bench registry (arms for ``bench`` / ``sweep`` / ``recommend``).

Lossy presses and decode-time selection are registered ``lossless=False``: the runner scores them
by token agreement with the baseline's greedy output (and the loss budget decides whether the
selector may pick them); TriForce is lossless and must reproduce the baseline exactly. Every
method needs unpadded prompts of equal length and an AttentionInterface model; otherwise the cell
is marked n/a (``NotApplicable``) rather than failed -- as is a prompt shorter than
``MIN_CONTEXT`` tokens (the methods target long contexts; on a short prompt there is nothing to
select) or one the method's windows do not fit in.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from accelerando.bench.methods import LLMOutput, LLMSetup, MethodEntry, NotApplicable, register
from accelerando.llm.sampling import SamplingConfig

MIN_CONTEXT = 256


def _applicable(s: LLMSetup, what: str) -> None:
    from accelerando.llm.kv.presses import check_kv_model
    n = s.input_ids.shape[1]
    if n < MIN_CONTEXT:
        raise NotApplicable(f"{what} is a long-context method: the prompt has {n} tokens (< {MIN_CONTEXT})")
    if not bool(s.attention_mask.all()):
        raise NotApplicable(f"{what} needs unpadded prompts of equal length (this batch is left-padded)")
    try:
        check_kv_model(s.target, what)
    except TypeError as exc:
        raise NotApplicable(str(exc)) from None


def _kv_run(s: LLMSetup, make: Callable[[], dict[str, Any]], what: str) -> Callable[[], LLMOutput]:
    from accelerando.llm.kv.generate import kv_generate
    _applicable(s, what)
    m = make()                               # validate the knobs now (bad knob -> error, not n/a)
    if m.get("press") is not None:
        try:
            m["press"].check_context(s.input_ids.shape[1])
        except ValueError as exc:
            raise NotApplicable(str(exc)) from None
    sampling = SamplingConfig(s.temperature, s.top_k, s.top_p)

    def run() -> LLMOutput:
        g = torch.Generator(device=s.input_ids.device).manual_seed(s.seed) if s.temperature > 0 else None
        out, st = kv_generate(s.target, s.input_ids, max_new_tokens=s.max_new_tokens, sampling=sampling,
                              generator=g, eos_token_id=s.eos_token_id, **make())
        new = int((out.shape[1] - s.input_ids.shape[1]) * out.shape[0])
        calls = out.shape[1] - s.input_ids.shape[1]
        return LLMOutput(out, {**st, "target_calls": calls, "new_tokens": new,
                               "tokens_per_target_call": new / max(1, calls * out.shape[0]),
                               "kv_kept_fraction": st["kv_bytes_prefill"] / max(1, st["kv_bytes_full"])})
    return run


def _press_builder(cls_name: str) -> Callable[..., Callable[[], LLMOutput]]:
    def build(s: LLMSetup, ratio: float = 0.25, **knobs: Any) -> Callable[[], LLMOutput]:
        from accelerando.llm.kv import presses
        cls = getattr(presses, cls_name)
        return _kv_run(s, lambda: {"press": cls(ratio=ratio, **knobs)}, cls_name)
    build.__doc__ = f"{cls_name}: prefill-time press keeping `ratio` of the KV cache."
    return build


def _policy_builder(cls_name: str) -> Callable[..., Callable[[], LLMOutput]]:
    def build(s: LLMSetup, ratio: float = 0.25, **knobs: Any) -> Callable[[], LLMOutput]:
        from accelerando.llm.kv import dynamic
        cls = getattr(dynamic, cls_name)
        return _kv_run(s, lambda: {"policy": cls(ratio=ratio, **knobs)}, cls_name)
    build.__doc__ = f"{cls_name}: decode-time selection attending to `ratio` of the KV cache."
    return build


def build_kvpress(s: LLMSetup, press: str = "kvpress-snapkv", ratio: float = 0.25) -> Callable[[], LLMOutput]:
    """The anchor: a kvpress press (needs the kvpress package) keeping `ratio` of the cache."""
    try:
        import kvpress  # noqa: F401
    except ModuleNotFoundError:
        raise NotApplicable("kvpress is not installed (pip install --no-deps kvpress==0.5.5)") from None
    from accelerando.llm.kv.anchor import KVPressAnchor
    return _kv_run(s, lambda: {"press": KVPressAnchor(press, ratio=ratio)}, press)


def build_triforce(s: LLMSetup, ratio: float = 0.1, chunk: int = 8, k: int = 4,
                   engine: str = "hf") -> Callable[[], LLMOutput]:
    """TriForce: the target with a retrieval cache of `ratio` drafts `k` tokens for the full target."""
    from accelerando.llm.kv.triforce import TriForce
    from accelerando.llm.speculative import speculative_generate
    _applicable(s, "TriForce")
    try:
        TriForce(s.target, k=k, ratio=ratio, chunk=chunk).press.check_context(s.input_ids.shape[1])
    except ValueError as exc:
        if "ratio must" in str(exc) or "chunk must" in str(exc):
            raise
        raise NotApplicable(str(exc)) from None
    pad = s.tokenizer.pad_token_id if s.tokenizer is not None else None

    def run() -> LLMOutput:
        out = speculative_generate(s.target, s.input_ids, draft=TriForce(s.target, k=k, ratio=ratio, chunk=chunk),
                                   attention_mask=s.attention_mask, max_new_tokens=s.max_new_tokens,
                                   temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                   eos_token_id=s.eos_token_id, pad_token_id=pad, seed=s.seed, engine=engine)
        return LLMOutput(out.sequences, out.stats)
    return run


_PRESS_ARMS = {"kv-streaming": ("StreamingLLMPress", "StreamingLLM: attention sinks + recent window"),
               "kv-snapkv": ("SnapKVPress", "SnapKV: observation-window votes per kv head"),
               "kv-h2o": ("H2OPress", "H2O: heavy hitters (accumulated attention) + recent tokens"),
               "kv-elastic": ("ElasticCachePress", "Elastic Cache: importance anchors, others merged in")}
_POLICY_ARMS = {"kv-tokenselect": ("TokenSelect", "TokenSelect: per-query top-k tokens (soft head vote, selection cache)"),
                "kv-recycled": ("RecycledAttention", "Recycled Attention: full attention every S steps, recycled top-k between")}

for _name, (_cls, _desc) in _PRESS_ARMS.items():
    register(MethodEntry(_name, "llm", _press_builder(_cls), lossless=False,
                         description=f"{_desc} (prefill press, lossy; memory held = ratio)",
                         default_knobs={"ratio": 0.25}, min_prompt_tokens=MIN_CONTEXT))
for _name, (_cls, _desc) in _POLICY_ARMS.items():
    register(MethodEntry(_name, "llm", _policy_builder(_cls), lossless=False,
                         description=f"{_desc} (decode-time, lossy; full cache stays in memory)",
                         default_knobs={"ratio": 0.25}, min_prompt_tokens=MIN_CONTEXT))
register(MethodEntry("kvpress", "llm", build_kvpress, lossless=False,
                     description="anchor: an NVIDIA kvpress press (press=kvpress-snapkv|-streaming|-knorm|-expected|-tova)",
                     default_knobs={"press": "kvpress-snapkv", "ratio": 0.25}, min_prompt_tokens=MIN_CONTEXT))
register(MethodEntry("kv-triforce", "llm", build_triforce, lossless=True,
                     description="TriForce: target with a retrieval-chunk KV cache drafts for the full target (lossless)",
                     default_knobs={"ratio": 0.1, "chunk": 8, "k": 4}, min_prompt_tokens=MIN_CONTEXT))
