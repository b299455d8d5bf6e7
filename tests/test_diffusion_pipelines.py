"""The adapter inside real diffusers pipelines and pipeline-style loops, with a tiny random UNet built
offline: DDPMPipeline / DDIMPipeline, img2img, inpainting with the mask blend, callback_on_step_end
editing latents -- for every method; equal to diffusers' own schedulers where the method is theirs."""

import pytest
import torch

from diffusers import (DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler,
                       PNDMScheduler, UNet2DModel, UniPCMultistepScheduler)

from accelerando.diffusion import METHODS, as_diffusers_scheduler
from accelerando.diffusion.diffusers_scheduler import AccelerandoScheduler

STEPS = 5           # f-pndm / pndm-diffusers-prk need 4 grid steps; 5 keeps every method above its minimum


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def image():
    return torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1


EQUIVALENT = {    # method -> diffusers' scheduler it reproduces (configs where diffusers is right)
    "ddim": DDIMScheduler(timestep_spacing="trailing", clip_sample=True),
    "dpmpp-2m": DPMSolverMultistepScheduler(),
    "unipc": UniPCMultistepScheduler(),
    "pndm-diffusers": PNDMScheduler(skip_prk_steps=True, timestep_spacing="trailing"),
}


def ours_for(method):
    ref = EQUIVALENT.get(method)
    return as_diffusers_scheduler(method, (ref or DDPMScheduler()).config)


@torch.no_grad()
def img2img(unet, sched, strength=0.6, inpaint_mask=None, callback=None, steps=STEPS):
    """StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline's loop, in pixel space: timesteps
    sliced at t_start * order, set_begin_index, add_noise to the first kept timestep; inpainting blends the
    known region (mask 0) noised to the next timestep after every step; the callback may edit latents."""
    sched.set_timesteps(steps)
    t_start = max(steps - min(int(steps * strength), steps), 0)
    timesteps = sched.timesteps[t_start * sched.order:]
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(t_start * sched.order)
    init = image()
    noise = torch.randn(init.shape, generator=torch.Generator().manual_seed(2))
    latents = sched.add_noise(init, noise, timesteps[:1].repeat(init.shape[0]))
    for i, t in enumerate(timesteps):
        out = unet(sched.scale_model_input(latents, t), t).sample
        latents = sched.step(out, t, latents, return_dict=False)[0]
        if inpaint_mask is not None:
            proper = init
            if i < len(timesteps) - 1:
                proper = sched.add_noise(init, noise, torch.tensor([timesteps[i + 1]]))
            latents = (1 - inpaint_mask) * proper + inpaint_mask * latents
        if callback is not None:
            latents = callback(i, t, {"latents": latents}).pop("latents", latents)
    return latents


def mask():
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:6, 2:6] = 1.0      # 1 = repaint
    return m


@pytest.mark.parametrize("method", METHODS)
def test_ddpm_and_ddim_pipelines_run_every_method(unet, method):
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.scheduler = as_diffusers_scheduler(method, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    a = pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
             output_type="np").images
    assert a.shape == (2, 8, 8, 1) and (a == a).all()
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler())
    pipe.scheduler = as_diffusers_scheduler(method, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    b = pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
             output_type="np").images
    assert (b == b).all()


@pytest.mark.parametrize("method", list(EQUIVALENT))
def test_pipeline_equals_diffusers_scheduler(unet, method):
    """DDIMPipeline / DDPMPipeline where diffusers' own scheduler fits the pipeline's step() call (DDIMPipeline
    passes eta, DDPMPipeline a generator, which UniPC's and PNDM's step() reject: they get the
    text-to-image loop, img2img at strength 1)."""
    ref = EQUIVALENT[method]
    if method in ("unipc", "pndm-diffusers"):
        theirs = img2img(unet, type(ref).from_config(ref.config), strength=1.0)
        torch.testing.assert_close(img2img(unet, ours_for(method), strength=1.0), theirs, rtol=1e-4, atol=5e-5)
        return

    def run(sched):
        pipe = (DDIMPipeline if method == "ddim" else DDPMPipeline)(unet=unet, scheduler=DDPMScheduler())
        pipe.scheduler = sched
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=2, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0),
                    output_type="np").images
    theirs = run(type(ref).from_config(ref.config))
    ours = run(ours_for(method))
    assert abs(ours - theirs).max() < 5e-5


def edit_callback(i, t, kwargs):
    """A callback_on_step_end that changes the latents (as a user's would, e.g. a guidance tweak)."""
    if i == 1:
        kwargs["latents"] = kwargs["latents"] * 0.8
    return kwargs


@pytest.mark.parametrize("method", METHODS)
def test_img2img_inpaint_and_callback_for_every_method(unet, method):
    plain = img2img(unet, ours_for(method))
    assert torch.isfinite(plain).all()
    painted = img2img(unet, ours_for(method), inpaint_mask=mask())
    # the last blend puts the known region back exactly; the repainted region is the model's
    torch.testing.assert_close(painted * (1 - mask()), image() * (1 - mask()), rtol=0, atol=1e-6)
    assert torch.isfinite(painted).all()
    edited = img2img(unet, ours_for(method), callback=edit_callback)
    assert torch.isfinite(edited).all() and (edited - plain).abs().max() > 1e-4
    if method in EQUIVALENT:
        ref = EQUIVALENT[method]
        for kw in ({}, {"inpaint_mask": mask()}, {"callback": edit_callback}):
            if isinstance(ref, PNDMScheduler):
                continue   # diffusers' PNDM has no set_begin_index; sliced, its warm-up counter restarts
            theirs = img2img(unet, type(ref).from_config(ref.config), **kw)
            ours = img2img(unet, ours_for(method), **kw)
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=5e-5)


def test_pipeline_save_and_load_keeps_method_and_knobs(unet, tmp_path):
    pipe = DDPMPipeline(unet=unet, scheduler=DDPMScheduler())
    pipe.scheduler = as_diffusers_scheduler("f-pndm", pipe.scheduler.config, float_t=True, clip_sample=False,
                                            method_knobs={"interp": "s"})
    pipe.save_pretrained(tmp_path)
    loaded = DDPMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.scheduler, AccelerandoScheduler)
    assert loaded.scheduler.config.method == "f-pndm" and loaded.scheduler.config.float_t
    assert loaded.scheduler.config.method_knobs == {"interp": "s"}
    for p in (pipe, loaded):
        p.set_progress_bar_config(disable=True)
    a = pipe(batch_size=1, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")
    b = loaded(batch_size=1, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="np")
    assert abs(a.images - b.images).max() < 1e-5         # the reloaded UNet differs by float rounding
    assert loaded.scheduler.timesteps.tolist() == pipe.scheduler.timesteps.tolist()


# ---------------------------------------------------------------- Stable Diffusion pipelines, tiny and offline
@pytest.fixture(scope="module")
def sd_parts(tmp_path_factory):
    """A tiny random Stable Diffusion (CLIP text encoder, a word-level CLIP tokenizer written here,
    conditional UNet, one-block VAE), built without any download."""
    import json

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    d = tmp_path_factory.mktemp("tok")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for i, c in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[c], vocab[c + "</w>"] = 3 + 2 * i, 4 + 2 * i
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    return dict(
        tokenizer=CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=16),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                  num_hidden_layers=1, num_attention_heads=2,
                                                  max_position_embeddings=16, projection_dim=16, bos_token_id=0,
                                                  eos_token_id=1, pad_token_id=1)).eval(),
        unet=UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                  block_out_channels=(8, 16), norm_num_groups=4, cross_attention_dim=16,
                                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2).eval(),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                          norm_num_groups=4, down_block_types=("DownEncoderBlock2D",),
                          up_block_types=("UpDecoderBlock2D",), sample_size=8).eval(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


SD_CONFIG = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                 set_alpha_to_one=False, steps_offset=1)   # Stable Diffusion 1.x's scheduler settings
SD_EQUIVALENT = {"ddim": DDIMScheduler(**SD_CONFIG),
                 "dpmpp-2m": DPMSolverMultistepScheduler(**{k: v for k, v in SD_CONFIG.items()
                                                            if k not in ("clip_sample", "set_alpha_to_one")}),
                 "unipc": UniPCMultistepScheduler(**{k: v for k, v in SD_CONFIG.items()
                                                     if k not in ("clip_sample", "set_alpha_to_one")})}


def sd_run(parts, kind, sched):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    img = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    common = dict(prompt="a cat", image=img, num_inference_steps=STEPS, guidance_scale=2.0, output_type="pt",
                  generator=torch.Generator().manual_seed(0))
    if kind == "img2img":
        pipe = StableDiffusionImg2ImgPipeline(scheduler=sched, **parts)
        common.update(strength=0.6, callback_on_step_end=lambda p, i, t, kw: {"latents": kw["latents"] * 0.98})
    else:
        pipe = StableDiffusionInpaintPipeline(scheduler=sched, **parts)   # 4-channel UNet: the mask-blend path
        m = torch.zeros(1, 1, 8, 8)
        m[..., 2:6, 2:6] = 1
        common.update(mask_image=m, strength=0.8, height=8, width=8)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(**common).images


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
@pytest.mark.parametrize("method", METHODS)
def test_stable_diffusion_img2img_and_inpaint_pipelines(sd_parts, method, kind):
    """diffusers' own StableDiffusionImg2ImgPipeline (with a callback_on_step_end editing the latents) and
    StableDiffusionInpaintPipeline, scheduler swapped from SD 1.x's config: every method runs; the ones
    that are diffusers' schedulers give diffusers' images."""
    base = SD_EQUIVALENT.get(method, DDIMScheduler(**SD_CONFIG))
    out = sd_run(sd_parts, kind, as_diffusers_scheduler(method, base.config))
    assert torch.isfinite(out).all()
    if method in SD_EQUIVALENT:
        theirs = sd_run(sd_parts, kind, type(base).from_config(base.config))
        torch.testing.assert_close(out, theirs, rtol=1e-4, atol=1e-4)
