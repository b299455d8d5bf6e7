"""diffusers' own cache hooks on a DiT, as the anchors our caching is measured against.

``DiTTransformer2DModel`` is not a ``CacheMixin`` (no ``enable_cache`` / ``cache_context``), so the
hooks are applied with ``diffusers.hooks.apply_*`` and every call runs inside an explicit cache
context. TaylorSeer's default identifiers (``^transformer_blocks.*attn`` under ``re.fullmatch``) match
no DiT module (``transformer_blocks.0.attn1``), so it gets DiT identifiers for attention and MLP, and
MagCache's per-model ratios come from one calibration run on the same sampler; FasterCache's
unconditional-branch skip halves inputs it finds by keyword, so the DiT is called by keyword and
its ``class_labels`` are declared batched. The hooks run on a
private copy of the model; block work is counted by the attention ``to_q`` and MLP output projections
that actually run, so a skip the hook makes is seen, not assumed.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
from typing import Any, Callable

import torch

from .core import check_dit
from .denoiser import Counts

HOOKS = ("first-block", "taylorseer", "pab", "faster", "mag")
DIT_ATTN = r"transformer_blocks\.\d+\.attn1"
DIT_FF = r"transformer_blocks\.\d+\.ff"


def _config(kind: str, knobs: dict[str, Any], timestep: Callable[[], float], steps: int | None) -> Any:
    import diffusers.hooks as H
    if kind == "first-block":
        thr = knobs.get("threshold", 0.05)
        if not 0.0 <= thr <= 1.0:
            raise ValueError(f"first-block cache threshold must be in [0, 1], got {thr}")
        return H.FirstBlockCacheConfig(threshold=thr)
    for knob in ("interval", "skip", "uncond_skip", "max_skip"):
        if knob in knobs and int(knobs[knob]) < 1:
            raise ValueError(f"{kind} hook: {knob} must be >= 1, got {knobs[knob]}")
    if kind == "taylorseer":
        return H.TaylorSeerCacheConfig(cache_interval=knobs.get("interval", 2), max_order=knobs.get("order", 1),
                                       disable_cache_before_step=knobs.get("warmup", 2),
                                       taylor_factors_dtype=torch.float32, cache_identifiers=[DIT_ATTN, DIT_FF])
    if kind == "pab":
        return H.PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=knobs.get("skip", 2),
            spatial_attention_timestep_skip_range=tuple(knobs.get("t_range", (100, 800))),
            current_timestep_callback=timestep)
    if kind == "faster":
        return H.FasterCacheConfig(spatial_attention_block_skip_range=knobs.get("skip", 2),
                                   spatial_attention_timestep_skip_range=(-1, knobs.get("t_max", 681)),
                                   unconditional_batch_skip_range=knobs.get("uncond_skip", 5),
                                   tensor_format="BCHW", current_timestep_callback=timestep,
                                   attention_weight_callback=lambda _: 0.5,
                                   # the DiT's label is batched [uncond, cond] like the latents: halve it too
                                   _unconditional_conditional_input_kwargs_identifiers=[
                                       "hidden_states", "timestep", "class_labels"])
    if kind == "mag":
        if not 0.0 <= knobs.get("threshold", 0.06) <= 1.0:
            raise ValueError(f"mag cache threshold must be in [0, 1], got {knobs['threshold']}")
        if knobs.get("mag_ratios") is None:
            raise ValueError("the mag hook needs mag_ratios= (get them with calibrate_mag_ratios)")
        return H.MagCacheConfig(threshold=knobs.get("threshold", 0.06), max_skip_steps=knobs.get("max_skip", 3),
                                retention_ratio=knobs.get("retention", 0.2), num_inference_steps=steps,
                                mag_ratios=knobs["mag_ratios"])
    raise ValueError(f"unknown diffusers hook {kind!r}; valid: {', '.join(HOOKS)}")


def _apply(kind: str, model: Any, cfg: Any) -> None:
    import diffusers.hooks as H
    {"first-block": H.apply_first_block_cache, "taylorseer": H.apply_taylorseer_cache,
     "pab": H.apply_pyramid_attention_broadcast, "faster": H.apply_faster_cache,
     "mag": H.apply_mag_cache}[kind](model, cfg)


class DiffusersCache:
    """A diffusers cache hook (``kind`` in HOOKS) as a DiTDenoiser method. ``steps``: the sampler's number
    of model calls (MagCache interpolates its ratios over it and needs ``mag_ratios=`` from
    ``calibrate_mag_ratios``)."""

    def __init__(self, kind: str, *, steps: int | None = None, **knobs: Any) -> None:
        if kind not in HOOKS:
            raise ValueError(f"unknown diffusers hook {kind!r}; valid: {', '.join(HOOKS)}")
        if kind == "mag" and not steps:
            raise ValueError("the mag hook needs steps= (the number of model calls per trajectory)")
        self.kind, self.knobs, self.steps = kind, dict(knobs), steps
        _config(kind, self.knobs, lambda: 0.0, steps)        # bad knobs fail here, in one line, not mid-run
        self._src: Any = None
        self.model: Any = None
        self._t = 1000.0
        self._units = 0.0

    def _count(self, _m: Any, args: tuple, _out: Any) -> None:
        x = args[0]
        self._units += 0.5 * x.shape[0] * x.shape[1]          # half a block: attention or MLP, per token

    def prepare(self, model: Any) -> "DiffusersCache":
        """Copy and hook ``model`` now (otherwise at the first call): keeps that one-off cost out of a
        timed trajectory. Later trajectories reuse the hooked copy after ``reset()``."""
        if self._src is not model:
            self._build(model)
        return self

    def _build(self, model: Any) -> None:
        check_dit(model, who=f"diffusers {self.kind} hook")
        self._src, self.model = model, copy.deepcopy(model)
        _apply(self.kind, self.model, _config(self.kind, self.knobs, lambda: self._t, self.steps))
        for blk in self.model.transformer_blocks:
            blk.attn1.to_q.register_forward_hook(self._count)
            blk.ff.net[-1].register_forward_hook(self._count)

    def reset(self) -> None:
        if self.model is not None:
            from diffusers.hooks import HookRegistry
            HookRegistry.check_if_exists_or_initialize(self.model).reset_stateful_hooks()

    def forward(self, model: Any, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *, step: int,
                counts: Counts) -> torch.Tensor:
        from diffusers.hooks.hooks import CacheContext, _set_cache_context
        if self._src is not model:
            self._build(model)
        self._t = float(t[0])
        self._units = 0.0
        _set_cache_context(self.model, CacheContext("cond", step_index=step, num_inference_steps=self.steps,
                                                    timestep=t))
        try:
            out = self.model(hidden_states=x, timestep=t, class_labels=y).sample   # by name: FasterCache halves kwargs
        finally:
            _set_cache_context(self.model, None)
        n = x.shape[-1] * x.shape[-2] // model.patch_size ** 2
        counts.units += self._units
        counts.full_units += x.shape[0] * len(model.transformer_blocks) * n
        return out


def calibrate_mag_ratios(model: Any, run_trajectory: Callable[[Any], Any], steps: int) -> list[float]:
    """Run one full trajectory with MagCache in calibration mode and return the ratios diffusers
    prints at its end. ``run_trajectory(method)`` must sample once with that DiTDenoiser method."""
    import diffusers.hooks as H
    m = copy.deepcopy(model)
    H.apply_mag_cache(m, H.MagCacheConfig(calibrate=True, num_inference_steps=steps))
    probe = DiffusersCache("first-block")
    probe._src, probe.model = model, m          # reuse the context plumbing, no hook of its own
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        run_trajectory(probe)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip().startswith("[")]
    if not lines:
        raise RuntimeError("MagCache calibration printed no ratios")
    return [float(v) for v in ast.literal_eval(lines[-1].strip())]
