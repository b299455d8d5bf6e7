"""The sample() API: call counts, spacings that reach the end, the oracle, bad input."""

import math

import pytest
import torch

from accelerando.diffusion import (METHODS, SPECS, BelowMinimumError, ContinuousSchedule, NonFiniteError,
                                   make_schedule, min_nfe, nfe_for, sample, steps_for_nfe, timesteps)
from accelerando.diffusion.models import to_eps
from accelerando.diffusion.oracle import random_mixture

SCHED = make_schedule("linear", 1000)


def counting(fn):
    calls = []

    def eps(x, t):
        calls.append(t)
        return fn(x, t)
    return eps, calls


def smooth_eps(x, t):
    return 0.3 * torch.tanh(x)


def test_methods_listed():
    for m in ("ddim", "ddim-eta", "prk", "plms2", "plms3", "plms4", "s-pndm", "f-pndm", "fon", "dpmpp-2m",
              "dpmpp-3m", "unipc", "unipc3", "hb-plms", "hb-dpmpp-2m", "ghvb", "pndm-diffusers",
              "pndm-diffusers-prk"):
        assert m in METHODS


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("steps", [0, 7])      # 0: the method's minimum
@pytest.mark.parametrize("final_one", [True, False])
def test_nfe_is_reported_and_documented(method, steps, final_one):
    steps = steps or SPECS[method].min_steps
    sched = make_schedule("linear", 1000, set_alpha_to_one=final_one)
    eps, calls = counting(smooth_eps)
    x = torch.randn(2, 3, dtype=torch.float64)
    _, info = sample(eps, x, schedule=sched, method=method, steps=steps, return_info=True,
                     generator=torch.Generator().manual_seed(0))
    assert info.nfe == len(calls) == nfe_for(method, steps, sched)
    assert all(t >= 0 for t in info.times)      # the model is never asked at the end point t = -1


def test_nfe_formulas():
    assert nfe_for("f-pndm", 50) == 59 and nfe_for("s-pndm", 50) == 51
    # PRK's last step into alpha_bar = 1 has no model time at its end: 3 stages instead of 4
    assert nfe_for("prk", 10) == 39 and nfe_for("prk", 10, make_schedule(set_alpha_to_one=False)) == 40
    assert steps_for_nfe("f-pndm", 20) == 11 and steps_for_nfe("ddim", 20) == 20 and steps_for_nfe("prk", 2) is None


# warm-up + one step of the main scheme; below it one RK step spans the interval and diverges
MINIMA = {"f-pndm": (4, 13), "pndm-diffusers-prk": (4, 13), "prk": (3, 11), "fon": (3, 11),
          "s-pndm": (2, 3), "s-pndm4": (2, 3), "pndm-diffusers": (2, 3), "ddim": (1, 1), "dpmpp-3m": (1, 1)}


@pytest.mark.parametrize("method", MINIMA)
def test_minimum_budgets(method):
    steps, nfe = MINIMA[method]
    assert SPECS[method].min_steps == steps and min_nfe(method, SCHED) == nfe
    assert nfe_for(method, steps, SCHED) == nfe
    for budget in range(1, nfe):
        assert steps_for_nfe(method, budget, SCHED) is None, budget
    assert steps_for_nfe(method, nfe, SCHED) == steps


@pytest.mark.parametrize("budget, steps", [(5, None), (10, None), (12, None), (13, 4), (14, 5), (20, 11)])
def test_f_pndm_small_budgets(budget, steps):
    assert steps_for_nfe("f-pndm", budget) == steps


@pytest.mark.parametrize("method", ["f-pndm", "prk", "fon", "pndm-diffusers-prk"])
def test_below_minimum_is_refused_not_divergent(method):
    steps = SPECS[method].min_steps - 1
    with pytest.raises(BelowMinimumError, match=rf"{method} needs at least {steps + 1} steps = "
                                                rf"{min_nfe(method, SCHED)} model calls: .*got steps={steps}"):
        sample(smooth_eps, torch.randn(1, 2), schedule=SCHED, method=method, steps=steps)


@pytest.mark.parametrize("method", ["f-pndm", "prk", "fon"])
def test_minimum_is_not_divergent_on_the_oracle(method):
    """At the minimum the error is within a few times DDIM's at the same calls (F-PNDM 0.42 vs 0.12,
    PRK 0.27 vs 0.12); one step below it, it is ~1e3."""
    gm = random_mixture(2, 4, schedule=SCHED, seed=0)
    x = torch.randn(32, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = gm.reference(x, SCHED.alpha_bar(999), 1.0)
    n = SPECS[method].min_steps
    err = (sample(gm.eps_fn, x, schedule=SCHED, method=method, steps=n) - ref).pow(2).mean().sqrt()
    x_ddim = sample(gm.eps_fn, x, schedule=SCHED, method="ddim", steps=min_nfe(method, SCHED))
    ddim = (x_ddim - ref).pow(2).mean().sqrt()
    assert err < 5 * ddim, (float(err), float(ddim))


def test_registry_refuses_a_budget_below_the_minimum():
    from accelerando.bench.methods import DiffusionSetup, NotApplicable, get_method
    gm = random_mixture(2, 2, schedule=SCHED, seed=0)
    x = torch.randn(3, 2, dtype=torch.float64)
    for method, (_, nfe) in MINIMA.items():
        if nfe == 1:
            continue
        with pytest.raises(NotApplicable, match=rf"{method} needs .*{nfe} model calls.*the budget is {nfe - 1}"):
            get_method(method).build(DiffusionSetup(eps_fn=gm.eps_fn, schedule=SCHED, x_T=x, steps=nfe - 1))
        o = get_method(method).build(DiffusionSetup(eps_fn=gm.eps_fn, schedule=SCHED, x_T=x, steps=nfe))()
        assert o.nfe == nfe and o.stats["steps"] == MINIMA[method][0]


def test_runner_marks_a_refused_budget_not_applicable():
    from accelerando.bench.methods import DiffusionSetup
    from accelerando.bench.runner import run_methods
    gm = random_mixture(2, 2, schedule=SCHED, seed=0)
    setup = DiffusionSetup(eps_fn=gm.eps_fn, schedule=SCHED, x_T=torch.randn(3, 2, dtype=torch.float64), steps=5)
    rows = {r.method: r for r in run_methods(setup, ["ddim", "f-pndm", "s-pndm"], workload={"model": "oracle"},
                                             repeats=1, warmup=0)}
    assert rows["f-pndm"].not_applicable and rows["f-pndm"].error.startswith("n/a: f-pndm needs at least 4 steps")
    assert rows["ddim"].error is None and rows["s-pndm"].error is None and not rows["s-pndm"].not_applicable


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("final_one", [True, False])
def test_every_spacing_integrates_the_whole_interval(spacing, method, final_one):
    """eps = 0 makes the exact solution x_T * sqrt(final / a(first timestep)); every method must land there."""
    sched = make_schedule("linear", 1000, set_alpha_to_one=final_one)
    x = torch.randn(2, 3, dtype=torch.float64)
    zero = lambda x, t: torch.zeros_like(x)  # noqa: E731
    knobs = {"eta": 0.0} if method == "ddim-eta" else {}
    out, info = sample(zero, x, schedule=sched, method=method, steps=13, spacing=spacing, return_info=True, **knobs)
    first = timesteps(1000, 14 if SPECS[method].drop_zero and spacing != "trailing" else 13, spacing)[0]
    assert info.times[0] == first and info.grid.ab[-1] == sched.final_alpha_bar
    exact = x * math.sqrt(sched.final_alpha_bar / float(sched.alphas_cumprod[first]))
    tol = 0.05 if method == "fon" else 1e-12   # FON (classical RK4 in t) is not exact for eps = 0
    torch.testing.assert_close(out, exact, rtol=tol, atol=0)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("steps", [5, 10, 20])
def test_multistep_grids_spend_no_call_at_t0_like_diffusers_dpm_solver(spacing, steps):
    """drop_zero: N calls = the first N of the spacing's N + 1 timesteps (diffusers' DPMSolverMultistep and
    UniPC convention), so no call is spent on the step t = 0 -> alpha_bar = 1; DDIM keeps DDIMScheduler's grid."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
    dpm = DPMSolverMultistepScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    dpm.set_timesteps(steps)
    _, info = sample(smooth_eps, torch.randn(1, 2), schedule=SCHED, method="dpmpp-2m", steps=steps,
                     spacing=spacing, return_info=True)
    assert info.times == [float(t) for t in dpm.timesteps] and info.grid.ab[-1] == 1.0
    assert 0.0 not in info.times
    ddim = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    ddim.set_timesteps(steps)
    _, info = sample(smooth_eps, torch.randn(1, 2), schedule=SCHED, method="ddim", steps=steps, spacing=spacing,
                     return_info=True)
    assert info.times == [float(t) for t in ddim.timesteps]


def test_float_t_places_midpoints_between_integers():
    _, info = sample(smooth_eps, torch.randn(1, 2), schedule=SCHED, method="prk", steps=7, return_info=True)
    assert all(float(t).is_integer() for t in info.times)
    _, info = sample(smooth_eps, torch.randn(1, 2), schedule=SCHED, method="prk", steps=7, return_info=True,
                     float_t=True)
    assert any(not float(t).is_integer() for t in info.times)


def test_ddim_eta_reproducible_and_eta_zero_is_ddim():
    x = torch.randn(4, 3, dtype=torch.float64)
    a = sample(smooth_eps, x, schedule=SCHED, method="ddim-eta", steps=10, generator=torch.Generator().manual_seed(1))
    b = sample(smooth_eps, x, schedule=SCHED, method="ddim-eta", steps=10, generator=torch.Generator().manual_seed(1))
    c = sample(smooth_eps, x, schedule=SCHED, method="ddim-eta", steps=10, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    torch.testing.assert_close(sample(smooth_eps, x, schedule=SCHED, method="ddim-eta", steps=10, eta=0.0),
                               sample(smooth_eps, x, schedule=SCHED, method="ddim", steps=10), rtol=0, atol=0)


def test_ddim_eta_matches_the_data_distribution_on_the_oracle():
    """Stochastic DDIM (eta = 1, many steps) samples the mixture: mean and variance match."""
    gm = random_mixture(2, 2, schedule=SCHED, seed=3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, dtype=torch.float64, generator=g)
    out = sample(gm.eps_fn, x, schedule=SCHED, method="ddim-eta", steps=100, generator=g)
    data = gm.sample_data(20000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out.mean(0), data.mean(0), rtol=0, atol=0.06)
    torch.testing.assert_close(out.var(0), data.var(0), rtol=0.1, atol=0.02)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedules_match_diffusers(name):
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name).alphas_cumprod.to(torch.float64)
    ours = make_schedule(name, 1000, betas_dtype=torch.float32).alphas_cumprod
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)


def test_schedule_float_time_and_inverse():
    for s in (SCHED, ContinuousSchedule()):
        for t in (0.0, 12.5, 499.25, 998.0):
            assert abs(s.time_of(s.alpha_bar(t)) - t) < 1e-7
    assert SCHED.alpha_bar(-1) == 1.0 and SCHED.alpha_bar(10) == float(SCHED.alphas_cumprod[10])


def test_prediction_type_conversion():
    x, e, a = torch.randn(3), torch.randn(3), 0.3
    x0 = (x - math.sqrt(1 - a) * e) / math.sqrt(a)
    torch.testing.assert_close(to_eps(math.sqrt(a) * e - math.sqrt(1 - a) * x0, x, a, "v_prediction"), e)
    torch.testing.assert_close(to_eps(x0, x, a, "sample"), e)


# ----------------------------------------------------------------------------- bad input

def test_unknown_method_lists_valid_ones():
    with pytest.raises(ValueError, match="valid methods: ddim"):
        sample(smooth_eps, torch.randn(1, 2), schedule=SCHED, method="euler-magic")


def test_too_few_steps():
    with pytest.raises(ValueError, match="at least 2 steps"):
        sample(smooth_eps, torch.randn(1, 2), schedule=SCHED, method="s-pndm", steps=1)


def test_too_many_steps():
    with pytest.raises(ValueError, match="number of training timesteps"):
        sample(smooth_eps, torch.randn(1, 2), schedule=SCHED, method="ddim", steps=1001)


def test_non_finite_eps_names_the_call():
    def bad(x, t):
        return torch.full_like(x, float("nan")) if int(t[0]) < 500 else torch.zeros_like(x)
    with pytest.raises(NonFiniteError, match=r"model call \d+ \(t=4\d\d"):
        sample(bad, torch.randn(1, 2), schedule=SCHED, method="f-pndm", steps=10)


def test_non_finite_check_is_exact():
    """drive() tests the eps sum first: one inf among finite values raises; finite values whose sum
    overflows do not (the exact test clears them)."""
    from accelerando.diffusion.api import drive

    def one_request(x):
        yield x, 10.0
        return x

    huge = lambda x, t: torch.full_like(x, 3e38)  # noqa: E731  float32 sum overflows to inf
    x = torch.zeros(2, 4)
    assert torch.equal(drive(one_request(x), huge)[0], x)
    one_inf = lambda x, t: torch.zeros_like(x).index_fill_(1, torch.tensor([2]), float("inf"))  # noqa: E731
    with pytest.raises(NonFiniteError):
        drive(one_request(x), one_inf)
    pos_neg_inf = lambda x, t: torch.tensor([[float("inf"), -float("inf"), 0.0, 0.0]] * 2)  # noqa: E731
    with pytest.raises(NonFiniteError):
        drive(one_request(x), pos_neg_inf)


@pytest.mark.parametrize("schedule,float_t", [(SCHED, False), (make_schedule("squaredcos_cap_v2", 1000), True),
                                              (ContinuousSchedule(), True)])
def test_grid_adams_weights_equal_per_step(schedule, float_t):
    """PLMS's weights precomputed for the whole grid == adams_weights_in_t step by step."""
    from accelerando.diffusion.samplers._common import adams_weights_in_t, adams_weights_in_t_steps, make_grid
    grid = make_grid(schedule, 12, "trailing", float_t=float_t)
    steps = range(1, grid.steps)
    ks = [min(2 + n, 4) for n in range(len(steps))]
    got = adams_weights_in_t_steps(grid, steps, ks)
    for i, k, w in zip(steps, ks, got):
        assert w == pytest.approx(adams_weights_in_t(grid, i, k), rel=1e-12, abs=1e-12)


def test_schedule_times_of_equals_time_of():
    import numpy as np
    for name in ("linear", "squaredcos_cap_v2"):
        sched = make_schedule(name, 1000)
        ab = np.array([sched.alpha_bar(t) for t in (999, 998.5, 500, 3.25, 0, -1)])
        assert sched.times_of(ab).tolist() == pytest.approx([sched.time_of(a) for a in ab], rel=1e-13, abs=1e-12)


def test_non_finite_start():
    with pytest.raises(ValueError, match="non-finite"):
        sample(smooth_eps, torch.tensor([[float("inf"), 0.0]]), schedule=SCHED, method="ddim", steps=5)


def test_bad_sampler_options():
    x = torch.randn(1, 2)
    with pytest.raises(ValueError, match="last_step must be"):
        sample(smooth_eps, x, schedule=SCHED, method="unipc3", steps=5, last_step="euler")
    with pytest.raises(ValueError, match="warmup must be"):
        sample(smooth_eps, x, schedule=SCHED, method="f-pndm", steps=5, warmup="t")
    with pytest.raises(ValueError, match="stages must be"):
        sample(smooth_eps, x, schedule=SCHED, method="prk", steps=5, stages="t")


def test_bad_schedule_names():
    with pytest.raises(ValueError, match="valid: linear"):
        make_schedule("cosine-ish")
    with pytest.raises(ValueError, match="spacing"):
        timesteps(1000, 10, "uniform")


# ----------------------------------------------------------------------------- registry

def test_registry_entries_fit_the_budget_and_diffusers_loops_run():
    from accelerando.bench.methods import DiffusionSetup, all_methods, get_method
    names = {e.name for e in all_methods("diffusion")}
    assert set(METHODS) <= names
    assert {"diffusers-ddim", "diffusers-pndm", "diffusers-dpmpp2m", "diffusers-unipc"} <= names
    assert [e.name for e in all_methods("diffusion") if e.is_baseline] == ["ddim"]
    gm = random_mixture(2, 2, schedule=SCHED, seed=0)
    setup = DiffusionSetup(eps_fn=gm.eps_fn, schedule=SCHED, x_T=torch.randn(3, 2, dtype=torch.float64), steps=10)
    outs = {}
    for name in ("ddim", "s-pndm", "diffusers-ddim", "diffusers-pndm", "diffusers-dpmpp2m", "diffusers-unipc"):
        o = get_method(name).build(setup)()
        assert o.nfe <= 10 and torch.isfinite(o.x0).all()
        outs[name] = o.x0
    torch.testing.assert_close(outs["ddim"], outs["diffusers-ddim"], rtol=1e-5, atol=1e-5)


def test_s_pndm_warm_up_interpolated_in_t_does_not_blow_up_on_cosine():
    """squaredcos_cap_v2 starts at s ~ 1e2-1e3: the trapezoid in s (PNDM's, diffusers') puts half the weight
    of that whole span on the eps at its far end; interpolating in t does not (RMSE 180 -> 0.36 at 5 calls)."""
    sched = make_schedule("squaredcos_cap_v2", 1000)
    gm = random_mixture(4, 4, schedule=sched, seed=2)
    x = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = gm.reference(x, sched.alpha_bar(999), 1.0)

    def err(method, **knobs):
        return float((sample(gm.eps_fn, x, schedule=sched, method=method, steps=4, **knobs) - ref).pow(2).mean().sqrt())
    ddim = err("ddim")
    assert err("s-pndm") < 2 * ddim and err("s-pndm4") < 3 * ddim
    assert err("s-pndm", interp="s") > 10 * ddim     # the classical warm-up, as in diffusers' PNDM


def _cosine_oracle(batch=32):
    sched = make_schedule("squaredcos_cap_v2", 1000)
    gm = random_mixture(16, 8, schedule=sched, seed=2)
    x = torch.randn(batch, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = gm.reference(x, sched.alpha_bar(999), 1.0)

    def err(method, steps, **knobs):
        x0 = sample(gm.eps_fn, x, schedule=sched, method=method, steps=steps, **knobs)
        return float((x0 - ref).pow(2).mean().sqrt())
    return err


def test_f_pndm_warm_up_in_alpha_does_not_blow_up_on_cosine():
    """squaredcos_cap_v2's first step spans s from 2e4 to 6: PNDM's RK4 stages in s diverge there (RMSE ~1e6
    at 20 calls), the stages interpolated in sqrt(alpha_bar) do not (this oracle, batch 32: 0.062 integer t,
    0.022 float t, DDIM at 20 calls 0.087; 4e-4 at 50 calls)."""
    err = _cosine_oracle()
    ddim = err("ddim", 20)
    assert err("f-pndm", 11) < ddim and err("f-pndm", 11, float_t=True) < 0.5 * ddim
    assert err("f-pndm", 41, float_t=True) < 0.05 * ddim        # 50 calls: 4e-4
    assert err("f-pndm", 11, warmup="s") > 1e3                   # PNDM's warm-up, as in diffusers


def test_unipc3_last_step_beats_first_order_end_on_cosine():
    """UniPC's last step into alpha_bar = 1 is first order (returns the data prediction); unipc3's pseudo
    Adams step in s is 3rd order: 0.033 -> 0.010 at 10 calls, 0.0079 -> 0.0017 at 20 on this oracle."""
    err = _cosine_oracle()
    for steps in (10, 20):
        assert err("unipc3", steps) < 0.5 * err("unipc", steps), steps
