"""``recommend``: which method, with which knobs, for a new workload — from its features alone.

Training data = the history bundled with accelerando (``select/data/history.jsonl.gz``, the sweep
of this project) plus the user's own history (every ``bench`` / ``sweep`` / ``recommend --verify``
row), so the selector ships trained and learns online. With fewer than ``MIN_WORKLOADS`` workloads
of the family it does not pretend: it falls back to a safe default and says so.
"""

from __future__ import annotations

import gzip
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .models import Prediction, default_model, make_selector
from .table import LOSSLESS, Arm, Constraint, PerfTable, build_table

MIN_WORKLOADS = 5
DATA_DIR = Path(__file__).resolve().parent / "data"
BUNDLED = DATA_DIR / "history.jsonl.gz"

# metrics kept in the bundled file (the rest — per-repeat samples, memory — stays in the sweep's DB)
KEEP_METRICS = ("speedup", "lossless", "is_baseline", "token_agreement", "exact_match", "lossless_verified",
                "perplexity", "rmse_vs_reference", "rmse_vs_baseline", "quality_loss", "tokens_per_s",
                "samples_per_s", "median_s", "iqr_s", "nfe", "new_tokens", "target_calls", "accepted_tokens",
                "drafted_tokens", "timing", "rounds", "round_seeds", "speedup_rounds", "speedup_iqr", "load_1min")


# ----------------------------------------------------------------------------- training data

def slim_row(m: Any) -> dict[str, Any]:
    """A history ``Measurement`` as a small dict (what the bundled file stores per row)."""
    return {"workload": m.workload, "method": m.method, "knobs": m.knobs, "run_id": m.run_id,
            "family": m.family, "hardware": m.hardware, "timestamp": m.timestamp,
            "metrics": {k: m.metrics[k] for k in KEEP_METRICS if k in m.metrics}}


def save_bundled(rows: Iterable[Any], path: Path | None = None) -> int:
    path = Path(path or BUNDLED)          # looked up at call time (tests point BUNDLED elsewhere)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for m in rows:
            fh.write(json.dumps(slim_row(m) if not isinstance(m, dict) else m, sort_keys=True) + "\n")
            n += 1
    return n


def row_key(r: Any) -> tuple:
    """What makes a measurement row the same one (bundled dict or history ``Measurement``): its run,
    method and knobs."""
    get = r.get if isinstance(r, dict) else (lambda name: getattr(r, name))
    return get("run_id"), get("method"), json.dumps(get("knobs"), sort_keys=True)


def merge_bundled(rows: Iterable[Any], path: Path | None = None) -> int:
    """Append ``rows`` to the bundled file, except those already there (same run, method and
    knobs); the rows it holds stay. Returns how many were added."""
    path = Path(path or BUNDLED)
    have = load_bundled(path)
    seen = {row_key(r) for r in have}
    new = []
    for m in rows:
        d = slim_row(m) if not isinstance(m, dict) else m
        k = row_key(d)
        if k not in seen:
            seen.add(k)
            new.append(d)
    if new:
        save_bundled(have + new, path)
    return len(new)


def load_bundled(path: Path = BUNDLED) -> list[dict[str, Any]]:
    """Rows of the bundled history (empty list if the file is absent)."""
    if not Path(path).exists():
        return []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def training_rows(history: Any = None, *, bundled: bool = True) -> list[Any]:
    """Bundled rows + the rows of an open ``History`` (if given)."""
    rows: list[Any] = load_bundled() if bundled else []
    if history is not None:
        rows += list(history.rows())
    return rows


# ----------------------------------------------------------------------------- describing a workload

TASK_DOMAINS = {"code": ("code", "python", "program", "function", "complet"),
                "repetitive": ("repet", "edit", "rewrite", "refactor", "copy", "summar", "extract"),
                "prose": ("prose", "text", "chat", "story", "doc", "write", "essay", "question")}


def domain_of_task(task: str) -> str:
    """Map a free-text task description to a prompt domain (code / repetitive / prose)."""
    t = task.lower()
    for dom, words in TASK_DOMAINS.items():
        if any(w in t for w in words):
            return dom
    return "prose"


@dataclass
class Described:
    """A workload ready for selection (its dict with measured features) and for ``--verify``."""

    workload: Any                 # LLMWorkload | DiffusionWorkload
    key: dict[str, Any]           # workload dict incl. ``features`` (what a history row stores)
    setups: list[Any]
    reference: Any = None


def describe(model: str, *, drafts: Sequence[str] = (), prompts: Sequence[str] | None = None,
             prompts_file: str | None = None, task: str | None = None, temperature: float = 0.0,
             top_p: float | None = None, batch_size: int = 1, max_new_tokens: int = 32, steps: int = 20,
             spacing: str = "trailing", batch: int = 4, seed: int = 0, device: str = "cpu",
             reference_steps: int = 100, cache: Any = None) -> Described:
    """Load the model (zoo name, directory or random spec), build the workload and measure its
    features: one timed forward and prompt statistics — the candidates are *not* run."""
    from accelerando.bench.models import ModelCache, resolve
    from accelerando.bench.runner import (RunnerError, build_diffusion_setups, build_llm_setups, check_limits,
                                          llm_workload_facts)
    from accelerando.bench.workloads import DiffusionWorkload, LLMWorkload
    from .features import diffusion_facts, memory_bandwidth_gbs, setup_facts
    from .sweep import make_prompts

    cache = cache or ModelCache(device)
    kind = resolve(model).kind
    if kind == "llm":
        domain = "code"
        if prompts is None and prompts_file is None:
            domain = domain_of_task(task) if task else "code"
            prompts = make_prompts(domain, n=max(1, batch_size), length=96, rng=random.Random(seed))
        elif task:
            domain = domain_of_task(task)
        wl = LLMWorkload(model=model, drafts=tuple(drafts), domain=domain, prompts_file=prompts_file,
                         prompts=tuple(prompts or ()), batch_size=batch_size, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_p=top_p, seed=seed)
        m = cache.llm(model)
        dm = {d: cache.llm(d).model for d in drafts}
        setups = build_llm_setups(wl, device=device, target=m.model, tokenizer=m.tokenizer, drafts=dm, max_batches=1)
        check_limits(setups)                       # positions, draft vocabulary: before any feature is measured
        s0 = setups[0]
        facts = setup_facts(s0)
        key = {**wl.key(), **llm_workload_facts(setups)}
        ref = None
    else:
        if drafts:
            raise RunnerError("draft models are for LLMs; this is a diffusion model")
        from accelerando.bench.runner import diffusion_reference
        wl = DiffusionWorkload(model=model, steps=steps, spacing=spacing, batch=batch, seed=seed)
        u = cache.unet(model)
        setups = build_diffusion_setups(wl, device=device, unet=u)
        check_limits(setups)
        facts = diffusion_facts(eps_fn=setups[0].eps_fn, model=u.unet, x_T=setups[0].x_T)
        key = {**wl.key(), "reference_steps": reference_steps}
        ref = (lambda: diffusion_reference(setups, steps=reference_steps))
    facts["mem_bw_gbs"] = memory_bandwidth_gbs()
    key["features"] = facts
    return Described(wl, key, setups, ref)


# ----------------------------------------------------------------------------- recommending

@dataclass
class Recommendation:
    family: str
    constraint: Constraint
    ranked: list[Prediction]
    arms: dict[str, Arm]
    selector: str
    n_workloads: int                       # workloads of this family in the training data
    fallback: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def choice(self) -> Prediction:
        return self.ranked[0]

    @property
    def runners_up(self) -> list[Prediction]:
        return self.ranked[1:3]

    def knobs(self, arm: str) -> dict[str, Any]:
        a = self.arms.get(arm)
        return a.knob_dict() if a else {}

    def method(self, arm: str) -> str:
        a = self.arms.get(arm)
        return a.method if a else arm


def _registered() -> dict[str, Any]:
    from accelerando.bench.methods import all_methods
    return {e.name: e for e in all_methods()}


def safe_default(family: str, key: Mapping[str, Any], constraint: Constraint) -> tuple[list[Prediction], dict[str, Arm], str]:
    """The fallback without enough history: the baseline, or one conservative rule that holds
    broadly (prompt lookup on repetitive prompts; a draft model 10x smaller than the target).
    Speed-ups are unknown (NaN)."""
    reg = _registered()
    base = next((e for e in reg.values() if e.family == family and e.is_baseline), None)
    arms: dict[str, Arm] = {}
    preds: list[Prediction] = []
    nan = math.nan

    def add(entry: Any, why: str) -> None:
        arm = Arm(entry.name, tuple(sorted(entry.default_knobs.items())), family, entry.lossless, entry.is_baseline)
        arms[arm.id] = arm
        preds.append(Prediction(arm.id, nan, nan, 1.0 if entry.lossless else nan, nan))
        notes.append(why)

    notes: list[str] = []
    f = key.get("features") or {}
    if family == "llm":
        lookup = reg.get("spec-prompt-lookup")
        draft = reg.get("spec-draft")
        if lookup and float(f.get("rep3", 0.0)) >= 0.3:
            add(lookup, "prompt has many repeated trigrams (rep3 >= 0.3): prompt lookup can copy them")
        if draft and key.get("drafts") and float(f.get("draft_latency_ratio", 1.0)) <= 0.3:
            add(draft, "the draft's forward costs <= 30% of the target's")
    if base is not None:
        add(base, "the baseline: never slower, never different")
    return preds, arms, "; ".join(notes)


def needs_draft(method: str, reg: Mapping[str, Any] | None = None) -> bool:
    """Does a registered method take a draft model (a ``draft`` knob or builder parameter)?"""
    import inspect
    reg = _registered() if reg is None else reg
    e = reg.get(method)
    if e is None:
        return False
    if "draft" in e.default_knobs:
        return True
    try:
        return "draft" in inspect.signature(e.build).parameters
    except (TypeError, ValueError):
        return False


def _refused_below(table: PerfTable, arm: str, steps: float) -> bool:
    """Did the history skip this diffusion arm on a budget giving at least ``steps`` steps (budget x
    ``steps_frac``), below the fewest it ever ran with? Then it cannot run there: the sweep records
    only what ran, and a multistep sampler has a minimum (f-pndm needs 4 steps)."""
    frac = float(table.arms[arm].knob_dict().get("steps_frac", 1.0))
    ran, skipped = [], []
    for w in table.wids(table.arms[arm].family):
        n = float(table.workloads[w].get("steps") or 0) * frac
        (ran if (w, arm) in table.speedup else skipped).append(n)
    fewest = min(ran, default=math.inf)
    return any(steps - 1e-9 <= n < fewest for n in skipped)


def _applicable(table: PerfTable, arm: str, key: Mapping[str, Any], reg: Mapping[str, Any]) -> bool:
    """Methods that need a draft model are not offered to a workload without one, long-context
    methods (``min_prompt_tokens``) not to a shorter prompt; a diffusion arm
    is not offered where the history shows it cannot run (``_refused_below``): a model of its
    quality or speed there would be extrapolating to a run that cannot happen."""
    a = table.arms[arm]
    if a.is_baseline:
        return True
    if a.family != "llm":
        frac = a.knob_dict().get("steps_frac", 1.0)
        if key.get("steps") is None or not isinstance(frac, (int, float)):
            return True
        return not _refused_below(table, arm, float(key["steps"]) * float(frac))
    e = reg.get(a.method)
    prompt_len = (key.get("features") or {}).get("prompt_len")
    if e is not None and getattr(e, "min_prompt_tokens", 0) and prompt_len is not None \
            and float(prompt_len) < e.min_prompt_tokens:
        return False          # a long-context method: n/a on this prompt
    if key.get("drafts"):
        return True
    return not needs_draft(a.method, reg)


def recommend(key: Mapping[str, Any], rows: Iterable[Any], *, constraint: Constraint = LOSSLESS,
              selector: str | None = None, hardware: Mapping[str, Any] | None = None,
              min_workloads: int = MIN_WORKLOADS, registered_only: bool = True) -> Recommendation:
    """Rank method configurations for the workload ``key`` (a dict with ``features``, as from
    ``describe``) by a selector trained on ``rows``; fall back to ``safe_default`` without data."""
    family = str(key.get("family", "llm"))
    selector = selector or default_model(family)
    table = build_table(rows)
    fam_table = table.subset(table.wids(family))
    n = len(fam_table)
    if hardware is None:
        from accelerando.bench.history import hardware_info
        hardware = hardware_info()
    if n < min_workloads or fam_table.baseline_arm(family) is None:
        preds, arms, why = safe_default(family, key, constraint)
        note = (f"the history has {n} {family} workload(s) (< {min_workloads}): not enough to learn from; "
                f"safe default ({why or 'baseline'}). Run `accelerando sweep` or `recommend --verify` to build it up.")
        return Recommendation(family, constraint, preds, arms, "safe-default", n, fallback=True, notes=[note])
    reg = _registered()
    allowed = [a for a in fam_table.arms if fam_table.arms[a].family == family and _applicable(fam_table, a, key, reg)
               and (not registered_only or not reg or fam_table.arms[a].method in reg)]
    sel = make_selector(selector, constraint=constraint).fit(fam_table)
    ranked = sel.rank(key, hardware=hardware, arms=allowed)
    ok = baseline_floor([p for p in ranked if p.p_ok >= sel.min_p_ok], fam_table.baseline_arm(family))
    rest = [p for p in ranked if p.p_ok < sel.min_p_ok]
    notes = []
    if rest:
        notes.append(f"{len(rest)} candidate(s) ranked last: predicted to break the constraint "
                     f"({constraint.label()}) with probability > {1 - sel.min_p_ok:.0%}")
    return Recommendation(family, constraint, ok + rest, dict(fam_table.arms), selector, n, notes=notes)


def baseline_floor(ranked: list[Prediction], base_arm: str | None) -> list[Prediction]:
    """The baseline (speed-up 1 by definition, always allowed) ranks above every arm predicted to
    be slower than it (or of unknown speed); the order is kept otherwise."""
    base = next((p for p in ranked if p.arm == base_arm), None)
    if base is None:
        return ranked
    faster = [p for p in ranked if p is not base and p.speedup >= 1.0]      # NaN compares False
    return faster + [base] + [p for p in ranked if p is not base and p not in faster]


def verify(described: Described, rec: Recommendation, *, top: int = 3, history: Any = None,
           repeats: int = 2, warmup: int = 1) -> list[Any]:
    """Run the top candidates (and the baseline) on the spot; rows go to ``history`` so the
    selector learns from them next time. Returns the runner's rows."""
    from accelerando.bench.runner import run_methods
    arms = [p.arm for p in rec.ranked[:top]]
    reg = _registered()
    by_method: dict[str, list[dict[str, Any]]] = {}
    fractions = {1.0}
    for a in arms:
        m = rec.method(a)
        k = rec.knobs(a)
        if "steps_frac" in k:                      # diffusion arm: sampler on a fraction of the budget
            fractions.add(float(k.pop("steps_frac")))
        if m in reg and not reg[m].is_baseline and k not in by_method.get(m, []):
            by_method.setdefault(m, []).append(k)
    rounds = []
    while any(by_method.values()):
        rounds.append({m: ks.pop(0) for m, ks in by_method.items() if ks})
    if not rounds:
        rounds = [{}]
    ref = described.reference() if callable(described.reference) else described.reference
    from .sweep import sweep_key
    key = {**described.key, "sweep_key": sweep_key(described.workload)}
    out = []
    if rec.family == "diffusion":
        from .sweep import diffusion_fraction_rounds
        for rows in diffusion_fraction_rounds(described.setups, rounds, workload=key, reference=ref,
                                              history=history, repeats=repeats, warmup=warmup,
                                              fractions=sorted(fractions, reverse=True)):
            out += rows
    else:
        for r in rounds:
            out += run_methods(described.setups, list(r), workload=key, knobs=r, repeats=repeats, warmup=warmup,
                               history=history, reference=ref)
    return verified_rows(out, arms, {rec.method(a) for a in arms})


def verified_rows(rows: list[Any], arms: Sequence[str], methods: set[str]) -> list[Any]:
    """What ``verify`` shows: the baseline once, then each candidate arm once. The runs hold more
    (a baseline per round, a diffusion sampler at every step fraction any candidate needed; all of
    it goes to the history). A candidate whose stored knobs no longer match what ran (defaults
    changed) shows every distinct configuration its method ran with. Failed rows are all shown."""
    from .table import arm_id
    wanted = set(arms)
    matched = {r.method for r in rows if arm_id(r.method, r.knobs) in wanted}
    out, seen = [], set()
    for r in sorted(rows, key=lambda r: not r.is_baseline):
        a = arm_id(r.method, r.knobs)
        if r.error is None and a in seen:
            continue
        if (r.is_baseline and not any(x.is_baseline for x in out)) or a in wanted or r.error is not None \
                or (r.method in methods and r.method not in matched):
            seen.add(a)
            out.append(r)
    return out
