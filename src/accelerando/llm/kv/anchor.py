"""kvpress (NVIDIA, PyPI ``kvpress``) presses as the anchor, behind our ``Press`` interface so the
same prefill / decode / scoring code runs them next to ours.

kvpress 0.5.5 declares ``transformers<5.3``; with newer transformers its attention hook looks for
the ``past_key_values`` / ``cache_position`` kwargs, which attention modules now receive as
``cache`` (and no cache position). A forward hook that runs first (``prepend=True``) adds the two
aliases to the kwargs dict the hooks share, so kvpress itself runs unmodified. Install it without
its pins: ``pip install --no-deps kvpress==0.5.5 cachetools datasets dill multiprocess xxhash fire``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from accelerando.llm.kv.presses import Press, check_ratio

# our name -> kvpress class name (kvpress's compression_ratio is the fraction *removed*)
KVPRESS_PRESSES = {"kvpress-snapkv": "SnapKVPress", "kvpress-streaming": "StreamingLLMPress",
                   "kvpress-knorm": "KnormPress", "kvpress-expected": "ExpectedAttentionPress",
                   "kvpress-tova": "TOVAPress"}


def _alias_hook(module: Any, args: Any, kwargs: dict, out: Any) -> None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    kwargs.setdefault("past_key_values", cache)
    if "cache_position" not in kwargs and cache is not None:
        q = kwargs["hidden_states"].shape[1]
        L = cache.get_seq_length(module.layer_idx)
        kwargs["cache_position"] = torch.arange(L - q, L, device=kwargs["hidden_states"].device)


class KVPressAnchor(Press):
    """A kvpress press keeping ``ratio`` of the cache (compression happens inside the prefill)."""

    def __init__(self, name: str = "kvpress-snapkv", *, ratio: float = 0.25, **press_kwargs: Any) -> None:
        check_ratio(ratio)
        if name not in KVPRESS_PRESSES:
            raise ValueError(f"unknown kvpress anchor {name!r}; valid: {', '.join(KVPRESS_PRESSES)}")
        try:
            import kvpress
        except ModuleNotFoundError as exc:
            raise ModuleNotFoundError("the kvpress anchor needs the kvpress package: "
                                      "pip install --no-deps kvpress==0.5.5 (see accelerando.llm.kv.anchor)") from exc
        self.name, self.ratio = name, ratio
        self.press = getattr(kvpress, KVPRESS_PRESSES[name])(compression_ratio=1.0 - ratio, **press_kwargs)
        self.reset()

    @contextlib.contextmanager
    def prefill_context(self, model: Any) -> Iterator[None]:
        if self.ratio >= 1.0:
            yield
            return
        layers = model.model.layers
        hooks = [layer.self_attn.register_forward_hook(_alias_hook, with_kwargs=True, prepend=True)
                 for layer in layers]
        try:
            with self.press(model):
                yield
        finally:
            for h in hooks:
                h.remove()

    def compress(self, cache: Any) -> None:      # kvpress compressed during the prefill
        pass

    def __repr__(self) -> str:
        return f"{self.name}(ratio={self.ratio})"
