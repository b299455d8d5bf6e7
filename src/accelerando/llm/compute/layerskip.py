"""Layer skipping: a model's own layers as a cheaper model -- an early exit (its first E layers) or
an input-independent skip schedule (Unified Layer Skipping) -- used either directly (lossy) or as
the draft of lossless self-speculative decoding.

Unified Layer Skipping (Liu et al., "Accelerating Inference in Large Language Models with a
Unified Layer Skipping Strategy", 2024): the number of skipped layers follows only from the target
speed-up (``skip = round(N (1 - 1 / speedup))``), and the skipped layers are *intermediate* ones
spread evenly (balanced), never the first or the last; the same schedule for every input, so batch
decoding and KV caching work unchanged. Early exit (LayerSkip, Elhoushi et al. 2024; transformers'
``assistant_early_exit``) keeps the first E layers and reads the final norm + LM head after them.

``skip_view`` builds the cheaper model as a *view*: a new ``*ForCausalLM`` object whose decoder
holds the kept layers of the original (same parameter tensors, no copy), renumbered so its own
KV cache is compact. It runs anywhere a causal LM runs: ``generate``, the lean engine, or as the
draft of ``speculative_generate`` (``selfspec.self_speculative_draft``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn


@dataclass
class SkipConfig:
    """Exactly one of: ``exit_layer`` E (keep layers 0..E-1), ``skip`` (number of intermediate
    layers skipped, balanced), ``speedup`` (target ratio -> skip, the paper's rule), ``keep``
    (explicit kept layer indices)."""

    exit_layer: int | None = None
    skip: int | None = None
    speedup: float | None = None
    keep: tuple[int, ...] | None = None

    def __post_init__(self):
        given = [n for n in ("exit_layer", "skip", "speedup", "keep") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of exit_layer, skip, speedup, keep (got {', '.join(given) or 'none'})")
        if self.exit_layer is not None and self.exit_layer < 1:
            raise ValueError(f"exit_layer must be >= 1 (0 would skip every layer), got {self.exit_layer}")
        if self.skip is not None and self.skip < 0:
            raise ValueError(f"skip must be >= 0, got {self.skip}")
        if self.speedup is not None and not self.speedup >= 1.0:
            raise ValueError(f"speedup must be >= 1, got {self.speedup}")
        if self.keep is not None:
            self.keep = tuple(int(i) for i in self.keep)
            if not self.keep:
                raise ValueError("keep is empty: a skip schedule must keep at least one layer")

    def kept_layers(self, n_layers: int) -> tuple[int, ...]:
        """The kept layer indices (ascending) of an ``n_layers`` model; errors name the bad knob."""
        if self.keep is not None:
            bad = [i for i in self.keep if not 0 <= i < n_layers]
            if bad:
                raise ValueError(f"keep has layer indices {bad} outside 0..{n_layers - 1}")
            if len(set(self.keep)) != len(self.keep) or list(self.keep) != sorted(self.keep):
                raise ValueError(f"keep must be strictly increasing layer indices, got {list(self.keep)}")
            return self.keep
        if self.exit_layer is not None:
            if self.exit_layer > n_layers:
                raise ValueError(f"exit_layer {self.exit_layer} exceeds the model's {n_layers} layers")
            return tuple(range(self.exit_layer))
        skip = self.skip if self.skip is not None else round(n_layers * (1 - 1 / self.speedup))
        return balanced_keep(n_layers, skip)


def balanced_keep(n_layers: int, skip: int) -> tuple[int, ...]:
    """Unified Layer Skipping's schedule: skip ``skip`` of the intermediate layers 1..N-2, evenly
    spaced (the first and last layers always run)."""
    inner = n_layers - 2
    if skip >= n_layers:
        raise ValueError(f"skip={skip} would skip every one of the {n_layers} layers")
    if skip > max(0, inner):
        raise ValueError(f"skip={skip} exceeds the {max(0, inner)} intermediate layers of a {n_layers}-layer "
                         "model (the first and last layers always run)")
    dropped = {1 + int((j + 0.5) * inner / skip) for j in range(skip)} if skip else set()
    return tuple(i for i in range(n_layers) if i not in dropped)


def _renumbered(layer: nn.Module, idx: int) -> nn.Module:
    """A shallow twin of a decoder layer sharing every parameter, whose attention writes KV-cache
    slot ``idx`` (transformers indexes the cache by ``self_attn.layer_idx``)."""
    twin = copy.copy(layer)
    twin._modules = dict(layer._modules)
    attn = getattr(layer, "self_attn", None)
    if attn is not None and hasattr(attn, "layer_idx"):
        twin.self_attn = copy.copy(attn)
        twin.self_attn._modules = dict(attn._modules)
        twin.self_attn.layer_idx = idx
    return twin


def skip_view(model: Any, cfg: SkipConfig, *, exit_head: nn.Module | None = None) -> Any:
    """A causal LM that runs only the kept layers of ``model`` (shared parameters, own config).
    ``exit_head`` (an ``ExitHead`` trained for this early exit) runs before the final norm."""
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise ValueError(f"{type(model).__name__} has no .model.layers: layer skipping needs a decoder-only model "
                         "laid out like Llama / Qwen2 / Mistral")
    n = len(base.layers)
    keep = cfg.kept_layers(n)
    view = copy.copy(model)
    view._modules = dict(model._modules)
    view.config = copy.deepcopy(model.config)
    view.config.num_hidden_layers = len(keep)
    if getattr(view.config, "layer_types", None):
        view.config.layer_types = [view.config.layer_types[i] for i in keep]
    vbase = copy.copy(base)
    vbase._modules = dict(base._modules)
    vbase.config = view.config
    vbase.layers = nn.ModuleList([_renumbered(base.layers[i], j) for j, i in enumerate(keep)])
    if exit_head is not None:
        if keep != tuple(range(len(keep))) or getattr(exit_head, "exit_layer", len(keep)) != len(keep):
            raise ValueError(f"this exit head was trained for exit_layer {getattr(exit_head, 'exit_layer', '?')}, "
                             f"not for the kept layers {list(keep)}")
        vbase.norm = nn.Sequential(exit_head, base.norm)
    view.model = vbase
    if hasattr(model, "generation_config"):
        view.generation_config = copy.deepcopy(model.generation_config)
    view._accelerando_kept_layers = keep
    view._accelerando_skip_of = model
    return view


@torch.no_grad()
def search_schedule(model: Any, token_ids: torch.Tensor, n_keep: int) -> tuple[int, ...]:
    """A trained (searched) input-independent skip schedule: starting from every layer, drop one
    layer at a time -- the one whose removal keeps the skip view's teacher-forced top-1 agreement
    with ``model`` highest on ``token_ids`` (B, T) -- until ``n_keep`` remain (greedy backward
    selection, as Draft & Verify / SWIFT choose their skipped layers; here judged by greedy
    acceptance). Returns the kept layer indices."""
    n = len(model.model.layers)
    if not 1 <= n_keep <= n:
        raise ValueError(f"n_keep must be in 1..{n}, got {n_keep}")
    ref = model(token_ids).logits.argmax(-1)
    keep = tuple(range(n))
    while len(keep) > n_keep:
        def score(k: tuple[int, ...]) -> float:
            return (skip_view(model, SkipConfig(keep=k))(token_ids).logits.argmax(-1) == ref).float().mean().item()
        keep = max((tuple(i for i in keep if i != j) for j in keep), key=score)
    return keep
