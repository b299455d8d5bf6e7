"""``DiTDenoiser``: a DiT as the ``eps_fn(x, t)`` every sampler takes, with classifier-free guidance
and an optional acceleration method wrapped around the model (DESIGN principle 2: methods wrap the
denoiser, samplers stay as they are). It counts the work done in token-block units, so the fraction
of block evaluations a method skipped is measured, not assumed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .core import check_dit


@dataclass
class Counts:
    """Work done: ``units`` token-block evaluations out of ``full_units`` a full model would do."""
    calls: int = 0
    units: float = 0.0
    full_units: float = 0.0

    @property
    def skipped_fraction(self) -> float:
        return 1.0 - self.units / self.full_units if self.full_units else 0.0

    def add(self, *, blocks: float, tokens: float, model: Any, batch: int) -> None:
        """Record ``blocks`` blocks run on ``tokens`` tokens each (per image) for a batch."""
        n = model.pos_embed.height * model.pos_embed.width
        self.units += batch * blocks * tokens
        self.full_units += batch * len(model.transformer_blocks) * n


class Method(Protocol):
    def reset(self) -> None: ...

    def forward(self, model: Any, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, step: int,
                counts: Counts) -> torch.Tensor: ...


class DiTDenoiser:
    """eps(x, t) of a class-conditional DiT (``labels`` per sample; None: sample i gets i mod classes);
    ``guidance`` w gives eps_u + w (eps_c - eps_u) with the
    null class ``null_class`` (Ho & Salimans 2022), one batched call for both halves.

    A new trajectory starts (method state reset, step 0) at the first call, after ``reset()``, or when
    t rises above the previous call's t.
    """

    def __init__(self, model: Any, labels: torch.Tensor | None = None, *, guidance: float = 1.0,
                 method: Method | None = None, null_class: int | None = None) -> None:
        check_dit(model)
        if guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {guidance}")
        self.model, self.method, self.guidance = model, method, float(guidance)
        # None: sample i of a batch gets label i % classes (a fixed, batch-size-free choice for benchmarks)
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.null_class = int(model.config.num_embeds_ada_norm if null_class is None else null_class)
        self.counts = Counts()
        self._noop = bool(getattr(method, "is_noop", lambda: False)())
        self.reset()

    def reset(self) -> None:
        self.step, self._last_t = 0, None
        if self.method is not None:
            self.method.reset()

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        t = (t.to(torch.float32) if t.is_floating_point() else t).reshape(-1).expand(x.shape[0])
        t0 = float(t[0])                       # one host sync per call: the trajectory bookkeeping
        if self._last_t is not None and t0 > self._last_t:
            self.reset()
        self._last_t = t0
        if self.labels is None:
            y = torch.arange(x.shape[0], device=x.device) % int(self.model.config.num_embeds_ada_norm)
        else:
            y = self.labels.to(x.device).expand(x.shape[0]) if self.labels.ndim == 0 else self.labels.to(x.device)
        cfg = self.guidance != 1.0
        if cfg:
            # [uncond, cond], diffusers' order (FasterCache relies on it)
            x, t, y = torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.full_like(y, self.null_class), y])
        if self.method is None or self._noop:
            # a method set to skip nothing adds only its bookkeeping: run the plain model instead
            out = self.model(x, t, class_labels=y).sample
            self.counts.add(blocks=len(self.model.transformer_blocks), tokens=out.shape[-1] * out.shape[-2]
                            / self.model.patch_size ** 2, model=self.model, batch=x.shape[0])
        else:
            out = self.method.forward(self.model, x, t, y, step=self.step, counts=self.counts)
        self.counts.calls += 1
        self.step += 1
        if not cfg:
            return out
        e_u, e_c = out.chunk(2)
        return e_u + self.guidance * (e_c - e_u)
