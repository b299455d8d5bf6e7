"""Which steps a forecasting block cache computes, chosen by the error of the final image.

HarmoniCa (Huang et al. 2024) weights each step by an image-error proxy: how much the *final* image
moves when that step uses the cache. Here the proxy picks the steps directly: starting from every
step computed, greedy backward elimination drops, round by round, the ``drop`` steps whose switch to
the cache (a TaylorSeer-style forecast, ``BlockCache(order=...)``) moves the final image least, with
the steps dropped so far already cached, until ``keep`` of the steps remain. Every block of a step runs
or none does, so the result is a (steps, blocks) router table of whole rows. The calibration images
come from ``generator`` (use other seeds than the ones you evaluate on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .cache import BlockCache, BlockCacheConfig
from .core import check_dit
from .denoiser import DiTDenoiser


@dataclass(frozen=True)
class StepSearchConfig:
    steps: int = 20                    # sampler steps (model calls) of the schedule searched
    keep: float = 0.5                  # fraction of steps that compute every block, in (0, 1]
    order: int = 2                     # the cache's forecast order (0 = plain reuse)
    method: str = "ddim"               # the sampler
    guidance: float = 1.0
    batch: int = 4                     # calibration images
    drop: int = 1                      # steps dropped per round (> 1: fewer trajectories on long schedules)

    def __post_init__(self) -> None:
        if self.steps < 2:
            raise ValueError(f"step search needs steps >= 2, got {self.steps}")
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if self.order not in (0, 1, 2):
            raise ValueError(f"forecast order must be 0, 1 or 2, got {self.order}")
        if self.batch < 1 or self.drop < 1 or self.guidance < 0:
            raise ValueError("need batch >= 1, drop >= 1 and guidance >= 0")


def rows_table(computed: torch.Tensor, blocks: int) -> torch.Tensor:
    """(steps,) bool -> the (steps, blocks) router table that runs every block of a computed step."""
    return computed.bool()[:, None].expand(-1, blocks).clone()


def forecast_cache(computed: torch.Tensor, blocks: int, *, order: int = 2) -> BlockCache:
    """The inference-time method: whole steps computed where ``computed`` is True, forecast elsewhere."""
    return BlockCache(BlockCacheConfig(policy="router", router=rows_table(computed, blocks), order=order))


@torch.no_grad()
def search_steps(model: Any, config: StepSearchConfig | None = None, *, generator: torch.Generator | None = None,
                 progress: Callable[[str], Any] | None = None) -> torch.Tensor:
    """Greedy backward elimination of computed steps by the final-image MSE against full compute;
    returns the (steps,) bool of steps that run (step 0 always does: the cache must exist)."""
    from accelerando.diffusion import sample
    check_dit(model, who="step search")
    cfg = config or StepSearchConfig()
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    size, blocks = model.config.sample_size, len(model.transformer_blocks)
    x_T = torch.randn(cfg.batch, model.config.in_channels, size, size, generator=g)
    labels = torch.randint(0, int(model.config.num_embeds_ada_norm), (cfg.batch,), generator=g)

    def final(method: Any) -> torch.Tensor:
        return sample(DiTDenoiser(model, labels, guidance=cfg.guidance, method=method), x_T, method=cfg.method,
                      steps=cfg.steps).clamp(-1, 1)
    ref = final(None)
    computed = torch.ones(cfg.steps, dtype=torch.bool)
    target = max(1, math.ceil(cfg.keep * cfg.steps))
    while int(computed.sum()) > target:
        errs = {}
        for s in (int(i) for i in computed.nonzero() if int(i) > 0):
            trial = computed.clone()
            trial[s] = False
            errs[s] = float(((final(forecast_cache(trial, blocks, order=cfg.order)) - ref) ** 2).mean())
        n_drop = min(cfg.drop, int(computed.sum()) - target)
        for s in sorted(errs, key=errs.get)[:n_drop]:
            computed[s] = False
        if progress is not None:
            progress(f"{int(computed.sum())} steps computed, final-image MSE {min(errs.values()):.2e}")
    return computed


__all__ = ["StepSearchConfig", "forecast_cache", "rows_table", "search_steps"]
