"""``accelerando dit train-router``: train HarmoniCa's cache router for a DiT and a step count."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="Diffusion transformers: train HarmoniCa's learned cache router.")


@app.command("train-router")
def train_router_cmd(
    model: Annotated[str, typer.Option(help="Zoo DiT name (digits-dit, digits-dit-32) or a "
                                            "DiTTransformer2DModel directory.")] = "digits-dit",
    steps: Annotated[int, typer.Option(min=2, help="Sampler steps the router is for (its rows).")] = 20,
    method: Annotated[str, typer.Option(help="Sampler (one model call per step: ddim, dpm++2m, ...).")] = "ddim",
    iterations: Annotated[int, typer.Option(min=1, help="Step-wise denoising training trajectories.")] = 30,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    beta: Annotated[float, typer.Option(min=0.0, help="Weight of the compute term mean(sigmoid(router)).")] = 0.002,
    lr: Annotated[float, typer.Option(min=1e-6)] = 0.1,
    lambda_every: Annotated[int, typer.Option(min=0, help="Refresh the image-error proxy weights every k "
                                                         "iterations (0: uniform).")] = 10,
    guidance: Annotated[float, typer.Option(min=0.0, help="Classifier-free guidance scale.")] = 1.0,
    seed: Annotated[int, typer.Option()] = 0,
    out: Annotated[Optional[Path], typer.Option(help="Router JSON to write (default: "
                                                     "harmonica-<model>-<method>-<steps>.json).")] = None,
) -> None:
    """Train a HarmoniCa router (SDT + IEPO) and save it as JSON; use it with
    ``harmonica_cache(load_router(path)[0], keep=0.5)``."""
    import torch

    from accelerando.cli.common import fail
    from accelerando.diffusion.api import get_spec
    from accelerando.diffusion.dit.harmonica import HarmoniCaConfig, save_router, train_router

    try:
        get_spec(method)
        cfg = HarmoniCaConfig(steps=steps, method=method, iterations=iterations, batch_size=batch_size, beta=beta,
                              lr=lr, lambda_every=lambda_every, guidance=guidance)
    except (KeyError, ValueError) as e:
        fail(str(e).strip("'\""))
    dit = _load(model)
    res = train_router(dit, cfg, generator=torch.Generator().manual_seed(seed), progress=typer.echo)
    path = out or Path(f"harmonica-{Path(model).name}-{method}-{steps}.json")
    save_router(path, res, model_name=model)
    typer.echo(f"wrote {path}")


def _load(model: str):
    from accelerando import zoo
    from accelerando.cli.common import fail
    if model in zoo.names():
        if not zoo.is_trained(model) or zoo.card(model)["role"] != "dit":
            fail(f"{model} is not a trained zoo DiT")
        return zoo.load(model)
    if not Path(model).is_dir():
        fail(f"--model {model!r} is neither a zoo DiT nor a directory")
    from diffusers import DiTTransformer2DModel
    return DiTTransformer2DModel.from_pretrained(model).float().eval()


@app.command("usf-search")
def usf_search_cmd(
    nfe: Annotated[int, typer.Option(min=2, help="Model calls of the schedule.")] = 10,
    name: Annotated[Optional[str], typer.Option(help="Schedule name; the method becomes usf-<name> "
                                                     "(default: the call count).")] = None,
    train_seeds: Annotated[str, typer.Option(help="Oracle mixtures searched on (comma-separated seeds).")] = "11,12,13",
    random_trials: Annotated[int, typer.Option(min=0)] = 60,
    sweeps: Annotated[int, typer.Option(min=0, help="Coordinate-descent sweeps over every per-step choice.")] = 2,
    seed: Annotated[int, typer.Option()] = 0,
    model: Annotated[Optional[str], typer.Option(help="Search on this zoo model (digits-unet, digits-dit) against "
                                                      "a 250-step DPM-Solver++(3M) reference instead of the oracle "
                                                      "(--train-seeds then seed the noise batches).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Schedules JSON (default: the package's "
                                                     "usf_schedules.json).")] = None,
) -> None:
    """USF: search a per-step solver schedule (time grid, predictor order, UniC corrector) for NFE
    model calls on the exact-score oracle (linear schedule, 1000 steps) or a zoo model, and save it by
    name."""
    from accelerando.cli.common import fail
    from accelerando.diffusion import make_schedule
    from accelerando.diffusion import usf

    try:
        seeds = [int(s) for s in train_seeds.split(",") if s.strip()]
    except ValueError:
        fail(f"--train-seeds must be comma-separated integers, got {train_seeds!r}")
    if not seeds:
        fail("--train-seeds needs at least one seed")
    sched = make_schedule("linear", 1000)
    if model is None:
        problems = usf.oracle_problems(sched, seeds)
    else:
        from accelerando import zoo
        if model not in ("digits-unet", "digits-dit", "digits-dit-32") or not zoo.is_trained(model):
            fail(f"--model {model!r} must be a trained zoo denoiser (digits-unet, digits-dit, digits-dit-32)")
        m = zoo.load(model)
        if model.startswith("digits-dit"):
            from accelerando.diffusion.dit import DiTDenoiser
            eps, size = DiTDenoiser(m), m.config.sample_size
        else:
            from accelerando.diffusion.models import eps_fn_from_unet
            eps, size = eps_fn_from_unet(m), m.config.sample_size
        problems = usf.model_problems(eps, sched, (8, 1, size, size), seeds=seeds)
    plan, err, knobs = usf.search(sched, nfe, problems, random_trials=random_trials, sweeps=sweeps, seed=seed,
                                  progress=typer.echo)
    label = name or str(nfe)
    usf.save_schedule(label, plan, {"train_rmse": err, "searched_on": model or "oracle", "train_seeds": seeds,
                                    "search": knobs},
                      path=out or usf.SCHEDULES_FILE)
    typer.echo(f"usf-{label}: {nfe} calls, RMSE {err:.5f} on {model or 'oracle'} seeds {seeds}")
