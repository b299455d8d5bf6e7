"""Training-free fast diffusion samplers: DDIM, the PNDM family, DPM-Solver++, momentum; an exact
Gaussian-mixture oracle; an adapter that plugs any of them into a diffusers pipeline."""

from .api import (METHODS, SPECS, BelowMinimumError, NonFiniteError, SampleInfo, SamplerSpec, min_nfe, nfe_for,
                  register_sampler, sample, sample_with_info, steps_for_nfe)
from .samplers._common import Grid, grid_between, make_grid
from .schedules import ContinuousSchedule, Schedule, make_schedule, timesteps


def as_diffusers_scheduler(name: str, config=None, **kwargs):
    """A diffusers scheduler (SchedulerMixin, ConfigMixin) running our sampler ``name``."""
    from .diffusers_scheduler import as_diffusers_scheduler as _make
    return _make(name, config, **kwargs)


__all__ = ["METHODS", "SPECS", "BelowMinimumError", "NonFiniteError", "SampleInfo", "SamplerSpec", "register_sampler",
           "sample", "sample_with_info",
           "nfe_for", "min_nfe", "steps_for_nfe", "Grid", "grid_between", "make_grid", "ContinuousSchedule", "Schedule",
           "make_schedule", "timesteps", "as_diffusers_scheduler"]
