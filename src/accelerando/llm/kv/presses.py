"""Prefill-time KV-cache presses: after the prompt's prefill, each layer's cache is cut down to
``ratio`` of its tokens (per kv head), so decoding reads -- and memory holds -- only what is kept.

A press is a small object with a validated config (``ratio`` in (0, 1] is the kept fraction):
  needs_scores           None | "window" | "all": which prefill attention it observes
  observe(layer, q, k)   accumulate that layer's scores during the prefill forward
  select(layer, keys)    -> (B, Hkv, k) kept column indices, ascending
  compress(cache)        gather every layer's kept columns into place (memory is freed)
Kept keys keep their original RoPE rotation; later tokens are fed with their true positions
(``position_ids``), so nothing is re-rotated. ``ratio == 1.0`` keeps the cache untouched.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from accelerando.llm.kv.attention import attention_probs, group_mean


def check_ratio(ratio: float, name: str = "ratio") -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"{name} must be in (0, 1] (the fraction of the KV cache kept), got {ratio!r}")


def check_kv_model(model: Any, method: str) -> None:
    """One-line error for an architecture the KV methods cannot drive: it must be a decoder-only
    transformers model whose attention goes through AttentionInterface and keeps a DynamicCache."""
    cfg = getattr(model, "config", None)
    name = type(model).__name__
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        raise TypeError(f"{method} does not support {name}: it needs a decoder-only transformers causal LM")
    can = getattr(model, "_can_set_attn_implementation", None)
    if can is None or not can():
        raise TypeError(f"{method} does not support {name} ({getattr(cfg, 'model_type', '?')}): its attention "
                        "does not go through transformers' AttentionInterface")
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "layer_types", None) and any(
            t != "full_attention" for t in cfg.layer_types):
        raise TypeError(f"{method} does not support {name}: sliding-window / hybrid attention layers")


def kept_count(ratio: float, n: int) -> int:
    return max(1, min(n, int(round(ratio * n))))


def kv_bytes(cache: Any) -> int:
    """Bytes of keys and values the cache actually holds (all layers)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor))


def gather_columns(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, L, D), idx (B, Hkv, k) -> (B, Hkv, k, D)."""
    return x.gather(2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def topk_with_forced(scores: torch.Tensor, k: int, forced: torch.Tensor) -> torch.Tensor:
    """Top-k columns of scores (B, Hkv, L) with the `forced` (L,) bool columns always in; ascending."""
    s = scores.masked_fill(forced, float("inf"))
    return s.topk(k, dim=-1).indices.sort(-1).values


class Press:
    """Base class: select() per layer, compress() gathers. Subclasses set `needs_scores`."""
    name = "press"
    needs_scores: str | None = None
    ratio: float = 1.0

    def reset(self) -> None:
        self.scores: dict[int, torch.Tensor] = {}

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        raise NotImplementedError

    def check_context(self, n: int) -> None:
        """Raise for a context the press's windows do not fit in."""

    def prefill_context(self, model: Any) -> Any:
        """Context manager around the prefill forward (presses that hook the model use it)."""
        return contextlib.nullcontext()

    def select(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def compress(self, cache: Any) -> None:
        n = cache.layers[0].keys.shape[2]
        self.check_context(n)
        if self.ratio >= 1.0:
            return
        for i, layer in enumerate(cache.layers):
            idx = self.select(i, layer.keys)
            layer.keys, layer.values = self._reduce(i, layer.keys, layer.values, idx)

    def _reduce(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
                idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gather_columns(keys, idx).contiguous(), gather_columns(values, idx).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"


@dataclass(repr=False)
class StreamingLLMPress(Press):
    """StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks"):
    keep the first ``sinks`` tokens (attention sinks) and the most recent ones, ``ratio`` in all."""
    ratio: float = 0.25
    sinks: int = 4
    name = "streaming"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"sinks must be an integer >= 0, got {self.sinks!r}")
        self.reset()

    def check_context(self, n: int) -> None:
        if self.ratio < 1.0 and kept_count(self.ratio, n) <= self.sinks:
            raise ValueError(f"ratio={self.ratio} keeps {kept_count(self.ratio, n)} of {n} tokens, not more than "
                             f"sinks={self.sinks}: raise the ratio or lower sinks")

    def select(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        B, H, n, _ = keys.shape
        k = kept_count(self.ratio, n)
        idx = torch.cat([torch.arange(self.sinks), torch.arange(n - (k - self.sinks), n)]).to(keys.device)
        return idx.expand(B, H, k)


@dataclass(repr=False)
class SnapKVPress(Press):
    """SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"):
    the last ``window`` prompt queries vote (summed softmax attention, max-pooled over ``kernel``
    neighbours) for the prefix columns each kv head keeps; the window itself is always kept."""
    ratio: float = 0.25
    window: int = 32
    kernel: int = 7
    name = "snapkv"
    needs_scores = "window"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be an integer >= 1, got {self.window!r}")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd integer >= 1, got {self.kernel!r}")
        self.reset()

    def check_context(self, n: int) -> None:
        if self.window >= n:
            raise ValueError(f"window={self.window} is larger than the context ({n} tokens)")
        if self.ratio < 1.0 and kept_count(self.ratio, n) <= self.window:
            raise ValueError(f"ratio={self.ratio} keeps {kept_count(self.ratio, n)} of {n} tokens, not more than "
                             f"window={self.window}: raise the ratio or shrink the window")

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        n = key.shape[2]
        self.check_context(n)
        w = self.window
        votes = sum(p.sum(2) for _, p in attention_probs(query[:, :, -w:], key, scaling=scaling, q_offset=n - w))
        self.scores[layer] = group_mean(votes, key.shape[1])                     # (B, Hkv, n)

    def select(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        n = keys.shape[2]
        s = self.scores.pop(layer)
        if self.kernel > 1:      # pooling keeps each selected token's neighbours (SnapKV's clustering)
            s = F.max_pool1d(s, self.kernel, stride=1, padding=self.kernel // 2)
        forced = torch.arange(n, device=keys.device) >= n - self.window
        return topk_with_forced(s, kept_count(self.ratio, n), forced)


@dataclass(repr=False)
class H2OPress(Press):
    """H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference"):
    keep the heavy hitters (largest attention summed over every prompt query) and the most recent
    tokens, ``recent`` of the budget (the paper's half / half split by default)."""
    ratio: float = 0.25
    recent: float = 0.5
    name = "h2o"
    needs_scores = "all"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if not 0.0 <= self.recent < 1.0:
            raise ValueError(f"recent must be in [0, 1) (the budget's share of recent tokens), got {self.recent!r}")
        self.reset()

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        n = key.shape[2]
        acc = query.new_zeros(query.shape[0], query.shape[1], n, dtype=torch.float32)
        for _, p in attention_probs(query, key, scaling=scaling, q_offset=n - query.shape[2]):
            acc[..., : p.shape[-1]] += p.sum(2)
        self.scores[layer] = group_mean(acc, key.shape[1])

    def select(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        n = keys.shape[2]
        k = kept_count(self.ratio, n)
        forced = torch.arange(n, device=keys.device) >= n - int(self.recent * k)
        return topk_with_forced(self.scores.pop(layer), k, forced)


@dataclass(repr=False)
class ElasticCachePress(H2OPress):
    """Elastic Cache (Liu et al., 2024, "Efficient Inference of Vision Instruction-Following Models
    with Elastic Cache"), instruction-encoding stage: the most important tokens by attention
    frequency become anchors, and every other token is merged (averaged) into its nearest anchor
    instead of being dropped. The first ``sinks`` and last ``recent`` share stay anchors."""
    ratio: float = 0.25
    recent: float = 0.1
    sinks: int = 4
    name = "elastic"

    def select(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        n = keys.shape[2]
        k = kept_count(self.ratio, n)
        pos = torch.arange(n, device=keys.device)
        forced = (pos >= n - int(self.recent * k)) | (pos < min(self.sinks, k))
        return topk_with_forced(self.scores.pop(layer), k, forced)

    def _reduce(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
                idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, H, n, D = keys.shape
        k = idx.shape[-1]
        pos = torch.arange(n, device=keys.device).expand(B, H, n).contiguous()
        # nearest anchor of each token (ties to the left one)
        right = torch.searchsorted(idx.contiguous(), pos).clamp_max(k - 1)            # (B, H, n)
        left = (right - 1).clamp_min(0)
        d_r = (idx.gather(2, right) - pos).abs()
        d_l = (idx.gather(2, left) - pos).abs()
        owner = torch.where(d_l <= d_r, left, right)                                 # (B, H, n)
        count = torch.zeros(B, H, k, dtype=keys.dtype, device=keys.device).scatter_add_(
            2, owner, torch.ones_like(owner, dtype=keys.dtype))
        own = owner[..., None].expand(B, H, n, D)
        k_sum = torch.zeros(B, H, k, D, dtype=keys.dtype, device=keys.device).scatter_add_(2, own, keys)
        v_sum = torch.zeros(B, H, k, D, dtype=values.dtype, device=values.device).scatter_add_(2, own, values)
        return (k_sum / count[..., None]).contiguous(), (v_sum / count[..., None]).contiguous()


PRESSES = {"streaming": StreamingLLMPress, "snapkv": SnapKVPress, "h2o": H2OPress, "elastic": ElasticCachePress}


@dataclass(repr=False)
class RetrievalChunkPress(Press):
    """TriForce's retrieval cache (Sun et al., 2024, "TriForce: Lossless Acceleration of Long
    Sequence Generation with Hierarchical Speculative Decoding", Sec. 4.1): the prompt's cache is
    cut into chunks of ``chunk`` tokens, each chunk is scored by the last prompt query's dot
    product with the chunk's mean key, and the top chunks fill ``ratio`` of the cache (the first
    and last chunks always stay)."""
    ratio: float = 0.1
    chunk: int = 8
    name = "retrieval"
    needs_scores = "window"

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        if not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"chunk must be an integer >= 1, got {self.chunk!r}")
        self.reset()

    def check_context(self, n: int) -> None:
        if self.ratio < 1.0 and kept_count(self.ratio, n) < 2 * self.chunk:
            raise ValueError(f"ratio={self.ratio} keeps {kept_count(self.ratio, n)} of {n} tokens, fewer than two "
                             f"chunks of {self.chunk}: raise the ratio or shrink the chunk")

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        n, c = key.shape[2], self.chunk
        nc = -(-n // c)
        pad = nc * c - n
        kp = F.pad(key.float(), (0, 0, 0, pad))                                            # (B, Hkv, nc*c, D)
        sizes = torch.full((nc, 1), float(c), device=key.device)
        sizes[-1] = c - pad
        means = kp.view(*key.shape[:2], nc, c, key.shape[-1]).sum(3) / sizes              # (B, Hkv, nc, D)
        groups = query.shape[1] // key.shape[1]
        q = query[:, :, -1].float().view(query.shape[0], key.shape[1], groups, -1)          # (B, Hkv, g, D)
        self.scores[layer] = (q @ means.transpose(-1, -2)).mean(2)                           # (B, Hkv, nc)

    def select(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        n, c = keys.shape[2], self.chunk
        s = self.scores.pop(layer)
        nc = s.shape[-1]
        n_chunks = max(2, min(nc, kept_count(self.ratio, n) // c))
        forced = torch.zeros(nc, dtype=torch.bool, device=keys.device)
        forced[0] = forced[-1] = True
        top = topk_with_forced(s, n_chunks, forced)                                        # (B, Hkv, m) chunks
        idx = (top[..., None] * c + torch.arange(c, device=keys.device)).flatten(-2)
        pad = nc * c - n        # the forced last chunk is partial: its missing tail sits at the end
        return idx[..., : idx.shape[-1] - pad]


PRESSES["retrieval"] = RetrievalChunkPress
