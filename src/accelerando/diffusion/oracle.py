"""Exact-score oracle: a Gaussian mixture whose eps(x, t) under the VP process is closed form.

Marginal at alpha_bar a: ``sum_k pi_k N(sqrt(a) mu_k, a Sigma_k + (1 - a) I)`` (diagonal Sigma_k);
``eps = -sqrt(1 - a) * score``.  ``reference`` solves the probability-flow ODE to ~1e-11 in DDIM
coordinates (``d xbar / d s = eps``, float64, scipy's DOP853), the ground truth for solver error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .samplers._common import s_of


@dataclass(frozen=True)
class GaussianMixture:
    """Data distribution sum_k pi_k N(mu_k, diag(var_k)) in d dimensions, and its VP schedule."""

    weights: torch.Tensor      # (K,)
    means: torch.Tensor        # (K, d)
    variances: torch.Tensor    # (K, d), > 0
    schedule: Any

    def __post_init__(self) -> None:
        K, d = self.means.shape
        if self.weights.shape != (K,) or self.variances.shape != (K, d):
            raise ValueError("weights (K,), means (K, d), variances (K, d) must agree")
        if not bool((self.variances > 0).all()) or abs(float(self.weights.sum()) - 1) > 1e-9:
            raise ValueError("variances must be > 0 and weights must sum to 1")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def eps_at(self, x: torch.Tensor, a: float | torch.Tensor | list) -> torch.Tensor:
        """Exact eps for x of shape (B, d) at alpha_bar a (a float or one value per row)."""
        a_np = np.asarray(torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1, 1))
        e = self._eps_np(x.detach().cpu().to(torch.float64).numpy(), a_np)
        return torch.from_numpy(e).to(device=x.device, dtype=x.dtype)

    def _eps_np(self, x: np.ndarray, a: np.ndarray | float) -> np.ndarray:
        # numpy, not torch: tiny reductions in torch wake its thread pool, slow on a busy host
        logw = np.log(self.weights.to(torch.float64).numpy())[None]             # (1, K)
        mu, var = self.means.to(torch.float64).numpy()[None], self.variances.to(torch.float64).numpy()[None]
        C = a * var + (1 - a)                                                    # (B, K, d)
        diff = np.sqrt(a) * mu - x[:, None, :]                                   # (B, K, d)
        logp = logw - 0.5 * (diff ** 2 / C + np.log(C)).sum(-1)                  # (B, K)
        w = np.exp(logp - logp.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)                                             # posterior weights
        score = (w[..., None] * diff / C).sum(1)                                 # (B, d)
        return -np.sqrt(1 - np.reshape(a, (-1, 1))) * score

    def eps_fn(self, x: torch.Tensor, t: Any) -> torch.Tensor:
        """eps(x, t) with (float or integer) model times, the sampler convention; x is (B, ...)."""
        shape = x.shape
        tt = torch.as_tensor(t).reshape(-1).tolist()
        a = [self.schedule.alpha_bar(float(v)) for v in tt]
        e = self.eps_at(x.reshape(shape[0], -1), a if len(a) > 1 else a[0])
        return e.reshape(shape)

    def sample_data(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights.to(torch.float64), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means.to(torch.float64)[k] + self.variances.to(torch.float64)[k].sqrt() * z

    def reference(self, x_start: torch.Tensor, ab_start: float, ab_end: float, *,
                  rtol: float = 1e-11, atol: float = 1e-11) -> torch.Tensor:
        """The exact probability-flow ODE solution from x at ab_start to ab_end (float64)."""
        from scipy.integrate import solve_ivp

        shape = x_start.shape
        x = x_start.reshape(shape[0], -1).to(torch.float64)
        xbar0 = (x / math.sqrt(ab_start)).numpy().ravel()

        def rhs(s: float, y: np.ndarray) -> np.ndarray:
            a = 1.0 / (1.0 + s * s)
            return self._eps_np(y.reshape(x.shape) * math.sqrt(a), a).ravel()

        sol = solve_ivp(rhs, (s_of(ab_start), s_of(ab_end)), xbar0, method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"reference ODE solve failed: {sol.message}")
        xbar = torch.from_numpy(sol.y[:, -1].reshape(x.shape))
        return (xbar * math.sqrt(ab_end)).reshape(shape)


def random_mixture(dim: int = 2, components: int = 4, *, schedule: Any, seed: int = 0,
                   spread: float = 1.5, min_var: float = 0.02, max_var: float = 0.3) -> GaussianMixture:
    """A reproducible mixture: means ~ N(0, spread^2 / d) per coordinate, diagonal variances in range."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(components, dim, generator=g, dtype=torch.float64) * spread / math.sqrt(max(dim, 1)) ** 0.5
    var = min_var + (max_var - min_var) * torch.rand(components, dim, generator=g, dtype=torch.float64)
    w = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
    return GaussianMixture(w / w.sum(), means, var, schedule)
