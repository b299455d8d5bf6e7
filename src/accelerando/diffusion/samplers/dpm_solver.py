"""DPM-Solver++ (Lu et al. 2022), multistep 2M and 3M in data prediction, in lambda = log(alpha/sigma).

Handles non-uniform grids natively (the ratios r = h_prev / h). A step that ends at alpha_bar = 1
(lambda = inf) is first order: it returns the data prediction, as diffusers' ``final_sigmas_type="zero"``.
"""

from __future__ import annotations

import math

import torch

from ._common import Grid, Sampler, ask, x0_hat
from ..schedules import log_snr_lambda


def _coeffs(a_s: float, a_t: float) -> tuple[float, float, float, float]:
    """(sigma_t / sigma_s, alpha_t, h, expm1(-h)) for a step from alpha_bar a_s to a_t."""
    lam_s, lam_t = log_snr_lambda(a_s), log_snr_lambda(a_t)
    h = lam_t - lam_s
    ratio = math.sqrt((1 - a_t) / (1 - a_s))
    return ratio, math.sqrt(a_t), h, (-1.0 if math.isinf(h) else math.expm1(-h))


def dpmpp_direction(D: list[torch.Tensor], lams: list[float], lam_t: float, order: int) -> torch.Tensor:
    """The combined data prediction of a 2M step (``D0 + D1 / 2``); D, lams most recent first."""
    if order == 1 or math.isinf(lam_t):
        return D[0]
    h, h0 = lam_t - lams[0], lams[0] - lams[1]
    return D[0] + 0.5 * (D[0] - D[1]) * (h / h0)


def _multistep(x: torch.Tensor, grid: Grid, keep: int, update, start: int = 0, lower_order_final: bool = False,
               euler_at_final: bool = False) -> Sampler:
    """The loop both solvers share: one call per grid point, the last ``keep`` data predictions D and
    their lambdas (most recent first), then ``update(x, D, lams, a, a_next)`` takes the step.

    ``lower_order_final`` (diffusers' DPMSolverMultistep): below 15 steps the last step is first order and
    the one before at most second; ``euler_at_final``: the last step is first order at any length."""
    D: list[torch.Tensor] = []
    lams: list[float] = []
    short = lower_order_final and grid.steps < 15
    for i in range(start, grid.steps):
        a, a_next = grid.ab[i], grid.ab[i + 1]
        x, e = yield from ask(x, grid.t[i], a, i)
        D, lams = [x0_hat(x, e, a)] + D[: keep - 1], [log_snr_lambda(a)] + lams[: keep - 1]
        k = len(D)
        if i == grid.steps - 1 and (euler_at_final or short):
            k = 1
        elif i == grid.steps - 2 and short:
            k = min(k, 2)
        x = update(x, D[:k], lams[:k], a, a_next)
    return x


def _step_2m(x: torch.Tensor, D: list[torch.Tensor], lams: list[float], a: float, a_next: float) -> torch.Tensor:
    ratio, alpha_t, _, em = _coeffs(a, a_next)
    return ratio * x - alpha_t * em * dpmpp_direction(D, lams, log_snr_lambda(a_next), len(D))


def _step_3m(x: torch.Tensor, D: list[torch.Tensor], lams: list[float], a: float, a_next: float) -> torch.Tensor:
    ratio, alpha_t, h, em = _coeffs(a, a_next)
    if len(D) < 3 or math.isinf(h):
        return _step_2m(x, D[:2], lams[:2], a, a_next)
    r0 = (lams[0] - lams[1]) / h
    r1 = (lams[1] - lams[2]) / h
    D1_0, D1_1 = (D[0] - D[1]) / r0, (D[1] - D[2]) / r1
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (D1_0 - D1_1) / (r0 + r1)
    return (ratio * x - alpha_t * em * D[0] + alpha_t * (em / h + 1.0) * D1
            - alpha_t * ((em + h) / h ** 2 - 0.5) * D2)


def dpmpp_2m(x: torch.Tensor, grid: Grid, *, start: int = 0, lower_order_final: bool = False,
             euler_at_final: bool = False) -> Sampler:
    """DPM-Solver++(2M): x_t = (sigma_t/sigma_s) x - alpha_t expm1(-h) (D0 + D1 / 2)."""
    return (yield from _multistep(x, grid, 2, _step_2m, start, lower_order_final, euler_at_final))


def dpmpp_3m(x: torch.Tensor, grid: Grid, *, start: int = 0, lower_order_final: bool = False,
             euler_at_final: bool = False) -> Sampler:
    """DPM-Solver++(3M): orders ramp 1 -> 2 -> 3; the step into alpha_bar = 1 is first order."""
    return (yield from _multistep(x, grid, 3, _step_3m, start, lower_order_final, euler_at_final))
