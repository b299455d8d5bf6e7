"""Decode-time KV selection: the full cache stays in memory, each decode step attends to a
selected subset of it. (These save attention reads, not memory: ``kv_bytes`` says so.)

A policy has ``attend(layer, query (B,H,1,D), key, value (B,Hkv,L,D), scaling) -> (B,1,H,D)`` and
``reset()``; the prompt's prefill and multi-token forwards use full attention.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from accelerando.llm.kv.attention import group_mean, repeat_kv, sdpa
from accelerando.llm.kv.presses import check_ratio, gather_columns, kept_count


def _check_int(name: str, v: object, lo: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")


def _forced(L: int, sinks: int, window: int, device: torch.device) -> torch.Tensor:
    pos = torch.arange(L, device=device)
    return (pos < sinks) | (pos >= L - window)


@dataclass(repr=False)
class TokenSelect:
    """TokenSelect (Wu et al., 2024, "TokenSelect: Efficient Long-Context Inference and Length
    Extrapolation for LLMs via Dynamic Token-Level KV Cache Selection"): at every decode step each
    head scores every cached token by q.k; per-head softmaxes are summed (soft voting) and the
    top ``ratio`` of tokens (plus ``sinks`` and the last ``window``) are attended. ``per_head=True``
    lets each kv head keep its own top-k instead of the vote. Selection Cache: when the new query's
    cosine similarity to the last selecting query is >= ``reuse_threshold`` (mean over heads), the
    previous selection is reused (plus the tokens generated since)."""
    ratio: float = 0.25
    sinks: int = 4
    window: int = 16
    reuse_threshold: float = 0.9
    per_head: bool = False
    name = "tokenselect"
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        _check_int("sinks", self.sinks, 0)
        _check_int("window", self.window, 0)
        if not -1.0 <= self.reuse_threshold <= 1.0 + 1e-9:
            raise ValueError(f"reuse_threshold must be in [-1, 1] (use > 1 to disable), got {self.reuse_threshold!r}")
        self.reset()

    def reset(self) -> None:
        self._last: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self.stats = {"selections": 0, "reused": 0}

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        B, Hkv, L, _ = key.shape
        k = kept_count(self.ratio, L)
        if k >= L:
            return sdpa(query, key, value, scaling=scaling)
        q = query[:, :, 0].float()                                                      # (B, H, D)
        prev = self._last.get(layer)
        if prev is not None:
            q0, idx0, L0 = prev
            sim = torch.nn.functional.cosine_similarity(q, q0, dim=-1).mean()
            # one host sync per layer and step: the reuse decision is control flow
            if float(sim) >= self.reuse_threshold:
                self.stats["reused"] += 1
                new = torch.arange(L0, L, device=key.device).expand(B, Hkv, L - L0)
                idx = torch.cat([idx0, new], -1)
                return sdpa(query, gather_columns(key, idx), gather_columns(value, idx), scaling=scaling)
        self.stats["selections"] += 1
        groups = query.shape[1] // Hkv
        s = (q[:, :, None] @ repeat_kv(key, groups).float().transpose(-1, -2))[:, :, 0] * scaling  # (B, H, L)
        p = s.softmax(-1)
        if self.per_head:
            votes = group_mean(p, Hkv)                                                   # (B, Hkv, L)
        else:
            votes = p.sum(1, keepdim=True).expand(B, Hkv, L)                             # soft vote over heads
        votes = votes.masked_fill(_forced(L, self.sinks, self.window, key.device), float("inf"))
        idx = votes.topk(k, -1).indices.sort(-1).values
        self._last[layer] = (q, idx, L)
        return sdpa(query, gather_columns(key, idx), gather_columns(value, idx), scaling=scaling)

    def __repr__(self) -> str:
        return f"TokenSelect(ratio={self.ratio})"


@dataclass(repr=False)
class RecycledAttention:
    """Recycled Attention (Xu et al., 2024, "Recycled Attention: Efficient inference for long-context
    language models"): every ``stride`` decode steps a step attends to the full cache and records
    each kv head's top ``ratio`` tokens by its attention weights; the steps in between attend only
    to that recycled set plus the tokens generated since."""
    ratio: float = 0.25
    stride: int = 8
    name = "recycled"
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_ratio(self.ratio)
        _check_int("stride", self.stride, 1)
        self.reset()

    def reset(self) -> None:
        self._kept: dict[int, tuple[torch.Tensor, int]] = {}
        self._step: dict[int, int] = {}
        self.stats = {"full_steps": 0, "recycled_steps": 0}

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        B, Hkv, L, _ = key.shape
        t = self._step.get(layer, 0)
        self._step[layer] = t + 1
        k = kept_count(self.ratio, L)
        if t % self.stride == 0 or layer not in self._kept or k >= L:
            self.stats["full_steps"] += 1
            groups = query.shape[1] // Hkv
            s = (query.float() @ repeat_kv(key, groups).float().transpose(-1, -2)) * scaling       # (B, H, 1, L)
            p = s.softmax(-1)
            out = (p @ repeat_kv(value, groups).float()).to(query.dtype)                          # (B, H, 1, D)
            if k < L:
                self._kept[layer] = (group_mean(p[:, :, 0], Hkv).topk(k, -1).indices.sort(-1).values, L)
            return out.transpose(1, 2).contiguous()
        self.stats["recycled_steps"] += 1
        idx0, L0 = self._kept[layer]
        idx = torch.cat([idx0, torch.arange(L0, L, device=key.device).expand(B, Hkv, L - L0)], -1)
        return sdpa(query, gather_columns(key, idx), gather_columns(value, idx), scaling=scaling)

    def __repr__(self) -> str:
        return f"RecycledAttention(ratio={self.ratio}, stride={self.stride})"


POLICIES = {"tokenselect": TokenSelect, "recycled": RecycledAttention}
