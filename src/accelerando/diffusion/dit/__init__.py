"""Diffusion-transformer acceleration that wraps the denoiser: block caching (static / threshold /
HarmoniCa's learned router), Region-Adaptive Sampling, token merging; diffusers' cache hooks as
anchors; USF solver-schedule search. All work on a diffusers ``DiTTransformer2DModel``.

    from accelerando.diffusion.dit import DiTDenoiser, BlockCache, RegionAdaptive
    eps = DiTDenoiser(model, labels, guidance=1.5, method=RegionAdaptive(ratio=0.5))
    x0 = accelerando.diffusion.sample(eps, x_T, method="ddim", steps=20)
    eps.counts.skipped_fraction
"""

from .cache import BlockCache, BlockCacheConfig
from .core import check_dit, full_forward
from .denoiser import Counts, DiTDenoiser
from .ras import RASConfig, RegionAdaptive
from .tome import ToMeConfig, TokenMerging

__all__ = ["BlockCache", "BlockCacheConfig", "Counts", "DiTDenoiser", "RASConfig", "RegionAdaptive", "ToMeConfig",
           "TokenMerging", "check_dit", "full_forward"]
