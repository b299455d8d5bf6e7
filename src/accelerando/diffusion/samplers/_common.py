"""Shared pieces of every sampler: the time grid, the DDIM transfer (PNDM's phi), Adams weights.

A sampler is a generator ``sampler(x, grid, *, start=0, **options)``: it yields ``Request(x, t, ab,
point)`` model requests (``x, t = request[:2]``; a plain ``(x, t)`` is accepted too), is sent ``eps(x, t)`` back, and
returns the final sample. ``start=j`` begins at grid point j with no history (multistep orders ramp up
again, warm-ups of points before j are skipped), so its requests are the tail of the full run's.
``accelerando.diffusion.api.sample`` drives it with an ``eps_fn``; the diffusers adapter drives the
same generator from ``step()``, answering ``(x', eps)`` when the pipeline changed the latents (``ask``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Generator, NamedTuple

import numpy as np
import torch

class Request(NamedTuple):
    """One model call a sampler asks for: eps at state ``x``, model time ``t``; ``ab`` is the alpha_bar the
    sampler holds ``x`` at (it can differ from the schedule's alpha_bar(t) on sigma grids), ``point`` the
    grid index when this is the first call of step ``point`` (the state there), None for a stage."""

    x: torch.Tensor
    t: float
    ab: float | None = None
    point: int | None = None


Sampler = Generator[Request, Any, torch.Tensor]


def ask(x: torch.Tensor, t: float, ab: float | None = None, point: int | None = None):
    """``x, e = yield from ask(x, t, ab, i)``: request eps at (x, t).

    A driver answers ``eps``, or ``(x', eps)`` when the caller replaced the state by x' before the call
    (a diffusers pipeline editing latents between steps: inpainting's mask blend, callbacks); the
    sampler then continues from x'. At a stage (``point`` None) x' only moves where eps was taken.
    """
    answer = yield Request(x, t, ab, point)
    if isinstance(answer, tuple):
        return answer
    return x, answer


def s_of(a: float) -> float:
    """DDIM's noise level s = sqrt((1 - a) / a); the ODE is d xbar / d s = eps."""
    return math.sqrt(max(1.0 - a, 0.0) / a)


@dataclass(frozen=True)
class Grid:
    """N + 1 points from noise to data: model times ``t`` (decreasing) and their alpha_bar ``ab``.

    The sampler steps from point i to point i + 1; the last point is the end of the interval and is
    reached by every method (it is evaluated only by methods whose last stage needs it).
    ``float_t``: the model accepts non-integer times, so Runge-Kutta midpoints are placed exactly;
    otherwise they are rounded to integers (diffusers' ``t - d // 2``).
    """

    t: tuple[float, ...]
    ab: tuple[float, ...]
    schedule: Any
    float_t: bool = False

    def __post_init__(self) -> None:
        if len(self.t) != len(self.ab) or len(self.t) < 2:
            raise ValueError("a grid needs matching t and ab of at least 2 points")
        if any(b <= a for a, b in zip(self.ab, self.ab[1:])):
            raise ValueError("alpha_bar must increase strictly along the grid (noise -> data)")

    @property
    def steps(self) -> int:
        return len(self.t) - 1

    def s(self, i: int) -> float:
        return s_of(self.ab[i])

    def midpoint(self, i: int) -> tuple[float, float]:
        """(t, alpha_bar) half-way through step i: exact in s when float_t, else an integer time."""
        if self.float_t:
            s_mid = 0.5 * (self.s(i) + self.s(i + 1))
            a_mid = 1.0 / (1.0 + s_mid * s_mid)
            return self.schedule.time_of(a_mid), a_mid
        t0, t1 = int(round(self.t[i])), int(round(self.t[i + 1]))
        tm = t0 - (t0 - t1) // 2
        return float(tm), self.schedule.alpha_bar(tm)

    def t_mid(self, i: int) -> tuple[float, float]:
        """(t, alpha_bar) half-way in *t* (classical RK in t); rounded unless float_t."""
        tm = 0.5 * (self.t[i] + self.t[i + 1])
        if not self.float_t:
            t0, t1 = int(round(self.t[i])), int(round(self.t[i + 1]))
            tm = t0 - (t0 - t1) // 2
        return float(tm), self.schedule.alpha_bar(tm)


def make_grid(schedule: Any, steps: int, spacing: str = "trailing", *, float_t: bool = False,
              steps_offset: int = 0, drop_zero: bool = False) -> Grid:
    """The spacing's N timesteps followed by the end point t = -1 (alpha_bar = final_alpha_bar).

    ``drop_zero``: with ``linspace`` / ``leading`` (whose last timestep is the first training step),
    use the first N of the spacing's N + 1 timesteps, as diffusers' DPMSolverMultistep and UniPC
    schedulers do: otherwise the N-th call is spent at t = 0 on a step to the end of length
    s(0) ~ 0.01, which at 5 calls wastes a fifth of the budget. ``trailing`` is unchanged.
    """
    n = steps + 1 if drop_zero and spacing != "trailing" and steps < schedule.num_train_timesteps else steps
    ts = [float(v) for v in schedule.timesteps(n, spacing, steps_offset=steps_offset)][:steps]
    if schedule.alpha_bar(ts[-1]) < schedule.final_alpha_bar:
        ts.append(-1.0)
    # else: the last timestep already is the end (linspace ends at t = 0 = final_alpha_bar when
    # set_alpha_to_one=False), so the grid has N - 1 steps
    return Grid(tuple(ts), tuple(schedule.alpha_bar(t) for t in ts), schedule, float_t)


def grid_between(schedule: Any, ab_start: float, ab_end: float, steps: int, *,
                 uniform_in: str = "t", float_t: bool = True) -> Grid:
    """A float-time grid from alpha_bar ``ab_start`` to ``ab_end``, uniform in t, s or lambda."""
    if not 0 < ab_start < ab_end <= 1:
        raise ValueError("need 0 < ab_start < ab_end <= 1")
    if uniform_in == "t":
        ts = np.linspace(schedule.time_of(ab_start), schedule.time_of(ab_end), steps + 1)
        abs_ = [schedule.alpha_bar(float(t)) for t in ts]
    elif uniform_in == "s":
        ss = np.linspace(s_of(ab_start), s_of(ab_end), steps + 1)
        abs_ = [1.0 / (1.0 + s * s) for s in ss]
    elif uniform_in == "lambda":
        if ab_end >= 1:
            raise ValueError("a lambda-uniform grid cannot reach alpha_bar = 1")
        lam = np.linspace(0.5 * math.log(ab_start / (1 - ab_start)), 0.5 * math.log(ab_end / (1 - ab_end)), steps + 1)
        abs_ = [1.0 / (1.0 + math.exp(-2 * v)) for v in lam]
    else:
        raise ValueError(f"uniform_in must be t, s or lambda, got {uniform_in!r}")
    abs_[0], abs_[-1] = ab_start, ab_end
    ts = [schedule.time_of(a) for a in abs_]
    return Grid(tuple(float(t) for t in ts), tuple(float(a) for a in abs_), schedule, float_t)


def x0_hat(x: torch.Tensor, e: torch.Tensor, a: float) -> torch.Tensor:
    """Data prediction from a noise prediction at alpha_bar a."""
    return (x - math.sqrt(1.0 - a) * e) / math.sqrt(a)


def _transfer_coefficients(a: float, a_next: float) -> tuple[float, float]:
    """(c_x, c_e) with transfer(x, e) = c_x x + c_e e: sqrt(a' / a) and sqrt(1 - a') - sqrt(a') sqrt(1 - a) / sqrt(a)."""
    r = math.sqrt(a_next) / math.sqrt(a)
    return r, math.sqrt(1.0 - a_next) - r * math.sqrt(1.0 - a)


def transfer(x: torch.Tensor, e: torch.Tensor, a: float, a_next: float) -> torch.Tensor:
    """DDIM step (eta = 0), PNDM's phi: exact for a constant eps, xbar' = xbar + (s' - s) eps."""
    # sqrt(a') x0_hat + sqrt(1 - a') e, expanded to two kernels (was six); equal up to rounding
    c_x, c_e = _transfer_coefficients(a, a_next)
    return torch.add(x * c_x, e, alpha=c_e)


def transfer_combined(x: torch.Tensor, weights: list[float], es: list[torch.Tensor], a: float,
                      a_next: float) -> torch.Tensor:
    """``transfer(x, combine(weights, es), a, a_next)`` in 1 + k kernels and one new tensor (was 6 + 2k - 1)."""
    c_x, c_e = _transfer_coefficients(a, a_next)
    out = x * c_x
    for w, e in zip(weights, es):
        out.add_(e, alpha=c_e * w)    # in place on the fresh tensor ``out``: no intermediate per term
    return out


def combine(weights: list[float], es: list[torch.Tensor]) -> torch.Tensor:
    out = weights[0] * es[0]
    for w, e in zip(weights[1:], es[1:]):
        out.add_(e, alpha=w)          # in place on the fresh tensor ``out``
    return out


# Adams-Bashforth weights on a uniform grid, most recent value first (PNDM's PLMS).
AB_FIXED = {
    1: [1.0],
    2: [3 / 2, -1 / 2],
    3: [23 / 12, -16 / 12, 5 / 12],
    4: [55 / 24, -59 / 24, 37 / 24, -9 / 24],
}


def adams_weights(nodes: list[float], s0: float, s1: float) -> list[float]:
    """Variable-step Adams-Bashforth: weights w with sum_j w_j e_j = mean of the interpolant of e
    (through ``nodes``, most recent first, nodes[0] == s0) over [s0, s1].  Uniform nodes give AB_FIXED."""
    h = s1 - s0
    u = np.array([(n - s0) / h for n in nodes], dtype=np.float64)      # 0, -1, -2, ... when uniform
    k = len(nodes)
    V = np.vander(u, k, increasing=True).T                              # V[p, j] = u_j ** p
    m = 1.0 / np.arange(1, k + 1, dtype=np.float64)                     # int_0^1 u^p du
    return [float(w) for w in np.linalg.solve(V, m)]


_GL_X, _GL_W = np.polynomial.legendre.leggauss(8)


def adams_weights_in_t(grid: "Grid", i: int, k: int) -> list[float]:
    """Variable-step Adams weights for step i with k history values, interpolating eps as a
    polynomial in the model time t (through t_i, t_{i-1}, ...) and integrating it over s:
    w_j = mean over s in [s_i, s_{i+1}] of L_j(t(s)). Spacings are uniform in t, so the
    interpolation is well conditioned even where s-steps vary by orders of magnitude."""
    if k == 1:
        return [1.0]
    return interp_weights_in_t(grid, i, [grid.t[i - j] for j in range(k)])


def adams_weights_in_t_steps(grid: "Grid", steps: range, ks: list[int]) -> list[list[float]]:
    """``adams_weights_in_t(grid, i, k)`` for every step i in ``steps`` with its k in ``ks``, computed for
    the whole grid at once (one vectorised pass instead of 8 schedule look-ups and k Lagrange bases per step)."""
    out: list[list[float]] = [[1.0] if k == 1 else [] for k in ks]
    todo = [(n, i, k) for n, (i, k) in enumerate(zip(steps, ks)) if k > 1]
    if not todo:
        return out
    idx = np.array([i for _, i, _ in todo])
    s = np.array([grid.s(i) for i in range(grid.steps + 1)])
    s0, s1 = s[idx], s[idx + 1]
    s_q = (0.5 * (s0 + s1))[:, None] + (0.5 * (s1 - s0))[:, None] * _GL_X          # (n, 8)
    t_q = _times_of(grid.schedule, 1.0 / (1.0 + s_q * s_q))                         # (n, 8)
    t = np.array(grid.t, dtype=np.float64)
    for k in sorted({k for _, _, k in todo}):
        rows = [r for r, (_, _, kk) in enumerate(todo) if kk == k]
        nodes = t[idx[rows][:, None] - np.arange(k)[None]]                          # (m, k): t_i, t_{i-1}, ...
        tq = t_q[rows]
        w = np.empty((len(rows), k))
        for j in range(k):
            others = np.delete(nodes, j, axis=1)                                    # (m, k - 1)
            L = np.prod((tq[:, :, None] - others[:, None]) / (nodes[:, j, None, None] - others[:, None]), axis=2)
            w[:, j] = 0.5 * (_GL_W * L).sum(axis=1)
        for r, row in zip(rows, w):
            out[todo[r][0]] = [float(v) for v in row]
    return out


def _times_of(schedule: Any, ab: np.ndarray) -> np.ndarray:
    """``schedule.time_of`` over an array (vectorised when the schedule offers ``times_of``)."""
    many = getattr(schedule, "times_of", None)
    if many is not None:
        return many(ab)
    return np.array([schedule.time_of(float(v)) for v in ab.ravel()]).reshape(ab.shape)


def interp_weights_in_t(grid: "Grid", i: int, times: list[float]) -> list[float]:
    """Weights w_j = mean over s in [s_i, s_{i+1}] of the Lagrange basis L_j(t(s)) through ``times``:
    the eps of step i integrated in s, interpolated in t (see ``adams_weights_in_t``)."""
    k = len(times)
    nodes = np.array(times, dtype=np.float64)
    s0, s1 = grid.s(i), grid.s(i + 1)
    s_q = 0.5 * (s0 + s1) + 0.5 * (s1 - s0) * _GL_X
    t_q = np.array([grid.schedule.time_of(1.0 / (1.0 + v * v)) for v in s_q])
    w = []
    for j in range(k):
        others = np.delete(nodes, j)
        L = np.prod((t_q[:, None] - others[None]) / (nodes[j] - others[None]), axis=1)
        w.append(float(0.5 * (_GL_W * L).sum()))
    return w


def interp_weights_in_alpha(nodes: list[float], a0: float, a1: float) -> list[float]:
    """Weights w_j = mean over s in [s(a0), s(a1)] of the Lagrange basis L_j(alpha) through the nodes
    alpha_j = sqrt(nodes[j]) (alpha_bar values): eps interpolated in alpha = sqrt(alpha_bar), integrated in s.

    Near pure noise alpha ~ 1/s and eps is nearly constant along the ODE (eps = z + O(alpha^2)), so a
    polynomial in alpha fits it where one in s or t does not: a step from t = 999 on squaredcos_cap_v2
    spans s from 2e4 to ~6, and weights in s put most of that span on stages far from its start."""
    v = np.sqrt(np.array(nodes, dtype=np.float64))
    s0, s1 = s_of(a0), s_of(a1)
    s_q = 0.5 * (s0 + s1) + 0.5 * (s1 - s0) * _GL_X
    v_q = 1.0 / np.sqrt(1.0 + s_q * s_q)
    w = []
    for j in range(len(v)):
        others = np.delete(v, j)
        L = np.prod((v_q[:, None] - others[None]) / (v[j] - others[None]), axis=1)
        w.append(float(0.5 * (_GL_W * L).sum()))
    return w


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
