"""Pseudo numerical methods (Liu, Ren, Lin, Zhao 2022, "PNDM"): PRK, PLMS, S-PNDM, F-PNDM, FON.

Notation: the transfer ``phi`` (``transfer``) replaces the Euler step; in DDIM coordinates
``xbar' = xbar + (s' - s) e``, so a pseudo method is the classical one applied in ``s``.
Differences to diffusers' ``PNDMScheduler`` (reproduced by ``pndm_diffusers``): PLMS weights are
variable-step Adams weights -- eps interpolated in t (default; the spacings are uniform in t) or in s
(``interp="s"``), integrated over s -- where diffusers' fixed weights assume a grid uniform in s,
which no spacing gives; PRK midpoints are exact s-midpoints when the model accepts float times.

Interpolated in t, eps is not smooth at the end point (s ~ sqrt(t + 1) near alpha_bar = 1) and, on a
discrete schedule, has a kink at every integer of the float-time extension, so on the exact-score
oracle F-PNDM's error stalls at ~2-5e-4 from 50 steps on; ``interp="s"`` keeps order ~3.7 from 20 to
200 steps (tests/test_diffusion_orders.py). t is more accurate on the oracle at 20-50 steps and is the
default the benchmarks were measured with; on the zoo UNet s was as accurate or better at 6-41 steps.
(eps interpolated in theta = arctan(s), smooth at both ends on the oracle, was tried and dropped: a
trained network's eps is not smooth in theta near pure noise, where theta hardly moves -- zoo UNet
RMSE 1.5 at 11 steps, t 0.08.)
"""

from __future__ import annotations

import torch

from ._common import (AB_FIXED, Grid, Sampler, adams_weights, adams_weights_in_t_steps, ask, interp_weights_in_alpha,
                      interp_weights_in_t, s_of, transfer, transfer_combined)


def _end_has_no_model_time(grid: Grid, i: int) -> bool:
    """Step i ends at t = -1 with alpha_bar above alpha_bar(0): a discrete-time model cannot be asked there."""
    sched = grid.schedule
    return (grid.t[i + 1] < 0 and not getattr(sched, "continuous", False)
            and grid.ab[i + 1] > sched.alpha_bar(0))


def _rk3_end_step(x: torch.Tensor, grid: Grid, i: int, e1: torch.Tensor | None = None):
    """Pseudo 3-stage, 3rd-order RK step whose stages avoid the step's end: used for a last step into
    alpha_bar = 1, where a discrete model has no timestep. Three calls.

    Nodes (fractions of the step in s) are Ralston's 1/2 and 3/4, moved inside [t_i, 0] when the model
    has no time there, and taken at rounded times unless float_t; the weights are the order-3 weights
    for the nodes actually used. If no two distinct valid times exist (t_i <= 1), the step is a
    2nd-order one with both extra calls at t = 0 (a tiny step; the calls keep the NFE formula).
    """
    a, a_next = grid.ab[i], grid.ab[i + 1]
    s0, s1 = grid.s(i), grid.s(i + 1)
    sched = grid.schedule

    def frac(a_c: float) -> float:
        return (s_of(a_c) - s0) / (s1 - s0)

    c_max = frac(sched.alpha_bar(0)) if grid.t[i] > 0 else 0.0
    nodes: list[tuple[float, float, float]] = []
    if grid.float_t and c_max > 0:
        c3 = min(0.75, c_max)
        for c in (c3 * 2 / 3, c3):
            s_c = s0 + c * (s1 - s0)
            a_c = 1.0 / (1.0 + s_c * s_c)
            nodes.append((max(sched.time_of(a_c), 0.0), a_c, c))
    elif not grid.float_t:
        t3 = max(round(grid.t[i] + 0.75 * (grid.t[i + 1] - grid.t[i])), 0)
        t2 = max(round(grid.t[i] + 0.5 * (grid.t[i + 1] - grid.t[i])), t3 + 1)
        if t2 < grid.t[i]:
            nodes = [(float(t), sched.alpha_bar(t), frac(sched.alpha_bar(t))) for t in (t2, t3)]
    if e1 is None:
        x, e1 = yield from ask(x, grid.t[i], a, i)
    if not nodes:   # degenerate: t_i <= 1
        c0 = c_max
        a0 = sched.alpha_bar(0)
        _, e2 = yield from ask(transfer(x, e1, a, a0), 0.0, a0)
        _, e3 = yield from ask(transfer(x, e2, a, a0), 0.0, a0)
        e = e1 if c0 <= 0 else (1 - 1 / (2 * c0)) * e1 + (e2 + e3) / (4 * c0)
        return transfer(x, e, a, a_next), e1
    (t2, a2, c2), (t3, a3, c3) = nodes
    # order conditions: b2 c2 + b3 c3 = 1/2, b2 c2^2 + b3 c3^2 = 1/3, b3 a32 c2 = 1/6
    b3 = (1 / 3 - c2 / 2) / (c3 * (c3 - c2))
    b2 = (0.5 - b3 * c3) / c2
    a32 = 1 / (6 * b3 * c2)
    a31 = c3 - a32
    _, e2 = yield from ask(transfer(x, e1, a, a2), t2, a2)
    _, e3 = yield from ask(transfer(x, (a31 * e1 + a32 * e2) / c3, a, a3), t3, a3)
    return transfer_combined(x, [1 - b2 - b3, b2, b3], [e1, e2, e3], a, a_next), e1


def _prk_step(x: torch.Tensor, grid: Grid, i: int, e1: torch.Tensor | None = None, stages: str = "s"):
    """Pseudo RK4 step i (PNDM eq. 13): four calls; returns (x_next, eps at the step's start).

    ``stages="alpha"``: same four calls, but each stage's eps is the interpolant through the calls so far
    (start and midpoint; then start, midpoint, end for the update) as a polynomial in alpha = sqrt(alpha_bar),
    integrated over s (``interp_weights_in_alpha``): the 3rd stage is a pseudo trapezoid to the midpoint,
    the 4th a linear extrapolation to the end. Stable where s spans orders of magnitude in one step
    (squaredcos_cap_v2 from t = 999); 3rd order per step instead of 4 (tested), which keeps F-PNDM at
    4th order since it takes only three such steps.
    """
    if _end_has_no_model_time(grid, i):
        return (yield from _rk3_end_step(x, grid, i, e1))
    a, a_next = grid.ab[i], grid.ab[i + 1]
    t_mid, a_mid = grid.midpoint(i)
    if e1 is None:
        x, e1 = yield from ask(x, grid.t[i], a, i)
    if stages == "alpha" and not grid.float_t:
        # the integer time nearest the s-midpoint, strictly inside the step (diffusers' t - d // 2 is the
        # t-midpoint: on squaredcos_cap_v2 from t = 999 its stage lies at s ~ 10 of a span 2e4 -> 6)
        s_m = 0.5 * (grid.s(i) + grid.s(i + 1))
        t0, t1 = int(round(grid.t[i])), int(round(grid.t[i + 1]))
        tm = min(max(round(grid.schedule.time_of(1.0 / (1.0 + s_m * s_m))), t1 + 1), t0 - 1)
        if t1 < tm < t0:
            t_mid, a_mid = float(tm), grid.schedule.alpha_bar(tm)
    if stages == "alpha" and a < a_mid < a_next:
        _, e2 = yield from ask(transfer(x, e1, a, a_mid), t_mid, a_mid)
        w = interp_weights_in_alpha([a, a_mid], a, a_mid)
        _, e3 = yield from ask(transfer_combined(x, w, [e1, e2], a, a_mid), t_mid, a_mid)
        w = interp_weights_in_alpha([a, a_mid], a, a_next)
        _, e4 = yield from ask(transfer_combined(x, w, [e1, e3], a, a_next), grid.t[i + 1], a_next)
        w = interp_weights_in_alpha([a, a_mid, a_next], a, a_next)
        return transfer_combined(x, w, [e1, e3, e4], a, a_next), e1
    _, e2 = yield from ask(transfer(x, e1, a, a_mid), t_mid, a_mid)
    _, e3 = yield from ask(transfer(x, e2, a, a_mid), t_mid, a_mid)
    _, e4 = yield from ask(transfer(x, e3, a, a_next), grid.t[i + 1], a_next)
    return transfer_combined(x, [1 / 6, 1 / 3, 1 / 3, 1 / 6], [e1, e2, e3, e4], a, a_next), e1


def _improved_euler_step(x: torch.Tensor, grid: Grid, i: int, interp: str = "s"):
    """Pseudo improved Euler (S-PNDM's warm-up): two calls; returns (x_next, eps at the start).

    ``interp="s"``: the trapezoid in s, (e1 + e2) / 2 (PNDM, diffusers). ``"t"``: eps linear in t between
    the two calls, integrated over s (same order). The first step from t = 999 spans s from ~160 to a
    few units, nearly all of it near t = 999, where the trapezoid's weight 1/2 on e2 multiplies the
    model's error by ~80 (S-PNDM RMSE 92 at 3 calls on the zoo UNet, DDIM 0.33).
    """
    a, a_next = grid.ab[i], grid.ab[i + 1]
    x, e1 = yield from ask(x, grid.t[i], a, i)
    _, e2 = yield from ask(transfer(x, e1, a, a_next), grid.t[i + 1], a_next)
    t_next = max(grid.t[i + 1], 0.0)      # where the model was asked
    w = [0.5, 0.5] if interp == "s" or t_next >= grid.t[i] else interp_weights_in_t(grid, i, [grid.t[i], t_next])
    return transfer_combined(x, w, [e1, e2], a, a_next), e1


def plms(x: torch.Tensor, grid: Grid, *, order: int = 4, fixed_coefficients: bool = False,
         start: int = 0, history: list[torch.Tensor] | None = None, interp: str = "t") -> Sampler:
    """Pseudo linear multistep: the transfer with an Adams-Bashforth eps, order ramping 1 -> order.

    ``history``: eps at the grid points before ``start`` (most recent first), from a warm-up.
    ``interp``: the variable eps is interpolated in for the variable-step weights, ``"t"`` (default:
    spacings are uniform in t) or ``"s"`` (the transfer's variable; AB exactly on s-uniform grids; keeps
    the order down to alpha_bar = 1, see the module docstring).
    """
    if order not in AB_FIXED:
        raise ValueError(f"PLMS order must be 1-4, got {order}")
    if interp not in ("t", "s"):
        raise ValueError(f"interp must be 't' or 's', got {interp!r}")
    es = list(history or [])[:order]
    steps = range(start, grid.steps)
    ks = [min(len(es) + 1 + n, order) for n in range(len(steps))]      # history length at each step
    # the weights of every step, before the first model call (they depend on the grid only)
    if fixed_coefficients:
        ws = [AB_FIXED[k] for k in ks]
    elif interp == "t":
        ws = adams_weights_in_t_steps(grid, steps, ks)
    else:
        ws = [adams_weights([grid.s(i - j) for j in range(k)], grid.s(i), grid.s(i + 1)) for i, k in zip(steps, ks)]
    for i, w in zip(steps, ws):
        x, e = yield from ask(x, grid.t[i], grid.ab[i], i)
        es = [e] + es[: order - 1]
        x = transfer_combined(x, w, es, grid.ab[i], grid.ab[i + 1])
    return x


def prk(x: torch.Tensor, grid: Grid, *, stages: str = "s", start: int = 0) -> Sampler:
    """Pseudo Runge-Kutta on every step: 4 calls per step. ``stages``: "s" (PNDM's RK4 in s) or "alpha"
    (see ``_prk_step``: stable on squaredcos_cap_v2, 3rd order)."""
    if stages not in ("s", "alpha"):
        raise ValueError(f"stages must be 's' or 'alpha', got {stages!r}")
    for i in range(start, grid.steps):
        x, _ = yield from _prk_step(x, grid, i, stages=stages)
    return x


def s_pndm(x: torch.Tensor, grid: Grid, *, interp: str = "t", start: int = 0) -> Sampler:
    """S-PNDM: one pseudo improved-Euler step, then 2nd-order PLMS. N + 1 calls (from ``start`` > 0:
    PLMS ramping 1 -> 2, one call per step)."""
    return (yield from _improved_euler_then_plms(x, grid, 2, start, interp=interp))


def _improved_euler_then_plms(x: torch.Tensor, grid: Grid, order: int, start: int, **plms_knobs) -> Sampler:
    if start > 0:
        return (yield from plms(x, grid, order=order, start=start, **plms_knobs))
    interp = plms_knobs.get("interp", "s")
    x, e0 = yield from _improved_euler_step(x, grid, 0, "s" if plms_knobs.get("fixed_coefficients") else interp)
    return (yield from plms(x, grid, order=order, start=1, history=[e0], **plms_knobs))


def f_pndm(x: torch.Tensor, grid: Grid, *, fixed_coefficients: bool = False, interp: str = "t",
           warmup: str = "alpha", start: int = 0) -> Sampler:
    """F-PNDM: pseudo RK4 for the first three steps, then 4th-order PLMS. N + 9 calls (N >= 3).

    ``warmup``: the pseudo-RK stages, "alpha" (default: stage eps interpolated in sqrt(alpha_bar), see
    ``_prk_step``; three 3rd-order steps keep the method 4th order) or "s" (PNDM's RK4 in s, which
    diverges on squaredcos_cap_v2: RMSE ~1e6 on the oracle at 20 calls)."""
    if warmup not in ("s", "alpha"):
        raise ValueError(f"warmup must be 's' or 'alpha', got {warmup!r}")
    es: list[torch.Tensor] = []
    n_prk = min(3, grid.steps)
    for i in range(start, n_prk):
        x, e1 = yield from _prk_step(x, grid, i, stages=warmup)
        es.insert(0, e1)
    return (yield from plms(x, grid, order=4, start=max(start, n_prk), history=es, fixed_coefficients=fixed_coefficients,
                            interp=interp))


def s_pndm4(x: torch.Tensor, grid: Grid, *, interp: str = "t", start: int = 0) -> Sampler:
    """Pseudo improved-Euler warm-up, then PLMS ramping 2 -> 3 -> 4 with variable-step weights:
    diffusers' ``skip_prk_steps`` scheme made exact on non-uniform grids. N + 1 calls."""
    return (yield from _improved_euler_then_plms(x, grid, 4, start, interp=interp))


def pndm_diffusers(x: torch.Tensor, grid: Grid, *, skip_prk_steps: bool = True, start: int = 0) -> Sampler:
    """diffusers' PNDMScheduler, exactly: fixed AB weights; ``skip_prk_steps`` = improved-Euler warm-up
    then AB2 -> AB3 -> AB4 (N + 1 calls), else three PRK steps (integer midpoints) then AB4 (N + 9)."""
    if not skip_prk_steps:
        return (yield from f_pndm(x, grid, fixed_coefficients=True, warmup="s", start=start))
    return (yield from _improved_euler_then_plms(x, grid, 4, start, fixed_coefficients=True))


def fon(x: torch.Tensor, grid: Grid, *, start: int = 0) -> Sampler:
    """FON: classical RK4 in t on the x-space probability-flow ODE (PNDM eq. 5), 4 calls per step.

    The ODE is singular at alpha_bar = 1 (ds/dt ~ 1/sqrt(t + 1)), so a step ending there is taken as a
    pseudo Runge-Kutta step (exact transfer; 3 stages when the end has no model time) instead.
    """
    sched = grid.schedule

    def f(x: torch.Tensor, e: torch.Tensor, t: float, a: float) -> torch.Tensor:
        # dx/dt = a'(t) (x / (2a) - e / (2a sqrt(1-a))), with a' = a dlog(a)/dt
        g = sched.dlog_alpha_bar(t)
        return g * (x / 2 - e / (2 * (1 - a) ** 0.5))

    for i in range(start, grid.steps):
        if grid.ab[i + 1] >= 1.0:
            x, _ = yield from _prk_step(x, grid, i)
            continue
        t0, t1, a0, a1 = grid.t[i], grid.t[i + 1], grid.ab[i], grid.ab[i + 1]
        tm, am = grid.t_mid(i)
        h, hm = t1 - t0, tm - t0
        x, e = yield from ask(x, t0, a0, i)
        k1 = f(x, e, t0, a0)
        x2 = x + hm * k1
        x2, e = yield from ask(x2, tm, am)
        k2 = f(x2, e, tm, am)
        x3 = x + hm * k2
        x3, e = yield from ask(x3, tm, am)
        k3 = f(x3, e, tm, am)
        x4 = x + h * k3
        x4, e = yield from ask(x4, t1, a1)
        k4 = f(x4, e, t1, a1)
        x = x + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
    return x
