"""Cheaper-forward-pass methods as bench / sweep arms.

Lossy arms (quantised weights, CoreInfer, layer-skip decoding, quantised attention) run plain
``generate`` on a transformed *copy* of the target (built once, not timed); the runner judges
them against the baseline's tokens (greedy: 1 - token agreement is their quality loss, so
``recommend --max-loss`` can weigh them). Lossless arms: self-speculation (the target's own skip
view drafts, ``speculative_generate`` verifies) and its anchor, transformers'
``assistant_early_exit``.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Callable

from accelerando.bench.methods import LLMOutput, LLMSetup, MethodEntry, NotApplicable, register


def _transformed(s: LLMSetup, fn: Callable[[Any], Any]) -> Any:
    try:
        return fn(copy.deepcopy(s.target))
    except ValueError as exc:      # e.g. a group size that does not divide this model's dims
        raise NotApplicable(str(exc)) from None


def _generate_on(s: LLMSetup, model: Any, engine: str = "hf") -> Callable[[], LLMOutput]:
    from accelerando.llm.bench_methods import _hf_run, build_engine_generate
    s2 = replace(s, target=model)
    if engine in ("static", "engine", "auto"):
        return build_engine_generate(s2)
    if engine in ("static-eager", "engine-eager"):
        return build_engine_generate(s2, compile=False)
    return _hf_run(s2, {})


def build_quant(s: LLMSetup, method: str = "int8", group_size: int = 64, bits: int | None = None,
                packed: bool = True, engine: str = "hf", budget: float | None = None,
                scale_bits: int = 16) -> Callable[[], LLMOutput]:
    """``engine``: "hf" (``generate``) or the lean engine ("static" / "engine": compiled), which
    runs packed int8 linears with the same kernel inside its fused step (other formats: fp32).
    bitmod ``budget`` (mixed 3/4-bit groups): calibrated (Fisher-weighted) on the workload's prompts."""
    from accelerando.llm.compute.quant import QuantConfig, bits_per_weight, quantize_model
    try:
        cfg = QuantConfig(method=method, group_size=int(group_size), bits=bits, packed=bool(packed),
                          budget=None if budget is None else float(budget), scale_bits=int(scale_bits))
    except ValueError as exc:
        raise NotApplicable(str(exc)) from None
    if engine != "hf" and cfg.packed and cfg.method != "int8":
        raise NotApplicable(f"the lean engine runs packed int8 only, not packed {cfg.method}")
    calib = s.input_ids if cfg.budget is not None else None
    model = _transformed(s, lambda m: quantize_model(m, cfg, calibration=calib))
    run = _generate_on(s, model, engine)
    bpw = bits_per_weight(model)

    def go() -> LLMOutput:
        out = run()
        out.stats["bits_per_weight"] = bpw
        return out
    return go


def build_torchao_int8(s: LLMSetup) -> Callable[[], LLMOutput]:
    from accelerando.llm.compute.quant import torchao_int8
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise NotApplicable("torchao is not installed (pip install 'accelerando[quant]')") from None
    return _generate_on(s, _transformed(s, torchao_int8))


def build_coreinfer(s: LLMSetup, alpha: float = 0.4, beta: float = 0.2) -> Callable[[], LLMOutput]:
    from accelerando.llm.compute.coreinfer import CoreInferConfig, apply_coreinfer, core_fraction
    model = _transformed(s, lambda m: apply_coreinfer(m, CoreInferConfig(alpha=float(alpha), beta=float(beta))))
    run = _generate_on(s, model)

    def go() -> LLMOutput:
        out = run()
        out.stats["core_fraction"] = core_fraction(model)
        return out
    return go


def _skip_cfg(exit_layer: int | None, skip: int | None, keep: str | None = None):
    from accelerando.llm.compute.layerskip import SkipConfig
    try:
        if keep is not None:
            return SkipConfig(keep=tuple(int(i) for i in str(keep).replace("-", ",").split(",")))
        return SkipConfig(exit_layer=int(exit_layer)) if exit_layer is not None else SkipConfig(skip=int(skip or 0))
    except ValueError as exc:
        raise NotApplicable(str(exc)) from None


def _head(s: LLMSetup, exit_layer: int | None) -> Any:
    """The target's trained exit head for ``exit_layer``."""
    from accelerando.llm.compute.exit_head import exit_head_for
    if exit_layer is None:
        raise NotApplicable("exit_head needs exit_layer (a head is trained for one early exit)")
    try:
        return exit_head_for(s.target, int(exit_layer))
    except FileNotFoundError as exc:
        raise NotApplicable(str(exc)) from None


def _view(s: LLMSetup, exit_layer: int | None, skip: int | None, keep: str | None = None,
          exit_head: bool = False) -> Any:
    from accelerando.llm.compute.layerskip import skip_view
    head = _head(s, exit_layer) if exit_head else None
    try:
        return skip_view(s.target, _skip_cfg(exit_layer, skip, keep), exit_head=head)
    except ValueError as exc:
        raise NotApplicable(str(exc)) from None


def build_layer_skip(s: LLMSetup, exit_layer: int | None = None, skip: int | None = 1, keep: str | None = None,
                     exit_head: bool = False, engine: str = "hf") -> Callable[[], LLMOutput]:
    """Lossy: decode with the skip view alone (early exit at ``exit_layer``, optionally through its
    trained ``exit_head``; Unified Layer Skipping's balanced schedule of ``skip`` layers; or the
    layers ``keep``, e.g. "0,1,3")."""
    return _generate_on(s, _view(s, exit_layer, skip, keep, bool(exit_head)), engine)


def build_self_spec(s: LLMSetup, exit_layer: int | None = None, skip: int | None = 1, keep: str | None = None,
                    k: int | str = 4, exit_head: bool = False, shared: bool = True,
                    engine: str = "hf", fused: bool = False, reuse: bool = False) -> Callable[[], LLMOutput]:
    """Lossless self-speculation: the skip view drafts (on the target's own KV cache when the
    target runs on the lean engine and ``shared``), the full target verifies. ``reuse`` (early exit,
    fixed k, lean engine): LayerSkip's reuse, one compiled call per round (``reuse_generate``)."""
    from accelerando.llm.bench_methods import _ours
    if reuse:
        return _reuse_run(s, exit_layer, k, bool(exit_head), engine)
    from accelerando.llm.compute.selfspec import SelfDraft
    from accelerando.llm.drafters.draft_model import DraftModel
    view = _view(s, exit_layer, skip, keep, bool(exit_head))
    if shared and engine != "hf":
        return _ours(s, lambda: SelfDraft(view, k=k, fused=bool(fused)), engine)
    return _ours(s, lambda: DraftModel(view, k=k), engine)


def _reuse_run(s: LLMSetup, exit_layer: int | None, k: int | str, exit_head: bool, engine: str) -> Callable[[], LLMOutput]:
    from accelerando.llm.compute.selfspec import reuse_generate
    if exit_layer is None or not str(k).isdigit():
        raise NotApplicable("reuse=True needs an early exit (exit_layer) and a fixed k")
    if engine == "hf":
        raise NotApplicable("reuse=True runs on the lean engine (engine='static' / 'engine' / 'engine-eager')")
    head = _head(s, exit_layer) if exit_head else None
    pad = s.tokenizer.pad_token_id if s.tokenizer is not None else None

    def run() -> LLMOutput:
        st: dict[str, Any] = {}
        try:
            out = reuse_generate(s.target, s.input_ids, s.attention_mask, exit_layer=int(exit_layer), exit_head=head,
                                 k=int(k), max_new_tokens=s.max_new_tokens, eos_token_id=s.eos_token_id,
                                 pad_token_id=pad, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                 seed=s.seed, compile="eager" not in engine, stats=st)
        except ValueError as exc:
            raise NotApplicable(str(exc)) from None
        return LLMOutput(out, st)
    return run


def build_hf_early_exit(s: LLMSetup, exit_layer: int = 2, k: int | None = None) -> Callable[[], LLMOutput]:
    """The anchor: transformers' ``assistant_early_exit`` (batch 1 only)."""
    from accelerando.llm.bench_methods import _hf_run
    if s.input_ids.shape[0] != 1:
        raise NotApplicable(f"assistant_early_exit runs batch 1 only (got batch {s.input_ids.shape[0]})")
    n = s.target.config.num_hidden_layers
    if not 1 <= int(exit_layer) < n:
        raise NotApplicable(f"exit_layer {exit_layer} is not in 1..{n - 1}")
    extra: dict[str, Any] = dict(assistant_early_exit=int(exit_layer))
    if k is not None:
        extra.update(num_assistant_tokens=int(k), num_assistant_tokens_schedule="constant",
                     assistant_confidence_threshold=0.0)
    return _hf_run(s, extra)


def build_sage_attention(s: LLMSetup, pv: str = "fp8") -> Callable[[], LLMOutput]:
    from accelerando.llm.compute.sage import use_sage_attention
    return _generate_on(s, _transformed(s, lambda m: use_sage_attention(m, pv=pv)))


register(MethodEntry("quant-int8", "llm", lambda s, **k: build_quant(s, method="int8", **k), lossless=False,
                     description="weight-only int8 per channel (real kernel: _weight_int8pack_mm, bf16 activations)",
                     default_knobs={"packed": True}))
register(MethodEntry("quant-int4", "llm", lambda s, **k: build_quant(s, method="int4", **k), lossless=False,
                     description="weight-only int4 RTN with group scale + zero (real kernel: _weight_int4pack_mm_for_cpu)",
                     default_knobs={"group_size": 64, "packed": True}))
register(MethodEntry("quant-bitmod", "llm", lambda s, **k: build_quant(s, method="bitmod", **k), lossless=False,
                     description="BitMoD per-group 3/4-bit datatype mixture (simulated: dequantised weights)",
                     default_knobs={"bits": 4, "group_size": 64, "packed": False}))
register(MethodEntry("torchao-int8", "llm", build_torchao_int8, lossless=False,
                     description="anchor: torchao Int8WeightOnlyConfig on the decoder linears"))
register(MethodEntry("coreinfer", "llm", build_coreinfer, lossless=False,
                     description="CoreInfer: sentence-level core neurons from the prefill, smaller MLP matmuls when decoding",
                     default_knobs={"alpha": 0.4, "beta": 0.2}))
register(MethodEntry("layer-skip", "llm", build_layer_skip, lossless=False,
                     description="decode with a balanced skip schedule (Unified Layer Skipping) or an early exit, no verification",
                     default_knobs={"skip": 1}))
register(MethodEntry("self-spec", "llm", build_self_spec, lossless=True,
                     description="self-speculative decoding: the target's own skip view drafts (on its KV cache), the target verifies",
                     default_knobs={"skip": 1, "k": 4}))
register(MethodEntry("hf-early-exit", "llm", build_hf_early_exit, lossless=True,
                     description="anchor: transformers assisted generation with assistant_early_exit (batch 1 only)",
                     default_knobs={"exit_layer": 2}))
register(MethodEntry("sage-attn", "llm", build_sage_attention, lossless=False,
                     description="SageAttention2-style INT8 Q.K^T with K smoothing, FP8 P.V (CPU implementation)",
                     default_knobs={"pv": "fp8"}))
