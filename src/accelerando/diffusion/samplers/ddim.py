"""DDIM (Song, Meng, Ermon 2021, eq. 12): eta = 0 is the first-order probability-flow ODE solver."""

from __future__ import annotations

import math

import torch

from ._common import Grid, Sampler, randn_like, transfer, x0_hat


def ddim(x: torch.Tensor, grid: Grid, *, eta: float = 0.0,
         generator: torch.Generator | None = None) -> Sampler:
    """One model call per step; eta > 0 adds fresh noise (eta = 1 is DDPM's posterior variance)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    for i in range(grid.steps):
        a, a_next = grid.ab[i], grid.ab[i + 1]
        e = yield x, grid.t[i]
        if eta == 0:
            x = transfer(x, e, a, a_next)
            continue
        sigma = eta * math.sqrt((1 - a_next) / (1 - a)) * math.sqrt(1 - a / a_next)
        x = (math.sqrt(a_next) * x0_hat(x, e, a) + math.sqrt(max(1 - a_next - sigma ** 2, 0.0)) * e
             + sigma * randn_like(x, generator))
    return x
