"""The runner: time every chosen method on one workload, side by side, and judge its quality.

``run_methods(setups, methods, workload=...)`` is what ``demo``, ``bench`` and ``sweep`` call:

1. the family's baseline (the entry registered with ``is_baseline=True``) runs first, always;
2. each method is built (untimed) on every setup, then one timed call runs it over all setups
   (``measure``: warm-up excluded, device synchronised, repeated, median and spread);
3. quality is computed against the baseline of the same run: LLM greedy -> exact match of the
   sequences (a lossless method must reach 1.0); LLM sampling -> token agreement and perplexity
   under the target (equality of *distributions* is a statistical test, not a per-run number);
   diffusion -> RMSE to the baseline's sample and to an optional high-accuracy reference;
4. one ``Measurement`` per method goes to the history, all in one transaction.

A setup list (not one setup) lets a workload with more prompts than ``batch_size`` run as several
batches inside one timed call. Raw counts from the method's ``stats`` are merged over the batches:
integers are summed, floats averaged, equal-length number lists summed element-wise.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from . import metrics as M
from .harness import Timing, measure
from .methods import (DiffusionOutput, DiffusionSetup, LLMOutput, LLMSetup, MethodEntry, NotApplicable,
                      all_methods, get_method)
from .models import LoadedUNet, ModelCache, ModelError, load_llm, load_unet, model_kind, resolve  # noqa: F401
from .workloads import DiffusionWorkload, LLMWorkload


class RunnerError(ValueError):
    """Bad input to a run: wrong kind of model, no methods, a limit the workload exceeds, ..."""


@dataclass
class RunRow:
    """What one method did on one workload (also the row written to the history)."""

    method: str
    family: str
    knobs: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    lossless: bool = False
    is_baseline: bool = False
    error: str | None = None
    not_applicable: bool = False          # error is "n/a: ..." (e.g. budget below the method's minimum)
    measurement_id: int | None = None
    output: Any = None                    # the last outputs (list, one per setup); not stored


# ----------------------------------------------------------------------------- methods

def resolve_methods(family: str, names: Sequence[str] | None = None) -> list[MethodEntry]:
    """The baseline first, then the named methods (all of the family when ``names`` is None).

    Raises ``KeyError`` naming the valid methods for an unknown name, ``RunnerError`` for a method
    of the other family.
    """
    if names is None:
        chosen = all_methods(family)
    else:
        chosen = []
        for n in names:
            e = get_method(n)
            if e.family != family:
                valid = ", ".join(x.name for x in all_methods(family)) or "(none registered)"
                raise RunnerError(f"method {n!r} is a {e.family} method, this workload is {family}; "
                                  f"valid {family} methods: {valid}")
            chosen.append(e)
    baselines = [e for e in all_methods(family) if e.is_baseline]
    out = baselines[:1] + [e for e in chosen if not (baselines and e is baselines[0])]
    seen, uniq = set(), []
    for e in out:
        if e.name not in seen:
            seen.add(e.name)
            uniq.append(e)
    return uniq


def merge_stats(per_setup: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Combine the stats of several batches (see the module docstring)."""
    items = [s for s in per_setup if s]
    if not items:
        return {}
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for s in items for k in s):
        vals = [s[key] for s in items if key in s]
        if all(isinstance(v, bool) for v in vals):
            out[key] = all(vals)
        elif all(isinstance(v, int) for v in vals):
            out[key] = sum(vals)
        elif all(isinstance(v, (int, float)) for v in vals):
            out[key] = sum(vals) / len(vals)
        elif all(isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v) for v in vals):
            n = max(len(v) for v in vals)
            out[key] = [sum(v[i] for v in vals if i < len(v)) for i in range(n)]
        else:
            v = vals[-1]
            out[key] = v.tolist() if hasattr(v, "tolist") else v
    return out


def _jsonable_stats(stats: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in stats.items():
        if hasattr(v, "tolist"):
            v = v.tolist()
        try:
            json.dumps(v)
        except TypeError:
            v = repr(v)
        out[k] = v
    return out


# ----------------------------------------------------------------------------- the run

def run_methods(
    setups: LLMSetup | DiffusionSetup | Sequence[LLMSetup] | Sequence[DiffusionSetup],
    methods: Sequence[MethodEntry | str] | None = None,
    *,
    workload: dict[str, Any],
    knobs: dict[str, dict[str, Any]] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    history: Any = None,
    run_id: str | None = None,
    reference: Sequence[Any] | None = None,
    reference_s: float | None = None,
    score_perplexity: bool = True,
    progress: Callable[[str, str], None] | None = None,
    sync: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[RunRow]:
    """Run the baseline and ``methods`` on ``setups``; return one ``RunRow`` each (baseline first).

    ``knobs`` maps a method name to knob overrides (on top of its ``default_knobs``).
    ``reference``: diffusion only, one high-accuracy x0 per setup (e.g. ``diffusion_reference``);
    ``reference_s``: the time that reference took (each row then gets ``speedup_vs_reference``).
    ``progress(method, phase)`` is called with phase "start" / "done" around each method.
    ``history``: an open ``History``; rows that ran without error are recorded in one transaction.
    """
    setups = [setups] if isinstance(setups, (LLMSetup, DiffusionSetup)) else list(setups)
    if not setups:
        raise RunnerError("no setups to run")
    family = "llm" if isinstance(setups[0], LLMSetup) else "diffusion"
    if methods is None:
        entries = resolve_methods(family)
    else:
        names = [m.name if isinstance(m, MethodEntry) else m for m in methods]
        entries = resolve_methods(family, names)
    if not entries:
        raise RunnerError(f"no {family} methods are registered")
    knobs = knobs or {}
    check_knobs(entries, knobs)
    check_limits(setups)
    run_id = run_id or uuid.uuid4().hex[:12]

    rows: list[RunRow] = []
    base_timing: Timing | None = None
    base_out: list[Any] | None = None
    for entry in entries:
        k = {**entry.default_knobs, **knobs.get(entry.name, {})}
        row = RunRow(entry.name, family, k, lossless=entry.lossless, is_baseline=entry.is_baseline)
        if progress:
            progress(entry.name, "start")
        try:
            calls = [entry.build(s, **k) for s in setups]
            timing = measure(lambda: [c() for c in calls], warmup=warmup, repeats=repeats,
                             sync=sync, clock=clock)
            outs = timing.result
            row.output = outs
            row.metrics = _speed_metrics(family, setups, outs, timing)
            if entry.is_baseline:
                base_timing, base_out = timing, outs
            if base_timing is not None:
                row.metrics["speedup"] = base_timing.median_s / timing.median_s if timing.median_s > 0 else None
            if reference_s and timing.median_s > 0:
                row.metrics["speedup_vs_reference"] = reference_s / timing.median_s
            row.metrics.update(_quality(family, setups, outs, base_out, reference, entry,
                                        score_perplexity=score_perplexity))
            row.metrics["lossless"] = entry.lossless
            row.metrics["is_baseline"] = entry.is_baseline
        except NotApplicable as exc:
            row.error, row.not_applicable = f"n/a: {exc}", True
        except Exception as exc:   # one broken method must not hide the others' results
            row.error = f"{type(exc).__name__}: {exc}"
        rows.append(row)
        if progress:
            progress(entry.name, "done")

    if history is not None:
        from .history import Measurement
        ok = [r for r in rows if r.error is None]
        ms = [Measurement(workload=dict(workload), method=r.method, knobs=r.knobs, metrics=r.metrics,
                          seed=int(workload.get("seed", getattr(setups[0], "seed", 0))),
                          family=family, run_id=run_id) for r in ok]
        for r, mid in zip(ok, history.record_many(ms)):
            r.measurement_id = mid
    return rows


def knob_names(entry: MethodEntry) -> tuple[str, ...] | None:
    """The knobs a method's builder takes (``build.knobs`` if it declares them, else its keyword
    parameters); None when it takes any ``**knobs`` and declares none."""
    import inspect
    declared = getattr(entry.build, "knobs", None)
    if declared is not None:
        return tuple(declared)
    params = list(inspect.signature(entry.build).parameters.values())[1:]      # after the setup
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return tuple(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def check_knobs(entries: Sequence[MethodEntry], knobs: dict[str, dict[str, Any]]) -> None:
    """Knobs name a selected method and a knob it has (``RunnerError`` otherwise), before anything runs."""
    selected = {e.name: e for e in entries}
    for method, given in knobs.items():
        if method not in selected:
            raise RunnerError(f"--knob {method}.{next(iter(given), '?')}: method {method!r} is not selected "
                              f"(selected: {', '.join(selected)})")
        valid = knob_names(selected[method])
        if valid is None:
            continue
        for k in given:
            if k not in valid:
                raise RunnerError(f"--knob {method}.{k}: {method} has no knob {k!r} "
                                  f"(its knobs: {', '.join(valid) or 'none'})")


def check_limits(setups: Sequence[LLMSetup] | Sequence[DiffusionSetup]) -> None:
    """What the models cannot do, refused before anything runs: more positions than an LLM (or its
    draft) has, drafts whose vocabulary differs from the target's, more diffusion steps than
    training timesteps."""
    if setups and isinstance(setups[0], LLMSetup) and setups[0].drafts:
        from accelerando.llm.drafters.draft_model import vocab_size
    for s in setups:
        if isinstance(s, LLMSetup):
            need = int(s.input_ids.shape[1]) + int(s.max_new_tokens)
            for name, m in (("target", s.target), *((f"draft {d}", dm) for d, dm in s.drafts.items())):
                n_pos = getattr(getattr(m, "config", None), "max_position_embeddings", None)
                if isinstance(n_pos, int) and need > n_pos:
                    raise RunnerError(f"prompt ({s.input_ids.shape[1]} tokens) + max_new_tokens ({s.max_new_tokens}) "
                                      f"= {need} positions; the {name} has {n_pos}")
            for d, dm in s.drafts.items():
                vt, vd = vocab_size(s.target), vocab_size(dm)
                if vt != vd:
                    raise RunnerError(f"draft {d} has a vocabulary of {vd} tokens, the target {vt}: "
                                      "speculative decoding needs the same token ids")
        else:
            check_steps_fit(s.schedule, s.steps)


def training_timesteps(schedule: Any) -> int:
    n = getattr(schedule, "num_train_timesteps", None)
    return int(n) if n is not None else len(schedule.alphas_cumprod)


def check_steps_fit(schedule: Any, steps: int, what: str = "steps") -> None:
    T = training_timesteps(schedule)
    if steps > T:
        raise RunnerError(f"{what} {steps} is more than the model's {T} training timesteps")


def llm_new_tokens(setups: list[Any], outs: list[Any]) -> int:
    """Tokens an LLM method generated over its setups' batches (padding after a row's EOS excluded)."""
    return sum(M.new_token_count(o.sequences, prompt_len=s.input_ids.shape[1], pad_token_id=_pad_id(s))
               for s, o in zip(setups, outs))


def _speed_metrics(family: str, setups: list[Any], outs: list[Any], t: Timing) -> dict[str, Any]:
    m = t.summary()
    if family == "llm":
        for o in outs:
            if not isinstance(o, LLMOutput):
                raise TypeError(f"an LLM method must return LLMOutput, got {type(o).__name__}")
        new = llm_new_tokens(setups, outs)
        m.update(new_tokens=new, batch_size=int(sum(s.input_ids.shape[0] for s in setups)),
                 tokens_per_s=new / t.median_s if t.median_s > 0 else None,
                 latency_s=t.median_s)
    else:
        for o in outs:
            if not isinstance(o, DiffusionOutput):
                raise TypeError(f"a diffusion method must return DiffusionOutput, got {type(o).__name__}")
        n = sum(int(s.x_T.shape[0]) for s in setups)
        nfe = sum(int(o.nfe) for o in outs)
        m.update(nfe=nfe, samples=n, samples_per_s=n / t.median_s if t.median_s > 0 else None,
                 s_per_nfe=t.median_s / nfe if nfe else None)
    stats = _jsonable_stats(merge_stats(o.stats for o in outs))
    for key, v in stats.items():
        m[key if key not in m else f"stats.{key}"] = v
    return m


def _pad_id(s: LLMSetup) -> int | None:
    tok = s.tokenizer
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    return pad if pad is not None else s.eos_token_id


def _quality(family: str, setups: list[Any], outs: list[Any], base: list[Any] | None,
             reference: Sequence[Any] | None, entry: MethodEntry, *, score_perplexity: bool) -> dict[str, Any]:
    q: dict[str, Any] = {}
    if family == "llm":
        greedy = all(s.temperature == 0 for s in setups)
        if base is not None:
            em, agree, n = 0.0, 0.0, 0
            for s, o, b in zip(setups, outs, base):
                kw = dict(prompt_len=s.input_ids.shape[1], pad_token_id=_pad_id(s))
                rows = s.input_ids.shape[0]
                em += M.exact_match_rate(o.sequences, b.sequences, **kw) * rows
                agree += M.token_agreement(o.sequences, b.sequences, **kw) * rows
                n += rows
            q["token_agreement"] = agree / n
            if greedy:
                q["exact_match"] = em / n
                # greedy decoding is deterministic: a lossless method must reproduce the baseline
                q["lossless_verified"] = bool(entry.lossless and em == n) if entry.lossless else None
        if score_perplexity:
            ppl = [M.perplexity(s.target, o.sequences, prompt_len=s.input_ids.shape[1],
                                attention_mask=s.attention_mask, pad_token_id=_pad_id(s))
                   for s, o in zip(setups, outs)]
            q["perplexity"] = sum(ppl) / len(ppl)
    else:
        if base is not None:
            q["rmse_vs_baseline"] = _mean(M.rmse(o.x0, b.x0) for o, b in zip(outs, base))
        if reference is not None:
            q["rmse_vs_reference"] = _mean(M.rmse(o.x0, r) for o, r in zip(outs, reference))
    return q


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def diffusion_reference(setups: Sequence[DiffusionSetup], *, steps: int,
                        method: str | None = None) -> list[Any]:
    """High-accuracy x0 per setup: the baseline (or ``method``) run once at ``steps`` steps."""
    return timed_diffusion_reference(setups, steps=steps, method=method)[0]


def timed_diffusion_reference(setups: Sequence[DiffusionSetup], *, steps: int, method: str | None = None,
                              sync: Callable[[], None] | None = None) -> tuple[list[Any], float]:
    """``diffusion_reference`` and the seconds it took (one timed call over all setups, no warm-up:
    the reference is the expensive way to get the same samples, so its cost is part of the story)."""
    from dataclasses import replace
    entry = get_method(method) if method else next((e for e in all_methods("diffusion") if e.is_baseline), None)
    if entry is None:
        raise RunnerError("no diffusion baseline registered to compute a reference")
    for s in setups:
        check_steps_fit(s.schedule, steps, "--reference-steps")
    calls = [entry.build(replace(s, steps=steps), **entry.default_knobs) for s in setups]
    t = measure(lambda: [c().x0 for c in calls], warmup=0, repeats=1, sync=sync)
    return t.result, t.median_s


# ----------------------------------------------------------------------------- models and setups

def resolve_model_dir(name_or_path: str) -> Path:
    """A model directory: an existing path, else a zoo name (``models.resolve``; random specs have none)."""
    ref = resolve(name_or_path)
    if ref.path is None:
        raise RunnerError(f"{name_or_path} is a random-initialised spec; it has no directory")
    return ref.path


def build_llm_setups(workload: LLMWorkload, *, device: str | torch.device = "cpu",
                     max_batches: int | None = None, target=None, tokenizer=None,
                     drafts: dict[str, Any] | None = None) -> list[LLMSetup]:
    """Load the workload's models and tokenise its prompts into left-padded batches."""
    if target is None:
        loaded = load_llm(workload.model, device=device)
        target, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    if tokenizer is None:
        raise RunnerError("a tokenizer is needed with a preloaded target")
    if drafts is None:
        drafts = {name: load_llm(name, device=device).model for name in workload.drafts}
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = workload.resolve_prompts()
    bs = workload.batch_size
    if len(prompts) < bs:                       # too few prompts for one batch: repeat them
        prompts = (prompts * bs)[:bs]
    batches = [prompts[i:i + bs] for i in range(0, len(prompts) - bs + 1, bs)]
    if max_batches is not None:
        batches = batches[:max_batches]
    setups = []
    for batch in batches:
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        setups.append(LLMSetup(
            target=target, tokenizer=tokenizer, input_ids=enc["input_ids"].to(device),
            attention_mask=enc["attention_mask"].to(device), max_new_tokens=workload.max_new_tokens,
            temperature=workload.temperature, top_k=workload.top_k, top_p=workload.top_p,
            seed=workload.seed, drafts=dict(drafts), eos_token_id=None))
    return setups


def llm_workload_facts(setups: Sequence[LLMSetup]) -> dict[str, Any]:
    """Workload facts measured from the loaded setup (for the history and the selector)."""
    s = setups[0]
    facts = {"target_params": sum(p.numel() for p in s.target.parameters()),
             "prompt_len": int(s.input_ids.shape[1]), "n_batches": len(setups),
             "device": str(s.input_ids.device)}
    for name, d in s.drafts.items():
        facts[f"draft_params.{name}"] = sum(p.numel() for p in d.parameters())
    return facts


def _diffusion_api():
    try:
        from accelerando.diffusion import make_schedule
    except ImportError as exc:
        raise RunnerError(f"the diffusion samplers are not available yet ({exc})") from None
    return make_schedule


def unet_eps_fn(unet: Any, *, prediction_type: str = "epsilon", schedule: Any = None) -> Callable[[Any, Any], Any]:
    """eps(x, t) from a diffusers UNet (through ``accelerando.diffusion.models`` when present)."""
    if type(unet).__name__ == "DiTTransformer2DModel":    # class-conditional: sample i gets label i mod 10
        from accelerando.diffusion.dit import DiTDenoiser
        return DiTDenoiser(unet)
    try:
        from accelerando.diffusion.models import eps_fn_from_unet
    except ImportError:
        eps_fn_from_unet = None
    if eps_fn_from_unet is not None:
        return eps_fn_from_unet(unet, prediction_type=prediction_type, schedule=schedule)
    if prediction_type != "epsilon":
        raise RunnerError(f"{prediction_type}-prediction models need accelerando.diffusion.models")

    @torch.no_grad()
    def eps(x, t):
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        return unet(x, t).sample
    return eps


def build_diffusion_setups(workload: DiffusionWorkload, *, device: str | torch.device = "cpu",
                           unet: Any = None, num_train_timesteps: int = 1000,
                           prediction_type: str = "epsilon") -> list[DiffusionSetup]:
    """One setup: the model's eps_fn, the schedule, per-sample-seeded starting noise.

    ``unet``: a ``LoadedUNet`` (its timesteps and prediction type come with it), a bare denoiser
    (then ``num_train_timesteps`` / ``prediction_type`` describe it), or None to load ``workload.model``."""
    make_schedule = _diffusion_api()
    if workload.model.startswith("oracle:"):
        raise RunnerError("oracle workloads are run by the diffusion benchmark, not by this runner yet")
    if unet is None:
        unet = load_unet(workload.model, device=device)
    if isinstance(unet, LoadedUNet):
        unet, num_train_timesteps, prediction_type = unet.unet, unet.num_train_timesteps, unet.prediction_type
    cfg = unet.config
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size) if isinstance(cfg.sample_size, int) \
        else (cfg.in_channels, *cfg.sample_size)
    # one generator per sample (EDM-style): a sample does not depend on the batch it is in
    x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(workload.seed + i))
                       for i in range(workload.batch)]).to(device)
    schedule = make_schedule(workload.schedule, num_train_timesteps=num_train_timesteps)
    eps_fn = unet_eps_fn(unet, prediction_type=prediction_type, schedule=schedule)
    return [DiffusionSetup(eps_fn=eps_fn, schedule=schedule, x_T=x_T, steps=workload.steps,
                           spacing=workload.spacing, seed=workload.seed)]


def run_workload(
    workload: LLMWorkload | DiffusionWorkload,
    methods: Sequence[MethodEntry | str] | None = None,
    *,
    device: str | torch.device = "cpu",
    reference_steps: int | None = None,
    models: ModelCache | None = None,
    max_batches: int | None = None,
    **run_kwargs: Any,
) -> list[RunRow]:
    """Build the setups of one workload and ``run_methods`` on them (what a sweep calls per grid point).

    ``models``: a ``ModelCache`` reused across calls, so many workloads of one model load it once.
    ``reference_steps`` (diffusion): also compare to the baseline run at that many steps.
    Other keywords (``history``, ``repeats``, ``warmup``, ``knobs``, ``progress``, ...) go to ``run_methods``.
    """
    cache = models if models is not None else ModelCache(device)
    if isinstance(workload, LLMWorkload):
        m = cache.llm(workload.model)
        setups = build_llm_setups(workload, device=device, max_batches=max_batches, target=m.model,
                                  tokenizer=m.tokenizer, drafts={n: cache.llm(n).model for n in workload.drafts})
        key = {**workload.key(), **llm_workload_facts(setups)}
        return run_methods(setups, methods, workload=key, **run_kwargs)
    if isinstance(workload, DiffusionWorkload):
        setups = build_diffusion_setups(workload, device=device, unet=cache.unet(workload.model))
        key = workload.key()
        if reference_steps:
            key["reference_steps"] = reference_steps
            ref, ref_s = timed_diffusion_reference(setups, steps=reference_steps)
            run_kwargs.setdefault("reference", ref)
            run_kwargs.setdefault("reference_s", ref_s)
        return run_methods(setups, methods, workload=key, **run_kwargs)
    raise TypeError(f"run_workload takes an LLMWorkload or a DiffusionWorkload, got {type(workload).__name__}")
