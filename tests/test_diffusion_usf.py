"""USF plans: order 1 without correction is DDIM; a registered schedule runs through sample() and the
diffusers adapter with the same result; bad input fails in one line."""
import pytest
import torch

from accelerando.diffusion import as_diffusers_scheduler, make_schedule, sample
from accelerando.diffusion import usf
from accelerando.diffusion.api import drive
from accelerando.diffusion.oracle import random_mixture
from accelerando.diffusion.samplers._common import make_grid


@pytest.fixture
def sched():
    return make_schedule("linear", 1000)


def test_first_order_plan_is_ddim(sched):
    gm = random_mixture(4, 3, schedule=sched, seed=0)
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = make_grid(sched, 6, "trailing")
    plan = usf.USFPlan(grid.ab, (1,) * 6, (False,) * 6)
    ours, _ = drive(usf.usf(x, grid, plan=plan), gm.eps_fn)
    ref = sample(gm.eps_fn, x, schedule=sched, method="ddim", steps=6)
    assert torch.allclose(ours, ref, atol=1e-9, rtol=1e-9)


def test_registered_schedule_runs_in_sample_and_adapter(sched, tmp_path, monkeypatch):
    plan = usf.warped_plan(sched, 5, rho=2.0, t_min=10.0, orders=[3, 2, 3, 2, 1], correct=[True] * 5)
    f = tmp_path / "s.json"
    usf.save_schedule("t5", plan, {"note": "test"}, path=f)
    monkeypatch.setattr(usf, "SCHEDULES_FILE", f)
    gm = random_mixture(4, 3, schedule=sched, seed=1)
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x0, info = sample(gm.eps_fn, x, schedule=sched, method="usf-t5", steps=5, return_info=True)
    assert info.nfe == 5 and torch.isfinite(x0).all()
    ref = gm.reference(x, sched.alpha_bar(999), 1.0)
    ddim = sample(gm.eps_fn, x, schedule=sched, method="ddim", steps=5)
    assert (x0 - ref).pow(2).mean() < (ddim - ref).pow(2).mean()     # a 3rd-order corrected plan beats DDIM
    s = as_diffusers_scheduler("usf-t5")
    s.set_timesteps(5)
    assert len(s.timesteps) == 5
    xs = x.clone()
    for t in s.timesteps:
        xs = s.step(gm.eps_fn(xs, t.reshape(1).double()), t, xs).prev_sample
    assert torch.allclose(xs, x0, atol=1e-6)
    with pytest.raises(ValueError, match="exactly 5 model calls; use steps=5"):
        sample(gm.eps_fn, x, schedule=sched, method="usf-t5", steps=7)


def test_bad_plans():
    with pytest.raises(ValueError, match="orders must be in"):
        usf.USFPlan((0.1, 0.5, 1.0), (1, 4), (False, False))
    with pytest.raises(ValueError, match="increase strictly"):
        usf.USFPlan((0.5, 0.1, 1.0), (1, 1), (False, False))
    with pytest.raises(ValueError, match="unknown sampling method 'usf-nope'"):
        sample(lambda x, t: x, torch.zeros(1, 2), method="usf-nope", steps=5)
