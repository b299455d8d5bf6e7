"""A diffusers scheduler over our samplers, for ``pipe.scheduler = as_diffusers_scheduler(...)``.

diffusers' pipelines call ``step()`` once per entry of ``scheduler.timesteps``. Our samplers are
generators of model requests, so the adapter lists *every* model call in ``timesteps`` (PRK and FON
midpoints and repeated points appear as extra entries, as in diffusers' PNDM; ``len(timesteps)``
is the method's NFE) and ``step()`` sends the model output in and returns the next request's
input as ``prev_sample`` (the final data sample on the last call). The pipeline must pass back the
``prev_sample`` it got, unchanged (true of the standard loops).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .api import check_steps, drive, get_spec, make_sampler
from .models import to_eps
from .samplers._common import make_grid
from .schedules import Schedule, make_schedule

_CONFIG_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "prediction_type", "timestep_spacing", "steps_offset", "set_alpha_to_one")


class AccelerandoScheduler(SchedulerMixin, ConfigMixin):
    """Runs ``method`` (any name in ``accelerando.diffusion.METHODS``) inside a diffusers pipeline."""

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, method: str = "f-pndm", num_train_timesteps: int = 1000, beta_start: float = 0.0001,
                 beta_end: float = 0.02, beta_schedule: str = "linear", trained_betas: Any = None,
                 set_alpha_to_one: bool = True, timestep_spacing: str = "trailing", steps_offset: int = 0,
                 prediction_type: str = "epsilon", float_t: bool = False, method_knobs: dict | None = None):
        get_spec(method)   # unknown names fail here, listing the valid ones
        if trained_betas is not None:
            betas = torch.as_tensor(trained_betas, dtype=torch.float32)
            ac = torch.cumprod(1.0 - betas, 0).to(torch.float64)
            self.schedule = Schedule(ac, final_alpha_bar=1.0 if set_alpha_to_one else float(ac[0]), name="trained")
        else:   # float32 betas: the same alphas_cumprod as diffusers' own schedulers
            self.schedule = make_schedule(beta_schedule, num_train_timesteps, beta_start=beta_start,
                                          beta_end=beta_end, set_alpha_to_one=set_alpha_to_one,
                                          betas_dtype=torch.float32)
        self.alphas_cumprod = self.schedule.alphas_cumprod.to(torch.float32)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.tensor([], dtype=torch.long)
        self._grid = None
        self._sampler = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        check_steps(self.config.method, num_inference_steps, self.schedule)
        self.num_inference_steps = num_inference_steps
        self._grid = make_grid(self.schedule, num_inference_steps, self.config.timestep_spacing,
                               float_t=self.config.float_t, steps_offset=self.config.steps_offset,
                               drop_zero=get_spec(self.config.method).drop_zero)
        # the call times do not depend on the model's answers: record them with a dry run
        _, times = drive(self._new_sampler(torch.zeros(1, dtype=torch.float64)), lambda x, t: torch.zeros_like(x))
        times = [max(t, 0.0) for t in times]
        dtype = torch.long if all(float(t).is_integer() for t in times) else torch.float32
        self.timesteps = torch.tensor(times, dtype=torch.float64).to(dtype).to(device)
        self._sampler = None
        self._calls = 0

    def _new_sampler(self, x: torch.Tensor, generator: torch.Generator | None = None):
        return make_sampler(self.config.method, x, self._grid, generator=generator, **(self.config.method_knobs or {}))

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, return_dict: bool = True,
             generator: torch.Generator | None = None, **kwargs: Any) -> SchedulerOutput | tuple:
        if self._grid is None:
            raise ValueError("call set_timesteps before step")
        if self._sampler is None:
            if self._calls:
                raise ValueError("the sampler already finished; call set_timesteps again")
            self._sampler = self._new_sampler(sample, generator)
            next(self._sampler)
        eps = model_output
        if self.config.prediction_type != "epsilon":
            t = float(torch.as_tensor(timestep).reshape(-1)[0])
            eps = to_eps(model_output, sample, self.schedule.alpha_bar(t), self.config.prediction_type)
        if not torch.isfinite(eps).all():
            raise FloatingPointError(f"model output is non-finite at call {self._calls + 1} (t={timestep})")
        self._calls += 1
        try:
            prev, _ = self._sampler.send(eps.to(sample.dtype))
        except StopIteration as stop:
            prev, self._sampler = stop.value, None
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        a = self.schedule.alphas_cumprod.to(original.device)[timesteps.long()].to(original.dtype)
        a = a.reshape(-1, *([1] * (original.ndim - 1)))
        return a.sqrt() * original + (1 - a).sqrt() * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def as_diffusers_scheduler(name: str, config: Any = None, **kwargs: Any) -> AccelerandoScheduler:
    """Our sampler ``name`` as a scheduler; ``config`` (e.g. ``pipe.scheduler.config``) gives the betas."""
    base = {k: config[k] for k in _CONFIG_KEYS if config is not None and k in config and config[k] is not None}
    base.update(kwargs)
    return AccelerandoScheduler(method=name, **base)
