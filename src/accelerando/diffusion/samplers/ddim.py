"""DDIM (Song, Meng, Ermon 2021, eq. 12): eta = 0 is the first-order probability-flow ODE solver."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._common import Grid, Sampler, ask, randn_like, transfer, x0_hat


def ddim(x: torch.Tensor, grid: Grid, *, eta: float = 0.0, generator: torch.Generator | None = None,
         start: int = 0, correct_x0: Callable[[torch.Tensor], torch.Tensor] | None = None,
         noise: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Sampler:
    """One model call per step; eta > 0 adds fresh noise (eta = 1 is DDPM's posterior variance).

    ``correct_x0``: clipping / thresholding of the data prediction the DDIM way (diffusers' ``clip_sample``,
    ``thresholding``): x0 is replaced, the direction term keeps the model's eps. ``noise(x)`` draws the
    eta noise (default: standard normal from ``generator``).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    for i in range(start, grid.steps):
        a, a_next = grid.ab[i], grid.ab[i + 1]
        x, e = yield from ask(x, grid.t[i], a, i)
        if eta == 0 and correct_x0 is None:
            x = transfer(x, e, a, a_next)
            continue
        x0 = x0_hat(x, e, a)
        if correct_x0 is not None:
            x0 = correct_x0(x0)
        sigma = eta * math.sqrt((1 - a_next) / (1 - a)) * math.sqrt(1 - a / a_next)
        x = math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - sigma ** 2, 0.0)) * e
        if sigma > 0:
            x = x + sigma * (noise(x) if noise is not None else randn_like(x, generator))
    return x
