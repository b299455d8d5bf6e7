"""SageAttention2-style quantised attention as a transformers attention backend (CPU implementation).

SageAttention (Zhang et al., ICLR 2025) and SageAttention2 (Zhang et al., 2024): smooth K by
subtracting its mean over tokens (softmax is invariant to adding q . mean(K) to a row), quantise
Q per token and K per block of ``block`` tokens to INT8 (or INT4 with Q smoothed too, its mean
term added back as ``mean(Q) . K^T``), compute S = (Q_q K_q^T) s_q s_k in integers, take the
unnormalised softmax P~ = exp(S - rowmax) in full precision, and multiply P~ V in low precision:
P~ in FP8 E4M3 with the static scale 448 (P~ is in [0, 1]), V in FP8 per channel after
subtracting its mean over tokens (added back after normalising); "fp16" keeps SageAttention 1's
16-bit P.V. The row sum l is kept in fp32 and divides at the end.

On this CPU the integer product is an fp32 matmul of integer-valued tensors -- exact while
``head_dim * 127**2 < 2**24`` (head_dim <= 1040), so it *is* the INT8 GEMM's result -- and FP8
rounding uses torch's float8 casts: the numerics are SageAttention's, the speed is not (no INT8
/ FP8 tensor cores here; on a GPU the ``sageattention`` package is the fast path). Shapes this
implementation cannot take exactly -- head_dim > 1024, attention dropout in training, an
attention-weights request -- fall back to exact attention, with a one-time warning naming why.

Use: ``use_sage_attention(model)`` (switches ``model``'s attention implementation to
``"accelerando_sage"``); ``attention_cosine(model, input_ids)`` measures, per layer, the cosine
similarity of the quantised attention output to exact attention on the same Q, K, V.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

NAME = "accelerando_sage"
MAX_HEAD_DIM = 1024
FP8_MAX = 448.0                       # largest finite float8_e4m3fn


@dataclass
class SageConfig:
    """``qk``: "int8" (SageAttention) or "int4" (SageAttention2, Q smoothed too); ``pv``: "fp8"
    (SageAttention2) or "fp16" (SageAttention); ``block``: K tokens per quantisation scale."""

    qk: str = "int8"
    pv: str = "fp8"
    block: int = 64

    def __post_init__(self):
        if self.qk not in ("int8", "int4"):
            raise ValueError(f"qk must be 'int8' or 'int4', got {self.qk!r}")
        if self.pv not in ("fp8", "fp16"):
            raise ValueError(f"pv must be 'fp8' or 'fp16', got {self.pv!r}")
        if not isinstance(self.block, int) or self.block < 1:
            raise ValueError(f"block must be a positive int, got {self.block!r}")


@dataclass
class _Probe:
    """Per-layer cosine similarities collected while ``attention_cosine`` runs."""
    cos: dict[int, list[float]] = field(default_factory=dict)


_WARNED: set[str] = set()


def _quant_sym(x: torch.Tensor, qmax: int, dim_groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantisation of x (..., D) with one scale per row: integer-valued x_q and s."""
    s = (x.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-12)
    return (x / s).round().clamp(-qmax, qmax), s


def _quant_blocks(k: torch.Tensor, qmax: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale per block of ``block`` tokens (per head): k (B, H, S, D)."""
    B, H, S, D = k.shape
    pad = (-S) % block
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad))
    kb = kp.reshape(B, H, -1, block * D)                                    # (B, H, nblk, block*D)
    s = (kb.abs().amax(-1, keepdim=True) / qmax).clamp(min=1e-12)
    q = (kb / s).round().clamp(-qmax, qmax)
    s_tok = s.expand(-1, -1, -1, block).reshape(B, H, -1)[..., :S, None]     # (B, H, S, 1)
    return q.reshape(B, H, -1, D)[:, :, :S], s_tok


def _fp8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).to(torch.float32)


def sage_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float, cfg: SageConfig) -> torch.Tensor:
    """Quantised attention; q (B, H, T, D), k and v (B, H, S, D) (kv heads already repeated),
    ``mask`` additive (B or 1, 1, T, S) or None; returns (B, H, T, D) in q's dtype."""
    dt = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    qmax = 127 if cfg.qk == "int8" else 7
    k = k - k.mean(dim=2, keepdim=True)                       # smoothing K: softmax-invariant
    bias = None
    if cfg.qk == "int4":                                      # smoothing Q: add mean(Q) K^T back exactly
        qm = q.mean(dim=2, keepdim=True)                      # (B, H, 1, D)
        bias = (qm @ k.transpose(-1, -2)) * scale             # (B, H, 1, S)
        q = q - qm
    qq, sq = _quant_sym(q, qmax)                              # per token
    kq, sk = _quant_blocks(k, qmax, cfg.block)                # per block of K tokens
    s = (qq @ kq.transpose(-1, -2)) * (sq * sk.transpose(-1, -2)) * scale   # integer GEMM, then dequantise
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s + (mask.float() if mask.dtype != torch.bool else torch.where(mask, 0.0, float("-inf")))
    m = s.amax(-1, keepdim=True).clamp(min=-1e30)             # a fully masked row stays finite
    p = torch.exp(s - m)                                      # P~ in [0, 1]
    l = p.sum(-1, keepdim=True).clamp(min=1e-30)
    vm = v.mean(dim=2, keepdim=True)                          # smoothing V: rows of P sum to 1
    vc = v - vm
    if cfg.pv == "fp8":
        sv = (vc.abs().amax(dim=2, keepdim=True) / FP8_MAX).clamp(min=1e-12)   # per channel
        o = (_fp8(p * FP8_MAX) @ _fp8(vc / sv)) * (sv / FP8_MAX)
    else:
        o = p.half().float() @ vc.half().float()
    return (o / l + vm).to(dt)


def _exact(q, k, v, mask, scale):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _fallback_reason(module: Any, q: torch.Tensor, dropout: float, kwargs: dict) -> str | None:
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim {q.shape[-1]} > {MAX_HEAD_DIM} (the integer product would not be exact in fp32)"
    if dropout > 0 and getattr(module, "training", False):
        return "attention dropout in training"
    if kwargs.get("output_attentions"):
        return "attention weights were requested"
    return None


def sage_attention_forward(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, scaling: float | None = None,
                           dropout: float = 0.0, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-interface signature; returns ((B, T, H, D), None)."""
    cfg: SageConfig = getattr(module, "_accelerando_sage", None) or SageConfig()
    rep = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, rep), _repeat_kv(value, rep)
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    mask = attention_mask[..., : k.shape[-2]] if attention_mask is not None else None
    reason = _fallback_reason(module, query, dropout, kwargs)
    if reason is not None:
        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"accelerando sage attention: exact attention instead ({reason})", stacklevel=2)
        out = _exact(query, k, v, mask, scale)
    else:
        out = sage_attention(query, k, v, mask, scale, cfg)
        probe: _Probe | None = getattr(module, "_accelerando_probe", None)
        if probe is not None:
            ref = _exact(query.float(), k.float(), v.float(), None if mask is None else mask.float(), scale)
            cos = torch.nn.functional.cosine_similarity(out.float().flatten(1), ref.flatten(1), dim=1)
            probe.cos.setdefault(int(getattr(module, "layer_idx", -1)), []).extend(cos.tolist())
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the backend (attention function + its mask builder) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask
    AttentionInterface.register(NAME, sage_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, eager_mask)   # additive float mask, always materialised
    return NAME


def _attention_modules(model: Any) -> list[Any]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    mods = [getattr(l, "self_attn", None) for l in (layers or [])]
    if not mods or any(m is None for m in mods):
        raise ValueError(f"{type(model).__name__} has no .model.layers[i].self_attn: sage attention supports "
                         "Llama-family decoders")
    return mods


def use_sage_attention(model: Any, *, qk: str = "int8", pv: str = "fp8", block: int = 64) -> Any:
    """Switch ``model`` (in place) to the quantised attention; returns the model."""
    cfg = SageConfig(qk=qk, pv=pv, block=block)
    mods = _attention_modules(model)
    register()
    model.set_attn_implementation(NAME)
    for m in mods:
        m._accelerando_sage = cfg
    return model


@torch.no_grad()
def attention_cosine(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                     ) -> list[float]:
    """Per layer, the mean cosine similarity (over batch rows and heads) of the quantised attention
    output to exact attention on the same Q, K, V, in one forward of a ``use_sage_attention`` model."""
    mods = _attention_modules(model)
    probe = _Probe()
    for m in mods:
        m._accelerando_probe = probe
    try:
        model(input_ids, attention_mask=attention_mask)
    finally:
        for m in mods:
            del m._accelerando_probe
    if not probe.cos:
        raise ValueError("the model did not run sage attention (call use_sage_attention first)")
    return [sum(v) / len(v) for _, v in sorted(probe.cos.items())]
