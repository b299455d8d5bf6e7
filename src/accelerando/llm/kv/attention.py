"""One attention function for every KV method, registered with transformers' AttentionInterface.

A forward called with ``kv_state=<KVState>`` (transformers passes extra forward kwargs down to the
attention function) lets the state (1) observe prefill attention scores for the prefill presses
(SnapKV, H2O, Elastic Cache) and (2) replace decode-time attention for the dynamic methods
(TokenSelect, Recycled Attention). Without ``kv_state`` it is plain SDPA, so a model switched to it
behaves exactly as before. Shapes: query (B, H, q, D); key / value (B, Hkv, L, D) after the cache
update (RoPE already applied, so scores are the model's own).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn.functional as F

ATTN_NAME = "accelerando_kv"
_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(ATTN_NAME, kv_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, Hkv, L, D) -> (B, Hkv * groups, L, D): each kv head serves `groups` query heads."""
    if groups == 1:
        return x
    B, Hkv, L, D = x.shape
    return x[:, :, None].expand(B, Hkv, groups, L, D).reshape(B, Hkv * groups, L, D)


def group_mean(s: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, H, ...) per-query-head scores -> (B, Hkv, ...): mean over each kv head's query group."""
    B, H = s.shape[:2]
    return s.reshape(B, hkv, H // hkv, *s.shape[2:]).mean(2)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scaling: float,
         mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """SDPA with GQA expansion; returns transformers' layout (B, q, H, D)."""
    groups = query.shape[1] // key.shape[1]
    out = F.scaled_dot_product_attention(query, repeat_kv(key, groups), repeat_kv(value, groups),
                                         attn_mask=mask, is_causal=causal and mask is None, scale=scaling)
    return out.transpose(1, 2).contiguous()


def attention_probs(query: torch.Tensor, key: torch.Tensor, *, scaling: float, q_offset: int,
                    chunk: int = 256) -> Iterator[tuple[int, torch.Tensor]]:
    """Causal softmax(q K^T) in chunks of queries: yields (start, probs (B, H, c, L_s)); query i sits
    at key position ``q_offset + i``, and a chunk only scores the keys it can see (L_s = last
    visible key + 1), so an 8k prefill never holds an (L, L) matrix and skips the masked half."""
    groups = query.shape[1] // key.shape[1]
    k = repeat_kv(key, groups).float()
    for s in range(0, query.shape[2], chunk):
        q = query[:, :, s: s + chunk].float()
        c = q.shape[2]
        visible = q_offset + s + c                                                 # keys 0 .. visible-1
        logits = (q @ k[:, :, :visible].transpose(-1, -2)) * scaling              # (B, H, c, L_s)
        # row r sees keys <= q_offset + s + r: the last c - 1 - r columns of the chunk are masked
        mask = torch.ones(c, c, dtype=torch.bool, device=key.device).triu(1)
        logits[..., visible - c:].masked_fill_(mask, float("-inf"))
        yield s, logits.softmax(-1)


def kv_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 kv_state: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers attention function: SDPA, with the hooks of `kv_state` when one is passed."""
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if kv_state is not None:
        out = kv_state.attend(module.layer_idx, query, key, value, attention_mask, scaling)
        if out is not None:
            return out, None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


@contextlib.contextmanager
def kv_attention_enabled(model: Any) -> Iterator[None]:
    """Switch `model` to the KV attention function for the duration (restored afterwards)."""
    _register()
    prev = model.config._attn_implementation
    if prev == ATTN_NAME:
        yield
        return
    model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(prev)
