"""Registers every sampler (ours and diffusers' step() loops) in ``accelerando.bench.methods``.

``setup.steps`` is the **model-call budget**: each method runs the most grid steps whose NFE fits
(F-PNDM with 20 calls runs 11 steps), so all methods compare at equal cost. A budget below a
method's minimum (``min_nfe``: F-PNDM 13, PRK / FON 11) raises ``NotApplicable`` at build time. The baseline is DDIM
at the same NFE (``ddim``, ``is_baseline=True``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..bench.methods import DiffusionOutput, DiffusionSetup, MethodEntry, NotApplicable, register
from .api import SPECS, BelowMinimumError, check_budget, sample_with_info

DIFFUSERS_METHODS = {
    # name: (scheduler class, extra config, NFE for N steps)
    "diffusers-ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}, lambda n: n),
    "diffusers-pndm": ("PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": True}, lambda n: n + 1),
    "diffusers-dpmpp2m": ("DPMSolverMultistepScheduler",
                          {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"}, lambda n: n),
    "diffusers-unipc": ("UniPCMultistepScheduler", {"solver_order": 2, "final_sigmas_type": "zero"}, lambda n: n),
}


def _steps(name: str, nfe: int, cost: Callable[[int], int], min_steps: int = 1) -> int:
    best = max((n for n in range(min_steps, nfe + 1) if cost(n) <= nfe), default=None)
    if best is None:
        raise NotApplicable(f"{name} cannot run within {nfe} model calls (needs {cost(min_steps)})")
    return best


def _sampler_knobs(name: str) -> tuple[str, ...]:
    """The options a sampler takes beyond (x, grid): its spec's defaults and its keyword parameters."""
    import inspect
    spec = SPECS[name]
    params = [p for p in list(inspect.signature(spec.fn).parameters)[2:] if p != "generator"]
    return tuple(dict.fromkeys([*spec.knobs, *params]))


def _ours(name: str) -> Callable[..., Callable[[], DiffusionOutput]]:
    sampler_knobs = _sampler_knobs(name)

    def build(setup: DiffusionSetup, *, match_nfe: bool = True, float_t: bool = False, spacing: str | None = None,
              **knobs: Any):
        """``spacing`` overrides the workload's timestep spacing for this method."""
        bad = [k for k in knobs if k not in sampler_knobs]
        if bad:
            raise TypeError(f"{name} has no knob {bad[0]!r} (its knobs: {', '.join(build.knobs)})")
        try:
            steps = check_budget(name, setup.steps, setup.schedule) if match_nfe else setup.steps
        except BelowMinimumError as exc:
            raise NotApplicable(str(exc)) from None
        sp = setup.spacing if spacing is None else spacing

        def run() -> DiffusionOutput:
            g = torch.Generator(device=setup.x_T.device).manual_seed(setup.seed)
            x0, info = sample_with_info(setup.eps_fn, setup.x_T, schedule=setup.schedule, method=name, steps=steps,
                                        spacing=sp, generator=g, float_t=float_t, **knobs)
            return DiffusionOutput(x0=x0, nfe=info.nfe, stats={"steps": steps, "t_start": info.times[0]})
        return run
    build.knobs = ("match_nfe", "float_t", "spacing", *sampler_knobs)      # what the runner checks --knob against
    return build


def diffusers_scheduler_for(name: str, schedule: Any, spacing: str):
    """diffusers' own scheduler ``name`` on our schedule's table (as ``trained_betas``)."""
    import diffusers
    cls_name, extra, _ = DIFFUSERS_METHODS[name]
    ac = schedule.alphas_cumprod
    betas = torch.cat([1 - ac[:1], 1 - ac[1:] / ac[:-1]]).tolist()
    return getattr(diffusers, cls_name)(num_train_timesteps=len(ac), trained_betas=betas,
                                        timestep_spacing=spacing, **extra)


def run_diffusers_loop(sched: Any, eps_fn: Callable, x_T: torch.Tensor, steps: int) -> tuple[torch.Tensor, int]:
    """The standard pipeline loop over ``sched.timesteps``; returns (x0, model calls)."""
    sched.set_timesteps(steps)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        e = eps_fn(sched.scale_model_input(x, t), t.reshape(1).expand(x.shape[0]))
        x = sched.step(e, t, x).prev_sample
    return x, len(sched.timesteps)


def _theirs(name: str) -> Callable[..., Callable[[], DiffusionOutput]]:
    def build(setup: DiffusionSetup, *, match_nfe: bool = True):
        cost = DIFFUSERS_METHODS[name][2]
        steps = _steps(name, setup.steps, cost, 2 if name == "diffusers-pndm" else 1) if match_nfe else setup.steps
        sched = diffusers_scheduler_for(name, setup.schedule, setup.spacing)

        def run() -> DiffusionOutput:
            x0, nfe = run_diffusers_loop(sched, setup.eps_fn, setup.x_T, steps)
            return DiffusionOutput(x0=x0, nfe=nfe, stats={"steps": steps, "t_start": float(sched.timesteps[0])})
        return run
    return build


for _spec in SPECS.values():
    register(MethodEntry(name=_spec.name, family="diffusion", build=_ours(_spec.name), lossless=False,
                         description=f"{_spec.description}; NFE {_spec.nfe_formula}, order {_spec.order}",
                         is_baseline=_spec.name == "ddim"))
for _name in DIFFUSERS_METHODS:
    register(MethodEntry(name=_name, family="diffusion", build=_theirs(_name), lossless=False,
                         description=f"diffusers' {DIFFUSERS_METHODS[_name][0]} through its step() loop"))
