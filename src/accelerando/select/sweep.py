"""The sweep: a grid of workloads x method configurations run through the harness into the history.

A workload names its models by zoo name, directory, or a random-initialised spec
(``rand-llama-h64-l2-v256-s0``: hidden 64, 2 layers, vocabulary 256, seed 0;
``rand-unet-c16x32-i16-s0``: channels 16/32, 16x16 images) so the grid can vary shapes that the
zoo does not have. Per workload the sweep

1. loads / builds the models and the prompts (cached across workloads);
2. measures the features (``features.llm_facts`` / ``diffusion_facts``: one timed forward, prompt
   statistics) and stores them in the workload dict under ``"features"``;
3. runs every method configuration in *rounds*: round r runs the baseline plus the r-th knob
   setting of each method, through ``bench.runner.run_methods`` (speed-up against the baseline of
   the same round), and records the rows in the history.

Resumable: each row carries ``sweep_key`` (the id of the workload's settings); a round whose
(method, knobs) rows are all in the history already is skipped.
"""

from __future__ import annotations

import inspect
import math
import random
import re
import statistics
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

from .table import INTERLEAVED, arm_id, timing_protocol, workload_id

# method name -> knob settings to sweep (methods not listed run with their default knobs)
KNOB_GRID: dict[str, list[dict[str, Any]]] = {
    "spec-draft": [{"k": 2}, {"k": 4}, {"k": "adaptive"}],
    "spec-prompt-lookup": [{"k": 4}, {"k": 8}],
    # cheaper forward passes (llm/compute): lossless self-speculation and lossy transforms
    "self-spec": [{"exit_layer": 1, "k": 3}, {"skip": 1, "k": 3}, {"exit_layer": 2, "k": 3, "exit_head": True}],
    "coreinfer": [{"alpha": 0.4, "beta": 0.2}, {"alpha": 0.6, "beta": 0.3}],
    "quant-bitmod": [{"bits": 4, "group_size": 32}, {"bits": 3, "group_size": 32},
                     {"bits": None, "budget": 4.0, "scale_bits": 6, "group_size": 32}],
    "quant-int4": [{"group_size": 32}],
    # long context (llm/kv): the kept ratio; n/a on prompts under 256 tokens
    **{m: [{"ratio": 0.25}, {"ratio": 0.5}] for m in ("kv-streaming", "kv-snapkv", "kv-h2o", "kv-elastic",
                                                      "kv-tokenselect", "kv-recycled")},
    "kv-triforce": [{"ratio": 0.1, "k": 4}],
}

# Diffusion: each sampler also runs on a fraction of the workload's NFE budget. The question a
# diffusion user asks is "how few model calls reach the baseline's quality at my budget?", so an
# arm is (sampler, steps_frac); its speed-up is against the baseline at the full budget and its
# quality loss is the relative increase of the error to the high-accuracy reference.
STEP_FRACTIONS: tuple[float, ...] = (1.0, 0.5, 0.25)


# ----------------------------------------------------------------------------- models

# one resolver for zoo names, directories and rand-* specs (re-exported: older code imports them from here)
from accelerando.bench.models import ModelCache, char_tokenizer, rand_llm, rand_unet  # noqa: E402,F401
from accelerando.bench.models import RAND_LLM as _RAND_LLM, RAND_UNET as _RAND_UNET  # noqa: E402,F401


# ----------------------------------------------------------------------------- prompts

def _stdlib_text(kind: str) -> str:
    """Offline text: Python standard-library source ("code") or docstrings ("prose")."""
    import argparse, collections, json, textwrap, difflib, heapq, string, fractions  # noqa: E401
    mods = [textwrap, json, difflib, heapq, string, fractions, argparse, collections]
    if kind == "code":
        return "\n".join(inspect.getsource(m) for m in mods[:6])
    docs = []
    for m in mods:
        for _, obj in inspect.getmembers(m):
            d = inspect.getdoc(obj) if callable(obj) else None
            if d and len(d) > 80:
                docs.append(d)
    return "\n\n".join(docs)


_TEXT_CACHE: dict[str, str] = {}


def make_prompts(domain: str, *, n: int, length: int, rng: random.Random) -> list[str]:
    """``n`` prompts of about ``length`` characters: code, prose, repetitive (a short block repeated:
    what prompt lookup can copy), or random characters (nothing to copy)."""
    if domain not in ("code", "prose", "repetitive", "random"):
        raise ValueError(f"unknown prompt domain {domain!r}; use code, prose, repetitive or random")
    if domain == "random":
        alphabet = [chr(i) for i in range(32, 127)]
        return ["".join(rng.choice(alphabet) for _ in range(length)) for _ in range(n)]
    base = "code" if domain in ("code", "repetitive") else "prose"
    text = _TEXT_CACHE.setdefault(base, _stdlib_text(base))
    out = []
    for _ in range(n):
        if domain == "repetitive":
            unit = max(8, length // rng.choice([3, 4, 6]))
            i = rng.randrange(0, len(text) - unit)
            block = text[i:i + unit]
            s = (block * (length // unit + 1))[:length]
        else:
            i = rng.randrange(0, len(text) - length)
            s = text[i:i + length]
        out.append(s)
    return out


# ----------------------------------------------------------------------------- the grid

def _zoo_names() -> list[str]:
    try:
        from accelerando import zoo
        return [n for n in zoo.names() if _zoo_ready(zoo, n)]
    except Exception:        # noqa: BLE001 - the zoo is optional for the sweep
        return []


def _zoo_ready(zoo: Any, name: str) -> bool:
    try:
        from pathlib import Path
        return (Path(zoo.path(name)) / "config.json").exists()
    except Exception:        # noqa: BLE001
        return False


def llm_grid(n: int = 60, *, seed: int = 0, zoo_names: Sequence[str] | None = None) -> list[Any]:
    """``n`` LLM workloads varying what changes the winner: draft/target size ratio, temperature,
    prompt repetitiveness, batch, prompt and generation length. Uses the zoo's code models when
    they are trained, random-initialised Llamas of several shapes otherwise and in addition."""
    from accelerando.bench.workloads import LLMWorkload
    rng = random.Random(seed)
    zoo_names = _zoo_names() if zoo_names is None else list(zoo_names)
    pairs: list[tuple[str, tuple[str, ...]]] = []
    if "code-target" in zoo_names:
        for d in ("code-draft-small", "code-draft-tiny"):
            if d in zoo_names:
                pairs.append(("code-target", (d,)))
    # independent small drafts (they rarely agree with the target) and early-exit drafts (the
    # target's first layers: they agree often; cost ratio ~ kept / total layers)
    # target's first layers, with the later layers' weight d% of normal: they agree the more the
    # smaller d; cost ratio ~ kept / total layers)
    for h, layers, d, draft in ((64, 2, 100, "rand-llama-h32-l1-v128-s1"), (128, 2, 100, "rand-llama-h64-l1-v128-s1"),
                                (128, 4, 10, "@l1"), (128, 6, 5, "@l1"), (128, 6, 30, "@l2"), (256, 4, 15, "@l1"),
                                (256, 6, 40, "@l1"), (192, 8, 5, "@l2")):
        target = f"rand-llama-h{h}-l{layers}-v128-s{h + layers}" + (f"-d{d}" if d != 100 else "")
        pairs.append((target, (target + draft if draft.startswith("@") else draft,)))
    out = []
    domains = ("code", "prose", "repetitive", "random")
    long_rng = random.Random(seed + 18)
    for i in range(n):
        if i >= LLM_GRID_FIXED and (i - LLM_GRID_FIXED) % 2 == 0:     # past the bundled entries: half long context
            out.append(long_context_workload((i - LLM_GRID_FIXED) // 2, rng=long_rng, zoo_names=zoo_names))
            continue
        model, drafts = pairs[i % len(pairs)] if i < len(pairs) else rng.choice(pairs)
        domain = domains[i % 4]
        length = rng.choice([48, 96, 192])
        bs = rng.choice([1, 1, 2, 4])
        prompts = make_prompts(domain, n=bs, length=length, rng=rng)
        out.append(LLMWorkload(model=model, drafts=drafts, domain=domain, batch_size=bs,
                               max_new_tokens=rng.choice([16, 32]), temperature=rng.choice([0.0, 0.0, 0.7, 1.0]),
                               seed=i, prompts=tuple(prompts)))
    return out


LLM_GRID_FIXED = 60                               # llm_grid entries of the bundled history's sweeps: unchanged
LONG_MODEL = "code-long-target"


def long_context_workload(j: int, *, rng: random.Random, zoo_names: Sequence[str]) -> Any:
    """The j-th long-context workload (the KV-cache methods' territory, issue 18): batch 1 (the
    methods need unpadded rows), greedy or T=0.7, 512-2048 prompt tokens. With the zoo's
    ``code-long-target``: held-out code or a multi-key retrieval haystack (``llm.kv.tasks``);
    without it a random Llama reading 512-1000 characters of code (char tokens)."""
    from accelerando.bench.workloads import LLMWorkload
    temperature = rng.choice([0.0, 0.0, 0.7])
    new = rng.choice([16, 32])
    if LONG_MODEL in zoo_names:
        n = rng.choice([512, 1024, 2048])
        domain = "retrieval" if j % 2 == 0 else "long-code"
        return LLMWorkload(model=LONG_MODEL, domain=domain, max_new_tokens=new, temperature=temperature,
                           seed=1000 + j, prompts=(long_prompt(domain, tokens=n, rng=rng),))
    n = rng.choice([512, 768, 1000])
    return LLMWorkload(model=f"rand-llama-h128-l4-v128-s{j % 3}", domain="long-code", max_new_tokens=new,
                       temperature=temperature, seed=1000 + j, prompts=tuple(make_prompts("code", n=1, length=n, rng=rng)))


_LONG: list[Any] = []


def _long_filler() -> tuple[Any, Any]:
    """(tokenizer, held-out code token stream) of the long-context model, loaded once."""
    if not _LONG:
        from accelerando import zoo
        from accelerando.llm.kv.tasks import corpus_filler
        tok = zoo.load_tokenizer(LONG_MODEL)
        _LONG.extend([tok, corpus_filler(tok, "heldout")])
    return _LONG[0], _LONG[1]


def long_prompt(domain: str, *, tokens: int, rng: random.Random) -> str:
    """A prompt of about ``tokens`` tokens of the long-context zoo model: a window of held-out code
    ("long-code") or a 4-key retrieval haystack whose query ends the prompt ("retrieval")."""
    import torch
    from accelerando.llm.kv.tasks import HaystackBuilder
    tok, filler = _long_filler()
    if domain == "retrieval":
        g = torch.Generator().manual_seed(rng.randrange(1 << 30))
        s = HaystackBuilder(tok, filler).sample("multikey", tokens, gen=g, depth=rng.random(), n_keys=4)[2]
        return tok.decode(s.prompt[1:])            # without the leading EOS (the text's own)
    start = rng.randrange(0, len(filler) - tokens - 1)
    return tok.decode(filler[start: start + tokens])


def diffusion_grid(n: int = 30, *, seed: int = 0, zoo_names: Sequence[str] | None = None) -> list[Any]:
    """``n`` diffusion workloads varying the NFE budget, spacing, batch and the denoiser's shape.

    The first ``GRID_FIXED`` entries (the bundled history's first rounds) draw budgets from 5 / 8 /
    10 / 15 / 25 and cycle three random UNets; later entries widen both (budgets 5-30, a fourth UNet
    shape) so that a held-out workload is not just another seed of a setting already measured. The
    first entries never change when ``n`` grows (their sweep keys are in the bundled history).
    Entries from ``GRID_DIT`` on are DiT workloads on the zoo DiTs (``digits-dit``, 16x16, and
    ``digits-dit-32``, 32x32: there are no random DiTs, and caching or region skipping on random
    weights says nothing), budgets 10-50, for the DiT arms (caches, RAS, ToMe, diffusers' hooks)
    next to the samplers; without trained zoo DiTs they continue the UNet entries."""
    from accelerando.bench.workloads import DiffusionWorkload
    rng = random.Random(seed + 1)
    zoo_names = _zoo_names() if zoo_names is None else list(zoo_names)
    # zoo models join only --zoo grids (the bundled history was swept on random models alone)
    zoo = [z for z in ("digits-unet", "digits-dit") if z in zoo_names]
    models = zoo + ["rand-unet-c8x16-i8-s0", "rand-unet-c16x32-i16-s1", "rand-unet-c32x64-i16-s2"]
    wide_models = models + ["rand-unet-c24x48-i12-s3"]
    dits = [z for z in GRID_DIT_MODELS if z in _zoo_names()]
    dit_rng = random.Random(seed + 2)       # its own stream: the UNet entries' draws stay as they were
    out = []
    for i in range(n):
        if i >= GRID_DIT and dits:
            # blocks of GRID_DIT_BLOCK workloads per model: one model's entries can be swept alone
            out.append(DiffusionWorkload(model=dits[(i - GRID_DIT) // GRID_DIT_BLOCK % len(dits)],
                                         steps=dit_rng.choice(GRID_STEPS_DIT),
                                         spacing=dit_rng.choice(["trailing", "trailing", "linspace"]),
                                         batch=dit_rng.choice([1, 1, 2, 4]), seed=i))
            continue
        fixed = i < GRID_FIXED
        ms = models if fixed else wide_models
        out.append(DiffusionWorkload(model=ms[i % len(ms)],
                                     steps=rng.choice(GRID_STEPS if fixed else GRID_STEPS_WIDE),
                                     spacing=rng.choice(["trailing", "trailing", "linspace", "leading"]),
                                     batch=rng.choice([1, 2, 4]), seed=i))
    return out


GRID_FIXED = 60                                   # diffusion_grid entries swept with the narrow choices
GRID_STEPS = (5, 8, 10, 15, 25)
GRID_STEPS_WIDE = (5, 6, 8, 10, 12, 15, 20, 25, 30)
GRID_DIT = 90                                     # diffusion_grid entries from here on are DiT workloads
GRID_DIT_MODELS = ("digits-dit", "digits-dit-32")
GRID_DIT_BLOCK = 6
GRID_STEPS_DIT = (10, 20, 20, 50)


# ----------------------------------------------------------------------------- running

@dataclass
class SweepReport:
    workloads: int = 0
    rounds_run: int = 0
    rounds_skipped: int = 0
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False


def sweep_key(workload: Any) -> str:
    return workload_id(workload.key())


def method_rounds(family: str, methods: Sequence[str] | None = None,
                  knob_grid: dict[str, list[dict[str, Any]]] | None = None) -> list[dict[str, dict[str, Any]]]:
    """Rounds of {method: knobs}; round r holds the r-th knob setting of every method that has one."""
    from accelerando.bench.methods import all_methods
    grid = KNOB_GRID if knob_grid is None else knob_grid
    entries = [e for e in all_methods(family) if not e.is_baseline and (methods is None or e.name in methods)]
    variants = {e.name: [{**e.default_knobs, **k} for k in grid.get(e.name, [{}])] for e in entries}
    n = max((len(v) for v in variants.values()), default=0)
    return [{m: v[r] for m, v in variants.items() if r < len(v)} for r in range(n)]


def diffusion_fraction_rounds(setups: Sequence[Any], rounds: Sequence[dict[str, dict[str, Any]]], *,
                              workload: dict[str, Any], reference: Any, history: Any, repeats: int, warmup: int,
                              done: set[tuple[str, str]] | None = None,
                              fractions: Sequence[float] = STEP_FRACTIONS,
                              round_index: Sequence[int] | None = None,
                              note: dict[str, Any] | None = None) -> Iterable[list[Any]]:
    """Run each round at every step fraction; yield the rows of each round (all fractions).

    The full-budget baseline is measured first in every round (``run_methods`` does that); its
    median time and reference error are the denominators of all speed-ups and quality losses of
    the round, so each row compares with a baseline measured seconds before, in the same process.
    Rows are re-labelled (knob ``steps_frac``; only the full-budget baseline is the baseline) and
    recorded here, with row keys from the round's index in ``method_rounds`` (``round_index[i]``
    for ``rounds[i]``; default ``i``).
    """
    from accelerando.bench.runner import run_methods
    key = workload.get("sweep_key")
    run_id = f"sweep-{key}-{int(time.time() * 1e3) % 10**9}"
    for r_i, r in enumerate(rounds):
        r_key = round_index[r_i] if round_index is not None else r_i     # its index in method_rounds
        base = None
        out: list[Any] = []
        for f in fractions:
            todo = {m: k for m, k in r.items() if done is None or (key, arm_id(m, {**k, "steps_frac": f})) not in done}
            if f != 1.0 and not todo and r_key > 0:
                continue          # nothing missing at this fraction (the baseline arms are in round 0)
            steps = max(1, round(setups[0].steps * f))
            sub = [replace(s, steps=steps) for s in setups]
            rows = run_methods(sub, list(todo), workload=workload, knobs=todo, repeats=repeats, warmup=warmup,
                               history=None, reference=reference)
            if f == 1.0:
                base = next((x for x in rows if x.is_baseline and x.error is None), None)
                if base is None:
                    out += rows
                    break
            keep = []
            for x in rows:
                if x.error is not None or (x.is_baseline and r_key > 0):
                    continue
                m = dict(x.metrics)
                m["speedup"] = base.metrics["median_s"] / m["median_s"] if m.get("median_s") else None
                rb, rx = base.metrics.get("rmse_vs_reference"), m.get("rmse_vs_reference")
                if rb and rx is not None:
                    m["quality_loss"] = max(0.0, rx / rb - 1.0)
                m["is_baseline"] = bool(x.is_baseline and f == 1.0)
                m["steps"] = steps
                x.knobs = {**x.knobs, "steps_frac": f} if not m["is_baseline"] else x.knobs
                x.metrics = m
                keep.append(x)
            _record(history, keep, workload, "diffusion", run_id, _round_key("sweep", str(key), r_key, todo, f), note)
            out += keep + [x for x in rows if x.error is not None]
        yield out


def _done_arms(history: Any) -> set[tuple[str, str]]:
    return {(str(m.workload.get("sweep_key")), arm_id(m.method, m.knobs))
            for m in history.rows() if m.workload.get("sweep_key")}


def row_key(*parts: Any) -> str:
    """A deterministic id of what a row measures (``Measurement.row_key``): the same cell run
    twice (a Ray task retried after its worker died, a serial re-run) writes the same keys, and
    the store keeps the first. 40 hex digits of SHA-1 over the parts' JSON."""
    import hashlib
    import json
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _round_key(kind: str, key: str, r_i: int, todo: dict[str, dict[str, Any]], frac: float | None = None) -> Callable[[str, dict[str, Any]], str]:
    """Row keys of one round: the workload, the round's index in ``method_rounds``, the step
    fraction and every arm the round runs (a retry of only its failed method is another run, with
    its own baseline row), then the row's own arm."""
    arms = sorted(arm_id(m, k) for m, k in todo.items())
    return lambda method, knobs: row_key(kind, key, r_i, frac, arms, arm_id(method, knobs))


def _label_of(wl: Any) -> str:
    return f"{wl.family} {wl.model} " + (f"T={wl.temperature} bs={wl.batch_size} {wl.domain}"
                                         if wl.family == "llm" else f"steps={wl.steps} {wl.spacing} b={wl.batch}")


def sweep_cell(wl: Any, *, history: Any, cache: "ModelCache", done: set[tuple[str, str]] | None = None,
               methods: Sequence[str] | None = None, knob_grid: dict[str, list[dict[str, Any]]] | None = None,
               repeats: int = 2, warmup: int = 1, reference_steps: int = 100, device: str = "cpu",
               mem_bw_gbs: float | None = None, note: dict[str, Any] | None = None) -> SweepReport:
    """One workload of the sweep (a cell: every method round of the workload, because a
    speed-up is against the baseline measured in the same round, in the same process): measure
    its features, run the rounds not in ``done`` (a set of (sweep_key, arm id); read from
    ``history`` when None, updated here), record each round's rows in ``history`` with row keys
    (``row_key``) in one transaction; ``note`` is added to every row's metrics (e.g. the core a
    Ray cell was pinned to). Returns this cell's counts."""
    from accelerando.bench.runner import (build_diffusion_setups, build_llm_setups, diffusion_reference,
                                          llm_workload_facts, run_methods)
    from .features import diffusion_facts, memory_bandwidth_gbs, setup_facts

    rep = SweepReport()
    done = _done_arms(history) if done is None else done
    label, key = _label_of(wl), sweep_key(wl)
    # only what is missing runs again (a method that failed last time is retried)
    all_rounds = method_rounds(wl.family, methods, knob_grid)
    fracs = STEP_FRACTIONS if wl.family == "diffusion" else (None,)
    rounds = [(r_i, todo) for r_i, r in enumerate(all_rounds)
              if (todo := {m: k for m, k in r.items()
                           if any((key, arm_id(m, k if f is None else {**k, "steps_frac": f})) not in done
                                  for f in fracs)})]
    rep.rounds_skipped += len(all_rounds) - len(rounds)
    if not rounds:
        return rep
    try:
        if wl.family == "llm":
            m = cache.llm(wl.model)
            drafts = {d: cache.llm(d).model for d in wl.drafts}
            setups = build_llm_setups(wl, device=device, target=m.model, tokenizer=m.tokenizer, drafts=drafts)
            facts = setup_facts(setups[0], repeats=3)
            wkey = {**wl.key(), **llm_workload_facts(setups)}
            ref = None
        else:
            u = cache.unet(wl.model)
            setups = build_diffusion_setups(wl, device=device, unet=u)
            facts = diffusion_facts(eps_fn=setups[0].eps_fn, model=u.unet, x_T=setups[0].x_T, repeats=3)
            wkey = {**wl.key(), "reference_steps": reference_steps}
            ref = diffusion_reference(setups, steps=reference_steps)
    except Exception as exc:    # noqa: BLE001 - one broken workload must not stop the sweep
        rep.errors.append(f"{label}: {type(exc).__name__}: {exc}")
        return rep
    facts["mem_bw_gbs"] = memory_bandwidth_gbs() if mem_bw_gbs is None else mem_bw_gbs
    wkey.update(sweep_key=key, features=facts)
    rep.workloads += 1
    if wl.family == "diffusion":
        rounds_rows = diffusion_fraction_rounds(setups, [t for _, t in rounds], workload=wkey, reference=ref,
                                                history=history, repeats=repeats, warmup=warmup, done=done,
                                                round_index=[i for i, _ in rounds], note=note)
    else:
        def llm_rounds() -> Iterator[list[Any]]:
            for r_i, r in rounds:
                run_id = uuid.uuid4().hex[:12]
                rows = run_methods(setups, list(r), workload=wkey, knobs=r, repeats=repeats, warmup=warmup,
                                   history=None, reference=ref, run_id=run_id)
                _record(history, [x for x in rows if x.error is None], wkey, "llm", run_id,
                        _round_key("sweep", key, r_i, r), note)
                yield rows
        rounds_rows = llm_rounds()
    for rows in rounds_rows:
        rep.rounds_run += 1
        rep.rows += sum(x.error is None for x in rows)
        rep.errors += [f"{label}: {x.method}: {x.error}" for x in rows if x.error and not x.not_applicable]
        for x in rows:
            if x.error is None:
                done.add((key, arm_id(x.method, x.knobs)))
    return rep


def _record(history: Any, rows: list[Any], workload: dict[str, Any], family: str, run_id: str,
            keys: Callable[[str, dict[str, Any]], str], note: dict[str, Any] | None = None) -> None:
    """Rows of one round into the history, one transaction, each with its row key."""
    from accelerando.bench.history import Measurement
    if history is None or not rows:
        return
    ids = history.record_many([Measurement(workload=dict(workload), method=x.method, knobs=x.knobs,
                                           metrics={**x.metrics, **(note or {})}, seed=int(workload.get("seed", 0)), family=family,
                                           run_id=run_id, row_key=keys(x.method, x.knobs)) for x in rows])
    for x, i in zip(rows, ids):
        x.measurement_id = i


def _merge(rep: SweepReport, part: SweepReport) -> None:
    rep.workloads += part.workloads
    rep.rounds_run += part.rounds_run
    rep.rounds_skipped += part.rounds_skipped
    rep.rows += part.rows
    rep.errors += part.errors


def run_sweep(workloads: Iterable[Any], *, history: Any, methods: Sequence[str] | None = None,
              knob_grid: dict[str, list[dict[str, Any]]] | None = None, repeats: int = 2, warmup: int = 1,
              reference_steps: int = 100, device: str = "cpu", max_seconds: float | None = None,
              progress: Callable[[int, int, str, float | None], None] | None = None) -> SweepReport:
    """Run every workload x method configuration into ``history`` (see the module docstring),
    one ``sweep_cell`` after another (``ray_sweep`` runs the cells on a Ray cluster).

    ``progress(i, n, label, eta_s)`` is called before each workload with an ETA (seconds) from the
    mean time of the workloads run so far. ``max_seconds`` stops before a workload that would start
    after that budget (the sweep can be resumed later).
    """
    from .features import memory_bandwidth_gbs

    workloads = list(workloads)
    cache = ModelCache(device)
    done = _done_arms(history)
    rep = SweepReport()
    t0 = time.perf_counter()
    times: list[float] = []
    bw = memory_bandwidth_gbs()
    for i, wl in enumerate(workloads):
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            rep.stopped_early = True
            break
        eta = (sum(times) / len(times)) * (len(workloads) - i) if times else None
        if progress:
            progress(i, len(workloads), _label_of(wl), eta)
        tw = time.perf_counter()
        part = sweep_cell(wl, history=history, cache=cache, done=done, methods=methods, knob_grid=knob_grid,
                          repeats=repeats, warmup=warmup, reference_steps=reference_steps, device=device,
                          mem_bw_gbs=bw)
        _merge(rep, part)
        if part.rounds_run:
            times.append(time.perf_counter() - tw)
    rep.seconds = time.perf_counter() - t0
    return rep


def refresh_llm_facts(rows: list[dict[str, Any]], workloads: Iterable[Any], *, names: Sequence[str],
                      device: str = "cpu") -> tuple[int, int]:
    """Add facts ``names`` (computed by ``features.setup_facts``) to the stored LLM workloads of
    bundled-style ``rows`` (dicts, changed in place) whose ``sweep_key`` matches one of
    ``workloads`` (the grid that produced them, e.g. ``llm_grid(60, zoo_names=[])``). The facts a
    row already has (timings!) are kept: only the missing names are added, from the same models and
    prompts, so an old history gains a new feature without re-running any method.
    Returns (workloads refreshed, rows changed)."""
    import torch
    from accelerando.bench.runner import build_llm_setups
    from .features import setup_facts
    by_key = {sweep_key(w): w for w in workloads if w.family == "llm"}
    todo: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        k = (r.get("workload") or {}).get("sweep_key")
        if k in by_key:
            todo.setdefault(k, []).append(r)
    cache = ModelCache(device)
    changed = 0
    for k, rs in todo.items():
        wl = by_key[k]
        m = cache.llm(wl.model)
        drafts = {d: cache.llm(d).model for d in wl.drafts}
        s0 = build_llm_setups(wl, device=device, target=m.model, tokenizer=m.tokenizer, drafts=drafts)[0]
        with torch.no_grad():
            facts = setup_facts(s0, repeats=1)
        for r in rs:
            feats = r["workload"].setdefault("features", {})
            new = {n: facts[n] for n in names if n in facts and n not in feats}
            if new:
                feats.update(new)
                changed += 1
    return len(todo), changed


def _missing(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and math.isnan(v)) or v == "nan"


def refresh_diffusion_facts(rows: list[dict[str, Any]], *, names: Sequence[str],
                            device: str = "cpu") -> tuple[int, int]:
    """Add the denoiser facts ``names`` (``features.diffusion_model_facts``: size, depth, width,
    architecture) to the stored diffusion workloads of bundled-style ``rows`` (dicts, changed in
    place), loading each row's model once; facts a row already has are kept unless unknown (NaN).
    No method runs and no timing changes. Returns (models loaded, rows changed)."""
    from .features import diffusion_model_facts
    cache = ModelCache(device)
    by_model: dict[str, dict[str, float]] = {}
    changed = 0
    for r in rows:
        wl = r.get("workload") or {}
        if wl.get("family") != "diffusion" or not wl.get("model"):
            continue
        if wl["model"] not in by_model:
            by_model[wl["model"]] = diffusion_model_facts(cache.unet(wl["model"]).unet)
        facts = by_model[wl["model"]]
        feats = wl.setdefault("features", {})
        new = {n: facts[n] for n in names if n in facts and _missing(feats.get(n)) and not _missing(facts[n])}
        if new:
            feats.update(new)
            changed += 1
    return len(by_model), changed


# ----------------------------------------------------------------------------- re-timing

@dataclass
class RetimeReport:
    workloads: int = 0               # re-timed now
    todo: int = 0                    # workloads that needed (more) rounds when it started
    skipped: int = 0                 # already re-timed in the history (resumed)
    missing: int = 0                 # history workloads not in the given grid (cannot be rebuilt)
    rows: int = 0
    errors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # arms that no longer run (e.g. n/a at the budget)
    not_exact: list[str] = field(default_factory=list)  # LLM, greedy: a lossless arm's tokens != the baseline's
    max_quality_drift: float = 0.0   # max |quality(now) / quality(stored) - 1| over the arms (``DRIFT_METRIC``)
    seconds: float = 0.0
    load: list[float] = field(default_factory=list)   # 1-minute load average before each workload
    stopped_early: bool = False


# the stored quality number a re-timing compares its own with (the drift is reported): diffusion,
# the error to the high-accuracy reference; LLM, the perplexity of the output under the target
DRIFT_METRIC = {"diffusion": "rmse_vs_reference", "llm": "perplexity"}


def _row(r: Any, name: str) -> Any:
    return r.get(name) if isinstance(r, dict) else getattr(r, name)


def per_round_speedups(base: Sequence[float], arm: Sequence[float], *, base_tokens: Sequence[int] | None = None,
                       arm_tokens: Sequence[int] | None = None) -> list[float]:
    """Speed-up of each interleaved round: the baseline's time over the arm's in the same round.
    With token counts (sampling, where a row stops at the EOS it happens to draw, so two arms of a
    round may generate different lengths): the ratio of time per generated token."""
    if base_tokens is None or arm_tokens is None:
        return [b / a for b, a in zip(base, arm) if a > 0]
    return [(b / nb) / (a / na) for b, a, nb, na in zip(base, arm, base_tokens, arm_tokens) if a > 0 and nb > 0 and na > 0]


def _stored_arms(rows: Iterable[Any], family: str) -> dict[str, dict[str, Any]]:
    """sweep_key -> {"workload", "arms": {id: (method, knobs)}, "base": baseline arm id,
    "quality": {id: stored DRIFT_METRIC}, "done": {timing_protocol: interleaved rounds already in
    the history}, "timed": {timing_protocol: arm ids those rounds cover}, "timed_at":
    {timing_protocol: newest timestamp of those rows}, "swept_at": {id: newest timestamp of its
    sweep rows}} (timestamps are ISO strings in UTC; a row without one counts as oldest)."""
    stored: dict[str, dict[str, Any]] = {}
    for r in rows:
        wl = _row(r, "workload") or {}
        key = wl.get("sweep_key")
        if not key or (_row(r, "family") or wl.get("family")) != family:
            continue
        m = _row(r, "metrics") or {}
        s = stored.setdefault(key, {"workload": None, "arms": {}, "base": None, "quality": {}, "done": {},
                                    "timed": {}, "timed_at": {}, "swept_at": {}})
        if wl.get("features") and s["workload"] is None:
            s["workload"] = dict(wl)
        a = arm_id(_row(r, "method"), _row(r, "knobs"))
        when = str(_row(r, "timestamp") or "")
        if m.get("timing") == INTERLEAVED:
            p = timing_protocol(m)
            s["timed"].setdefault(p, set()).add(a)
            s["timed_at"][p] = max(s["timed_at"].get(p, ""), when)
            if m.get("is_baseline"):
                s["done"][p] = s["done"].get(p, 0) + int(m.get("rounds") or 0)
        else:
            s["arms"][a] = (_row(r, "method"), dict(_row(r, "knobs") or {}))
            s["swept_at"][a] = max(s["swept_at"].get(a, ""), when)
            if m.get("is_baseline"):
                s["base"] = a
            if m.get(DRIFT_METRIC[family]) is not None:
                s["quality"][a] = float(m[DRIFT_METRIC[family]])
    return stored


def _label(wl: Any) -> str:
    if wl.family == "llm":
        return f"llm {wl.model} T={wl.temperature} bs={wl.batch_size} {wl.domain}"
    return f"diffusion {wl.model} steps={wl.steps} {wl.spacing} b={wl.batch}"


def _retime_setups(wl: Any, stored_wl: dict[str, Any], *, device: str, models: Callable[[str], Any]):
    """(setups, reference) of a workload: the sweep's models, prompts / noise and seeds."""
    from accelerando.bench.runner import build_diffusion_setups, build_llm_setups, diffusion_reference
    if wl.family == "llm":
        m = models(wl.model)
        drafts = {d: models(d).model for d in wl.drafts}
        return build_llm_setups(wl, device=device, target=m.model, tokenizer=m.tokenizer, drafts=drafts), None
    setups = build_diffusion_setups(wl, device=device, unet=models(wl.model))
    return setups, diffusion_reference(setups, steps=int(stored_wl.get("reference_steps", 100)))


def _arm_inputs(setups: list[Any], knobs: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """An arm's setups and builder knobs: a diffusion arm's ``steps_frac`` is its budget (the
    steps of its setups), not a knob of the sampler."""
    if "steps_frac" not in knobs:
        return setups, dict(knobs)
    steps = max(1, round(setups[0].steps * float(knobs["steps_frac"])))
    return [replace(x, steps=steps) for x in setups], {n: v for n, v in knobs.items() if n != "steps_frac"}


def _seeds_per_round(wl: Any, seed_rounds: bool) -> bool:
    """Whether a re-timing draws a new seed each round: LLM workloads that sample (at temperature
    0 the output, and so the time, does not depend on the seed)."""
    return seed_rounds and wl.family == "llm" and float(wl.temperature or 0.0) > 0


def _round_calls(entry: Any, sub: list[Any], knobs: dict[str, Any], seeds: list[int] | None) -> list[list[Any]]:
    """An arm's built calls, one list per round: with ``seeds``, round i's setups carry seed
    ``seeds[i]``; without, one list serves every round."""
    knobs = {**entry.default_knobs, **knobs}
    if seeds is None:
        return [[entry.build(x, **knobs) for x in sub]]
    return [[entry.build(replace(x, seed=g), **knobs) for x in sub] for g in seeds]


def _counting_call(order: Iterator[list[Any]], setups: list[Any], counts: list[int] | None) -> Callable[[], list[Any]]:
    """One timed call of an arm: the next round's built calls; with ``counts``, the tokens the
    round generated are appended to it (``runner.llm_new_tokens``)."""
    from accelerando.bench.runner import llm_new_tokens

    def call() -> list[Any]:
        outs = [c() for c in next(order)]
        if counts is not None:
            counts.append(llm_new_tokens(setups, outs))
        return outs
    return call


def retime_workload(wl: Any, s: dict[str, Any], *, n_done: int, rounds: int, warmup_rounds: int = 1,
                    seed_rounds: bool = True, device: str = "cpu", models_for: Callable[[str], Any],
                    sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter,
                    report: RetimeReport | None = None) -> list[Any]:
    """Re-time one stored workload (``s``: its entry of ``_stored_arms``): ``rounds - n_done``
    interleaved rounds of every arm, quality recomputed; returns the new rows (``Measurement``s,
    with row keys: the same top-up of the same workload never stores twice). Arms that no longer
    run, lossless arms that differ and the quality drift go to ``report`` (see ``retime``)."""
    from accelerando.bench.harness import measure_interleaved, percentile
    from accelerando.bench.history import Measurement
    from accelerando.bench.methods import get_method
    from accelerando.bench.runner import _quality, _speed_metrics

    rep = report if report is not None else RetimeReport()
    if not rep.load:
        rep.load.append(float("nan"))
    family = wl.family
    key = sweep_key(wl)
    label, base = _label(wl), s["base"]
    n_rounds = rounds - n_done
    extra_warmup = max(0, warmup_rounds - 1)
    seeds = ([int(wl.seed) + n_done + r for r in range(n_rounds)]
             if _seeds_per_round(wl, seed_rounds) else None)
    setups, ref = _retime_setups(wl, s["workload"], device=device, models=models_for)
    fns, entries, inputs, tokens = {}, {}, {}, {}
    for a, (method, knobs) in s["arms"].items():
        # build and the first warm-up call, one arm at a time: an arm the current code
        # refuses (a budget below its minimum) or that fails is left out and reported
        try:
            entry = get_method(method)
            sub, k = _arm_inputs(setups, knobs)
            per_round = _round_calls(entry, sub, k, seeds)
            [c() for c in per_round[0]]
        except Exception as exc:    # noqa: BLE001
            if a == base:
                raise
            rep.dropped.append(f"{label}: {a}: {type(exc).__name__}: {exc}")
            continue
        # the extra warm-up rounds reuse round 0's calls; timed round i runs per_round[i]
        order = iter([per_round[0]] * extra_warmup + per_round * (n_rounds if seeds is None else 1))
        fns[a] = _counting_call(order, sub, tokens.setdefault(a, []) if seeds is not None else None)
        entries[a], inputs[a] = entry, sub
    timings = measure_interleaved(fns, rounds=n_rounds, warmup_rounds=extra_warmup,
                                  sync=sync, clock=clock)
    base_out = timings[base].result
    llm = family == "llm"
    base_q = _quality(family, inputs[base], base_out, base_out, ref, entries[base], score_perplexity=llm)
    run_id = f"retime-{key}-{int(time.time() * 1e3) % 10**9}"
    new = []
    for a, t in timings.items():
        q = _quality(family, inputs[a], t.result, base_out, ref, entries[a], score_perplexity=llm)
        counts = {x: tokens[x][-n_rounds:] for x in (base, a)} if seeds is not None else {}
        ratios = per_round_speedups(timings[base].samples, t.samples, base_tokens=counts.get(base),
                                    arm_tokens=counts.get(a))
        srt = sorted(ratios)
        is_base = a == base
        if llm:
            m = _speed_metrics("llm", inputs[a], t.result, t)
        else:
            m = {**t.summary(), "nfe": sum(int(o.nfe) for o in t.result), "steps": inputs[a][0].steps}
        m.update(q)
        m.update(timing=INTERLEAVED, rounds=n_rounds, warmup_rounds=warmup_rounds,
                 speedup=1.0 if is_base else statistics.median(ratios), speedup_rounds=ratios,
                 speedup_iqr=percentile(srt, 75) - percentile(srt, 25),
                 lossless=entries[a].lossless, is_baseline=is_base, load_1min=rep.load[-1])
        if seeds is not None:
            m["round_seeds"] = seeds          # the last round's output is the one scored
        m.pop("peak_memory_bytes", None), m.pop("peak_memory_kind", None)
        if not llm:
            rb, rx = base_q.get("rmse_vs_reference"), q.get("rmse_vs_reference")
            if rb and rx is not None:
                m["quality_loss"] = 0.0 if is_base else max(0.0, rx / rb - 1.0)
        elif q.get("lossless_verified") is False:
            rep.not_exact.append(f"{label}: {a}: exact match {q.get('exact_match', 0.0):.2f}")
        old, now = s["quality"].get(a), q.get(DRIFT_METRIC[family])
        if old and now is not None:
            rep.max_quality_drift = max(rep.max_quality_drift, abs(now / old - 1.0))
        method, knobs = s["arms"][a]
        new.append(Measurement(workload=dict(s["workload"]), method=method, knobs=knobs, metrics=m,
                               seed=int(s["workload"].get("seed", 0)), family=family, run_id=run_id,
                               row_key=row_key("retime", key, n_done, rounds, seeds is not None, sorted(s["arms"]), a)))
    return new



def retime(rows: Iterable[Any], workloads: Iterable[Any], *, history: Any, family: str = "diffusion",
           rounds: int = 5, warmup_rounds: int = 1, device: str = "cpu", max_seconds: float | None = None,
           seed_rounds: bool = True,
           progress: Callable[[int, int, str, float | None], None] | None = None,
           sync: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter,
           models_for: Callable[[str], Any] | None = None) -> RetimeReport:
    """Re-time the ``family`` arms already in the history, interleaved, into new rows.

    For every swept workload of ``rows`` (history rows with a ``sweep_key``) that one of
    ``workloads`` (the grid that produced it) can rebuild: every arm measured there runs again on
    the same models and inputs (diffusion: model, budget, spacing, seeds; LLM: target, drafts,
    prompts, temperature, seed), in ``rounds`` interleaved rounds after ``warmup_rounds`` untimed
    ones (``harness.measure_interleaved``: one call of every arm per round, so a load change hits
    all arms of the round alike). ``rounds`` is the total per workload: where earlier re-timings
    hold some rounds already, only the rest run (a top-up; the table pools the per-round speed-ups
    of all re-timings). An arm's speed-up is the median of its per-round speed-ups (baseline time /
    arm time in the same round). With ``seed_rounds`` an LLM workload that samples (temperature >
    0) draws a new seed each round, the same for all arms of the round (the workload's seed + the
    round's index over all its re-timings, stored as ``round_seeds``): a sampled continuation that
    happens to stop early at an EOS it drew makes an arm look fast on that one seed only, so the
    median over seeds, of the ratios of time per generated token, is the speed-up a user can expect; such rows supersede same-seed re-timings
    (``table.timing_protocol``), which count as no rounds done for it. A workload with an arm swept
    after its last re-timing and not covered by it (a new method) is re-timed afresh, all arms, ``rounds``
    rounds (the table pools them with the earlier rounds; until then the new arm's sweep rows are
    not read, as the workload's cells come from its re-timed rows). Quality is recomputed as the sweep does (``runner._quality``):
    diffusion, the error to the reference from the same seeds; LLM, token agreement and perplexity
    against the baseline's output of this re-timing, and at temperature 0 the exact-match check of
    every lossless arm (one that fails is kept, with ``lossless_verified = False`` -- the table
    then counts it as lossy -- and listed in ``not_exact``). The report's ``max_quality_drift`` says
    how far ``DRIFT_METRIC`` moved from the stored rows. An arm the current code refuses or that
    fails (a budget below a sampler's minimum, a method no longer registered) is left out and
    listed in ``dropped``. New rows carry ``metrics["timing"] = "interleaved"`` and go to
    ``history``; no row is changed or dropped. Resumable: a workload whose baseline's interleaved
    rows hold ``rounds`` rounds in all is skipped (a workload's rows are written in one transaction
    after all its rounds, so a stopped run loses at most the workload in progress).
    ``max_seconds``: no workload starts that would end after it at the mean time per workload so
    far. ``models_for(name)`` (tests) replaces the model cache (``ModelCache.unet`` / ``.llm``: a
    ``LoadedUNet`` / ``LoadedLLM``).
    """
    import os

    if family not in DRIFT_METRIC:
        raise ValueError(f"family must be llm or diffusion, got {family!r}")
    by_key = {sweep_key(w): w for w in workloads if w.family == family}
    stored = _stored_arms(rows, family)
    rep = RetimeReport()
    todo = []
    def done(key: str) -> int:              # rounds already timed under the protocol this run uses
        want = 2 if _seeds_per_round(by_key[key], seed_rounds) else 1
        st = stored[key]
        timed = set().union(*(a for p, a in st["timed"].items() if p >= want))
        last = max((t for p, t in st["timed_at"].items() if p >= want), default="")
        if any(a not in timed and st["swept_at"].get(a, "") > last for a in st["arms"]):
            return 0                        # an arm swept since (a new method): all arms again, afresh
        return sum(n for p, n in st["done"].items() if p >= want)

    for key, s in stored.items():
        if key not in by_key or s["workload"] is None or s["base"] is None:
            rep.missing += 1
        elif done(key) >= rounds:
            rep.skipped += 1
        else:
            todo.append(key)
    rep.todo = len(todo)
    cache = ModelCache(device)
    models_for = models_for or (cache.llm if family == "llm" else cache.unet)
    t_start = time.perf_counter()
    times: list[float] = []
    for i, key in enumerate(todo):
        mean = sum(times) / len(times) if times else 0.0
        if max_seconds is not None and time.perf_counter() - t_start + mean > max_seconds:
            rep.stopped_early = True
            break
        wl, s = by_key[key], stored[key]
        label = _label(wl)
        if progress:
            progress(i, len(todo), label, mean * (len(todo) - i) if times else None)
        tw = time.perf_counter()
        rep.load.append(os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
        try:
            new = retime_workload(wl, s, n_done=done(key), rounds=rounds, warmup_rounds=warmup_rounds,
                                  seed_rounds=seed_rounds, device=device, models_for=models_for, sync=sync,
                                  clock=clock, report=rep)
        except Exception as exc:    # noqa: BLE001 - one broken workload must not stop the rest
            rep.errors.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        history.record_many(new)
        rep.rows += len(new)
        rep.workloads += 1
        times.append(time.perf_counter() - tw)
    rep.seconds = time.perf_counter() - t_start
    return rep


def retime_diffusion(rows: Iterable[Any], workloads: Iterable[Any], *, history: Any,
                     unet_for: Callable[[str], tuple[Any, int]] | None = None, **kw: Any) -> RetimeReport:
    """``retime`` of the diffusion workloads (``unet_for(model)`` -> (unet, num_train_timesteps))."""
    return retime(rows, workloads, history=history, family="diffusion", models_for=unet_for, **kw)


def retime_llm(rows: Iterable[Any], workloads: Iterable[Any], *, history: Any,
               llm_for: Callable[[str], tuple[Any, Any]] | None = None, **kw: Any) -> RetimeReport:
    """``retime`` of the LLM workloads (``llm_for(name)`` -> (model, tokenizer))."""
    return retime(rows, workloads, history=history, family="llm", models_for=llm_for, **kw)
