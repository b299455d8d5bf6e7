"""Momentum on multistep samplers (Wizadwongsa & Suwajanakorn 2023, "Diffusion sampling with momentum").

HB: ``v_n = (1 - beta) v_{n-1} + beta p_n`` with p_n the method's combined direction; step with v_n.
GHVB (order r): smooth the eps, ``v_n = (1 - beta) v_{n-1} + beta e_n``, then AB_r-like weights in
beta (they sum to beta, hence the division) -- fractional order r - 1 + beta. beta = 1 is exactly
PLMS-r (fixed weights) / the underlying method. v starts at the first direction (no zero bias).
"""

from __future__ import annotations

import torch

from ._common import AB_FIXED, Grid, Sampler, adams_weights, ask, combine, transfer, x0_hat
from .dpm_solver import _coeffs, dpmpp_direction
from ..schedules import log_snr_lambda


def _check_beta(beta: float) -> None:
    if not 0 < beta <= 1:
        raise ValueError(f"momentum beta must be in (0, 1], got {beta}")


def ghvb_weights(order: int, beta: float) -> list[float]:
    """GHVB weights on v_n, v_{n-1}, ... (most recent first), already divided by beta."""
    b = beta
    w = {1: [b],
         2: [(2 + b) / 2, -(2 - b) / 2],
         3: [(18 + 5 * b) / 12, -(24 - 8 * b) / 12, (6 - b) / 12],
         4: [(46 + 9 * b) / 24, -(78 - 19 * b) / 24, (42 - 5 * b) / 24, -(10 - b) / 24]}[order]
    return [c / b for c in w]


def hb_plms(x: torch.Tensor, grid: Grid, *, order: int = 4, beta: float = 0.8, start: int = 0) -> Sampler:
    """PLMS-order with heavy-ball momentum on its combined eps (variable-step weights)."""
    _check_beta(beta)
    es: list[torch.Tensor] = []
    v = None
    for i in range(start, grid.steps):
        x, e = yield from ask(x, grid.t[i], grid.ab[i], i)
        es = [e] + es[: order - 1]
        w = adams_weights([grid.s(i - j) for j in range(len(es))], grid.s(i), grid.s(i + 1))
        p = combine(w, es)
        v = p if v is None else (1 - beta) * v + beta * p
        x = transfer(x, v, grid.ab[i], grid.ab[i + 1])
    return x


def hb_dpmpp_2m(x: torch.Tensor, grid: Grid, *, beta: float = 0.8, start: int = 0) -> Sampler:
    """DPM-Solver++(2M) with heavy-ball momentum on its data-prediction direction D0 + D1/2."""
    _check_beta(beta)
    D: list[torch.Tensor] = []
    lams: list[float] = []
    v = None
    for i in range(start, grid.steps):
        a, a_next = grid.ab[i], grid.ab[i + 1]
        x, e = yield from ask(x, grid.t[i], grid.ab[i], i)
        D, lams = [x0_hat(x, e, a)] + D[:1], [log_snr_lambda(a)] + lams[:1]
        p = dpmpp_direction(D, lams, log_snr_lambda(a_next), len(D))
        v = p if v is None else (1 - beta) * v + beta * p
        ratio, alpha_t, _, em = _coeffs(a, a_next)
        x = ratio * x - alpha_t * em * v
    return x


def ghvb(x: torch.Tensor, grid: Grid, *, order: int = 2, beta: float = 0.8, start: int = 0) -> Sampler:
    """Generalised heavy ball of order ``order`` (1-4); uniform-step weights, as in the paper."""
    _check_beta(beta)
    if order not in AB_FIXED:
        raise ValueError(f"GHVB order must be 1-4, got {order}")
    vs: list[torch.Tensor] = []
    for i in range(start, grid.steps):
        x, e = yield from ask(x, grid.t[i], grid.ab[i], i)
        v = e if not vs else (1 - beta) * vs[0] + beta * e
        vs = [v] + vs[: order - 1]
        k = len(vs)
        w = ghvb_weights(k, beta) if k > 1 else [1.0]
        x = transfer(x, combine(w, vs), grid.ab[i], grid.ab[i + 1])
    return x
