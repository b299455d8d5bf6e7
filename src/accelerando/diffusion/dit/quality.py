"""Same-seed image quality against the full-compute output: PSNR and SSIM (Wang et al. 2004,
"Image Quality Assessment: From Error Visibility to Structural Similarity"), images in [-1, 1]."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, ref: torch.Tensor, *, data_range: float = 2.0) -> float:
    """Mean over images of 10 log10(range^2 / MSE) (inf where an image is identical)."""
    mse = ((x.double() - ref.double()) ** 2).flatten(1).mean(1)
    vals = 10 * torch.log10(data_range ** 2 / mse)
    return float(vals.mean()) if torch.isfinite(vals).all() else (math.inf if (mse == 0).all() else
                                                                   float(vals[torch.isfinite(vals)].mean()))


def ssim(x: torch.Tensor, ref: torch.Tensor, *, data_range: float = 2.0, window: int = 7, sigma: float = 1.5) -> float:
    """Mean SSIM with a Gaussian window (valid positions only), per channel, averaged over images."""
    x, ref = x.double(), ref.double()
    c = x.shape[1]
    g = torch.exp(-((torch.arange(window, dtype=torch.float64) - window // 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum())
    w = (g[:, None] * g[None, :]).expand(c, 1, window, window)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(ref, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x ** 2
    syy = F.conv2d(ref * ref, w, groups=c) - mu_y ** 2
    sxy = F.conv2d(x * ref, w, groups=c) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return float(s.mean())
