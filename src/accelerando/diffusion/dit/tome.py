"""Token merging for DiTs (ToMe, Bolya et al. 2023; its diffusion form ToMe-SD, Bolya & Hoffman 2023).

In every block, before attention and before the MLP, the most similar tokens are merged: tokens are
split into destinations (one per ``stride x stride`` cell) and sources (the rest); each source is
matched to its most cosine-similar destination (bipartite soft matching) and the ``r`` best-matched
sources are averaged into their destinations. Attention and MLP run on N - r tokens; unmerging copies
each destination's output back to the sources merged into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .core import block_forward, embed, final_layer, unpatchify
from .denoiser import Counts


@dataclass(frozen=True)
class ToMeConfig:
    ratio: float = 0.5                 # fraction of the source tokens merged away, in [0, 1]
    stride: int = 2                    # one destination token per stride x stride cell (>= 2)
    warmup: int = 0                    # full steps at the start

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"merge ratio must be in [0, 1], got {self.ratio}")
        if self.stride < 2:
            raise ValueError(f"stride must be >= 2, got {self.stride}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def dst_mask(side: int, stride: int, device: Any = None) -> torch.Tensor:
    """(N,) bool: True for the top-left token of every stride x stride cell of a side x side grid."""
    r = torch.arange(side, device=device)
    return ((r[:, None] % stride == 0) & (r[None, :] % stride == 0)).reshape(-1)


class Merge:
    """A bipartite merge computed once from ``metric`` (B, N, D); ``merge(x)`` -> (B, N - r, D),
    ``unmerge(x')`` -> (B, N, D)."""

    def __init__(self, metric: torch.Tensor, dst: torch.Tensor, r: int) -> None:
        b, n, _ = metric.shape
        self.n, self.r = n, r
        self.dst_idx = dst.nonzero().squeeze(1)                                # (Nd,)
        self.src_idx = (~dst).nonzero().squeeze(1)                             # (Ns,)
        m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sim = m[:, self.src_idx] @ m[:, self.dst_idx].transpose(1, 2)          # (B, Ns, Nd)
        best, self.match = sim.max(-1)                                         # (B, Ns)
        order = best.argsort(-1, descending=True)
        self.merged_src, self.kept_src = order[:, :r], order[:, r:]            # positions within src
        self.into = self.match.gather(1, self.merged_src)                      # (B, r) dst positions

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, d = x.shape
        src, dst = x[:, self.src_idx], x[:, self.dst_idx]
        moved = src.gather(1, self.merged_src[..., None].expand(b, self.r, d))
        dst = dst.scatter_reduce(1, self.into[..., None].expand(b, self.r, d), moved, reduce="mean",
                                 include_self=True)
        kept = src.gather(1, self.kept_src[..., None].expand(b, self.kept_src.shape[1], d))
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        b, _, d = y.shape
        nk = self.kept_src.shape[1]
        kept, dst = y[:, :nk], y[:, nk:]
        src = y.new_empty(b, len(self.src_idx), d)
        src.scatter_(1, self.kept_src[..., None].expand(b, nk, d), kept)
        src.scatter_(1, self.merged_src[..., None].expand(b, self.r, d),
                     dst.gather(1, self.into[..., None].expand(b, self.r, d)))
        out = y.new_empty(b, self.n, d)
        out[:, self.src_idx] = src
        out[:, self.dst_idx] = dst
        return out


class _LazyMerge:
    """Builds the block's Merge from the first tensor it sees (the attention input) and reuses it."""

    def __init__(self, dst: torch.Tensor, r: int) -> None:
        self.dst, self.r, self.m = dst, r, None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.m is None:
            self.m = Merge(x, self.dst, self.r)
        return self.m(x)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return self.m.unmerge(y)


class TokenMerging:
    def __init__(self, config: ToMeConfig | None = None, **kw: Any) -> None:
        self.config = config if config is not None else ToMeConfig(**kw)

    def reset(self) -> None:
        pass

    def is_noop(self) -> bool:
        return self.config.ratio == 0.0

    def forward(self, model: Any, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, step: int,
                counts: Counts) -> torch.Tensor:
        h = embed(model, x)
        b, n, _ = h.shape
        side = int(math.isqrt(n))
        dst = dst_mask(side, self.config.stride, h.device)
        r = int(self.config.ratio * int((~dst).sum())) if step >= self.config.warmup else 0
        for blk in model.transformer_blocks:
            h = block_forward(blk, h, t, y, merge=_LazyMerge(dst, r) if r > 0 else None)
        counts.add(blocks=len(model.transformer_blocks), tokens=n - r, model=model, batch=b)
        return unpatchify(model, final_layer(model, h, t, y))
