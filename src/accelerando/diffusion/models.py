"""Parameterisation adapters: any denoiser (eps-, v- or x0-prediction) -> one ``eps_fn(x, t)``."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def to_eps(output: torch.Tensor, x: torch.Tensor, a: float, prediction_type: str) -> torch.Tensor:
    """eps from a model output at alpha_bar a: v = sqrt(a) eps - sqrt(1-a) x0, x0 = data prediction."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return math.sqrt(a) * output + math.sqrt(1 - a) * x
    if prediction_type == "sample":
        return (x - math.sqrt(a) * output) / math.sqrt(1 - a)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def eps_fn_from_unet(unet: Any, *, prediction_type: str = "epsilon", schedule: Any = None,
                     class_labels: torch.Tensor | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """eps(x, t) from a diffusers ``UNet2DModel``-like module (``unet(x, t).sample``).

    Float times (RK midpoints with ``float_t=True``) are passed as float32, as the UNet's sinusoidal
    embedding accepts them; v- and x0-prediction need ``schedule`` for alpha_bar(t).
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    if prediction_type != "epsilon" and schedule is None:
        raise ValueError(f"{prediction_type} models need the schedule to convert to eps")
    param = next(unet.parameters())

    @torch.no_grad()
    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=param.device)
        if t.is_floating_point():
            t = t.to(torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        kw = {"class_labels": class_labels} if class_labels is not None else {}
        out = unet(x.to(param.dtype), t, **kw).sample.to(x.dtype)
        if prediction_type == "epsilon":
            return out
        # one time per call in the samplers: alpha_bar of the first entry
        return to_eps(out, x, schedule.alpha_bar(float(t.reshape(-1)[0])), prediction_type)

    return eps


def clip_x0(clip_range: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """diffusers' ``clip_sample``: the data prediction clamped to [-clip_range, clip_range]."""
    return lambda x0: x0.clamp(-clip_range, clip_range)


def dynamic_threshold(ratio: float = 0.995, max_value: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", sec. 2.3): per sample, s = the ``ratio``
    quantile of |x0| clamped to [1, max_value]; x0 -> clamp(x0, -s, s) / s (diffusers' ``thresholding``)."""
    def threshold(x0: torch.Tensor) -> torch.Tensor:
        flat = x0.reshape(x0.shape[0], -1)
        if flat.dtype not in (torch.float32, torch.float64):
            flat = flat.float()      # quantile and CPU clamp need a float32 / float64 tensor
        s = torch.quantile(flat.abs(), ratio, dim=1).clamp(1.0, max_value).unsqueeze(1)
        return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape).to(x0.dtype)
    return threshold


def eps_with_corrected_x0(eps: torch.Tensor, x: torch.Tensor, a: float,
                          correct: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The eps whose data prediction at alpha_bar a is ``correct(x0_hat)`` (clipping / thresholding for
    solvers that consume eps; equals diffusers' ``use_clipped_model_output``)."""
    x0 = correct((x - math.sqrt(1 - a) * eps) / math.sqrt(a))
    return (x - math.sqrt(a) * x0) / math.sqrt(1 - a)
