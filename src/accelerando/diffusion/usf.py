"""USF (Liu et al. 2023, "A Unified Sampling Framework for Solver Searching of Diffusion Probabilistic
Models"): a sampler is a per-step choice of timestep, solver order and whether to correct; search those
choices for a budget of model calls instead of fixing one solver.

Here a plan is N model calls at alpha_bar points ``ab`` (noise -> data, ending at the schedule's
final alpha_bar), a predictor order per step (UniP in data prediction, orders 1-3; order 1 is DDIM)
and per step whether UniC corrects the new point with the model call made there (free: no extra call).
The time grid is searched as ``t_i = t_min + (T - t_min)(1 - i/(N-1))^rho`` plus per-point log-SNR
nudges; ``search`` does random search then coordinate descent on the exact-score oracle's error (S^3,
the paper's search, uses an evolutionary search on a proxy of FID; here the oracle gives the exact error).

Searched plans ship in ``usf_schedules.json`` as methods named ``usf-<name>`` usable from ``sample()``
and ``as_diffusers_scheduler``: ``sample(eps, x_T, method="usf-10", steps=10)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .samplers._common import Grid, Sampler, ask, x0_hat
from .schedules import log_snr_lambda

SCHEDULES_FILE = Path(__file__).with_name("usf_schedules.json")
ORDERS = (1, 2, 3)


@dataclass(frozen=True)
class USFPlan:
    ab: tuple[float, ...]              # N + 1 alpha_bar points, increasing (noise -> data)
    orders: tuple[int, ...]            # N predictor orders in 1..3
    correct: tuple[bool, ...]          # N: UniC-correct the point reached by step i (uses call i + 1)

    def __post_init__(self) -> None:
        n = len(self.ab) - 1
        if n < 1 or len(self.orders) != n or len(self.correct) != n:
            raise ValueError("a USF plan needs N + 1 alpha_bar points, N orders and N correct flags")
        if any(b <= a for a, b in zip(self.ab, self.ab[1:])) or not 0 < self.ab[0]:
            raise ValueError("USF alpha_bar points must increase strictly from > 0")
        if any(o not in ORDERS for o in self.orders):
            raise ValueError(f"USF orders must be in {ORDERS}, got {self.orders}")

    @property
    def nfe(self) -> int:
        return len(self.ab) - 1


def plan_grid(plan: USFPlan, schedule: Any) -> Grid:
    """The plan's points as a float-time Grid on ``schedule`` (its end point at t = -1 when it is the
    schedule's final alpha_bar, as ``make_grid`` does)."""
    ts = [float(schedule.time_of(a)) for a in plan.ab[:-1]]
    end = plan.ab[-1]
    t_end = -1.0 if end >= schedule.final_alpha_bar and not getattr(schedule, "continuous", False) \
        else float(schedule.time_of(end))
    ab = list(plan.ab[:-1]) + [float(schedule.final_alpha_bar) if t_end == -1.0 else end]
    return Grid(tuple(ts) + (t_end,), tuple(ab), schedule, float_t=True)


def usf(x: torch.Tensor, grid: Grid, *, plan: USFPlan, steps_check: bool = True, start: int = 0) -> Sampler:
    """Run ``plan`` (the grid passed in only supplies the schedule and must have the plan's N steps).
    ``start`` (the adapter's img2img entry point) must be 0: a searched schedule is a whole trajectory."""
    from .samplers.unipc import _uni_update
    if start != 0:
        raise ValueError(f"a USF schedule runs whole trajectories from noise; start={start} (img2img) is not supported")
    if steps_check and grid.steps != plan.nfe:
        raise ValueError(f"this USF schedule makes exactly {plan.nfe} model calls; use steps={plan.nfe}")
    g = plan_grid(plan, grid.schedule)
    ms: list[torch.Tensor] = []
    lams: list[float] = []
    x_prev, k_prev = None, 0
    for i in range(g.steps):
        a = g.ab[i]
        x, e = yield from ask(x, g.t[i], a, i)      # a driver may hand back an edited x with eps
        m = x0_hat(x, e, a)
        if i > 0 and plan.correct[i - 1]:
            x = _uni_update(x_prev, ms, lams, g.ab[i - 1], a, k_prev, m_t=m)
        ms, lams = [m] + ms[:2], [log_snr_lambda(a)] + lams[:2]
        # a step into alpha_bar = 1 (lambda = inf) is first order: it returns the data prediction
        k = 1 if math.isinf(log_snr_lambda(g.ab[i + 1])) else min(plan.orders[i], len(ms))
        x_prev, k_prev = x, k
        x = _uni_update(x, ms, lams, a, g.ab[i + 1], k)
    return x


# ----------------------------------------------------------------------------- search

def warped_plan(schedule: Any, n: int, *, rho: float, t_min: float, orders: Sequence[int],
                correct: Sequence[bool], nudges: Sequence[float] | None = None, t_max: float | None = None) -> USFPlan:
    """Call times t_i = t_min + (t_max - t_min)(1 - i/(n-1))^rho (i < n), each nudged by a log-SNR offset,
    then the end point."""
    t_max = float(schedule.num_train_timesteps - 1) if t_max is None else t_max
    u = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    ts = t_min + (t_max - t_min) * (1.0 - u) ** rho
    ab = np.array([schedule.alpha_bar(float(t)) for t in ts])
    if nudges is not None:
        lam = 0.5 * np.log(ab / (1 - ab)) + np.asarray(nudges)
        ab = 1.0 / (1.0 + np.exp(-2 * lam))
    ab = np.maximum.accumulate(ab)
    for i in range(1, len(ab)):                # keep strictly increasing after nudges
        if ab[i] <= ab[i - 1]:
            ab[i] = min(ab[i - 1] * (1 + 1e-6), 1 - 1e-9)
    return USFPlan(tuple(float(a) for a in ab) + (float(schedule.final_alpha_bar),), tuple(int(o) for o in orders),
                   tuple(bool(c) for c in correct))


@dataclass
class Problem:
    """One oracle instance: mixture, starting noise and the exact solution from it."""
    eps_fn: Callable[..., torch.Tensor]
    x_T: torch.Tensor
    ref: torch.Tensor


def oracle_problems(schedule: Any, seeds: Sequence[int], *, dim: int = 16, components: int = 8,
                    batch: int = 128) -> list[Problem]:
    from .oracle import random_mixture
    out = []
    t0 = schedule.num_train_timesteps - 1
    for s in seeds:
        gm = random_mixture(dim, components, schedule=schedule, seed=s)
        x_T = torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1000 + s))
        out.append(Problem(gm.eps_fn, x_T, gm.reference(x_T, schedule.alpha_bar(t0), schedule.final_alpha_bar)))
    return out


def model_problems(eps_fn: Callable[..., torch.Tensor], schedule: Any, shape: Sequence[int], *, seeds: Sequence[int],
                   reference_steps: int = 250) -> list[Problem]:
    """Search problems on a trained model: per seed a batch of noise and its ``reference_steps``-step
    DPM-Solver++(3M) solution as the target."""
    from .api import sample
    out = []
    for s in seeds:
        x_T = torch.randn(*shape, generator=torch.Generator().manual_seed(s))
        out.append(Problem(eps_fn, x_T, sample(eps_fn, x_T, schedule=schedule, method="dpmpp-3m",
                                               steps=reference_steps)))
    return out


def plan_error(plan: USFPlan, schedule: Any, problems: Sequence[Problem]) -> float:
    """Mean RMSE to the exact solutions (inf if the plan diverges)."""
    from .api import drive
    errs = []
    for p in problems:
        grid = plan_grid(plan, schedule)
        try:
            x0, _ = drive(usf(p.x_T, grid, plan=plan), p.eps_fn)
        except FloatingPointError:
            return math.inf
        e = float(((x0 - p.ref) ** 2).mean().sqrt())
        errs.append(e if math.isfinite(e) else math.inf)
    return float(np.mean(errs))


def search(schedule: Any, n: int, problems: Sequence[Problem], *, random_trials: int = 60, sweeps: int = 2,
           seed: int = 0, progress: Callable[[str], Any] | None = None) -> tuple[USFPlan, float, dict[str, Any]]:
    """Random search over (rho, t_min, orders, correct), then coordinate descent over every per-step
    choice and log-SNR nudge; returns (plan, error, knobs)."""
    rng = np.random.default_rng(seed)

    def make(k: dict[str, Any]) -> USFPlan:
        return warped_plan(schedule, n, rho=k["rho"], t_min=k["t_min"], orders=k["orders"], correct=k["correct"],
                           nudges=k["nudges"])

    def score(k: dict[str, Any]) -> float:
        return plan_error(make(k), schedule, problems)

    best = {"rho": 1.0, "t_min": 0.0, "orders": [2] * n, "correct": [True] * n, "nudges": [0.0] * n}
    best_err = score(best)
    for _ in range(random_trials):
        k = {"rho": float(rng.uniform(0.6, 3.0)), "t_min": float(rng.choice([0.0, 5.0, 10.0, 20.0, 40.0])),
             "orders": [int(rng.choice(ORDERS)) for _ in range(n)], "correct": [bool(rng.random() < 0.7) for _ in range(n)],
             "nudges": [0.0] * n}
        e = score(k)
        if e < best_err:
            best, best_err = k, e
    if progress:
        progress(f"random search: {best_err:.5f}")
    for sweep in range(sweeps):
        for key, values in [("rho", [best["rho"] * f for f in (0.8, 0.9, 1.1, 1.25)]),
                            ("t_min", [max(0.0, best["t_min"] + d) for d in (-10, -5, 5, 10)])]:
            for v in values:
                k = {**best, key: v}
                e = score(k)
                if e < best_err:
                    best, best_err = k, e
        for i in range(n):
            for o in ORDERS:
                k = {**best, "orders": best["orders"][:i] + [o] + best["orders"][i + 1:]}
                e = score(k)
                if e < best_err:
                    best, best_err = k, e
            k = {**best, "correct": best["correct"][:i] + [not best["correct"][i]] + best["correct"][i + 1:]}
            e = score(k)
            if e < best_err:
                best, best_err = k, e
            for d in (-0.3, -0.1, 0.1, 0.3):
                k = {**best, "nudges": best["nudges"][:i] + [best["nudges"][i] + d] + best["nudges"][i + 1:]}
                e = score(k)
                if e < best_err:
                    best, best_err = k, e
        if progress:
            progress(f"sweep {sweep + 1}: {best_err:.5f}")
    return make(best), best_err, best


# ----------------------------------------------------------------------------- named schedules

def load_schedules(path: Path | None = None) -> dict[str, USFPlan]:
    path = Path(path) if path is not None else SCHEDULES_FILE
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {name: USFPlan(tuple(d["ab"]), tuple(d["orders"]), tuple(d["correct"])) for name, d in data.items()}


def save_schedule(name: str, plan: USFPlan, info: dict[str, Any], path: Path | None = None) -> None:
    path = Path(path) if path is not None else SCHEDULES_FILE
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = {**asdict(plan), **info}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def register(path: Path | None = None) -> list[str]:
    """Make every shipped plan a sampling method ``usf-<name>`` (called on first use of such a name)."""
    from .api import SamplerSpec, register_method
    names = []
    for name, plan in load_schedules(path).items():
        def fn(x: torch.Tensor, grid: Grid, plan: USFPlan = plan, start: int = 0) -> Sampler:
            return (yield from usf(x, grid, plan=plan, start=start))
        register_method(SamplerSpec(f"usf-{name}", fn, lambda n, r=0, k=plan.nfe: k, str(plan.nfe), "searched",
                                    min_steps=plan.nfe, min_reason="a searched schedule of fixed length",
                                    description=f"USF searched schedule ({plan.nfe} calls, orders {list(plan.orders)})"))
        names.append(f"usf-{name}")
    return names
