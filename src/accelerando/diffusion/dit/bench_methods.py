"""Registers the DiT acceleration methods as arms of ``accelerando bench`` / ``sweep`` (family
"diffusion"). They apply to DiT workloads only (the setup's eps_fn is a ``DiTDenoiser``; others raise
``NotApplicable``) and sample with DDIM at the workload's budget, so their speed-up and quality loss
are against the DDIM baseline of the same workload; ``stats`` carries the counted skipped fraction."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ...bench.methods import DiffusionOutput, DiffusionSetup, MethodEntry, NotApplicable, register


def _cache(**kw: Any) -> Callable[[], Any]:
    from .cache import BlockCache
    return lambda: BlockCache(**kw)


def _ras(**kw: Any) -> Callable[[], Any]:
    from .ras import RegionAdaptive
    return lambda: RegionAdaptive(**kw)


def _tome(**kw: Any) -> Callable[[], Any]:
    from .tome import TokenMerging
    return lambda: TokenMerging(**kw)


def _hook(kind: str, **kw: Any) -> Callable[[], Any]:
    from .hooks import DiffusersCache
    return lambda: DiffusersCache(kind, **kw)


ARMS: dict[str, tuple[Callable[..., Callable[[], Any]], dict[str, Any], str]] = {
    "dit-cache-static": (_cache, {"policy": "static", "interval": 2}, "block cache, all blocks every 2nd step (FORA)"),
    "dit-cache-threshold": (_cache, {"policy": "threshold", "threshold": 0.1},
                            "block cache, a block runs when its input moved >= threshold (relative L1)"),
    "dit-ras": (_ras, {"ratio": 0.5, "warmup": 3, "full_every": 3},
                "Region-Adaptive Sampling, half the tokens per step, a full step every 3rd (error reset)"),
    "dit-tome": (_tome, {"ratio": 0.5}, "ToMe token merging before attention and MLP"),
    "dit-diffusers-fbc": (lambda **kw: _hook("first-block", **kw), {"threshold": 0.1}, "diffusers FirstBlockCache"),
    "dit-diffusers-taylorseer": (lambda **kw: _hook("taylorseer", **kw), {"interval": 2, "warmup": 3},
                                 "diffusers TaylorSeer (DiT identifiers)"),
}


def _build(name: str) -> Callable[..., Callable[[], DiffusionOutput]]:
    make, defaults, _ = ARMS[name]

    def build(setup: DiffusionSetup, **knobs: Any) -> Callable[[], DiffusionOutput]:
        from accelerando.diffusion.api import sample_with_info
        from .denoiser import DiTDenoiser
        base = setup.eps_fn
        if not isinstance(base, DiTDenoiser):
            raise NotApplicable(f"{name} needs a DiT workload (diffusers DiTTransformer2DModel)")
        # one method object for all runs (a new trajectory resets it): a diffusers hook copies and hooks
        # the model once, in the untimed warm-up run, not inside every timed one; bad knobs fail here
        method = make(**{**defaults, **knobs})()

        def run() -> DiffusionOutput:
            eps = DiTDenoiser(base.model, base.labels, guidance=base.guidance, method=method)
            g = torch.Generator(device=setup.x_T.device).manual_seed(setup.seed)
            x0, info = sample_with_info(eps, setup.x_T, schedule=setup.schedule, method="ddim", steps=setup.steps,
                                        spacing=setup.spacing, generator=g)
            return DiffusionOutput(x0=x0, nfe=info.nfe, stats={"steps": setup.steps,
                                                              "skipped_fraction": eps.counts.skipped_fraction})
        return run
    return build


for _name, (_make, _defaults, _desc) in ARMS.items():
    register(MethodEntry(name=_name, family="diffusion", build=_build(_name), lossless=False, description=_desc,
                         default_knobs=dict(_defaults)))
