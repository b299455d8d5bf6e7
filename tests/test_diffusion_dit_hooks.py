"""diffusers' cache hooks on a DiT actually fire (counted skips) and are exact where they should be."""
import pytest
import torch

from accelerando.diffusion.dit.hooks import HOOKS, DiffusersCache, calibrate_mag_ratios

from test_diffusion_dit import run, tiny_dit


def test_first_block_threshold_zero_is_full_compute():
    m = tiny_dit(layers=4)
    ref, _ = run(m, None, steps=8, guidance=2.0)
    out, c = run(m, DiffusersCache("first-block", threshold=0.0), steps=8, guidance=2.0)
    assert torch.equal(out, ref) and c.skipped_fraction == 0.0


@pytest.mark.parametrize("kind, knobs", [("first-block", {"threshold": 0.5}), ("taylorseer", {}), ("pab", {}),
                                          ("faster", {})])
def test_hook_fires(kind, knobs):
    m = tiny_dit(layers=4)
    ref, _ = run(m, None, steps=10, guidance=2.0)
    out, c = run(m, DiffusersCache(kind, steps=10, **knobs), steps=10, guidance=2.0)
    assert c.skipped_fraction > 0, kind
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    # the model passed in is untouched: the hook lives on a private copy
    again, _ = run(m, None, steps=10, guidance=2.0)
    assert torch.equal(again, ref)


def test_mag_calibrates_then_fires():
    m = tiny_dit(layers=4)
    ratios = calibrate_mag_ratios(m, lambda meth: run(m, meth, steps=10, guidance=2.0), 10)
    assert len(ratios) == 10
    _, c = run(m, DiffusersCache("mag", steps=10, mag_ratios=ratios, threshold=0.1), steps=10, guidance=2.0)
    assert c.skipped_fraction > 0


def test_hook_bad_input():
    with pytest.raises(ValueError, match="unknown diffusers hook 'nope'"):
        DiffusersCache("nope")
    # out-of-range knobs fail when the method is made, in one line naming the knob
    for kind, knobs, msg in [("first-block", {"threshold": 1.5}, "first-block cache threshold must be in"),
                             ("mag", {"threshold": -0.1, "mag_ratios": [1.0]}, "mag cache threshold must be in"),
                             ("taylorseer", {"interval": 0}, "taylorseer hook: interval must be >= 1"),
                             ("pab", {"skip": 0}, "pab hook: skip must be >= 1")]:
        with pytest.raises(ValueError, match=msg) as e:
            DiffusersCache(kind, steps=4, **knobs)
        assert "\n" not in str(e.value)
    from diffusers import UNet2DModel
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    with pytest.raises(TypeError, match="first-block hook: unsupported model class UNet2DModel"):
        DiffusersCache("first-block")._build(unet)
    assert set(HOOKS) == {"first-block", "taylorseer", "pab", "faster", "mag"}
