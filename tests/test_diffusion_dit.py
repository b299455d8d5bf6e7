"""DiT acceleration: exactness at the no-op settings, counted skips, one-line errors (tiny random DiTs)."""
import pytest
import torch

from accelerando.diffusion import sample
from accelerando.diffusion.dit import (BlockCache, BlockCacheConfig, DiTDenoiser, RASConfig, RegionAdaptive,
                                       ToMeConfig, TokenMerging, full_forward)
from accelerando.diffusion.dit.tome import Merge, dst_mask


def tiny_dit(size=8, layers=3, seed=0):
    from diffusers import DiTTransformer2DModel
    torch.manual_seed(seed)
    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                              num_layers=layers, sample_size=size, patch_size=2, num_embeds_ada_norm=10,
                              norm_num_groups=1)
    # random adaLN weights so every block matters (diffusers' init is not zero here, but be sure)
    return m.eval()


def run(model, method, *, steps=6, guidance=1.0, seed=1, b=2):
    x = torch.randn(b, 1, model.config.sample_size, model.config.sample_size,
                    generator=torch.Generator().manual_seed(seed))
    eps = DiTDenoiser(model, torch.arange(b) % 10, guidance=guidance, method=method)
    return sample(eps, x, method="ddim", steps=steps), eps.counts


def test_split_forward_equals_model():
    m = tiny_dit()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([999, 500, 3]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        assert torch.equal(full_forward(m, x, t, y), m(x, t, class_labels=y).sample)


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_noop_settings_equal_full_compute(guidance):
    m = tiny_dit()
    ref, c0 = run(m, None, guidance=guidance)
    assert c0.skipped_fraction == 0.0
    for method in (BlockCache(policy="threshold", threshold=0.0), BlockCache(policy="static", interval=1),
                   RegionAdaptive(ratio=1.0), TokenMerging(ratio=0.0)):
        assert method.is_noop()          # the denoiser calls the plain model: no overhead at all
        out, c = run(m, method, guidance=guidance)
        assert torch.equal(out, ref), type(method).__name__
        assert c.skipped_fraction == 0.0
        method.is_noop = lambda: False   # and the method's own path at that setting is exact too
        out, c = run(m, method, guidance=guidance)
        assert torch.equal(out, ref), type(method).__name__
        assert c.skipped_fraction == 0.0
    assert not BlockCache(policy="static", interval=2).is_noop() and not RegionAdaptive(ratio=0.5).is_noop()


def test_block_cache_counts_skips():
    m = tiny_dit(layers=4)
    _, c = run(m, BlockCache(policy="static", interval=2), steps=6)
    # steps 0, 2, 4 run all 4 blocks; 1, 3, 5 none
    assert c.skipped_fraction == pytest.approx(0.5)
    router = torch.zeros(6, 4, dtype=torch.bool)
    router[:, 0] = True
    _, c = run(m, BlockCache(policy="router", router=router), steps=6)
    # step 0 is warm-up (all 4), then 1 of 4 blocks on 5 steps
    assert c.skipped_fraction == pytest.approx(1 - (4 + 5) / 24)
    out, c = run(m, BlockCache(policy="threshold", threshold=1.0), steps=6)
    assert c.skipped_fraction > 0 and torch.isfinite(out).all()


def test_ras_counts_and_changes_only_by_reuse():
    m = tiny_dit(size=8)           # 16 tokens
    ref, _ = run(m, None, steps=8)
    out, c = run(m, RegionAdaptive(ratio=0.25, warmup=2), steps=8)
    # 2 full steps, 6 steps at 4 of 16 tokens
    assert c.skipped_fraction == pytest.approx(1 - (2 * 16 + 6 * 4) / (8 * 16))
    assert not torch.equal(out, ref) and torch.isfinite(out).all()


def test_attention_steps_equal_diffusers_attention():
    from accelerando.diffusion.dit.core import attention
    m = tiny_dit()
    attn = m.transformer_blocks[0].attn1
    nh = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(attention(attn, nh), attn(nh))


def test_ras_all_tokens_active_equals_full_compute_and_full_steps_count():
    # every token active on a RAS step: the cached-K/V path (gather, scatter, attention rows) must give
    # the full model's output up to float rounding, whatever order the focus put the tokens in
    m = tiny_dit(size=8)
    ref, _ = run(m, None, steps=6, guidance=1.5)
    out, c = run(m, RegionAdaptive(ratio=0.999, warmup=1), steps=6, guidance=1.5)
    assert c.skipped_fraction == 0.0
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # full steps: warm-up 0-1, error reset 4, dense 6-7 (of 8): 5 full + 3 steps at 4 of 16 tokens
    _, c = run(m, RegionAdaptive(ratio=0.25, warmup=2, reset_steps=(4,), dense_from=6), steps=8)
    assert c.skipped_fraction == pytest.approx(1 - (5 * 16 + 3 * 4) / (8 * 16))


def test_newton_forecast_is_exact_on_polynomials_of_its_order():
    from accelerando.diffusion.dit.cache import newton_forecast
    ts = [950.0, 900.0, 720.0]                                   # uneven, as a router leaves them
    a, b, c = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    line = [a + b * t for t in ts]
    quad = [a + b * t + c * t * t / 1e3 for t in ts]
    torch.testing.assert_close(newton_forecast(ts[1:], line[1:], 500.0), a + b * 500.0)
    torch.testing.assert_close(newton_forecast(ts, quad, 500.0), a + b * 500.0 + c * 250.0, rtol=1e-4, atol=1e-4)
    assert torch.equal(newton_forecast(ts[:1], line[:1], 500.0), line[0])


def test_forecast_cache_adds_the_extrapolated_residual():
    m = tiny_dit(layers=2)
    cache = BlockCache(policy="static", interval=2, order=1)
    x, y = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
    from accelerando.diffusion.dit.denoiser import Counts
    with torch.no_grad():
        for step, t in enumerate((900.0, 800.0, 700.0)):             # runs, skips, runs
            cache.forward(m, x, torch.full((2,), t), y, step=step, counts=Counts())
        hist = cache.history[1]
        assert [p[0] for p in hist] == [900.0, 700.0]
        (t0, a0, f0), (t1, a1, f1) = hist
        # a skipped step at t = 600: the ungated attention / MLP outputs on the line through the two runs
        a, f = cache.forecast(1, 600.0)
        torch.testing.assert_close(a, a1 + (600.0 - t1) * (a1 - a0) / (t1 - t0))
        torch.testing.assert_close(f, f1 + (600.0 - t1) * (f1 - f0) / (t1 - t0))
        # and a run's a, f rebuild its output with that step's gates
        from accelerando.diffusion.dit.core import block_forward, block_forward_parts, gates
        h, tt = torch.randn(2, 16, 16), torch.full((2,), 321.0)
        out, a, f = block_forward_parts(m.transformer_blocks[0], h, tt, y)
        g1, g2 = gates(m.transformer_blocks[0], tt, y, h.dtype)
        torch.testing.assert_close(out, h + g1[:, None] * a + g2[:, None] * f)
        assert torch.equal(out, block_forward(m.transformer_blocks[0], h, tt, y))
    ref, _ = run(m, None, steps=6)
    outs = {o: run(m, BlockCache(policy="static", interval=2, order=o), steps=6) for o in (0, 1, 2)}
    assert all(c.skipped_fraction == pytest.approx(0.5) for _, c in outs.values())
    assert not torch.equal(outs[0][0], outs[1][0]) and not torch.equal(outs[1][0], outs[2][0])
    every = BlockCache(policy="router", router=torch.ones(6, 2, dtype=torch.bool), order=2)
    every.is_noop = lambda: False                                  # the forecast path itself, never used
    assert torch.equal(run(m, every, steps=6)[0], ref)


def test_step_search_moves_computed_steps_while_the_final_image_improves():
    from accelerando.diffusion.dit.stepsearch import (StepSearchConfig, forecast_cache, moves, search_steps,
                                                      uniform_steps)
    assert uniform_steps(6, 0.5).tolist() == [True, False, True, False, True, False]
    assert uniform_steps(5, 0.4).tolist() == [True, False, True, False, False]
    assert sorted(c.nonzero().flatten().tolist() for c in moves(uniform_steps(6, 0.5))) == [
        [0, 1, 4], [0, 2, 3], [0, 2, 5], [0, 3, 4]]
    m = tiny_dit(layers=2)
    cfg = StepSearchConfig(steps=6, keep=0.5, order=1, batch=2, rounds=3)
    computed = search_steps(m, cfg, generator=torch.Generator().manual_seed(3))
    assert computed.dtype == torch.bool and computed[0] and int(computed.sum()) == 3
    # independently: the same calibration draw; the result beats (or is) the uniform start and no single
    # move improves it, unless the rounds ran out
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (2,), generator=g)
    ref = sample(DiTDenoiser(m, y), x, method="ddim", steps=6).clamp(-1, 1)

    def err(c):
        out = sample(DiTDenoiser(m, y, method=forecast_cache(c, 2, order=1)), x, method="ddim", steps=6)
        return float(((out.clamp(-1, 1) - ref) ** 2).mean())
    e = err(computed)
    assert e <= err(uniform_steps(6, 0.5))
    assert all(err(c) >= e for c in moves(computed))
    _, c = run(m, forecast_cache(computed, 2, order=1), steps=6)
    assert c.skipped_fraction == pytest.approx(0.5)


def test_ras_forecast_extrapolates_left_out_tokens_and_is_exact_when_all_are_active():
    m = tiny_dit(size=8)
    ref, _ = run(m, None, steps=6, guidance=1.5)
    for kv in (False, True):
        out, _ = run(m, RegionAdaptive(ratio=0.999, warmup=1, forecast=True, forecast_kv=kv), steps=6, guidance=1.5)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    r = RegionAdaptive(ratio=0.5, forecast=True)
    r.eps_patches, r.eps_prev = torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), 1.0)
    r.t_last, r.t_prev = torch.tensor([[800.0, 700.0]]), torch.tensor([[900.0, 700.0]])
    pred = r._predict(torch.tensor([700.0]))
    # token 0: the line through (900, 1) and (800, 2) at 700 -> 3; token 1: computed at 700 -> itself
    assert torch.equal(pred, torch.tensor([[[3.0] * 3, [2.0] * 3]]))
    # the line is followed at most one fitted span ahead: token 0 at 600 stays at 3
    assert torch.equal(r._predict(torch.tensor([600.0]))[0, 0], torch.full((3,), 3.0))
    plain, _ = run(m, RegionAdaptive(ratio=0.5, warmup=2), steps=6)
    fc, c = run(m, RegionAdaptive(ratio=0.5, warmup=2, forecast=True), steps=6)
    fkv, ckv = run(m, RegionAdaptive(ratio=0.5, warmup=2, forecast=True, forecast_kv=True), steps=6)
    assert not torch.equal(plain, fc) and not torch.equal(fc, fkv)
    assert c.skipped_fraction == ckv.skipped_fraction > 0


def test_ras_focus_prefers_high_score_and_starved_tokens():
    r = RegionAdaptive(ratio=0.5, starvation=0.0)
    r.eps_patches = torch.zeros(1, 4, 3)
    r.eps_patches[0, 2] = torch.tensor([1.0, -1.0, 0.0])
    r.stale = torch.zeros(1, 4)
    assert 2 in r.focus(1)[0].tolist()
    r = RegionAdaptive(ratio=0.5, starvation=10.0)
    r.eps_patches, r.stale = torch.zeros(1, 4, 3), torch.tensor([[0.0, 0.0, 0.0, 3.0]])
    r.eps_patches[0, :, 0] = 1.0
    r.eps_patches[0, 3, 0] = 0.5
    assert r.focus(1)[0].tolist() == [3]


def test_ras_delta_criterion_tracks_where_the_noise_moved():
    m = tiny_dit(size=8)
    r = RegionAdaptive(ratio=0.25, warmup=2, criterion="delta", starvation=0.0)
    eps = DiTDenoiser(m, torch.arange(2) % 10, method=r)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    prev = None
    for i, t in enumerate((999, 900, 800)):
        before = None if r.eps_patches is None else r.eps_patches.clone()
        eps(x, torch.tensor(t))
        if before is not None:
            moved = (r.eps_patches - before).norm(dim=-1)
            changed = moved > 0                     # full step: every token; RAS step: the 4 active ones
            torch.testing.assert_close(r.delta[changed], moved[changed])
            assert int(changed.sum()) == (2 * 16 if i < 2 else 2 * 4)
            if i == 2:
                assert torch.equal(r.delta[~changed], prev[~changed])   # the others keep their last change
        prev = r.delta.clone()


def test_tome_merge_unmerge_roundtrip_and_mean():
    x = torch.randn(2, 16, 5)
    dst = dst_mask(4, 2)
    m = Merge(x, dst, r=0)
    assert torch.equal(m.unmerge(m(x)), x)
    m = Merge(x, dst, r=6)
    y = m(x)
    assert y.shape == (2, 10, 5)
    back = m.unmerge(y)
    # every merged source gets exactly its destination's value
    for b in range(2):
        for s, d in zip(m.merged_src[b].tolist(), m.into[b].tolist()):
            assert torch.equal(back[b, m.src_idx[s]], back[b, m.dst_idx[d]])
    # a destination holds the mean of itself and the sources merged into it
    b, d = 0, int(m.into[0, 0])
    group = [x[b, m.dst_idx[d]]] + [x[b, m.src_idx[s]] for s, dd in zip(m.merged_src[b].tolist(),
                                                                         m.into[b].tolist()) if dd == d]
    assert torch.allclose(back[b, m.dst_idx[d]], torch.stack(group).mean(0), atol=1e-6)


def test_tome_counts():
    m = tiny_dit(size=8)
    out, c = run(m, TokenMerging(ratio=0.5), steps=3)
    # 16 tokens: 4 destinations, 12 sources, 6 merged away per block
    assert c.skipped_fraction == pytest.approx(6 / 16)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("make, msg", [
    (lambda: BlockCacheConfig(threshold=1.5), "threshold"),
    (lambda: BlockCacheConfig(threshold=-0.1), "threshold"),
    (lambda: RASConfig(ratio=0.0), "region ratio"),
    (lambda: RASConfig(dense_from=0), "dense_from"),
    (lambda: RASConfig(reset_steps=(-1,)), "reset_steps"),
    (lambda: ToMeConfig(ratio=1.5), "merge ratio"),
    (lambda: BlockCacheConfig(policy="router"), "router"),
    (lambda: BlockCacheConfig(order=3), "forecast order"),
    (lambda: RASConfig(forecast_kv=True), "forecast_kv"),
])
def test_bad_knobs_one_line_errors(make, msg):
    with pytest.raises(ValueError, match=msg) as e:
        make()
    assert "\n" not in str(e.value)


def test_unsupported_model_class():
    from diffusers import UNet2DModel
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    with pytest.raises(TypeError, match="unsupported model class UNet2DModel") as e:
        DiTDenoiser(unet, torch.tensor([0]))
    assert "\n" not in str(e.value)


def test_harmonica_soft_gates_one_is_full_and_router_trains(tmp_path):
    from accelerando.diffusion.dit.core import full_forward
    from accelerando.diffusion.dit.harmonica import (HarmoniCaConfig, harmonica_cache, load_router, router_table,
                                                     save_router, soft_forward, train_router)
    m = tiny_dit(layers=3)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([500, 500]), torch.tensor([1, 2])
    residual = [torch.randn(2, 16, 16) for _ in range(3)]
    with torch.no_grad():
        assert torch.equal(soft_forward(m, x, t, y, torch.ones(3), residual), full_forward(m, x, t, y))
    cfg = HarmoniCaConfig(steps=4, iterations=2, batch_size=2, lambda_every=1, lambda_batch=2, beta=0.5)
    res = train_router(m, cfg, generator=torch.Generator().manual_seed(0))
    assert res["logits"].shape == (4, 3) and len(res["log"]) == 2
    assert (res["logits"] < cfg.init).any()          # the compute term pushed some gates down
    table = router_table(res["logits"], keep=0.5)
    assert table.shape == (4, 3) and table[0].all() and int(table.sum()) == 6
    save_router(tmp_path / "r.json", res, model_name="tiny")
    logits, cfg2 = load_router(tmp_path / "r.json")
    assert torch.equal(logits, res["logits"]) and cfg2 == cfg
    _, c = run(m, harmonica_cache(logits, keep=0.5), steps=4)
    assert c.skipped_fraction == pytest.approx(0.5)


def test_psnr_ssim():
    from accelerando.diffusion.dit.quality import psnr, ssim
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 16, 16, generator=g) * 2 - 1
    assert psnr(x, x) == float("inf") and ssim(x, x) == pytest.approx(1.0)
    noise = 0.1 * torch.randn(x.shape, generator=g)
    # PSNR of additive noise: 10 log10(4 / mse)
    mse = float((noise.double() ** 2).flatten(1).mean(1).log10().neg().mul(10).add(10 * torch.log10(torch.tensor(4.0))).mean())
    assert psnr(x + noise, x) == pytest.approx(mse)
    assert ssim(x + noise, x) > ssim(x + 5 * noise, x) > -1


def test_bench_arms_on_a_dit_workload_and_not_elsewhere():
    from accelerando.bench.methods import DiffusionSetup, NotApplicable, get_method
    from accelerando.bench.runner import unet_eps_fn
    from accelerando.diffusion import make_schedule
    m = tiny_dit(layers=4)
    eps = unet_eps_fn(m)
    assert isinstance(eps, DiTDenoiser)
    setup = DiffusionSetup(eps_fn=eps, schedule=make_schedule("linear", 1000), x_T=torch.randn(2, 1, 8, 8), steps=6)
    ref = sample(eps, setup.x_T, method="ddim", steps=6)
    out = get_method("dit-cache-static").build(setup, interval=1)()
    assert torch.equal(out.x0, ref) and out.stats["skipped_fraction"] == 0.0
    out = get_method("dit-ras").build(setup)()
    assert out.nfe == 6 and out.stats["skipped_fraction"] > 0
    # an arm's method object serves every timed run: each run is a fresh trajectory (state reset)
    for arm in ("dit-ras", "dit-cache-threshold", "dit-diffusers-fbc", "dit-diffusers-taylorseer"):
        run_arm = get_method(arm).build(setup)
        a, b = run_arm(), run_arm()
        assert torch.equal(a.x0, b.x0) and a.stats == b.stats, arm
    with pytest.raises(ValueError, match="region ratio"):
        get_method("dit-ras").build(setup, ratio=0.0)          # bad knobs fail at build, not mid-run
    with pytest.raises(NotApplicable, match="needs a DiT workload"):
        get_method("dit-tome").build(DiffusionSetup(eps_fn=lambda x, t: x, schedule=setup.schedule,
                                                    x_T=setup.x_T, steps=6))


def test_demo_runs_the_dit_arms_on_the_zoo_dit(tmp_path):
    """`accelerando demo` runs the DiT arms on the zoo DiT (rows, not n/a on the UNet)."""
    import io
    from rich.console import Console
    from accelerando import zoo
    from accelerando.bench.history import open_history
    from accelerando.bench.methods import all_methods
    from accelerando.cli import demo as D
    if not zoo.is_trained("digits-dit"):
        pytest.skip("zoo DiT not trained")
    arms = D._dit_arms()
    assert {"dit-cache-static", "dit-ras", "dit-tome", "dit-diffusers-fbc"} <= arms
    methods = [m for m in all_methods("diffusion") if m.is_baseline or m.name in arms]
    collected: list = []
    with open_history(tmp_path / "h.sqlite") as h:
        D._demo_dit(Console(file=io.StringIO()), h, methods, 3, 2, 6, 1, "cpu", collected)
        assert h.count() == len(methods)
    title, fam, rows = collected[0]
    assert fam == "dit" and "digits-dit" in title
    assert {r.method for r in rows} == {m.name for m in methods} and not any(r.error for r in rows)
    assert any(line.startswith("DiT:") for line in D.takeaway(collected))


def test_harmonica_step_loss_is_in_x_space():
    """SDT's step loss is on x_{t-1} (the paper): a DDIM step scales an eps error by c_s, far larger at
    the high-noise steps; weights have mean 1 (beta keeps its scale); loss_space='eps' is uniform."""
    from accelerando.diffusion.dit.harmonica import HarmoniCaConfig, _grid, step_weights
    from accelerando.diffusion.samplers._common import transfer
    cfg = HarmoniCaConfig(steps=10)
    w = step_weights(cfg)
    assert w.shape == (10,) and float(w.mean()) == pytest.approx(1.0)
    # proportional to the squared change of the DDIM step's output per unit eps change (the sampler's own step)
    grid, x, e = _grid(cfg), torch.zeros(1), torch.zeros(1)
    ab = list(grid.ab) + [1.0]
    c2 = torch.tensor([float(transfer(x, e + 1, ab[i], ab[i + 1]) - transfer(x, e, ab[i], ab[i + 1])) ** 2
                       for i in range(10)])
    torch.testing.assert_close(w, c2 / c2.mean())
    assert w[0] > 5 * w[-2] and bool((w[:-1].diff() < 0).all())
    assert torch.equal(step_weights(HarmoniCaConfig(steps=10, loss_space="eps")), torch.ones(10))
    with pytest.raises(ValueError, match="loss_space"):
        HarmoniCaConfig(loss_space="z")


def test_harmonica_leave_out_proxy():
    """'leave-out' lambda: computing step s fully under the current router; all-True router -> no change."""
    from accelerando.diffusion.dit.harmonica import HarmoniCaConfig, iepo_lambda
    m = tiny_dit(layers=2)
    cfg = HarmoniCaConfig(steps=4, lambda_batch=1, proxy="leave-out")
    lam = iepo_lambda(m, torch.full((4, 2), 5.0), cfg, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lam, torch.full((4,), 1e-3))          # nothing skipped: every step's change is 0
    logits = torch.tensor([[5.0, 5.0], [-5.0, -5.0], [-5.0, -5.0], [5.0, 5.0]])
    lam = iepo_lambda(m, logits, cfg, generator=torch.Generator().manual_seed(0))
    assert float(lam.mean()) == pytest.approx(1.0 + 1e-3) and lam[1] > 0.01 and lam[0] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="proxy"):
        HarmoniCaConfig(proxy="both")
