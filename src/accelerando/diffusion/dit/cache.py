"""Block-level feature caching for DiTs: a block either runs or adds the residual it produced when it
last ran (FORA, Selvaraju et al. 2024, "Fast-Forward Caching in Diffusion Transformer Acceleration";
per-block skipping as in Delta-DiT, Chen et al. 2024). Which blocks run at a step is a *policy*:

- ``static``: every block runs at steps ``0, k, 2k, ...`` (FORA's interval ``k``), none in between;
- ``threshold``: a block runs when its input moved by at least ``threshold`` (relative L1) since it
  last ran; threshold 0 runs every block, exactly the full model;
- ``router``: a (steps, blocks) boolean table, e.g. HarmoniCa's learned router (``harmonica.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .core import block_forward, embed, final_layer, unpatchify
from .denoiser import Counts

POLICIES = ("static", "threshold", "router")


@dataclass(frozen=True)
class BlockCacheConfig:
    policy: str = "threshold"
    threshold: float = 0.1             # threshold policy: relative L1 change of a block's input, in [0, 1]
    interval: int = 2                  # static policy: all blocks run every `interval` steps (>= 1)
    warmup: int = 1                    # the first `warmup` steps run every block (>= 1: a cache must exist)
    router: Any = None                 # router policy: bool tensor (steps, blocks), True = run

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"cache threshold must be in [0, 1], got {self.threshold}")
        if self.interval < 1:
            raise ValueError(f"cache interval must be >= 1, got {self.interval}")
        if self.warmup < 1:
            raise ValueError(f"cache warmup must be >= 1 step, got {self.warmup}")
        if self.policy == "router":
            r = torch.as_tensor(self.router) if self.router is not None else None
            if r is None or r.ndim != 2 or r.dtype != torch.bool:
                raise ValueError("router policy needs router= a bool tensor of shape (steps, blocks)")


class BlockCache:
    """Run each block or reuse its cached residual ``r_i = block_i(h) - h`` (state: one residual and
    one reference input per block, reset per trajectory)."""

    def __init__(self, config: BlockCacheConfig | None = None, **kw: Any) -> None:
        self.config = config if config is not None else BlockCacheConfig(**kw)
        self.reset()

    def reset(self) -> None:
        self.residual: list[torch.Tensor | None] = []
        self.ref_input: list[torch.Tensor | None] = []

    def is_noop(self) -> bool:
        """True when the policy would run every block at every step (interval 1, threshold 0, an
        all-True router): the denoiser then calls the plain model, so the cache costs nothing."""
        c = self.config
        return ((c.policy == "static" and c.interval == 1) or (c.policy == "threshold" and c.threshold == 0.0)
                or (c.policy == "router" and bool(torch.as_tensor(c.router).all())))

    def _run(self, i: int, h: torch.Tensor, step: int) -> bool:
        c = self.config
        if step < c.warmup or self.residual[i] is None or self.residual[i].shape != h.shape:
            return True
        if c.policy == "static":
            return step % c.interval == 0
        if c.policy == "router":
            r = c.router
            return bool(r[step, i]) if step < r.shape[0] else True
        ref = self.ref_input[i]
        # one host sync per block: the decision needs the number
        return float((h - ref).abs().mean() / ref.abs().mean().clamp_min(1e-12)) >= c.threshold

    def forward(self, model: Any, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, step: int,
                counts: Counts) -> torch.Tensor:
        blocks = model.transformer_blocks
        if len(self.residual) != len(blocks):
            self.residual, self.ref_input = [None] * len(blocks), [None] * len(blocks)
        h = embed(model, x)
        ran = 0
        for i, blk in enumerate(blocks):
            if self._run(i, h, step):
                out = block_forward(blk, h, t, y)
                self.residual[i], self.ref_input[i] = out - h, h
                h, ran = out, ran + 1
            else:
                h = h + self.residual[i]
        counts.add(blocks=ran, tokens=h.shape[1], model=model, batch=x.shape[0])
        return unpatchify(model, final_layer(model, h, t, y))
