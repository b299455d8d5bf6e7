"""``sample``: drive one of the samplers with an ``eps_fn``; the table of methods and their costs."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .samplers._common import Grid, make_grid
from .samplers.ddim import ddim
from .samplers.dpm_solver import dpmpp_2m, dpmpp_3m
from .samplers.momentum import ghvb, hb_dpmpp_2m, hb_plms
from .samplers.unipc import unipc
from .samplers.pndm import f_pndm, fon, plms, pndm_diffusers, prk, s_pndm, s_pndm4
from .schedules import make_schedule


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable[..., Any]
    nfe: Callable[[int, int], int]     # eps_fn calls for (steps, r); r = 1 when the last step ends where
                                       # the model has no timestep (alpha_bar = 1 on a discrete schedule)
    nfe_formula: str
    order: str                         # order on a smooth, uniform grid
    min_steps: int = 1                 # fewest grid steps: warm-up + one step of the main scheme
    min_reason: str = ""
    knobs: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False
    description: str = ""
    # linspace / leading: no call at t = 0 (make_grid's drop_zero). False where the method reproduces
    # diffusers' DDIM / PNDM, whose grids keep t = 0.
    drop_zero: bool = True


def _rk_warmup(n: int, r: int = 0) -> int:
    return 4 * min(3, n) + max(0, n - 3) - (r if n <= 3 else 0)


def _one(n: int, r: int = 0) -> int:
    return n


def _rk(n: int, r: int = 0) -> int:
    return 4 * n - r


def _plus_one(n: int, r: int = 0) -> int:
    return n + 1


# Why a method has a minimum. Measured on the oracle (linear, trailing): one Runge-Kutta step over
# the whole interval gives RMSE ~1e3, two ~3-4 (DDIM at the same calls: 0.6, 0.25); from three on
# the error is of DDIM's size and then falls at 4th order.
_RK_MIN = "a Runge-Kutta step across a third or more of the interval is unstable in s"
_IE_MIN = "the improved-Euler warm-up step, then at least one PLMS step"
_F_MIN = "3 pseudo-RK warm-up steps, then at least one PLMS step"

_SPECS = [
    SamplerSpec("ddim", ddim, _one, "N", "1", drop_zero=False, description="DDIM, eta = 0 (deterministic)"),
    SamplerSpec("ddim-eta", ddim, _one, "N", "1 (weak, SDE)", knobs={"eta": 1.0}, stochastic=True, drop_zero=False,
                description="DDIM with eta > 0 (default 1.0 = DDPM posterior noise)"),
    SamplerSpec("prk", prk, _rk, "4N - 1 (4N)", "4", min_steps=3, min_reason=_RK_MIN,
                description="pseudo Runge-Kutta (RK4 in s) every step"),
    SamplerSpec("plms2", plms, _one, "N", "2", knobs={"order": 2}, description="pseudo linear multistep, order 2"),
    SamplerSpec("plms3", plms, _one, "N", "3", knobs={"order": 3}, description="pseudo linear multistep, order 3"),
    SamplerSpec("plms4", plms, _one, "N", "4", knobs={"order": 4}, description="pseudo linear multistep, order 4"),
    SamplerSpec("s-pndm", s_pndm, _plus_one, "N + 1", "2", min_steps=2, min_reason=_IE_MIN,
                description="pseudo improved-Euler warm-up, then PLMS-2"),
    SamplerSpec("s-pndm4", s_pndm4, _plus_one, "N + 1", "2 (improved-Euler start)", min_steps=2,
                min_reason=_IE_MIN,
                description="pseudo improved-Euler warm-up, then PLMS 2 -> 3 -> 4 (variable-step weights)"),
    SamplerSpec("f-pndm", f_pndm, _rk_warmup, "N + 9 (N >= 3)", "4", min_steps=4, min_reason=_F_MIN,
                description="pseudo RK4 warm-up for 3 steps, then PLMS-4"),
    SamplerSpec("fon", fon, _rk, "4N - 1 (4N)", "4", min_steps=3, min_reason=_RK_MIN,
                description="classical RK4 in t on the PF-ODE"),
    SamplerSpec("pndm-diffusers", pndm_diffusers, _plus_one, "N + 1", "<= 4 (fixed weights)", min_steps=2,
                min_reason=_IE_MIN,
                knobs={"skip_prk_steps": True}, drop_zero=False,
                description="diffusers' PNDMScheduler, skip_prk_steps=True"),
    SamplerSpec("pndm-diffusers-prk", pndm_diffusers, _rk_warmup, "N + 9 (N >= 3)", "<= 4 (fixed weights)",
                min_steps=4, min_reason=_F_MIN,
                knobs={"skip_prk_steps": False}, drop_zero=False,
                description="diffusers' PNDMScheduler, skip_prk_steps=False"),
    SamplerSpec("dpmpp-2m", dpmpp_2m, _one, "N", "2", description="DPM-Solver++(2M), data prediction"),
    SamplerSpec("dpmpp-3m", dpmpp_3m, _one, "N", "3", description="DPM-Solver++(3M), data prediction"),
    SamplerSpec("unipc", unipc, _one, "N", "2-3", knobs={"order": 2},
                description="UniPC (bh2) predictor-corrector, data prediction"),
    SamplerSpec("unipc3", unipc, _one, "N", "3", knobs={"order": 3, "last_step": "adams"},
                description="UniPC-3 (bh2), last step a 3rd-order pseudo Adams step in s (not first order)"),
    SamplerSpec("hb-plms", hb_plms, _one, "N", "1 (beta < 1)", knobs={"order": 4, "beta": 0.8},
                description="heavy-ball momentum on PLMS"),
    SamplerSpec("hb-dpmpp-2m", hb_dpmpp_2m, _one, "N", "1 (beta < 1)", knobs={"beta": 0.8},
                description="heavy-ball momentum on DPM-Solver++(2M)"),
    SamplerSpec("ghvb", ghvb, _one, "N", "order - 1 + beta", knobs={"order": 2, "beta": 0.8},
                description="generalised heavy ball, fractional order"),
]
SPECS: dict[str, SamplerSpec] = {s.name: s for s in _SPECS}
METHODS: tuple[str, ...] = tuple(SPECS)        # the built-in methods; SPECS also holds registered ones


def register_sampler(spec: SamplerSpec, *, replace: bool = False) -> None:
    """The extension point: a sampler usable by name in ``sample``, ``nfe_for`` and ``as_diffusers_scheduler``
    (e.g. a searched solver schedule). ``spec.fn(x, grid, *, start=0, **knobs)`` is a generator that yields
    ``samplers._common.ask`` requests and returns the final sample; ``start=j`` begins at grid point j with no
    history, asking for the tail of the full run's calls (the adapter's img2img needs it)."""
    if spec.name in SPECS and not replace:
        raise ValueError(f"sampling method {spec.name!r} is already registered (replace=True to override)")
    SPECS[spec.name] = spec


class NonFiniteError(FloatingPointError):
    """eps_fn returned NaN or inf."""


class BelowMinimumError(ValueError):
    """Fewer steps (or model calls) than the method's warm-up plus one step of its main scheme."""


# Extension point: methods defined outside this table register themselves with ``register_method``;
# a name prefix maps to the module that does so on import (loaded on first use of such a name).
EXTENSIONS: dict[str, str] = {"usf-": "accelerando.diffusion.usf"}


def register_method(spec: SamplerSpec) -> None:
    """Add (or replace) a sampling method, e.g. a searched USF schedule."""
    SPECS[spec.name] = spec


def get_spec(method: str) -> SamplerSpec:
    if method not in SPECS:
        for prefix, module in EXTENSIONS.items():
            if method.startswith(prefix):
                import importlib
                importlib.import_module(module).register()
    try:
        return SPECS[method]
    except KeyError:
        raise ValueError(f"unknown sampling method {method!r}; valid methods: {', '.join(METHODS)}") from None


def _end_saving(schedule: Any) -> int:
    """1 when a grid's last step ends where a discrete model has no timestep (final alpha_bar > alpha_bar(0)):
    Runge-Kutta methods then take that step with 3 stages instead of 4."""
    schedule = schedule if schedule is not None else _default_schedule()
    return int(not getattr(schedule, "continuous", False) and schedule.final_alpha_bar > schedule.alpha_bar(0))


def nfe_for(method: str, steps: int, schedule: Any = None) -> int:
    """Number of eps_fn calls ``method`` makes with ``steps`` grid timesteps on ``schedule``
    (default: a discrete schedule ending at alpha_bar = 1)."""
    return get_spec(method).nfe(steps, _end_saving(schedule))


def min_nfe(method: str, schedule: Any = None) -> int:
    """Model calls of the method's minimum number of steps (``SPECS[method].min_steps``)."""
    spec = get_spec(method)
    return spec.nfe(spec.min_steps, _end_saving(schedule))


def _minimum(spec: SamplerSpec, schedule: Any) -> str:
    why = f": {spec.min_reason}" if spec.min_reason else ""
    return f"at least {spec.min_steps} steps = {min_nfe(spec.name, schedule)} model calls{why}"


def check_steps(method: str, steps: int, schedule: Any = None) -> None:
    """Raise ``BelowMinimumError`` when ``steps`` is below the method's minimum."""
    spec = get_spec(method)
    if steps < spec.min_steps:
        raise BelowMinimumError(f"{method} needs {_minimum(spec, schedule)}; got steps={steps}")


def check_budget(method: str, nfe: int, schedule: Any = None) -> int:
    """The steps ``method`` runs within ``nfe`` model calls; ``BelowMinimumError`` if its minimum does not fit."""
    steps = steps_for_nfe(method, nfe, schedule)
    if steps is None:
        raise BelowMinimumError(f"{method} needs {_minimum(get_spec(method), schedule)}; "
                                f"the budget is {nfe} model calls")
    return steps


def steps_for_nfe(method: str, nfe: int, schedule: Any = None) -> int | None:
    """The most grid steps whose cost fits in ``nfe`` calls; None when the method's minimum
    (``min_nfe``) does not fit -- never a single divergent step over the whole interval."""
    spec = get_spec(method)
    r = _end_saving(schedule)
    best = None
    for n in range(spec.min_steps, nfe + 1):
        if spec.nfe(n, r) <= nfe:
            best = n
    return best


def make_sampler(method: str, x: torch.Tensor, grid: Grid, *, generator: torch.Generator | None = None,
                 **knobs: Any):
    """The method's generator over ``grid`` (knobs override the method's defaults)."""
    spec = get_spec(method)
    check_steps(method, grid.steps, grid.schedule)
    opts = {**spec.knobs, **knobs}
    if spec.stochastic:
        opts["generator"] = generator
    return spec.fn(x, grid, **opts)


@dataclass
class SampleInfo:
    nfe: int
    times: list[float]                 # the model time of every eps_fn call, in order
    grid: Grid


def _model_time(t: float, continuous: bool) -> float:
    # the end point t = -1 of a discrete schedule is only evaluated when alpha_bar(-1) = alpha_bar(0)
    return t if continuous else max(t, 0.0)


def _time_tensor(t: float, x: torch.Tensor) -> torch.Tensor:
    if float(t).is_integer():
        return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    # float64 keeps a float-time oracle exact; models.py casts for a UNet
    return torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)


def drive(sampler, eps_fn: Callable, *, continuous: bool = False) -> tuple[torch.Tensor, list[float]]:
    """Run a sampler generator to the end, answering each request with ``eps_fn``."""
    times: list[float] = []
    try:
        x, t = next(sampler)[:2]          # a Request (x, t, ab, point) or a plain (x, t)
        while True:
            t = _model_time(t, continuous)
            e = eps_fn(x, _time_tensor(t, x))
            times.append(t)
            # one host sync per call: a silent NaN image is worse. A NaN / inf anywhere makes the sum
            # non-finite; the sum is one reduction (isfinite + all: two kernels and a bool tensor, ~4x the
            # time on small batches), and a sum that overflows from finite values is cleared by the exact test
            if not math.isfinite(e.sum()) and not torch.isfinite(e).all():
                raise NonFiniteError(f"eps_fn returned non-finite values at model call {len(times)} "
                                     f"(t={t:g}); stopping instead of producing a NaN sample")
            x, t = sampler.send(e if e.dtype == x.dtype else e.to(x.dtype))[:2]
    except StopIteration as stop:
        return stop.value, times


def sample_with_info(eps_fn: Callable, x_T: torch.Tensor, *, schedule: Any = None, method: str = "f-pndm",
                     steps: int = 50, spacing: str = "trailing", generator: torch.Generator | None = None,
                     float_t: bool = False, grid: Grid | None = None, **knobs: Any) -> tuple[torch.Tensor, SampleInfo]:
    """Like ``sample``, also returning the number of model calls and their times."""
    spec = get_spec(method)
    if grid is None:
        schedule = schedule if schedule is not None else _default_schedule()
        check_steps(method, steps, schedule)
        grid = make_grid(schedule, steps, spacing, float_t=float_t, drop_zero=spec.drop_zero)
    if not torch.isfinite(x_T).all():
        raise ValueError("x_T contains non-finite values")
    x0, times = drive(make_sampler(method, x_T, grid, generator=generator, **knobs), eps_fn,
                      continuous=bool(getattr(grid.schedule, "continuous", False)))
    return x0, SampleInfo(nfe=len(times), times=times, grid=grid)


def sample(eps_fn: Callable, x_T: torch.Tensor, *, schedule: Any = None, method: str = "f-pndm",
           steps: int = 50, spacing: str = "trailing", generator: torch.Generator | None = None,
           float_t: bool = False, return_info: bool = False, grid: Grid | None = None, **knobs: Any):
    """Integrate the probability-flow ODE (or DDIM's SDE for ``ddim-eta``) from ``x_T`` to data.

    ``steps`` grid timesteps by ``spacing``, then the end point (``schedule.final_alpha_bar``);
    ``float_t=True`` lets Runge-Kutta midpoints fall between integer timesteps. ``grid`` overrides
    schedule/steps/spacing. ``return_info=True`` returns ``(x0, SampleInfo)`` (``info.nfe``).
    """
    x0, info = sample_with_info(eps_fn, x_T, schedule=schedule, method=method, steps=steps, spacing=spacing,
                                generator=generator, float_t=float_t, grid=grid, **knobs)
    return (x0, info) if return_info else x0


@functools.lru_cache(maxsize=1)
def _default_schedule():
    return make_schedule("linear", 1000)
