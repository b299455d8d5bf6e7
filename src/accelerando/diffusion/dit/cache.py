"""Block-level feature caching for DiTs: a block either runs or adds the residual it produced when it
last ran (FORA, Selvaraju et al. 2024, "Fast-Forward Caching in Diffusion Transformer Acceleration";
per-block skipping as in Delta-DiT, Chen et al. 2024). Which blocks run at a step is a *policy*:

- ``static``: every block runs at steps ``0, k, 2k, ...`` (FORA's interval ``k``), none in between;
- ``threshold``: a block runs when its input moved by at least ``threshold`` (relative L1) since it
  last ran; threshold 0 runs every block, exactly the full model;
- ``router``: a (steps, blocks) boolean table, e.g. HarmoniCa's learned router (``harmonica.py``).

A skipped block adds either its last residual (``order=0``, FORA) or a *forecast* (``order`` 1, 2):
its attention and MLP outputs before the adaLN-Zero gates, a and f, are each extrapolated to the
current timestep by the polynomial through their values at the block's last ``order + 1`` runs
(Newton's divided differences over the model's timestep t), and added with the current step's own
gates, ``h + gate_msa(t) a_hat + gate_mlp(t) f_hat`` (TaylorSeer, Liu et al. 2025, "From Reusing to
Forecasting: Accelerating Diffusion Models with TaylorSeers": a Taylor expansion whose derivatives
are finite differences, there per attention / MLP module; here per block, for unevenly spaced runs,
with the exact gates, which cost two small matrix products on (t, y) alone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .core import block_forward, block_forward_parts, embed, final_layer, gates, unpatchify
from .denoiser import Counts

POLICIES = ("static", "threshold", "router")


@dataclass(frozen=True)
class BlockCacheConfig:
    policy: str = "threshold"
    threshold: float = 0.1             # threshold policy: relative L1 change of a block's input, in [0, 1]
    interval: int = 2                  # static policy: all blocks run every `interval` steps (>= 1)
    warmup: int = 1                    # the first `warmup` steps run every block (>= 1: a cache must exist)
    router: Any = None                 # router policy: bool tensor (steps, blocks), True = run
    order: int = 0                     # skipped block: 0 reuses its residual; 1, 2 forecast its outputs (TaylorSeer)

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"cache threshold must be in [0, 1], got {self.threshold}")
        if self.interval < 1:
            raise ValueError(f"cache interval must be >= 1, got {self.interval}")
        if self.warmup < 1:
            raise ValueError(f"cache warmup must be >= 1 step, got {self.warmup}")
        if self.order not in (0, 1, 2):
            raise ValueError(f"cache forecast order must be 0, 1 or 2, got {self.order}")
        if self.policy == "router":
            r = torch.as_tensor(self.router) if self.router is not None else None
            if r is None or r.ndim != 2 or r.dtype != torch.bool:
                raise ValueError("router policy needs router= a bool tensor of shape (steps, blocks)")


def newton_forecast(ts: list[float], rs: list[torch.Tensor], t: float) -> torch.Tensor:
    """The polynomial through the points (ts[j], rs[j]) evaluated at t (Newton's divided differences;
    one point: rs[0], two: the line through them, ...)."""
    coef, n = list(rs), len(ts)
    for j in range(1, n):                   # coef[i] becomes f[ts[i-j], ..., ts[i]]
        for i in range(n - 1, j - 1, -1):
            coef[i] = (coef[i] - coef[i - 1]) / (ts[i] - ts[i - j])
    out = coef[-1]
    for i in range(n - 2, -1, -1):          # Horner on the Newton form
        out = coef[i] + (t - ts[i]) * out
    return out


class BlockCache:
    """Run each block or add its cached residual ``r_i = block_i(h) - h``, reused or forecast (state:
    per block the last residual, the (t, a, f) of its last ``order + 1`` runs and one reference input,
    reset per trajectory)."""

    def __init__(self, config: BlockCacheConfig | None = None, **kw: Any) -> None:
        self.config = config if config is not None else BlockCacheConfig(**kw)
        self.reset()

    def reset(self) -> None:
        self.residual: list[torch.Tensor | None] = []
        self.ref_input: list[torch.Tensor | None] = []
        self.history: list[list[tuple[float, torch.Tensor, torch.Tensor]]] = []   # per block: (t, a, f), oldest first

    def forecast(self, i: int, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Block i's ungated attention and MLP outputs (a, f) extrapolated to timestep t."""
        hist = self.history[i]
        ts = [p[0] for p in hist]
        return newton_forecast(ts, [p[1] for p in hist], t), newton_forecast(ts, [p[2] for p in hist], t)

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
            self.history = [[] for _ in blocks]
        h = embed(model, x)
        ran = 0
        t0 = float(t[0]) if self.config.order else 0.0     # one host sync per call (the forecast's time)
        for i, blk in enumerate(blocks):
            if self._run(i, h, step):
                if self.config.order:
                    out, a, f = block_forward_parts(blk, h, t, y)
                    hist = self.history[i]
                    if hist and hist[0][1].shape != out.shape:
                        hist.clear()
                    hist.append((t0, a, f))
                    del hist[:-(self.config.order + 1)]
                else:
                    out = block_forward(blk, h, t, y)
                self.residual[i], self.ref_input[i] = out - h, h
                h, ran = out, ran + 1
            elif self.config.order:
                a, f = self.forecast(i, t0)
                g_msa, g_mlp = gates(blk, t, y, h.dtype)
                h = g_mlp.unsqueeze(1) * f + (g_msa.unsqueeze(1) * a + h)
            else:
                h = h + self.residual[i]
        counts.add(blocks=ran, tokens=h.shape[1], model=model, batch=x.shape[0])
        return unpatchify(model, final_layer(model, h, t, y))
