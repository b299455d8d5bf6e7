"""Every config key of diffusers' DDIM / DDPM / PNDM / DPMSolverMultistep / UniPC schedulers: what the
adapter does with it. Each key is honoured (changes the computation as in diffusers) or refused with a
``ValueError`` naming it; none is dropped silently.

Three kinds:
- **schedule and model keys** (betas, spacing, prediction type, clipping, sigma spacings, ...): the same
  meaning for every method;
- **algorithm keys** of one diffusers scheduler (``solver_order``, ``skip_prk_steps``, ...): honoured or
  refused by the methods that are that algorithm (``FAMILIES``). Taken from another scheduler's config
  (``as_diffusers_scheduler("f-pndm", pndm.config)``), they describe the algorithm that ``method``
  replaces and are not carried over (``superseded``);
- **refused values**: options of model families the samplers do not cover (flow matching, learned
  variances, dynamic shifting).
"""

from __future__ import annotations

import math
from typing import Any


# the methods that implement one diffusers scheduler's algorithm
FAMILIES: dict[str, tuple[str, ...]] = {
    "PNDMScheduler": ("pndm-diffusers", "pndm-diffusers-prk"),
    "DPMSolverMultistepScheduler": ("dpmpp-2m", "dpmpp-3m"),
    "UniPCMultistepScheduler": ("unipc", "unipc3"),
}

# key -> the scheduler whose algorithm it configures
ALGORITHM_KEYS: dict[str, tuple[str, ...]] = {
    "skip_prk_steps": ("PNDMScheduler",),
    "solver_order": ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"),
    "algorithm_type": ("DPMSolverMultistepScheduler",),
    "solver_type": ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"),
    "lower_order_final": ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler"),
    "euler_at_final": ("DPMSolverMultistepScheduler",),
    "predict_x0": ("UniPCMultistepScheduler",),
    "solver_p": ("UniPCMultistepScheduler",),
    "disable_corrector": ("UniPCMultistepScheduler",),
}

# key -> what it does here (the docs table and the key-enumerating test read this)
KEY_POLICY: dict[str, str] = {
    "num_train_timesteps": "honoured: table length",
    "beta_start": "honoured", "beta_end": "honoured", "beta_schedule": "honoured (linear, scaled_linear, "
                                                                      "squaredcos_cap_v2)",
    "trained_betas": "honoured",
    "rescale_betas_zero_snr": "honoured: zero terminal SNR, last alpha_bar 2**-24 (diffusers' DPM / UniPC value)",
    "set_alpha_to_one": "honoured: the last step ends at alpha_bar 1, else at alphas_cumprod[0] (a sigma grid that "
                        "already ends there takes no extra step)",
    "final_sigmas_type": "honoured: 'zero' = set_alpha_to_one=True, 'sigma_min' = False",
    "prediction_type": "honoured: epsilon, v_prediction, sample; flow_prediction refused",
    "timestep_spacing": "honoured: linspace, leading, trailing",
    "steps_offset": "honoured (leading spacing)",
    "clip_sample": "honoured: x0 clipped (DDIM / DDPM way for ddim, eps re-derived for the others)",
    "clip_sample_range": "honoured with clip_sample",
    "thresholding": "honoured: dynamic thresholding of x0",
    "dynamic_thresholding_ratio": "honoured with thresholding",
    "sample_max_value": "honoured with thresholding",
    "variance_type": "fixed_small / None honoured (DDIM eta noise = DDPM's posterior variance); others refused",
    "use_karras_sigmas": "honoured: Karras sigma grid (every method)",
    "use_exponential_sigmas": "honoured: log-uniform sigma grid",
    "use_lu_lambdas": "honoured: lambda-uniform grid",
    "use_beta_sigmas": "refused when True",
    "sigma_min": "honoured with karras / exponential sigmas; refused otherwise",
    "sigma_max": "honoured with karras / exponential sigmas; refused otherwise",
    "lambda_min_clipped": "refused unless -inf",
    "use_flow_sigmas": "refused when True (flow matching)",
    "flow_shift": "refused unless 1.0",
    "use_dynamic_shifting": "refused when True",
    "time_shift_type": "honoured as diffusers: only read with use_dynamic_shifting (refused)",
    "shift_terminal": "refused unless None",
    "skip_prk_steps": "pndm-diffusers: True, pndm-diffusers-prk: False (else refused)",
    "solver_order": "unipc: its order (1-3); dpmpp-2m / dpmpp-3m / unipc3: must equal the order in the name",
    "algorithm_type": "dpmpp-*: dpmsolver++ only (others refused)",
    "solver_type": "dpmpp-*: midpoint only; unipc*: bh1 or bh2",
    "lower_order_final": "honoured (dpmpp-*, unipc)",
    "euler_at_final": "honoured (dpmpp-*)",
    "predict_x0": "unipc*: True only",
    "solver_p": "unipc*: None only",
    "disable_corrector": "honoured (unipc*)",
}

_REFUSED_UNLESS = {
    "use_beta_sigmas": False, "use_flow_sigmas": False, "flow_shift": 1.0, "use_dynamic_shifting": False,
    "shift_terminal": None,
}


def family_of(method: str) -> str | None:
    for cls, methods in FAMILIES.items():
        if method in methods:
            return cls
    return None


def from_foreign_config(method: str, config: Any) -> dict[str, Any]:
    """The adapter's init kwargs from ``config`` (a diffusers scheduler's config or a dict).

    Private entries (``_class_name``, ``_diffusers_version``) are dropped; algorithm keys of a scheduler
    ``method`` does not implement are not carried over (``method`` replaces that algorithm); every other
    key is passed on, so the adapter honours or refuses it.
    """
    if config is None:
        return {}
    cfg = dict(config)
    ours = cfg.get("_class_name") == "AccelerandoScheduler"
    out = {}
    for key, value in cfg.items():
        if key.startswith("_") or key == "method":
            continue
        if not ours and key in ALGORITHM_KEYS and family_of(method) not in ALGORITHM_KEYS[key]:
            continue          # superseded by ``method``
        if not ours and key == "solver_order" and method != "unipc":
            continue          # the order is in the method's name (dpmpp-2m, dpmpp-3m, unipc3)
        out[key] = value
    return out


def _refuse(key: str, value: Any, why: str) -> None:
    raise ValueError(f"{key}={value!r} is not supported by the accelerando scheduler: {why}")


def method_knobs(method: str, cfg: Any) -> dict[str, Any]:
    """Validate the algorithm keys against ``method``; its sampler knobs from them."""
    fam = family_of(method)
    knobs: dict[str, Any] = {}
    for key, owners in ALGORITHM_KEYS.items():
        value = cfg[key]
        if value is not None and fam not in owners:
            _refuse(key, value, f"it configures {' / '.join(owners)}, which method {method!r} does not implement")
    if fam == "PNDMScheduler" and cfg["skip_prk_steps"] is not None:
        if bool(cfg["skip_prk_steps"]) != (method == "pndm-diffusers"):
            _refuse("skip_prk_steps", cfg["skip_prk_steps"],
                    f"method {method!r} is skip_prk_steps={method == 'pndm-diffusers'}; use "
                    f"{'pndm-diffusers' if cfg['skip_prk_steps'] else 'pndm-diffusers-prk'}")
    if fam == "DPMSolverMultistepScheduler":
        order = 2 if method == "dpmpp-2m" else 3
        if cfg["solver_order"] not in (None, order):
            _refuse("solver_order", cfg["solver_order"], f"{method} is order {order}; use dpmpp-2m or dpmpp-3m")
        if cfg["algorithm_type"] not in (None, "dpmsolver++"):
            _refuse("algorithm_type", cfg["algorithm_type"], "dpmpp-* is dpmsolver++ (data prediction, no noise)")
        if cfg["solver_type"] not in (None, "midpoint"):
            _refuse("solver_type", cfg["solver_type"], "dpmpp-* uses the midpoint second-order term")
        knobs["lower_order_final"] = True if cfg["lower_order_final"] is None else bool(cfg["lower_order_final"])
        knobs["euler_at_final"] = bool(cfg["euler_at_final"])
    if fam == "UniPCMultistepScheduler":
        if cfg["solver_order"] is not None:
            if method == "unipc3" and cfg["solver_order"] != 3:
                _refuse("solver_order", cfg["solver_order"], "unipc3 is order 3; use unipc for other orders")
            if method == "unipc":
                if cfg["solver_order"] not in (1, 2, 3):
                    _refuse("solver_order", cfg["solver_order"], "UniPC orders are 1-3")
                knobs["order"] = int(cfg["solver_order"])
        if cfg["solver_type"] is not None:
            if cfg["solver_type"] not in ("bh1", "bh2"):
                _refuse("solver_type", cfg["solver_type"], "UniPC's variants are bh1 and bh2")
            knobs["variant"] = cfg["solver_type"]
        if cfg["predict_x0"] not in (None, True):
            _refuse("predict_x0", cfg["predict_x0"], "UniPC here is the data-prediction form")
        if cfg["solver_p"] is not None:
            _refuse("solver_p", cfg["solver_p"], "no external predictor")
        if cfg["lower_order_final"] is not None:
            knobs["lower_order_final"] = bool(cfg["lower_order_final"])
        if cfg["disable_corrector"]:
            knobs["disable_corrector"] = tuple(int(i) for i in cfg["disable_corrector"])
    return knobs


def check_model_keys(cfg: Any) -> None:
    """Refuse the values of schedule / model keys the samplers do not cover."""
    for key, ok in _REFUSED_UNLESS.items():
        if cfg[key] != ok:
            _refuse(key, cfg[key], f"only {ok!r} (a VP diffusion model, not flow matching / shifted schedules)")
    if cfg["lambda_min_clipped"] is not None and cfg["lambda_min_clipped"] != -math.inf:
        _refuse("lambda_min_clipped", cfg["lambda_min_clipped"], "only -inf (no clipped lambda range)")
    if cfg["variance_type"] not in (None, "fixed_small"):
        _refuse("variance_type", cfg["variance_type"], "only fixed_small (the DDIM / DDPM posterior variance); "
                "learned variances need a 2x-channel model output")
    if cfg["prediction_type"] not in ("epsilon", "v_prediction", "sample"):
        _refuse("prediction_type", cfg["prediction_type"], "epsilon, v_prediction or sample")
    spacings = [k for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_lu_lambdas") if cfg[k]]
    if len(spacings) > 1:
        _refuse(spacings[1], True, f"only one sigma spacing at a time (also {spacings[0]}=True)")
    for key in ("sigma_min", "sigma_max"):
        if cfg[key] is not None and not (cfg["use_karras_sigmas"] or cfg["use_exponential_sigmas"]):
            _refuse(key, cfg[key], "it bounds use_karras_sigmas / use_exponential_sigmas grids; neither is set")
    if cfg["final_sigmas_type"] not in (None, "zero", "sigma_min"):
        _refuse("final_sigmas_type", cfg["final_sigmas_type"], "'zero' or 'sigma_min'")
    if cfg["final_sigmas_type"] == "sigma_min" and spacings:
        _refuse("final_sigmas_type", "sigma_min", f"with {spacings[0]} the grid already ends on sigma_min, so the last "
                "step would have zero length")


__all__ = ["FAMILIES", "ALGORITHM_KEYS", "KEY_POLICY", "from_foreign_config", "method_knobs", "check_model_keys",
           "family_of"]
