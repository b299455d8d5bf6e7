"""The diffusers adapter as a diffusers scheduler: the same loops as diffusers' own schedulers (img2img
slicing, set_begin_index, latents edited between steps, v-prediction, clipping), to float32 rounding."""

import pytest
import torch

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler, UniPCMultistepScheduler

from accelerando.diffusion import METHODS, as_diffusers_scheduler, make_schedule, sample
from accelerando.diffusion.diffusers_scheduler import AccelerandoScheduler
from accelerando.diffusion.oracle import random_mixture

T = 1000


def toy_model(x, t):
    """A smooth, nonlinear, time-dependent stand-in for a network (any prediction type)."""
    tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / T
    return torch.tanh(0.7 * x) * (1 - 0.5 * tt) + 0.3 * tt * torch.sin(x)


def loop(sched, x, steps, *, strength=None, edit=None, model=toy_model, eta=None, seed=None):
    """A pipeline's loop. ``strength`` < 1: img2img as diffusers' pipelines do it (timesteps sliced at
    t_start * order, set_begin_index, x noised to the first kept timestep with add_noise); ``edit(i, x)``
    changes the latents after step i (a callback_on_step_end / an inpainting blend)."""
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if strength is not None:
        t_start = max(steps - min(int(steps * strength), steps), 0)
        timesteps = timesteps[t_start * sched.order:]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=x.dtype)
        x = sched.add_noise(x, noise, timesteps[:1].repeat(x.shape[0]))
    x = x * sched.init_noise_sigma
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    for i, t in enumerate(timesteps):
        out = model(sched.scale_model_input(x, t), t)
        kw = {"generator": g} if g is not None else {}
        x = (sched.step(out, t, x, eta, **kw) if eta is not None else sched.step(out, t, x, **kw)).prev_sample
        if edit is not None:
            x = edit(i, x)
    return x


def x0():
    return torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))


def damp(i, x):
    return 0.9 * x if i == 2 else x


SCENARIOS = {
    "plain": {},
    "img2img": {"strength": 0.6},
    "edited": {"edit": damp},
    "img2img+edited": {"strength": 0.6, "edit": damp},
}

REFERENCES = {
    # (our method, diffusers' class, its config): configs where diffusers' scheduler is right
    "ddim": ("ddim", DDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": False}),
    "ddim-clip": ("ddim", DDIMScheduler, {"timestep_spacing": "trailing", "clip_sample": True}),
    "ddim-leading-v": ("ddim", DDIMScheduler, {"timestep_spacing": "leading", "clip_sample": False,
                                               "prediction_type": "v_prediction", "steps_offset": 1}),
    "ddim-threshold": ("ddim", DDIMScheduler, {"timestep_spacing": "trailing", "thresholding": True,
                                               "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}),
    "dpmpp-2m": ("dpmpp-2m", DPMSolverMultistepScheduler, {}),
    "dpmpp-2m-trailing-v": ("dpmpp-2m", DPMSolverMultistepScheduler,
                            {"timestep_spacing": "trailing", "prediction_type": "v_prediction"}),
    "dpmpp-2m-karras": ("dpmpp-2m", DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    "dpmpp-2m-lu": ("dpmpp-2m", DPMSolverMultistepScheduler, {"use_lu_lambdas": True}),
    "dpmpp-2m-exp": ("dpmpp-2m", DPMSolverMultistepScheduler, {"use_exponential_sigmas": True}),
    "dpmpp-2m-sigma-min": ("dpmpp-2m", DPMSolverMultistepScheduler, {"final_sigmas_type": "sigma_min"}),
    "dpmpp-2m-thresholding": ("dpmpp-2m", DPMSolverMultistepScheduler, {"thresholding": True,
                                                                        "sample_max_value": 1.2}),
    "dpmpp-3m": ("dpmpp-3m", DPMSolverMultistepScheduler, {"solver_order": 3, "timestep_spacing": "trailing"}),
    "dpmpp-2m-euler-final": ("dpmpp-2m", DPMSolverMultistepScheduler, {"euler_at_final": True,
                                                                       "final_sigmas_type": "sigma_min"}),
    "unipc": ("unipc", UniPCMultistepScheduler, {}),
    "unipc-trailing-v": ("unipc", UniPCMultistepScheduler, {"timestep_spacing": "trailing",
                                                            "prediction_type": "v_prediction"}),
    "unipc-3-karras": ("unipc", UniPCMultistepScheduler, {"solver_order": 3, "use_karras_sigmas": True}),
    "unipc-bh1": ("unipc", UniPCMultistepScheduler, {"solver_type": "bh1", "final_sigmas_type": "sigma_min"}),
    "unipc-no-corrector": ("unipc", UniPCMultistepScheduler, {"disable_corrector": [0, 2]}),
    "pndm": ("pndm-diffusers", PNDMScheduler, {"skip_prk_steps": True, "timestep_spacing": "trailing"}),
    "pndm-prk": ("pndm-diffusers-prk", PNDMScheduler, {"skip_prk_steps": False, "timestep_spacing": "trailing"}),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("ref", list(REFERENCES))
def test_equals_diffusers_in_the_same_loop(ref, scenario):
    method, cls, cfg = REFERENCES[ref]
    opts = SCENARIOS[scenario]
    if cls is PNDMScheduler and "strength" in opts:
        pytest.skip("diffusers' PNDM has no set_begin_index: sliced, it restarts its warm-up counter mid-list")
    theirs_sched = cls(num_train_timesteps=T, **cfg)
    ours_sched = as_diffusers_scheduler(method, theirs_sched.config)
    steps = 10
    theirs = loop(theirs_sched, x0(), steps, **opts)
    ours = loop(ours_sched, x0(), steps, **opts)
    assert ours_sched.timesteps.tolist() == theirs_sched.timesteps.tolist()
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("positional", [True, False])
def test_ddim_eta_noise_equals_diffusers(positional):
    """eta as the 4th positional argument (DDIMScheduler's signature) or a keyword; same generator draws."""
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing", clip_sample=False)
    ours = as_diffusers_scheduler("ddim", ref.config)
    kw = {"eta": 1.0} if not positional else {}
    if positional:
        a = loop(ref, x0(), 8, eta=1.0, seed=3)
        b = loop(ours, x0(), 8, eta=1.0, seed=3)
    else:
        def run(s):
            s.set_timesteps(8)
            x, g = x0(), torch.Generator().manual_seed(3)
            for t in s.timesteps:
                x = s.step(toy_model(x, t), t, x, generator=g, **kw).prev_sample
            return x
        a, b = run(ref), run(ours)
    torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)
    assert not torch.allclose(b, loop(as_diffusers_scheduler("ddim", ref.config), x0(), 8), atol=1e-3)


def test_ddim_variance_noise_is_used():
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing", clip_sample=False)
    ours = as_diffusers_scheduler("ddim", ref.config)
    for s in (ref, ours):
        s.set_timesteps(5)
    xa = xb = x0()
    for k, t in enumerate(ref.timesteps):
        z = torch.randn(xa.shape, generator=torch.Generator().manual_seed(k))
        xa = ref.step(toy_model(xa, t), t, xa, eta=0.5, variance_noise=z).prev_sample
        xb = ours.step(toy_model(xb, t), t, xb, eta=0.5, variance_noise=z).prev_sample
    torch.testing.assert_close(xb, xa, rtol=2e-5, atol=2e-5)


def test_eta_refused_for_ode_methods():
    s = as_diffusers_scheduler("f-pndm")
    s.set_timesteps(5)
    t = s.timesteps[0]
    s.step(toy_model(x0(), t), t, x0(), 0.0)              # DDIMPipeline passes eta=0.0: fine
    with pytest.raises(ValueError, match="eta=1.0"):
        s.step(toy_model(x0(), s.timesteps[1]), s.timesteps[1], x0(), 1.0)


def test_custom_timesteps_equal_ddpm_style_list():
    ours = as_diffusers_scheduler("ddim", None)
    custom = [999, 800, 500, 300, 100, 20]
    ours.set_timesteps(timesteps=custom)
    assert ours.timesteps.tolist() == custom
    ddim = sample(toy_model, x0(), schedule=ours.schedule, method="ddim", grid=ours._grid)
    torch.testing.assert_close(loop_with(ours, custom), ddim, rtol=0, atol=0)
    with pytest.raises(ValueError, match="decrease"):
        ours.set_timesteps(timesteps=[10, 500])


def loop_with(sched, custom):
    sched.set_timesteps(timesteps=custom)
    x = x0()
    for t in sched.timesteps:
        x = sched.step(toy_model(x, t), t, x).prev_sample
    return x


def test_step_follows_the_given_sample_not_its_own_trajectory():
    """Zeroing the latents before a step changes the result (it used to change it by exactly 0)."""
    for method in ("f-pndm", "ddim", "dpmpp-2m", "unipc", "prk"):
        s = as_diffusers_scheduler(method)
        a = loop(s, x0(), 6)
        b = loop(s, x0(), 6, edit=lambda i, x: torch.zeros_like(x) if i == 5 else x)
        assert (a - b).abs().max() > 1e-3, method


def test_ddim_swapped_latents_continue_the_other_run():
    """DDIM is one-step: latents swapped in from another run at entry k finish exactly as that run."""
    s = as_diffusers_scheduler("ddim")
    other = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    states = {}
    ref = loop(s, other, 8, edit=lambda i, x: states.setdefault(i, x) if True else x)
    out = loop(s, x0(), 8, edit=lambda i, x: states[i] if i == 3 else x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_mismatched_timestep_is_refused():
    s = as_diffusers_scheduler("dpmpp-2m")
    s.set_timesteps(5)
    t0, t1 = s.timesteps[:2]
    s.step(toy_model(x0(), t0), t0, x0())
    with pytest.raises(ValueError, match="entry 1"):
        s.step(toy_model(x0(), t0), t0, x0())


def test_step_index_begin_index_and_state():
    s = as_diffusers_scheduler("f-pndm")
    s.set_timesteps(6)
    assert s.step_index is None and s.begin_index is None and s.init_noise_sigma == 1.0
    assert len(s.sigmas) == len(s.timesteps) + 1 and float(s.sigmas[-1]) == 0.0
    assert s.betas.dtype == torch.float32 and len(s.betas) == T
    torch.testing.assert_close(s.alphas_cumprod, torch.cumprod(1 - s.betas, 0))
    s.set_begin_index(12)
    assert s.begin_index == 12
    t = s.timesteps[12]
    s.step(toy_model(x0(), t), t, x0())
    assert s.step_index == 13
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(len(s.timesteps))


@pytest.fixture(scope="module")
def oracle():
    sched = make_schedule("linear", T)
    gm = random_mixture(3, 3, schedule=sched, seed=0)
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return sched, gm, x


def _img2img_error(oracle, method, steps, begin):
    """Begin at entry ``begin`` with a state at that entry's noise level; error to the exact ODE solution."""
    sched, gm, x = oracle
    s = as_diffusers_scheduler(method, None)
    s.set_timesteps(steps)
    s.set_begin_index(begin)
    a = s._entry_ab[begin]
    xt = x
    ref = gm.reference(xt, a, 1.0)
    for t in s.timesteps[begin:]:
        xt = s.step(gm.eps_fn(xt, t.reshape(1).expand(xt.shape[0])), t, xt).prev_sample
    return float((xt - ref).pow(2).mean().sqrt())


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ddim-eta"])
def test_every_method_resumes_correctly_from_any_entry(oracle, method):
    """img2img for every method on the exact-score oracle: begun at a grid point (or, for Runge-Kutta
    methods, at a stage: entries 1, 2) the run integrates the ODE from that entry's noise level. Errors
    measured 2e-4 (FON) to 0.13 (DDIM at 3 calls left); ignoring the begin index gives ~1 (the scale)."""
    s = as_diffusers_scheduler(method, None)
    s.set_timesteps(20)
    n = len(s.timesteps)
    for b in sorted({1, 2, n // 3, n // 2, n - 3}):
        err = _img2img_error(oracle, method, 20, b)
        assert err < 0.15, (method, b, err)


# ---------------------------------------------------------------- every config key: honoured or refused
CLASSES = ["DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"]
LINEAR = [float(b) for b in torch.linspace(1e-4, 0.02, T) * 1.1]

# key -> (kind, method, overrides). "honoured": the loop's output changes (the equivalence tests above show
# it changes as diffusers'); "refused": ValueError naming the key; "inert": accepted, no effect, as in
# diffusers (read only with another key that is refused here)
KEY_CASES = {
    "num_train_timesteps": ("honoured", "f-pndm", {"num_train_timesteps": 500}),
    "beta_start": ("honoured", "f-pndm", {"beta_start": 2e-4}),
    "beta_end": ("honoured", "f-pndm", {"beta_end": 0.03}),
    "beta_schedule": ("honoured", "f-pndm", {"beta_schedule": "scaled_linear"}),
    "trained_betas": ("honoured", "f-pndm", {"trained_betas": LINEAR}),
    "rescale_betas_zero_snr": ("honoured", "dpmpp-2m", {"rescale_betas_zero_snr": True,
                                                         "prediction_type": "v_prediction"}),
    "set_alpha_to_one": ("honoured", "f-pndm", {"set_alpha_to_one": False}),
    "final_sigmas_type": ("honoured", "unipc", {"final_sigmas_type": "sigma_min"}),
    "prediction_type": ("honoured", "f-pndm", {"prediction_type": "v_prediction"}),
    "timestep_spacing": ("honoured", "f-pndm", {"timestep_spacing": "linspace"}),
    "steps_offset": ("honoured", "ddim", {"timestep_spacing": "leading", "steps_offset": 1}),
    "clip_sample": ("honoured", "f-pndm", {"clip_sample": True}),
    "clip_sample_range": ("honoured", "ddim", {"clip_sample": True, "clip_sample_range": 0.5}),
    "thresholding": ("honoured", "dpmpp-2m", {"thresholding": True}),
    "dynamic_thresholding_ratio": ("honoured", "ddim", {"thresholding": True, "sample_max_value": 3.0,
                                                       "dynamic_thresholding_ratio": 0.5}),
    "sample_max_value": ("honoured", "ddim", {"thresholding": True, "sample_max_value": 3.0}),
    "variance_type": ("refused", "ddim-eta", {"variance_type": "fixed_large"}),
    "use_karras_sigmas": ("honoured", "f-pndm", {"use_karras_sigmas": True}),
    "use_exponential_sigmas": ("honoured", "unipc", {"use_exponential_sigmas": True}),
    "use_lu_lambdas": ("honoured", "dpmpp-2m", {"use_lu_lambdas": True}),
    "use_beta_sigmas": ("refused", "dpmpp-2m", {"use_beta_sigmas": True}),
    "sigma_min": ("honoured", "unipc", {"use_karras_sigmas": True, "sigma_min": 0.1}),
    "sigma_max": ("honoured", "unipc", {"use_karras_sigmas": True, "sigma_max": 40.0}),
    "lambda_min_clipped": ("refused", "dpmpp-2m", {"lambda_min_clipped": -5.1}),
    "use_flow_sigmas": ("refused", "unipc", {"use_flow_sigmas": True}),
    "flow_shift": ("refused", "unipc", {"flow_shift": 3.0}),
    "use_dynamic_shifting": ("refused", "unipc", {"use_dynamic_shifting": True}),
    "time_shift_type": ("inert", "unipc", {"time_shift_type": "linear"}),
    "shift_terminal": ("refused", "unipc", {"shift_terminal": 0.1}),
    "skip_prk_steps": ("refused", "pndm-diffusers", {"skip_prk_steps": False}),
    "solver_order": ("honoured", "unipc", {"solver_order": 3}),
    "algorithm_type": ("refused", "dpmpp-2m", {"algorithm_type": "sde-dpmsolver++"}),
    "solver_type": ("honoured", "unipc", {"solver_type": "bh1"}),
    "lower_order_final": ("honoured", "dpmpp-2m", {"final_sigmas_type": "sigma_min", "lower_order_final": False}),
    "euler_at_final": ("honoured", "dpmpp-3m", {"final_sigmas_type": "sigma_min", "euler_at_final": True,
                                               "lower_order_final": False}),
    "predict_x0": ("refused", "unipc", {"predict_x0": False}),
    "solver_p": ("refused", "unipc", {"solver_p": "ddim"}),
    "disable_corrector": ("honoured", "unipc", {"disable_corrector": [1, 3]}),
}


def diffusers_keys():
    import inspect

    import diffusers
    return {k for c in CLASSES for k in inspect.signature(getattr(diffusers, c).__init__).parameters if k != "self"}


def test_every_diffusers_key_is_classified():
    from accelerando.diffusion.diffusers_scheduler import KEY_POLICY
    keys = diffusers_keys()
    assert keys <= set(KEY_CASES), sorted(keys - set(KEY_CASES))
    assert keys <= set(KEY_POLICY), sorted(keys - set(KEY_POLICY))


@pytest.mark.parametrize("key", sorted(KEY_CASES))
def test_key_is_honoured_or_refused(key):
    kind, method, overrides = KEY_CASES[key]
    if kind == "refused":
        with pytest.raises(ValueError, match=key):
            as_diffusers_scheduler(method, None, **overrides)
        return
    base = {k: v for k, v in overrides.items() if k != key}
    if key == "steps_offset":
        base = {"timestep_spacing": "leading"}
    a = loop(as_diffusers_scheduler(method, None, **base), x0(), 8)
    b = loop(as_diffusers_scheduler(method, None, **overrides), x0(), 8)
    assert torch.isfinite(b).all()
    if kind == "honoured":
        assert (a - b).abs().max() > 1e-4, key
    else:
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_zero_snr_reaches_alpha_bar_zero():
    s = as_diffusers_scheduler("dpmpp-2m", None, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    assert float(s.alphas_cumprod[-1]) <= 2 ** -24
    assert float(as_diffusers_scheduler("dpmpp-2m").alphas_cumprod[-1]) > 1e-5


def test_algorithm_keys_of_a_replaced_scheduler_are_superseded_by_the_method():
    """SD 1.x's PNDM config (skip_prk_steps=True, set_alpha_to_one=False, leading, steps_offset=1) swapped
    for f-pndm: PNDM's algorithm key does not carry over; its schedule keys do."""
    sd = PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True,
                       steps_offset=1, set_alpha_to_one=False)
    s = as_diffusers_scheduler("f-pndm", sd.config)
    assert s.config.skip_prk_steps is None and s.config.steps_offset == 1
    assert s.schedule.final_alpha_bar == float(s.schedule.alphas_cumprod[0])
    assert s.config.timestep_spacing == "leading"
    with pytest.raises(ValueError, match="skip_prk_steps"):
        as_diffusers_scheduler("f-pndm", None, skip_prk_steps=True)
    dpm = DPMSolverMultistepScheduler(solver_order=2)
    assert as_diffusers_scheduler("dpmpp-3m", dpm.config).config.solver_order is None   # the name says 3


def test_unknown_key_is_refused():
    with pytest.raises(TypeError, match="not_a_key"):
        as_diffusers_scheduler("f-pndm", {"not_a_key": 1})


def test_from_config_and_round_trip(tmp_path):
    ddim = DDIMScheduler(clip_sample=False, timestep_spacing="trailing", prediction_type="v_prediction")
    s = AccelerandoScheduler.from_config(ddim.config, method="f-pndm", float_t=True,
                                         method_knobs={"warmup": "s"})
    assert s.config.method == "f-pndm" and s.config.prediction_type == "v_prediction"
    s.save_pretrained(tmp_path)
    loaded = AccelerandoScheduler.from_pretrained(tmp_path)
    assert loaded.config.method == "f-pndm" and loaded.config.float_t and loaded.config.method_knobs == {"warmup": "s"}
    torch.testing.assert_close(loop(loaded, x0(), 6), loop(s, x0(), 6), rtol=0, atol=0)
    back = DDIMScheduler.from_config(loaded.config)          # and back to diffusers'
    assert back.config.prediction_type == "v_prediction"
    assert DDIMScheduler in s.compatibles and DPMSolverMultistepScheduler in s.compatibles


def as_v_model(sched_ab):
    """The v-prediction model with the same eps as ``toy_model``: v = sqrt(a) eps - sqrt(1 - a) x0."""
    def model(x, t):
        a = sched_ab(float(t))
        eps = toy_model(x, t)
        return a ** 0.5 * eps - (1 - a) ** 0.5 * (x - (1 - a) ** 0.5 * eps) / a ** 0.5
    return model


@pytest.mark.parametrize("skip_prk", [True, False])
def test_pndm_v_prediction_is_converted_per_call_diffusers_pndm_is_not(skip_prk):
    """diffusers' PNDM combines raw v outputs taken at different samples and converts the combination at
    the current one, which is not the eps combination: on a v-model with toy_model's eps it differs from
    its own epsilon run by ~0.5 (of 1.7); ours converts each call and equals the epsilon run."""
    method = "pndm-diffusers" if skip_prk else "pndm-diffusers-prk"
    ref_eps = PNDMScheduler(skip_prk_steps=skip_prk, timestep_spacing="trailing")
    ref_v = PNDMScheduler(skip_prk_steps=skip_prk, timestep_spacing="trailing", prediction_type="v_prediction")
    ab = lambda t: float(ref_eps.alphas_cumprod[int(t)])  # noqa: E731
    eps_run = loop(as_diffusers_scheduler(method, ref_eps.config), x0(), 10)
    ours_v = loop(as_diffusers_scheduler(method, ref_v.config), x0(), 10, model=as_v_model(ab))
    theirs_v = loop(ref_v, x0(), 10, model=as_v_model(ab))
    torch.testing.assert_close(ours_v, eps_run, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(loop(ref_eps, x0(), 10), eps_run, rtol=2e-5, atol=2e-5)
    assert (theirs_v - eps_run).abs().max() > 0.1


def test_ddim_use_clipped_model_output_equals_diffusers():
    ref = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing", clip_sample=True)
    ours = as_diffusers_scheduler("ddim", ref.config)
    out = []
    for s in (ref, ours):
        s.set_timesteps(10)         # N divides T: diffusers' DDIM steps t -> t - T // N reach the next grid point
        x = x0()
        for t in s.timesteps:
            x = s.step(toy_model(x, t), t, x, eta=0.3, use_clipped_model_output=True,
                       variance_noise=torch.ones_like(x)).prev_sample
        out.append(x)
    torch.testing.assert_close(out[1], out[0], rtol=2e-5, atol=2e-5)


def test_set_timesteps_leaves_the_global_random_stream_alone():
    s = as_diffusers_scheduler("ddim-eta")
    torch.manual_seed(0)
    s.set_timesteps(10)
    a = torch.randn(3)
    torch.manual_seed(0)
    torch.testing.assert_close(torch.randn(3), a)


def test_a_registered_sampler_works_in_sample_and_the_adapter():
    """The extension point (searched schedules, new solvers): register once, use by name everywhere."""
    from accelerando.diffusion import SPECS, SamplerSpec, register_sampler
    from accelerando.diffusion.samplers.ddim import ddim

    def ddim_copy(x, grid, *, start=0):
        return (yield from ddim(x, grid, start=start))

    register_sampler(SamplerSpec("test-ddim-copy", ddim_copy, lambda n, r=0: n, "N", "1"), replace=True)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_sampler(SPECS["test-ddim-copy"])
        a = loop(as_diffusers_scheduler("test-ddim-copy"), x0(), 8, strength=0.5)
        b = loop(as_diffusers_scheduler("ddim"), x0(), 8, strength=0.5)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        sched = make_schedule("linear", T)
        torch.testing.assert_close(sample(toy_model, x0(), schedule=sched, method="test-ddim-copy", steps=8),
                                   sample(toy_model, x0(), schedule=sched, method="ddim", steps=8))
    finally:
        SPECS.pop("test-ddim-copy", None)


@pytest.mark.parametrize("method", METHODS)
def test_start_j_asks_for_the_tail_of_the_full_run(method):
    """The resume contract behind img2img: a sampler begun at grid point j (start=j) asks for exactly the
    calls the full run makes from point j's first call on (the same times), and marks that call as point j."""
    from accelerando.diffusion.api import get_spec
    from accelerando.diffusion.diffusers_scheduler.scheduler import _requests
    from accelerando.diffusion.samplers._common import make_grid
    spec = get_spec(method)
    grid = make_grid(make_schedule("linear", T), 8, "trailing")
    knobs = dict(spec.knobs)
    if spec.stochastic:
        knobs["generator"] = torch.Generator().manual_seed(0)
    full = _requests(spec.fn(torch.zeros(1, dtype=torch.float64), grid, **knobs))
    entry = {r[3]: k for k, r in enumerate(full) if r[3] is not None}
    assert sorted(entry) == list(range(grid.steps))
    for j in range(1, grid.steps):
        if spec.stochastic:
            knobs["generator"] = torch.Generator().manual_seed(0)
        tail = _requests(spec.fn(torch.zeros(1, dtype=torch.float64), grid, start=j, **knobs))
        assert [r[1] for r in tail] == [r[1] for r in full[entry[j]:]], (method, j)
        assert tail[0][3] == j


def test_a_sigma_grid_ending_where_the_schedule_ends():
    """SD 1.x's PNDM config (set_alpha_to_one=False) with Karras sigmas: the Karras grid already ends at
    alphas_cumprod[0], so no zero-length step is added; diffusers' own final_sigmas_type="sigma_min" with a
    sigma grid (a zero-length last step) is refused."""
    s = as_diffusers_scheduler("dpmpp-2m", None, use_karras_sigmas=True, set_alpha_to_one=False)
    s.set_timesteps(10)
    assert len(s.timesteps) == 9 and s._grid.t[-1] == 0          # 10 Karras points = 9 steps, the last ends at t = 0
    assert s._grid.ab[-1] == pytest.approx(float(s.schedule.alphas_cumprod[0]), rel=1e-6)
    assert torch.isfinite(loop(s, x0(), 10)).all()
    with pytest.raises(ValueError, match="final_sigmas_type"):
        as_diffusers_scheduler("dpmpp-2m", None, use_karras_sigmas=True, final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match="timesteps must"):
        as_diffusers_scheduler("ddim").set_timesteps(timesteps=[])


def test_ddim_eta_one_equals_ddpm_scheduler_with_the_same_draws():
    """DDIM with eta = 1 is DDPM's posterior step (mean and fixed_small variance): ddim-eta equals
    DDPMScheduler in DDPMPipeline's loop, noise from the same generator, where DDPM steps land on the
    grid (N divides T) and x0 is not clipped (DDPM clips inside its posterior mean, DDIM its x0)."""
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=T, clip_sample=False)
    ours = as_diffusers_scheduler("ddim-eta", ref.config)
    assert ours.config.timestep_spacing == "leading"
    a = loop(ref, x0(), 10, seed=4)
    b = loop(ours, x0(), 10, seed=4)
    torch.testing.assert_close(b, a, rtol=2e-5, atol=2e-5)
