"""``AccelerandoScheduler``: our samplers behind diffusers' stateful ``set_timesteps`` / ``step`` API.

``timesteps`` lists every model call of the method (PRK and FON stages, S-PNDM's repeated point are
extra entries, as in diffusers' PNDM), so a pipeline's one ``step`` per entry drives the sampler call by
call. ``step`` works from the ``sample`` and ``timestep`` it is given: the entry is found by a step index
(``set_begin_index`` or the timestep's position, as diffusers' DPMSolverMultistep / UniPC do), the
sample passed in is the state the sampler continues from (edited latents are honoured) and the history
of a multistep method is what it saw since the run began there. A run begun at a grid point starts the
method there with no history (orders ramp up; warm-ups of earlier points are skipped); begun at a
Runge-Kutta stage, the calls up to the next grid point are first-order (DDIM) steps to the next listed
time.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from ..api import check_steps, get_spec
from ..models import clip_x0, dynamic_threshold, eps_with_corrected_x0, to_eps
from ..samplers._common import Grid, make_grid, s_of, transfer
from ..schedules import (SPACINGS, ZERO_SNR_ALPHA_BAR, Schedule, make_betas, rescale_zero_terminal_snr,
                         sigma_spacing)
from .keys import check_model_keys, from_foreign_config
from .keys import method_knobs as _algorithm_knobs

_DDIM_METHODS = ("ddim", "ddim-eta")
_COMPATIBLES = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                "UniPCMultistepScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
                "LMSDiscreteScheduler", "HeunDiscreteScheduler", "DEISMultistepScheduler",
                "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler"]


class AccelerandoScheduler(SchedulerMixin, ConfigMixin):
    """Runs ``method`` (any name in ``accelerando.diffusion.METHODS``) inside a diffusers pipeline.

    Config keys are diffusers' (see ``keys.KEY_POLICY``) plus ``method``, ``float_t`` (Runge-Kutta stages
    at exact non-integer times) and ``method_knobs`` (the sampler's own options).
    """

    config_name = "scheduler_config.json"
    _compatibles = list(_COMPATIBLES)
    order = 1

    @register_to_config
    def __init__(self, method: str = "f-pndm", num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas: Any = None,
                 rescale_betas_zero_snr: bool = False, set_alpha_to_one: bool | None = None,
                 final_sigmas_type: str | None = None, prediction_type: str = "epsilon",
                 timestep_spacing: str = "trailing", steps_offset: int = 0, clip_sample: bool = False,
                 clip_sample_range: float = 1.0, thresholding: bool = False, dynamic_thresholding_ratio: float = 0.995,
                 sample_max_value: float = 1.0, variance_type: str | None = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_lu_lambdas: bool = False, use_beta_sigmas: bool = False,
                 sigma_min: float | None = None, sigma_max: float | None = None,
                 lambda_min_clipped: float = -math.inf, use_flow_sigmas: bool = False, flow_shift: float = 1.0,
                 use_dynamic_shifting: bool = False, time_shift_type: str = "exponential",
                 shift_terminal: float | None = None, skip_prk_steps: bool | None = None,
                 solver_order: int | None = None, algorithm_type: str | None = None, solver_type: str | None = None,
                 lower_order_final: bool | None = None, euler_at_final: bool | None = None,
                 predict_x0: bool | None = None, solver_p: Any = None, disable_corrector: list[int] | None = None,
                 float_t: bool = False, method_knobs: dict | None = None):
        spec = get_spec(method)     # unknown names fail here, listing the valid ones
        cfg = self.config
        check_model_keys(cfg)
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing={timestep_spacing!r} is not supported; valid: {', '.join(SPACINGS)}")
        self._knobs = {**spec.knobs, **_algorithm_knobs(method, cfg), **(method_knobs or {})}
        self.schedule, self.betas = _schedule(cfg)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)
        self.final_alpha_cumprod = torch.tensor(self.schedule.final_alpha_bar, dtype=torch.float32)
        self.init_noise_sigma = 1.0
        # PRK / FON take 4 calls per grid step: img2img pipelines slice timesteps[t_start * order:]
        self.order = 4 if method in ("prk", "fon") else 1
        self._x0_fix = (dynamic_threshold(dynamic_thresholding_ratio, sample_max_value) if thresholding
                        else clip_x0(clip_sample_range) if clip_sample else None)
        self.num_inference_steps: int | None = None
        self.timesteps = torch.tensor([], dtype=torch.long)
        self._times: list[float] = []
        self.sigmas = torch.tensor([], dtype=torch.float32)
        self._grid: Grid | None = None
        self._begin_index: int | None = None
        self._reset_run()

    # ------------------------------------------------------------------ schedule of calls
    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      timesteps: list[int] | None = None) -> None:
        """The grid (``num_inference_steps`` points by the configured spacing, or custom decreasing
        ``timesteps``) and the list of model calls the method makes on it."""
        cfg = self.config
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            grid = self._custom_grid(timesteps)
        elif cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_lu_lambdas:
            kind = "karras" if cfg.use_karras_sigmas else "exponential" if cfg.use_exponential_sigmas else "lu"
            ts, sig = sigma_spacing(self.schedule, kind, num_inference_steps, sigma_min=cfg.sigma_min,
                                    sigma_max=cfg.sigma_max)
            abs_ = [1.0 / (1.0 + s * s) for s in sig]
            end = self.schedule.final_alpha_bar
            if abs_[-1] < end * (1 - 1e-6):      # else the grid already ends there (sigma_min = sigma(t = 0))
                ts, abs_ = ts + [-1.0], abs_ + [end]
            grid = Grid(tuple(ts), tuple(abs_), self.schedule, cfg.float_t)
        else:
            self._check_steps(num_inference_steps)
            grid = make_grid(self.schedule, num_inference_steps, cfg.timestep_spacing, float_t=cfg.float_t,
                             steps_offset=cfg.steps_offset, drop_zero=get_spec(cfg.method).drop_zero)
        self._check_steps(grid.steps)
        self._grid = grid
        self.num_inference_steps = grid.steps
        # the calls do not depend on the model's answers: list them with a dry run
        reqs = _requests(self._sampler_for(torch.zeros(1, dtype=torch.float64), 0, dry_run=True))
        continuous = bool(getattr(self.schedule, "continuous", False))
        times = [t if continuous else max(t, 0.0) for t in (r[1] for r in reqs)]
        self._entry_ab = [r[2] if r[2] is not None else self.schedule.alpha_bar(r[1]) for r in reqs]
        self._entry_point = [r[3] for r in reqs]
        dtype = torch.long if all(float(t).is_integer() for t in times) else torch.float32
        self.timesteps = torch.tensor(times, dtype=torch.float64).to(dtype).to(device)
        self._times = [float(t) for t in self.timesteps.cpu().tolist()]    # host copy: no device sync per step
        self.sigmas = torch.tensor([s_of(a) for a in self._entry_ab] + [s_of(grid.ab[-1])], dtype=torch.float32)
        self._begin_index = None
        self._reset_run()

    def _check_steps(self, steps: int) -> None:
        check_steps(self.config.method, steps, self.schedule)

    def _custom_grid(self, timesteps: list[int]) -> Grid:
        ts = [float(t) for t in (timesteps.tolist() if isinstance(timesteps, torch.Tensor) else timesteps)]
        T = self.schedule.num_train_timesteps
        if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[-1] < 0 or ts[0] > T - 1:
            raise ValueError(f"timesteps must decrease strictly within [0, {T - 1}], got {ts}")
        if self.schedule.alpha_bar(ts[-1]) < self.schedule.final_alpha_bar:
            ts.append(-1.0)
        return Grid(tuple(ts), tuple(self.schedule.alpha_bar(t) for t in ts), self.schedule, self.config.float_t)

    def _sampler_for(self, x: torch.Tensor, start: int, generator: torch.Generator | None = None,
                     eta: float | None = None, dry_run: bool = False):
        method = self.config.method
        knobs = dict(self._knobs)
        if dry_run:     # listing the calls must not draw from the caller's (or the global) random stream
            generator = torch.Generator().manual_seed(0)
        if method in _DDIM_METHODS:
            if eta is not None:
                knobs["eta"] = eta
            knobs["correct_x0"] = self._x0_fix
            knobs["noise"] = torch.zeros_like if dry_run else self._noise
        elif get_spec(method).stochastic:
            knobs["generator"] = generator
        return get_spec(method).fn(x, self._grid, start=start, **knobs)

    # ------------------------------------------------------------------ step index (diffusers' names)
    @property
    def step_index(self) -> int | None:
        """The entry of ``timesteps`` the next ``step`` answers (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start at entry ``begin_index`` of ``timesteps`` (img2img / inpainting pipelines call this)."""
        if not 0 <= begin_index < max(len(self.timesteps), 1):
            raise ValueError(f"begin_index must be in [0, {len(self.timesteps)}), got {begin_index}")
        self._begin_index = begin_index

    def _reset_run(self) -> None:
        self._step_index: int | None = None
        self._sampler = None
        self._resume = 0            # the first entry the method's generator answers (a grid point)
        self._eta: float | None = None
        self._step_generator: torch.Generator | None = None
        self._variance_noise: torch.Tensor | None = None

    def index_for_timestep(self, timestep: Any) -> int:
        """The entry of ``timestep``: where it appears more than once (a stage and the grid point after it),
        the grid point's entry."""
        t = float(torch.as_tensor(timestep).reshape(-1)[0])
        hits = [i for i, v in enumerate(self._times) if abs(v - t) < 1e-4]
        if not hits:
            raise ValueError(f"timestep {t:g} is not in this scheduler's timesteps; call set_timesteps first")
        points = [i for i in hits if self._entry_point[i] is not None]
        return (points or hits)[0]

    def _init_step_index(self, timestep: Any) -> None:
        i = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        self._step_index = i
        starts = [k for k in range(i, len(self.timesteps)) if self._entry_point[k] is not None]
        self._resume = starts[0] if starts else len(self.timesteps)

    # ------------------------------------------------------------------ the step
    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, eta: float | None = None,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True) -> SchedulerOutput | tuple:
        """The next entry's input from ``model_output`` at (``sample``, ``timestep``); the final sample on
        the last entry. ``eta`` (ddim methods) / ``generator`` / ``variance_noise`` as in DDIMScheduler."""
        if self._grid is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        n = len(self.timesteps)
        if i >= n:
            raise ValueError(f"all {n} entries of timesteps were stepped; call set_timesteps again")
        t_i = self._times[i]
        t = float(torch.as_tensor(timestep).reshape(-1)[0])     # one sync if the pipeline keeps t on the device
        if abs(t - t_i) > 1e-4:
            raise ValueError(f"step() got timestep {t:g} but entry {i} of timesteps is {t_i:g}; pass "
                             "scheduler.timesteps in order (after set_begin_index for a sliced list)")
        self._check_eta(eta)
        a = self._entry_ab[i]
        eps = to_eps(model_output, sample, a, self.config.prediction_type)
        if self._x0_fix is not None and (self.config.method not in _DDIM_METHODS or use_clipped_model_output):
            eps = eps_with_corrected_x0(eps, sample, a, self._x0_fix)
        if not torch.isfinite(eps).all():
            raise FloatingPointError(f"model output is non-finite at entry {i} (t={t_i:g})")
        eps = eps.to(sample.dtype)
        self._step_generator, self._variance_noise = generator, variance_noise
        if i < self._resume:        # begun inside a Runge-Kutta step: DDIM to the next listed time
            a_next = self._entry_ab[i + 1] if i + 1 < n else self._grid.ab[-1]
            prev = transfer(sample, eps, a, a_next)
        else:
            if self._sampler is None:
                self._sampler = self._sampler_for(sample, self._entry_point[i], generator, eta)
                next(self._sampler)
            try:
                prev = self._sampler.send((sample, eps))[0]
            except StopIteration as stop:
                prev = stop.value
        self._step_index = i + 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _check_eta(self, eta: float | None) -> None:
        if eta is None:
            return
        if self.config.method not in _DDIM_METHODS:
            if eta != 0:
                raise ValueError(f"eta={eta} applies to the ddim / ddim-eta methods; {self.config.method} is a "
                                 "deterministic ODE solver")
            return
        if self._eta is not None and eta != self._eta:
            raise ValueError(f"eta changed from {self._eta} to {eta} within one run")
        self._eta = eta

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """DDIM's eta noise for the current step: ``variance_noise`` if given, else drawn from its generator."""
        if self._variance_noise is not None:
            return self._variance_noise.to(device=x.device, dtype=x.dtype)
        return torch.randn(x.shape, generator=self._step_generator, device=x.device, dtype=x.dtype)

    # ------------------------------------------------------------------ noising (img2img, inpainting)
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """sqrt(a) x0 + sqrt(1 - a) noise; a = the alpha_bar of the current (or begin) entry when
        ``timesteps`` is that entry's time (its sigma-grid value), else the table's alpha_bar(t)."""
        ts = torch.as_tensor(timesteps).reshape(-1)
        idx = self._step_index if self._step_index is not None else self._begin_index
        if (idx is not None and idx < len(self.timesteps) and self._grid is not None
                and bool((ts.double().cpu() - self._times[idx]).abs().max() < 1e-4)):
            abs_ = [self._entry_ab[idx]] * len(ts)
        else:
            abs_ = [self.schedule.alpha_bar(float(t)) for t in ts.tolist()]
        a = torch.tensor(abs_, dtype=torch.float64, device=original_samples.device)
        if len(abs_) == 1:
            a = a.expand(original_samples.shape[0])
        a = a.reshape(-1, *([1] * (original_samples.ndim - 1)))
        return (a.sqrt() * original_samples + (1 - a).sqrt() * noise).to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @classmethod
    def from_config(cls, config: Any = None, return_unused_kwargs: bool = False, **kwargs: Any):
        """``AccelerandoScheduler.from_config(pipe.scheduler.config, method="f-pndm")``: another scheduler's
        config is translated key by key (``as_diffusers_scheduler``), never dropped silently."""
        config = dict(config or {})
        method = kwargs.pop("method", config.get("method", "f-pndm"))
        sched = cls(method=method, **{**from_foreign_config(method, config), **kwargs})   # = as_diffusers_scheduler
        return (sched, {}) if return_unused_kwargs else sched


def _schedule(cfg: Any) -> tuple[Schedule, torch.Tensor]:
    """The discrete schedule and its float32 betas: diffusers' tables, zero-SNR rescaling, the final alpha_bar."""
    if cfg.trained_betas is not None:
        betas = torch.as_tensor(cfg.trained_betas, dtype=torch.float32)
    else:
        betas = make_betas(cfg.beta_schedule, cfg.num_train_timesteps, beta_start=cfg.beta_start,
                           beta_end=cfg.beta_end, dtype=torch.float32)
    if cfg.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    ac = torch.cumprod(1.0 - betas, 0).to(torch.float64)
    if cfg.rescale_betas_zero_snr:
        ac[-1] = min(ZERO_SNR_ALPHA_BAR, float(ac[-2]) / 2)
    final = _final_is_one(cfg)
    sched = Schedule(ac, final_alpha_bar=1.0 if final else float(ac[0]),
                     name="trained" if cfg.trained_betas is not None else cfg.beta_schedule)
    return sched, betas.to(torch.float32)


def _final_is_one(cfg: Any) -> bool:
    by_sigmas = None if cfg.final_sigmas_type is None else cfg.final_sigmas_type == "zero"
    by_alpha = cfg.set_alpha_to_one
    if by_sigmas is not None and by_alpha is not None and by_sigmas != bool(by_alpha):
        raise ValueError(f"set_alpha_to_one={by_alpha} contradicts final_sigmas_type={cfg.final_sigmas_type!r}")
    return by_sigmas if by_sigmas is not None else (True if by_alpha is None else bool(by_alpha))


def _requests(sampler) -> list:
    """Every request of a sampler answered with zeros (its call list; the answers do not change it)."""
    out = []
    try:
        req = next(sampler)
        while True:
            out.append(tuple(req) + (None,) * (4 - len(req)))
            req = sampler.send(torch.zeros_like(req[0]))
    except StopIteration:
        return out
