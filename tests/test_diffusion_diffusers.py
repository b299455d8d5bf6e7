"""Equivalence to diffusers' schedulers where they are right, and the adapter inside a real pipeline."""

import math

import pytest
import torch

from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler,
                       PNDMScheduler, UNet2DModel)

from accelerando.diffusion import Schedule, as_diffusers_scheduler, make_schedule, nfe_for, sample
from accelerando.diffusion.diffusers_scheduler import AccelerandoScheduler
from accelerando.diffusion.models import eps_fn_from_unet

T = 1000


def toy_eps(x, t):
    """A smooth, nonlinear, time-dependent stand-in for a network."""
    tt = torch.as_tensor(t, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) / T
    return torch.tanh(0.7 * x) * (1 - 0.5 * tt) + 0.3 * tt * torch.sin(x)


def run_diffusers(sched, x, steps):
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        x = sched.step(toy_eps(x, t), t, x).prev_sample
    return x, [int(t) for t in sched.timesteps]


def x_T():
    return torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def float64_alphas(sched):
    """Our schedule from diffusers' own table; their table upcast so both compute in float64."""
    sched.alphas_cumprod = sched.alphas_cumprod.to(torch.float64)
    return sched.alphas_cumprod


@pytest.mark.parametrize("steps", [10, 50])
def test_ddim_equals_diffusers(steps):
    ref = DDIMScheduler(num_train_timesteps=T, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    sched = Schedule(float64_alphas(ref), final_alpha_bar=1.0)
    theirs, ts = run_diffusers(ref, x_T(), steps)
    ours, info = sample(toy_eps, x_T(), schedule=sched, method="ddim", steps=steps, spacing="trailing", return_info=True)
    assert [int(t) for t in info.times] == ts
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("skip_prk", [True, False])
@pytest.mark.parametrize("steps", [10, 50])
def test_pndm_equals_diffusers(skip_prk, steps):
    ref = PNDMScheduler(num_train_timesteps=T, skip_prk_steps=skip_prk, set_alpha_to_one=False,
                        timestep_spacing="trailing")
    ac = float64_alphas(ref)
    ref.final_alpha_cumprod = ac[0]
    sched = Schedule(ac, final_alpha_bar=float(ac[0]))
    method = "pndm-diffusers" if skip_prk else "pndm-diffusers-prk"
    theirs, ts = run_diffusers(ref, x_T(), steps)
    ours, info = sample(toy_eps, x_T(), schedule=sched, method=method, steps=steps, return_info=True)
    assert [int(t) for t in info.times] == ts and info.nfe == nfe_for(method, steps, sched)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [8, 25])
def test_dpmpp_2m_equals_diffusers(steps):
    ref = DPMSolverMultistepScheduler(num_train_timesteps=T, algorithm_type="dpmsolver++", solver_order=2,
                                      timestep_spacing="trailing", final_sigmas_type="zero")
    sched = Schedule(ref.alphas_cumprod.to(torch.float64), final_alpha_bar=1.0)
    theirs, ts = run_diffusers(ref, x_T(), steps)
    ours, info = sample(toy_eps, x_T(), schedule=sched, method="dpmpp-2m", steps=steps, return_info=True)
    assert [int(t) for t in info.times] == ts
    # diffusers keeps its sigmas in float32, so agreement is to float32 precision
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_linspace_ours_reach_the_end_diffusers_stop_early():
    """With eps = 0 the exact answer is sqrt(1 / a_first) x_T; diffusers' DDIM steps t -> t - T//N."""
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    ref = DDIMScheduler(num_train_timesteps=T, clip_sample=False, timestep_spacing="linspace")
    sched = Schedule(float64_alphas(ref), final_alpha_bar=1.0)
    ref.set_timesteps(30)
    x = x_T()
    exact = x / math.sqrt(float(sched.alphas_cumprod[int(ref.timesteps[0])]))
    theirs = x
    for t in ref.timesteps:
        theirs = ref.step(zero(theirs, t), t, theirs).prev_sample
    ours = sample(zero, x, schedule=sched, method="ddim", steps=30, spacing="linspace")
    torch.testing.assert_close(ours, exact, rtol=1e-12, atol=0)
    assert not torch.allclose(theirs, exact, rtol=1e-6)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


@pytest.mark.parametrize("method,float_t", [("ddim", False), ("f-pndm", True), ("dpmpp-2m", False)])
def test_adapter_in_ddpm_pipeline(unet, method, float_t):
    base = DDPMScheduler(num_train_timesteps=T)
    sched = as_diffusers_scheduler(method, base.config, float_t=float_t, timestep_spacing="trailing", clip_sample=False)
    pipe = DDPMPipeline(unet=unet, scheduler=sched)
    steps = 6
    out = pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(3),
               output_type="np").images
    assert len(sched.timesteps) == nfe_for(method, steps, sched.schedule)
    # the same sample through our function API
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    ours = sample(eps_fn_from_unet(unet), x, schedule=sched.schedule, method=method, steps=steps,
                  spacing="trailing", float_t=float_t)
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - out).max() < 1e-5


def test_adapter_as_pipe_scheduler_of_ddim_pipeline(unet, tmp_path):
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=T))
    pipe.scheduler = as_diffusers_scheduler("s-pndm", pipe.scheduler.config)
    img = pipe(batch_size=1, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert img.shape == (1, 8, 8, 1) and (img == img).all()
    pipe.scheduler.save_config(tmp_path)
    loaded = AccelerandoScheduler.from_pretrained(tmp_path)
    assert loaded.config.method == "s-pndm" and loaded.config.timestep_spacing == pipe.scheduler.config.timestep_spacing


def test_adapter_prk_midpoints_are_extra_timesteps():
    s = as_diffusers_scheduler("f-pndm", None, timestep_spacing="trailing")
    s.set_timesteps(10)
    # F-PNDM's warm-up stages sit at the integer time nearest the s-midpoint (962 on the linear schedule)
    assert s.timesteps.tolist()[:5] == [999, 962, 962, 899, 899]
    assert len(s.timesteps) == 19
    s = as_diffusers_scheduler("pndm-diffusers-prk", None, timestep_spacing="trailing")
    s.set_timesteps(10)
    assert s.timesteps.tolist()[:5] == [999, 949, 949, 899, 899]     # diffusers' t - d // 2


def test_adapter_rejects_unknown_method():
    with pytest.raises(ValueError, match="valid methods"):
        as_diffusers_scheduler("euler-magic")


def test_adapter_v_prediction_matches_eps():
    """A v-prediction output is converted: v built from a known eps gives the eps result."""
    a_sched = as_diffusers_scheduler("ddim", None, prediction_type="v_prediction")
    e_sched = as_diffusers_scheduler("ddim", None)
    x = x_T()
    xa, xe = x.clone(), x.clone()
    a_sched.set_timesteps(5)
    e_sched.set_timesteps(5)
    for t in e_sched.timesteps:
        a = e_sched.schedule.alpha_bar(float(t))
        eps = toy_eps(xe, t)
        x0 = (xa - math.sqrt(1 - a) * toy_eps(xa, t)) / math.sqrt(a)
        v = math.sqrt(a) * toy_eps(xa, t) - math.sqrt(1 - a) * x0
        xa = a_sched.step(v, t, xa).prev_sample
        xe = e_sched.step(eps, t, xe).prev_sample
    torch.testing.assert_close(xa, xe, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps", [5, 25])
def test_unipc_equals_diffusers(steps):
    """Our UniPC-2 (bh2) equals UniPCMultistepScheduler; their sigmas recomputed in float64."""
    from diffusers import UniPCMultistepScheduler
    ref = UniPCMultistepScheduler(num_train_timesteps=T, solver_order=2, solver_type="bh2",
                                  timestep_spacing="trailing", final_sigmas_type="zero")
    ac = ref.alphas_cumprod.to(torch.float64)
    ref.set_timesteps(steps)
    ts = ref.timesteps
    ref.sigmas = torch.cat([((1 - ac[ts]) / ac[ts]).sqrt(), torch.zeros(1, dtype=torch.float64)])
    theirs = x_T()
    for t in ts:
        theirs = ref.step(toy_eps(theirs, t), t, theirs).prev_sample
    ours, info = sample(toy_eps, x_T(), schedule=Schedule(ac, final_alpha_bar=1.0), method="unipc", steps=steps,
                        return_info=True)
    assert [int(t) for t in info.times] == ts.tolist()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-11)
