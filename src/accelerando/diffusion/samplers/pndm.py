"""Pseudo numerical methods (Liu, Ren, Lin, Zhao 2022, "PNDM"): PRK, PLMS, S-PNDM, F-PNDM, FON.

Notation: the transfer ``phi`` (``transfer``) replaces the Euler step; in DDIM coordinates
``xbar' = xbar + (s' - s) e``, so a pseudo method is the classical one applied in ``s``.
Differences to diffusers' ``PNDMScheduler`` (reproduced by ``pndm_diffusers``): PLMS weights are
variable-step Adams weights in ``s`` (diffusers' fixed weights assume a uniform grid in ``s``, which
no spacing gives), and PRK midpoints are exact s-midpoints when the model accepts float times.
"""

from __future__ import annotations

import torch

from ._common import AB_FIXED, Grid, Sampler, adams_weights, combine, transfer


def _prk_step(x: torch.Tensor, grid: Grid, i: int, e1: torch.Tensor | None = None):
    """Pseudo RK4 step i (PNDM eq. 13): four calls; returns (x_next, eps at the step's start)."""
    a, a_next = grid.ab[i], grid.ab[i + 1]
    t_mid, a_mid = grid.midpoint(i)
    if e1 is None:
        e1 = yield x, grid.t[i]
    e2 = yield transfer(x, e1, a, a_mid), t_mid
    e3 = yield transfer(x, e2, a, a_mid), t_mid
    e4 = yield transfer(x, e3, a, a_next), grid.t[i + 1]
    return transfer(x, (e1 + 2 * e2 + 2 * e3 + e4) / 6, a, a_next), e1


def _improved_euler_step(x: torch.Tensor, grid: Grid, i: int):
    """Pseudo improved Euler (S-PNDM's warm-up): two calls; returns (x_next, eps at the start)."""
    a, a_next = grid.ab[i], grid.ab[i + 1]
    e1 = yield x, grid.t[i]
    e2 = yield transfer(x, e1, a, a_next), grid.t[i + 1]
    return transfer(x, (e1 + e2) / 2, a, a_next), e1


def plms(x: torch.Tensor, grid: Grid, *, order: int = 4, fixed_coefficients: bool = False,
         start: int = 0, history: list[torch.Tensor] | None = None) -> Sampler:
    """Pseudo linear multistep: the transfer with an Adams-Bashforth eps, order ramping 1 -> order.

    ``history``: eps at the grid points before ``start`` (most recent first), from a warm-up.
    """
    if order not in AB_FIXED:
        raise ValueError(f"PLMS order must be 1-4, got {order}")
    es = list(history or [])[:order]
    for i in range(start, grid.steps):
        e = yield x, grid.t[i]
        es = [e] + es[: order - 1]
        k = len(es)
        w = AB_FIXED[k] if fixed_coefficients else adams_weights([grid.s(i - j) for j in range(k)], grid.s(i), grid.s(i + 1))
        x = transfer(x, combine(w, es), grid.ab[i], grid.ab[i + 1])
    return x


def prk(x: torch.Tensor, grid: Grid) -> Sampler:
    """Pseudo Runge-Kutta on every step: 4 calls per step."""
    for i in range(grid.steps):
        x, _ = yield from _prk_step(x, grid, i)
    return x


def s_pndm(x: torch.Tensor, grid: Grid) -> Sampler:
    """S-PNDM: one pseudo improved-Euler step, then 2nd-order PLMS. N + 1 calls."""
    x, e0 = yield from _improved_euler_step(x, grid, 0)
    return (yield from plms(x, grid, order=2, start=1, history=[e0]))


def f_pndm(x: torch.Tensor, grid: Grid, *, fixed_coefficients: bool = False) -> Sampler:
    """F-PNDM: pseudo RK4 for the first three steps, then 4th-order PLMS. N + 9 calls (N >= 3)."""
    es: list[torch.Tensor] = []
    n_prk = min(3, grid.steps)
    for i in range(n_prk):
        x, e1 = yield from _prk_step(x, grid, i)
        es.insert(0, e1)
    return (yield from plms(x, grid, order=4, start=n_prk, history=es, fixed_coefficients=fixed_coefficients))


def pndm_diffusers(x: torch.Tensor, grid: Grid, *, skip_prk_steps: bool = True) -> Sampler:
    """diffusers' PNDMScheduler, exactly: fixed AB weights; ``skip_prk_steps`` = improved-Euler warm-up
    then AB2 -> AB3 -> AB4 (N + 1 calls), else three PRK steps (integer midpoints) then AB4 (N + 9)."""
    if not skip_prk_steps:
        return (yield from f_pndm(x, grid, fixed_coefficients=True))
    x, e0 = yield from _improved_euler_step(x, grid, 0)
    return (yield from plms(x, grid, order=4, start=1, history=[e0], fixed_coefficients=True))


def fon(x: torch.Tensor, grid: Grid) -> Sampler:
    """FON: classical RK4 in t on the x-space probability-flow ODE (PNDM eq. 5), 4 calls per step.

    The ODE is singular at alpha_bar = 1 (ds/dt ~ 1/sqrt(t + 1)), so a step ending there is taken as a
    pseudo RK4 step (exact transfer) instead; interior steps are classical RK4.
    """
    sched = grid.schedule

    def f(x: torch.Tensor, e: torch.Tensor, t: float, a: float) -> torch.Tensor:
        # dx/dt = a'(t) (x / (2a) - e / (2a sqrt(1-a))), with a' = a dlog(a)/dt
        g = sched.dlog_alpha_bar(t)
        return g * (x / 2 - e / (2 * (1 - a) ** 0.5))

    for i in range(grid.steps):
        if grid.ab[i + 1] >= 1.0:
            x, _ = yield from _prk_step(x, grid, i)
            continue
        t0, t1, a0, a1 = grid.t[i], grid.t[i + 1], grid.ab[i], grid.ab[i + 1]
        tm, am = grid.t_mid(i)
        h, hm = t1 - t0, tm - t0
        k1 = f(x, (yield x, t0), t0, a0)
        x2 = x + hm * k1
        k2 = f(x2, (yield x2, tm), tm, am)
        x3 = x + hm * k2
        k3 = f(x3, (yield x3, tm), tm, am)
        x4 = x + h * k3
        k4 = f(x4, (yield x4, t1), t1, a1)
        x = x + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
    return x
