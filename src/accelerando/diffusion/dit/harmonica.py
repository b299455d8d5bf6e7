"""HarmoniCa (Huang et al. 2024, "HarmoniCa: Harmonizing Training and Inference for Better Feature
Caching in Diffusion Transformer Acceleration"): a learned router R (steps x blocks) decides, per
step and block, whether the block runs or reuses its cached residual.

Training, as in the paper:
- Step-Wise Denoising Training (SDT): the router is trained along whole sampling trajectories run
  *with* the cache, so the cache it learns on is the one inference sees; at each step the student
  (soft gates ``g = sigmoid(R[s])``: ``g * block(h) + (1 - g) * (h + r_cached)``) is matched to the
  full model at the same x_s, and the trajectory continues from the student's output.
- The step loss is on the step's *output* x_{t-1}, as in the paper, not on the noise prediction:
  one DDIM step maps an eps error d to c_s d with c_s = sqrt(1 - a_{s+1}) - sqrt(a_{s+1})
  sqrt(1 - a_s) / sqrt(a_s), so ||x_{t-1} student - teacher||^2 = c_s^2 ||d||^2. c_s^2 is ~20x larger
  at the first (high-noise) steps than at the last, where an eps loss would rate them alike: trained on
  eps, the router learns to skip every block of the early steps (``loss_space="eps"`` keeps that).
  The weights are normalised to mean 1 so ``beta`` keeps its scale.
- Image-Error Proxy-Guided Objective (IEPO): the step loss is weighted by ``lambda_s``, the error of
  the *final image* when the current (hard) router acts at step s alone, refreshed every few
  iterations, plus ``beta * mean(g)`` for compute. Here L = sum_s lambda_s c_s^2 ||eps_student -
  eps_full||^2 + beta * mean(g) (notation: the paper's Gamma is ``logits``, its lambda^(t) is ``lam``).
At inference the router is a bool table: ``sigmoid(R) > 0.5``, or the top ``keep`` fraction of R for
an exact block budget; it runs through ``BlockCache(policy="router")``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .cache import BlockCache, BlockCacheConfig
from .core import block_forward, check_dit, embed, final_layer, unpatchify


@dataclass(frozen=True)
class HarmoniCaConfig:
    steps: int = 20                    # sampler steps the router is for (its rows)
    method: str = "ddim"               # the sampler (one model call per step)
    iterations: int = 30               # SDT trajectories
    batch_size: int = 8
    lr: float = 0.1                    # Adam on the router logits
    beta: float = 0.002                # weight of the compute term mean(sigmoid(R)) (0.02 floors the early steps)
    lambda_every: int = 10             # IEPO: refresh lambda every k iterations (0 = uniform lambda)
    lambda_batch: int = 4              # images per IEPO refresh
    guidance: float = 1.0
    warmup: int = 1                    # first steps run every block (a cache must exist)
    init: float = 2.0                  # initial logit (sigmoid(2) = 0.88: start near full compute)
    loss_space: str = "x"              # "x": the step output x_{t-1} (the paper); "eps": the noise prediction
    proxy: str = "alone"               # IEPO's lambda: "alone" (the paper) or "leave-out" (see iepo_lambda)

    def __post_init__(self) -> None:
        if self.proxy not in ("alone", "leave-out"):
            raise ValueError(f"proxy must be 'alone' or 'leave-out', got {self.proxy!r}")
        if self.loss_space not in ("x", "eps"):
            raise ValueError(f"loss_space must be 'x' or 'eps', got {self.loss_space!r}")
        if self.steps < 2 or self.iterations < 1 or self.batch_size < 1 or self.lambda_batch < 1:
            raise ValueError("steps >= 2, iterations >= 1, batch_size >= 1 and lambda_batch >= 1 are required")
        if self.lr <= 0 or self.beta < 0 or self.lambda_every < 0 or self.warmup < 1 or self.guidance < 0:
            raise ValueError("need lr > 0, beta >= 0, lambda_every >= 0, warmup >= 1, guidance >= 0")


def router_table(logits: torch.Tensor, *, keep: float | None = None, warmup: int = 1) -> torch.Tensor:
    """Bool (steps, blocks): run where sigmoid(logits) > 0.5, or the ``keep`` fraction of all
    (step, block) slots with the largest logits (warm-up rows always run and count toward it)."""
    table = logits > 0
    table[:warmup] = True
    if keep is None:
        return table
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    n_total = logits.numel()
    n_rest = max(0, round(keep * n_total) - warmup * logits.shape[1])
    rest = logits[warmup:].flatten()
    table[warmup:] = False
    if n_rest > 0:
        idx = rest.topk(min(n_rest, rest.numel())).indices
        flat = table[warmup:].flatten()
        flat[idx] = True
        table[warmup:] = flat.view(-1, logits.shape[1])
    return table


def soft_forward(model: Any, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, gates: torch.Tensor,
                 residual: list[torch.Tensor | None]) -> torch.Tensor:
    """The DiT with soft block gates (blocks,): g * block(h) + (1 - g) * (h + r_cached); updates
    ``residual[i]`` (detached) where the hard decision g > 0.5 runs the block, as inference would."""
    h = embed(model, x)
    for i, blk in enumerate(model.transformer_blocks):
        out = block_forward(blk, h, t, y)
        g = gates[i]
        if residual[i] is None:
            h_new = out
        else:
            h_new = g * out + (1 - g) * (h + residual[i])
        if residual[i] is None or bool(g > 0.5):
            residual[i] = (out - h).detach()
        h = h_new
    return unpatchify(model, final_layer(model, h, t, y))


def _grid(cfg: HarmoniCaConfig) -> Any:
    from accelerando.diffusion.api import get_spec
    from accelerando.diffusion.samplers._common import make_grid
    from accelerando.diffusion.schedules import make_schedule
    return make_grid(make_schedule("linear", 1000), cfg.steps, "trailing", drop_zero=get_spec(cfg.method).drop_zero)


def step_weights(cfg: HarmoniCaConfig) -> torch.Tensor:
    """(steps,) weights of the step losses: c_s^2 of a DDIM step (eps error -> x_{t-1} error), mean 1;
    ones for ``loss_space="eps"``."""
    if cfg.loss_space == "eps":
        return torch.ones(cfg.steps)
    ab = list(_grid(cfg).ab) + [1.0]
    c = [(1 - ab[i + 1]) ** 0.5 - (ab[i + 1] * (1 - ab[i]) / ab[i]) ** 0.5 for i in range(cfg.steps)]
    w = torch.tensor(c, dtype=torch.float32) ** 2
    return w / w.mean()


def _trajectory(model: Any, x_T: torch.Tensor, y: torch.Tensor, cfg: HarmoniCaConfig,
                step_eps: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    from accelerando.diffusion.api import drive, make_sampler
    grid = _grid(cfg)
    state = {"s": 0}

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = step_eps(state["s"], x, t)
        state["s"] += 1
        return out
    x0, _ = drive(make_sampler(cfg.method, x_T, grid), eps)
    return x0


def _cfg_eps(out: torch.Tensor, guidance: float) -> torch.Tensor:
    if guidance == 1.0:
        return out
    e_u, e_c = out.chunk(2)
    return e_u + guidance * (e_c - e_u)


def _inputs(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: float) -> tuple[torch.Tensor, ...]:
    t = t.reshape(-1).expand(x.shape[0])
    if guidance == 1.0:
        return x, t, y
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.full_like(y, 10), y])


@torch.no_grad()
def iepo_lambda(model: Any, logits: torch.Tensor, cfg: HarmoniCaConfig, *, generator: torch.Generator) -> torch.Tensor:
    """lambda_s (steps,), normalised to mean 1: the image-error proxy of IEPO. ``proxy="alone"``: the
    final-image MSE against full compute when the hard router acts at step s only (the paper's proxy);
    ``"leave-out"``: how much the final image of the whole router moves when step s alone computes
    fully, which also sees how skips at consecutive steps compound."""
    size = model.config.sample_size
    x_T = torch.randn(cfg.lambda_batch, 1, size, size, generator=generator)
    y = torch.randint(0, 10, (cfg.lambda_batch,), generator=generator)
    table = router_table(logits.detach(), warmup=cfg.warmup)

    def run(router: torch.Tensor) -> torch.Tensor:
        cache = BlockCache(BlockCacheConfig(policy="router", router=router, warmup=cfg.warmup))
        from .denoiser import Counts
        counts = Counts()

        def step_eps(s: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            xi, ti, yi = _inputs(x, t, y, cfg.guidance)
            return _cfg_eps(cache.forward(model, xi, ti, yi, step=s, counts=counts), cfg.guidance)
        return _trajectory(model, x_T, y, cfg, step_eps)
    if cfg.proxy == "alone":
        ref = run(_only_row(table, None))
        lam = torch.stack([F.mse_loss(run(_only_row(table, s)), ref) for s in range(cfg.steps)])
    else:
        ref = run(table)
        lam = torch.stack([F.mse_loss(run(_full_row(table, s)), ref) for s in range(cfg.steps)])
    return lam / lam.mean().clamp_min(1e-12) + 1e-3


def _only_row(table: torch.Tensor, only: int | None) -> torch.Tensor:
    out = torch.ones_like(table)
    if only is not None:
        out[only] = table[only]
    return out


def _full_row(table: torch.Tensor, s: int) -> torch.Tensor:
    out = table.clone()
    out[s] = True
    return out


def train_router(model: Any, config: HarmoniCaConfig | None = None, *, generator: torch.Generator | None = None,
                 progress: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """SDT + IEPO training of a router for ``model``; returns {"logits", "config", "log"}."""
    check_dit(model, who="HarmoniCa")
    cfg = config or HarmoniCaConfig()
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    n_blocks = len(model.transformer_blocks)
    logits = torch.full((cfg.steps, n_blocks), cfg.init, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=cfg.lr)
    for p in model.parameters():
        p.requires_grad_(False)
    lam = torch.ones(cfg.steps)
    xw = step_weights(cfg)
    size = model.config.sample_size
    log: list[str] = []
    for it in range(cfg.iterations):
        if cfg.lambda_every and it % cfg.lambda_every == 0 and it > 0:
            lam = iepo_lambda(model, logits, cfg, generator=g)
        x_T = torch.randn(cfg.batch_size, 1, size, size, generator=g)
        y = torch.randint(0, 10, (cfg.batch_size,), generator=g)
        residual: list[torch.Tensor | None] = [None] * n_blocks
        losses: list[float] = []

        def step_eps(s: int, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            xi, ti, yi = _inputs(x, t, y, cfg.guidance)
            with torch.no_grad():
                teacher = _cfg_eps(model(xi, ti, class_labels=yi).sample, cfg.guidance)
            gates = torch.sigmoid(logits[s]) if s >= cfg.warmup else torch.ones(n_blocks)
            with torch.enable_grad():
                student = _cfg_eps(soft_forward(model, xi, ti, yi, gates, residual), cfg.guidance)
                loss = lam[s] * xw[s] * F.mse_loss(student, teacher) + cfg.beta * torch.sigmoid(logits[s]).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            losses.append(float(loss.detach()))
            return student.detach()
        _trajectory(model, x_T, y, cfg, step_eps)
        msg = (f"iteration {it + 1}/{cfg.iterations} mean step loss {sum(losses) / len(losses):.5f} "
               f"mean gate {float(torch.sigmoid(logits.detach()[cfg.warmup:]).mean()):.3f}")
        log.append(msg)
        if progress is not None:
            progress(msg)
    return {"logits": logits.detach(), "config": cfg, "log": log}


def save_router(path: str | Path, result: dict[str, Any], *, model_name: str = "") -> None:
    data = {"model": model_name, "config": asdict(result["config"]), "logits": result["logits"].tolist(),
            "log": result["log"]}
    Path(path).write_text(json.dumps(data, indent=1) + "\n")


def load_router(path: str | Path) -> tuple[torch.Tensor, HarmoniCaConfig]:
    data = json.loads(Path(path).read_text())
    return torch.tensor(data["logits"]), HarmoniCaConfig(**data["config"])


def harmonica_cache(logits: torch.Tensor, *, keep: float | None = None, warmup: int = 1) -> BlockCache:
    """The inference-time method: a BlockCache driven by the router's table."""
    return BlockCache(BlockCacheConfig(policy="router", router=router_table(logits, keep=keep, warmup=warmup),
                                       warmup=warmup))


def fraction_run(table: torch.Tensor) -> float:
    return float(table.float().mean())


__all__ = ["HarmoniCaConfig", "train_router", "router_table", "harmonica_cache", "save_router", "load_router",
           "iepo_lambda", "soft_forward", "fraction_run", "step_weights"]
