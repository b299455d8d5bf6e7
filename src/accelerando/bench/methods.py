"""The method registry: one table every runner (demo, bench, sweep, recommend) reads.

A method family registers a builder here; the harness times whatever the builder returns.
Contract:

* ``register(MethodEntry(...))`` at import time of the family's ``bench_methods`` module
  (``accelerando.llm.bench_methods``, ``accelerando.diffusion.bench_methods``, ...).
* ``entry.build(setup, **knobs)`` returns a zero-argument callable; each call runs the method
  once on the setup's inputs and returns an ``LLMOutput`` or a ``DiffusionOutput``.
  Building may load / prepare things (not timed); calling is what the harness times.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

Family = Literal["llm", "diffusion"]


class NotApplicable(ValueError):
    """Raised by ``entry.build`` when the method does not apply to the setup (e.g. a diffusion
    budget below the method's minimum): runners mark the cell n/a instead of failed."""

# Modules that register methods when imported; listed here so the registry can be filled lazily.
FAMILY_MODULES = (
    "accelerando.llm.bench_methods",
    "accelerando.llm.tree_bench_methods",
    "accelerando.llm.kv.bench_methods",
    "accelerando.llm.compute.bench_methods",
    "accelerando.diffusion.bench_methods",
    "accelerando.diffusion.dit.bench_methods",
)


@dataclass
class LLMSetup:
    """Inputs of one LLM workload: models are already loaded, prompts already tokenised."""

    target: Any                      # transformers PreTrainedModel (causal LM)
    tokenizer: Any
    input_ids: Any                   # LongTensor (batch, prompt_len), left-padded
    attention_mask: Any              # LongTensor (batch, prompt_len)
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    drafts: dict[str, Any] = field(default_factory=dict)   # name -> draft causal LM
    eos_token_id: int | None = None


@dataclass
class LLMOutput:
    sequences: Any                   # LongTensor (batch, prompt + generated)
    stats: dict[str, Any] = field(default_factory=dict)   # target_calls, accepted_tokens, ...


@dataclass
class DiffusionSetup:
    """Inputs of one diffusion workload."""

    eps_fn: Callable[[Any, Any], Any]   # eps_fn(x, t) with integer (or float) training timesteps
    schedule: Any                       # accelerando.diffusion.schedules.Schedule
    x_T: Any                            # starting noise, (batch, ...)
    steps: int = 20
    spacing: str = "trailing"
    seed: int = 0


@dataclass
class DiffusionOutput:
    x0: Any
    nfe: int                            # number of eps_fn calls made
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MethodEntry:
    name: str                           # unique, CLI-facing, e.g. "spec-draft", "f-pndm"
    family: Family
    build: Callable[..., Callable[[], Any]]
    lossless: bool                      # True: output must equal the baseline's (greedy) / its distribution
    description: str = ""
    default_knobs: dict[str, Any] = field(default_factory=dict)
    is_baseline: bool = False
    min_prompt_tokens: int = 0          # n/a on shorter prompts (long-context methods): not offered there


_REGISTRY: dict[str, MethodEntry] = {}
_loaded = False


def register(entry: MethodEntry) -> MethodEntry:
    if entry.name in _REGISTRY and _REGISTRY[entry.name] is not entry:
        raise ValueError(f"method {entry.name!r} is registered twice")
    _REGISTRY[entry.name] = entry
    return entry


def _load_families() -> None:
    global _loaded
    if _loaded:
        return
    for mod in FAMILY_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:   # a family that does not exist yet
            if exc.name != mod:
                raise
    _loaded = True


def all_methods(family: Family | None = None) -> list[MethodEntry]:
    _load_families()
    return [e for e in _REGISTRY.values() if family is None or e.family == family]


def get_method(name: str) -> MethodEntry:
    _load_families()
    try:
        return _REGISTRY[name]
    except KeyError:
        valid = ", ".join(sorted(_REGISTRY)) or "(none registered)"
        raise KeyError(f"unknown method {name!r}; valid methods: {valid}") from None
