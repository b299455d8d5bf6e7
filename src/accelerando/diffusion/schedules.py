"""Beta schedules, alpha_bar as a function of (possibly non-integer) time, and timestep spacings.

Notation (METHODS.md): ``a = alpha_bar(t)``; DDIM coordinates ``s = sqrt((1 - a) / a)``;
DPM-Solver's ``lambda = log(sqrt(a)) - log(sqrt(1 - a))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("linspace", "leading", "trailing")


@dataclass(frozen=True)
class Schedule:
    """A discrete VP schedule of ``T`` training steps plus the alpha_bar the sampler must end at.

    ``alpha_bar(t)`` extends the table to non-integer ``t`` by linear interpolation of
    ``log alpha_bar`` between integers; ``t = -1`` is the end point, ``alpha_bar(-1) = final_alpha_bar``
    (1.0 = clean data, diffusers' ``set_alpha_to_one=True``; ``alphas_cumprod[0]`` otherwise).
    """

    alphas_cumprod: torch.Tensor                 # float64 (T,)
    final_alpha_bar: float = 1.0
    name: str = "custom"
    _log_knots: np.ndarray = field(init=False, repr=False, compare=False)
    _neg_log_knots: np.ndarray = field(init=False, repr=False, compare=False)   # increasing, for np.interp
    _knot_times: np.ndarray = field(init=False, repr=False, compare=False)      # 0 .. T (t + 1 at each knot)
    _table: tuple[float, ...] = field(init=False, repr=False, compare=False)       # alphas_cumprod as floats

    def __post_init__(self) -> None:
        ac = torch.as_tensor(self.alphas_cumprod, dtype=torch.float64).cpu()
        if ac.ndim != 1 or len(ac) < 2:
            raise ValueError("alphas_cumprod must be a 1-D table of at least 2 entries")
        if not bool(((ac > 0) & (ac <= 1)).all()) or not bool((ac[1:] < ac[:-1]).all()):
            raise ValueError("alphas_cumprod must lie in (0, 1] and decrease strictly")
        if not (float(ac[0]) <= self.final_alpha_bar <= 1.0):
            raise ValueError(f"final_alpha_bar must be in [alphas_cumprod[0], 1], got {self.final_alpha_bar}")
        object.__setattr__(self, "alphas_cumprod", ac)
        knots = np.concatenate([[math.log(self.final_alpha_bar)], np.log(ac.numpy())])
        object.__setattr__(self, "_log_knots", knots)
        object.__setattr__(self, "_neg_log_knots", -knots)
        object.__setattr__(self, "_knot_times", np.arange(len(knots), dtype=np.float64))
        object.__setattr__(self, "_table", tuple(ac.tolist()))   # a tuple lookup, not a tensor index per call

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    continuous = False   # integer model times only (midpoints are rounded unless float_t=True)

    def alpha_bar(self, t: float) -> float:
        """alpha_bar at time ``t`` in [-1, T-1]; exact table values at integers."""
        T = self.num_train_timesteps
        if not (-1.0 <= t <= T - 1):
            raise ValueError(f"time {t} outside [-1, {T - 1}]")
        if float(t).is_integer():
            return self._table[int(t)] if t >= 0 else self.final_alpha_bar
        return math.exp(float(np.interp(t + 1.0, np.arange(T + 1), self._log_knots)))

    def dlog_alpha_bar(self, t: float) -> float:
        """d log(alpha_bar) / dt (slope of the log-linear extension; averaged at integer knots)."""
        T = self.num_train_timesteps
        slopes = np.diff(self._log_knots)               # slope on [k-1, k], k = 0..T-1
        u = t + 1.0
        k = int(math.floor(u))
        if u == k:
            lo, hi = slopes[max(k - 1, 0)], slopes[min(k, T - 1)]
            return float(0.5 * (lo + hi))
        return float(slopes[min(k, T - 1)])

    def time_of(self, alpha_bar: float) -> float:
        """Inverse of ``alpha_bar(t)`` (log-linear between integers)."""
        # _log_knots decreases; np.interp wants increasing x
        return float(np.interp(-math.log(alpha_bar), self._neg_log_knots, self._knot_times)) - 1.0

    def times_of(self, alpha_bar: np.ndarray) -> np.ndarray:
        """``time_of`` over an array of alpha_bar values."""
        return np.interp(-np.log(alpha_bar), self._neg_log_knots, self._knot_times) - 1.0

    def timesteps(self, steps: int, spacing: str = "trailing", *, steps_offset: int = 0) -> list[int]:
        return timesteps(self.num_train_timesteps, steps, spacing, steps_offset=steps_offset)


@dataclass(frozen=True)
class ContinuousSchedule:
    """A smooth VP schedule in float time (for measuring orders): ``alpha_bar = exp(-int beta)``.

    ``beta(t) = beta_start + (beta_end - beta_start) * (t + 1) / T`` per unit of ``t``; the continuous
    analogue of the ``linear`` DDPM table (equal to it up to O(beta^2)). ``t = -1`` is alpha_bar = 1.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    name: str = "continuous-linear"
    continuous = True

    @property
    def final_alpha_bar(self) -> float:
        return 1.0

    def _int_beta(self, t: float) -> float:
        u = t + 1.0
        return self.beta_start * u + (self.beta_end - self.beta_start) * u * u / (2 * self.num_train_timesteps)

    def alpha_bar(self, t: float) -> float:
        return math.exp(-self._int_beta(t))

    def dlog_alpha_bar(self, t: float) -> float:
        return -(self.beta_start + (self.beta_end - self.beta_start) * (t + 1.0) / self.num_train_timesteps)

    def time_of(self, alpha_bar: float) -> float:
        # solve beta_start u + k u^2 = -log a for u >= 0
        k = (self.beta_end - self.beta_start) / (2 * self.num_train_timesteps)
        c = -math.log(alpha_bar)
        u = 2 * c / (self.beta_start + math.sqrt(self.beta_start ** 2 + 4 * k * c))
        return u - 1.0

    def timesteps(self, steps: int, spacing: str = "trailing", *, steps_offset: int = 0) -> list[int]:
        return timesteps(self.num_train_timesteps, steps, spacing, steps_offset=steps_offset)


def make_betas(name: str, num_train_timesteps: int = 1000, *, beta_start: float = 1e-4,
               beta_end: float = 0.02, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """diffusers' beta tables (``dtype=torch.float32`` reproduces diffusers' rounding)."""
    T = num_train_timesteps
    if name == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=dtype)
    if name == "scaled_linear":
        return torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=dtype) ** 2
    if name == "squaredcos_cap_v2":
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=dtype)
    raise ValueError(f"unknown beta schedule {name!r}; valid: {', '.join(BETA_SCHEDULES)}")


def make_schedule(name: str = "linear", num_train_timesteps: int = 1000, *, beta_start: float = 1e-4,
                  beta_end: float = 0.02, set_alpha_to_one: bool = True,
                  betas_dtype: torch.dtype = torch.float64) -> Schedule:
    """A discrete schedule by diffusers' name; ``set_alpha_to_one`` picks the final alpha_bar."""
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    betas = make_betas(name, num_train_timesteps, beta_start=beta_start, beta_end=beta_end, dtype=betas_dtype)
    ac = torch.cumprod(1.0 - betas, dim=0).to(torch.float64)
    return Schedule(ac, final_alpha_bar=1.0 if set_alpha_to_one else float(ac[0]), name=name)


def timesteps(T: int, steps: int, spacing: str = "trailing", *, steps_offset: int = 0) -> list[int]:
    """The N grid timesteps, decreasing, as diffusers defines each spacing."""
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be in [1, {T}] (the number of training timesteps), got {steps}")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1] + steps_offset
    else:
        ts = np.round(np.arange(T, 0, -T / steps)) - 1
    out = [int(v) for v in ts]
    if len(set(out)) != len(out):
        raise ValueError(f"{spacing} spacing gives repeated timesteps for steps={steps}, T={T}")
    return out


def log_snr_lambda(a: float) -> float:
    """DPM-Solver's lambda = log(alpha / sigma); +inf at a = 1."""
    return math.inf if a >= 1.0 else 0.5 * (math.log(a) - math.log1p(-a))


AlphaBarFn = Callable[[float], float]


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Betas whose last alpha_bar is 0 (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", Alg. 1): sqrt(alpha_bar) shifted to end at 0 and scaled to keep its start."""
    root = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    ab = root ** 2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


ZERO_SNR_ALPHA_BAR = 2.0 ** -24     # diffusers' DPM-Solver / UniPC / Euler stand-in for alpha_bar = 0


SIGMA_SPACINGS = ("karras", "exponential", "lu")


def sigma_spacing(schedule: Schedule, kind: str, steps: int, *, sigma_min: float | None = None,
                  sigma_max: float | None = None) -> tuple[list[float], list[float]]:
    """(model times, sigmas) of diffusers' ``use_karras_sigmas`` / ``use_exponential_sigmas`` /
    ``use_lu_lambdas`` grids, sigma = s = sqrt((1 - a) / a), from noise to data, N points.

    karras: Karras et al. 2022 ("EDM") eq. 5, rho = 7; exponential: uniform in log sigma between
    ``sigma_min`` and ``sigma_max``; lu: uniform in lambda = -log sigma over the whole table (Lu et al.
    2022, "DPM-Solver"). Times are where the table's log sigma takes each value (linear interpolation),
    rounded for karras / lu and truncated for exponential, as diffusers casts them.
    """
    if kind not in SIGMA_SPACINGS:
        raise ValueError(f"unknown sigma spacing {kind!r}; valid: {', '.join(SIGMA_SPACINGS)}")
    ac = schedule.alphas_cumprod.to(torch.float32).to(torch.float64).numpy()
    log_sig = 0.5 * np.log((1 - ac) / ac)
    lo = float(np.exp(log_sig[0])) if sigma_min is None else float(sigma_min)
    hi = float(np.exp(log_sig[-1])) if sigma_max is None else float(sigma_max)
    ramp = np.linspace(0.0, 1.0, steps)
    if kind == "karras":
        rho = 7.0
        sig = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    elif kind == "exponential":
        sig = np.exp(np.linspace(math.log(hi), math.log(lo), steps))
    else:
        sig = np.exp(log_sig[-1] + ramp * (log_sig[0] - log_sig[-1]))
    # the time whose table log sigma is log(sig): log sigma increases with t
    t = np.interp(np.log(np.maximum(sig, 1e-10)), log_sig, np.arange(len(ac), dtype=np.float64))
    t = np.round(t) if kind in ("karras", "lu") else np.floor(t)
    sig32 = sig.astype(np.float32).astype(np.float64)      # diffusers keeps its sigmas in float32
    return [float(v) for v in t], [float(v) for v in sig32]
