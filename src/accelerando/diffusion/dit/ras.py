"""Region-Adaptive Sampling (Liu et al. 2025, "Region-Adaptive Sampling for Diffusion Transformers").

Per step only the tokens in the model's current focus go through the DiT; the others keep the noise
they were given last time. Focus is read off the previous output: the per-token spread (std, or L2
norm) of the predicted noise, times a starvation factor ``exp(starvation * steps since the token was
last updated)`` so no region is left behind. Active tokens attend over every token: the keys and
values of the others are the ones cached when they were last computed (RAS's attention KV cache), so
a RAS step computes Q/K/V, attention rows and MLP for the active tokens only. Full steps (the whole
model, all caches refreshed): the first ``warmup`` steps, the paper's error-reset steps
(``reset_steps``, and every ``full_every``-th RAS step), and every step from ``dense_from`` on (the
paper's scheduler end step: the last, detail-refining steps run dense).

``forecast=True`` (ours): a token left out of a step returns, instead of its last noise, the line
through its last two computed noise values extrapolated to the current timestep (a first-order
TaylorSeer forecast, Liu et al. 2025, per token and with each token's own times), at most one such
span ahead; ``forecast_kv=True`` extrapolates the cached keys and values the active tokens attend
over the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .core import block_forward, embed, final_layer, patchify, unpatchify
from .denoiser import Counts

CRITERIA = ("std", "l2", "delta")


@dataclass(frozen=True)
class RASConfig:
    ratio: float = 0.5                 # fraction of tokens updated per RAS step, in (0, 1]
    warmup: int = 4                    # full steps at the start (>= 1)
    full_every: int = 0                # a full step every k RAS steps (0 = never)
    reset_steps: tuple[int, ...] = ()  # step indices (0-based) that run full: the paper's error reset
    dense_from: int | None = None      # every step >= this index runs full (None: none)
    criterion: str = "std"             # per-token focus score: std / l2 of the previous noise output (the
                                       # paper), or "delta": how much it changed when last computed
    starvation: float = 0.25           # score *= exp(starvation * staleness)
    forecast: bool = False             # tokens left out: extrapolate their noise linearly in t, not reuse it
    forecast_kv: bool = False          # ... and their cached keys / values (needs forecast)

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"region ratio must be in (0, 1], got {self.ratio}")
        if self.warmup < 1:
            raise ValueError(f"RAS warmup must be >= 1 full step, got {self.warmup}")
        if self.full_every < 0:
            raise ValueError(f"full_every must be >= 0, got {self.full_every}")
        object.__setattr__(self, "reset_steps", tuple(int(i) for i in self.reset_steps))
        if any(i < 0 for i in self.reset_steps):
            raise ValueError(f"reset_steps must be step indices >= 0, got {self.reset_steps}")
        if self.dense_from is not None and self.dense_from < 1:
            raise ValueError(f"dense_from must be a step index >= 1 or None, got {self.dense_from}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if self.forecast_kv and not self.forecast:
            raise ValueError("forecast_kv=True needs forecast=True")
        if self.starvation < 0:
            raise ValueError(f"starvation must be >= 0, got {self.starvation}")


class RegionAdaptive:
    """State per trajectory: last noise patches (B, N, P), staleness (B, N), per-block keys and values
    (B, N, D) each."""

    def __init__(self, config: RASConfig | None = None, **kw: Any) -> None:
        self.config = config if config is not None else RASConfig(**kw)
        self.reset()

    def reset(self) -> None:
        self.eps_patches: torch.Tensor | None = None
        self.stale: torch.Tensor | None = None
        self.delta: torch.Tensor | None = None
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        # forecast: each token's previous noise and the timesteps of its last two computations (B, N)
        self.eps_prev: torch.Tensor | None = None
        self.t_last: torch.Tensor | None = None
        self.t_prev: torch.Tensor | None = None
        # forecast_kv: per block, each token's last change of its keys / values (B, N, D) each
        self.kv_diff: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _remember(self, t: torch.Tensor, new: torch.Tensor, idx: torch.Tensor | None) -> None:
        """Shift (noise, time) of the tokens just computed (all if ``idx`` is None) into the forecast history."""
        tt = t.to(new.dtype)[:, None].expand(new.shape[0], new.shape[1])     # (B, N) or (B, k)
        if idx is None or self.eps_prev is None:
            full = self.eps_prev is not None and self.eps_prev.shape == new.shape and idx is None
            self.eps_prev = self.eps_patches if full else new
            self.t_prev = self.t_last if full else tt.clone()
            self.t_last = tt.clone()
            return
        at = idx[..., None].expand(*idx.shape, new.shape[-1])
        self.eps_prev = self.eps_prev.scatter(1, at, self.eps_patches.gather(1, at))
        self.t_prev = self.t_prev.scatter(1, idx, self.t_last.gather(1, idx))
        self.t_last = self.t_last.scatter(1, idx, tt)

    def _slope(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N): how far t lies past each token's last computation, in units of its last span (0 where
        the two share a timestep; at most 1: no further ahead than the span the line was fitted on)."""
        dt = self.t_last - self.t_prev
        ahead = (t.to(dt.dtype)[:, None] - self.t_last) / torch.where(dt != 0, dt, 1.0)
        return torch.where(dt != 0, ahead, 0.0).clamp(0.0, 1.0)

    def _predict(self, t: torch.Tensor) -> torch.Tensor:
        """Every token's noise at t: the line through its last two values (its last value where they
        share a timestep)."""
        e1, e0 = self.eps_patches, self.eps_prev
        return e1 + self._slope(t)[..., None] * (e1 - e0)

    def is_noop(self) -> bool:
        return self.config.ratio == 1.0

    def _full_step(self, step: int, x: torch.Tensor) -> bool:
        c = self.config
        if c.ratio == 1.0 or step < c.warmup or self.eps_patches is None or self.eps_patches.shape[0] != x.shape[0]:
            return True
        if step in c.reset_steps or (c.dense_from is not None and step >= c.dense_from):
            return True
        return c.full_every > 0 and (step - c.warmup) % c.full_every == c.full_every - 1

    def focus(self, n_active: int) -> torch.Tensor:
        """Indices (B, k) of the tokens to update: top-k of score * exp(starvation * staleness)."""
        e, crit = self.eps_patches, self.config.criterion
        score = e.std(-1) if crit == "std" else self.delta if crit == "delta" else e.norm(dim=-1)
        score = score * torch.exp(self.config.starvation * self.stale)
        return score.topk(n_active, dim=-1).indices

    def forward(self, model: Any, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, step: int,
                counts: Counts) -> torch.Tensor:
        h = embed(model, x)                                                    # (B, N, D)
        b, n, d = h.shape
        blocks = model.transformer_blocks
        if self._full_step(step, x):
            old_kv, self.kv = self.kv, []
            for blk in blocks:
                h = block_forward(blk, h, t, y, kv=lambda k, v: self.kv.append((k, v)) or (k, v))
            if self.config.forecast_kv:
                same = bool(old_kv) and old_kv[0][0].shape == self.kv[0][0].shape
                self.kv_diff = ([(k - k0, v - v0) for (k, v), (k0, v0) in zip(self.kv, old_kv)] if same else
                                [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in self.kv])
            new = final_layer(model, h, t, y)
            # "delta": where the noise prediction still moves, the region is still being decided
            self.delta = (new - self.eps_patches).norm(dim=-1) if self.eps_patches is not None and \
                self.eps_patches.shape == new.shape else new.norm(dim=-1)
            if self.config.forecast:
                self._remember(t, new, None)
            self.eps_patches = new
            self.stale = torch.zeros(b, n, device=x.device)
            counts.add(blocks=len(blocks), tokens=n, model=model, batch=b)
            return unpatchify(model, self.eps_patches)
        k = max(1, math.ceil(self.config.ratio * n))
        idx = self.focus(k)                                                    # (B, k)
        gather = idx[..., None].expand(b, k, d)
        h = h.gather(1, gather)                                                # (B, k, D)
        ahead = self._slope(t).scatter(1, idx, 0.0)[..., None] if self.config.forecast_kv else None   # (B, N, 1)
        for i, blk in enumerate(blocks):
            def kv(k_new: torch.Tensor, v_new: torch.Tensor, i: int = i) -> tuple[torch.Tensor, torch.Tensor]:
                k_all, v_all = self.kv[i]          # active tokens' K/V fresh, the others' as last computed
                at = idx[..., None].expand(b, k, k_new.shape[-1])
                if ahead is None:
                    return k_all.scatter_(1, at, k_new), v_all.scatter_(1, at, v_new)
                # the active tokens' change since they last ran replaces their stored one; one fused
                # multiply-add over all tokens then moves the others along their last change
                dk, dv = self.kv_diff[i]
                dk.scatter_(1, at, k_new - k_all.gather(1, at))
                dv.scatter_(1, at, v_new - v_all.gather(1, at))
                k_all.scatter_(1, at, k_new)
                v_all.scatter_(1, at, v_new)
                return torch.addcmul(k_all, ahead, dk), torch.addcmul(v_all, ahead, dv)
            h = block_forward(blk, h, t, y, kv=kv)
        out = final_layer(model, h, t, y)                                      # (B, k, P)
        at = idx[..., None].expand(b, k, out.shape[-1])
        self.delta = self.delta.scatter(1, idx, (out - self.eps_patches.gather(1, at)).norm(dim=-1))
        if self.config.forecast:
            self._remember(t, out, idx)
        self.eps_patches = self.eps_patches.scatter(1, at, out)
        self.stale = (self.stale + 1).scatter(1, idx, 0.0)
        counts.add(blocks=len(blocks), tokens=k, model=model, batch=b)
        return unpatchify(model, self._predict(t) if self.config.forecast else self.eps_patches)


def patch_noise(model: Any, eps: torch.Tensor) -> torch.Tensor:
    """A noise image as the (B, N, P) patches RAS scores (for inspection and tests)."""
    return patchify(model, eps)
