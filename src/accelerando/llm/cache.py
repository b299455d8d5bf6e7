"""A KV cache with per-row validity around transformers' ``DynamicCache`` (any HF causal LM).

Batch > 1 design ("holes"): every row of a batch shares the cache's column count, but each column
has a per-row *valid* bit. A verification step appends k+1 columns to every row; row b keeps the
first ``keep[b]`` of them and the rest become holes (valid = False), masked out of attention
forever; columns no row keeps are cropped off with ``Cache.crop``. A token's position id is the
number of valid columns before it -- exactly transformers' ``attention_mask.cumsum(-1) - 1`` for
left padding -- so positions are passed explicitly and rows that accepted different numbers of
tokens never need re-alignment or re-prefill. (The engine's ``StaticKVCache`` uses the same
"valid slot + count of valid slots = position" rule, so it can implement this interface.)

Interface the speculative loop uses (``SpecCache``):
  forward(ids (B,T), valid (B,T) | None) -> logits (B,T,V)   append T columns
  mark() -> int                                              column count now (host int, no sync)
  rollback(start, keep (B,), max_keep: int)                  after ``start`` keep keep[b] columns
  lengths                                                    (B,) valid tokens per row (device)
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch


class SpecCache(Protocol):
    lengths: torch.Tensor

    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor: ...

    def mark(self) -> int: ...

    def rollback(self, start: int, keep: torch.Tensor, max_keep: int) -> None: ...


def check_supports_cache(model: Any, role: str = "model") -> None:
    """Clear error for a model that cannot keep a KV cache across calls."""
    name = type(model).__name__
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "past_key_values" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise TypeError(f"the {role} ({name}) takes no past_key_values: speculative decoding needs a causal LM "
                        "with a KV cache (a transformers PreTrainedModel for causal LM)")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise TypeError(f"the {role} ({name}) is an encoder-decoder model; only decoder-only causal LMs are supported")


def max_positions(model: Any) -> int | None:
    """The model's context length from its config (None if it has no fixed limit)."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class HFCache:
    """``SpecCache`` over a transformers model + ``DynamicCache`` with per-row valid columns."""

    def __init__(self, model: Any, role: str = "model"):
        from transformers import DynamicCache
        check_supports_cache(model, role)
        self.model, self.role = model, role
        self.cache = DynamicCache(config=model.config)
        self.max_pos = max_positions(model)
        self.valid: torch.Tensor | None = None        # (B, L) bool
        self.lengths: torch.Tensor | None = None      # (B,) long, valid columns per row
        self.dense = True     # host flag: no padding and no holes yet, so no attention mask is needed
        self.calls = 0

    def mark(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``ids`` (B, T); invalid entries become holes. Returns logits (B, T, V).

        ``valid=None`` means every entry is real; pass a mask only when some are not (the cache
        then stops taking the mask-free fast path for good).
        """
        B, T = ids.shape
        dev = ids.device
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=dev)
        else:
            self.dense = False
        if self.valid is None:
            self.valid = valid.new_zeros(B, 0)
            self.lengths = torch.zeros(B, dtype=torch.long, device=dev)
        pos = self.lengths[:, None] + valid.long().cumsum(-1) - 1        # (B, T) valid tokens before
        pos = pos.clamp_min(0)
        if self.max_pos is not None:      # only holes / tokens past the budget can exceed it
            pos = pos.clamp_max(self.max_pos - 1)
        self.valid = torch.cat([self.valid, valid], 1)
        before = self.cache.get_seq_length()
        mask = None if self.dense else self.valid.long()      # dense: plain causal attention, no mask to build
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                         use_cache=True)
        self.calls += 1
        if self.cache.get_seq_length() != before + T:
            raise TypeError(f"the {self.role} ({type(self.model).__name__}) did not extend its KV cache; "
                            "speculative decoding needs a model that keeps past_key_values")
        self.lengths = self.lengths + valid.sum(1)
        return out.logits

    def rollback(self, start: int, keep: torch.Tensor, max_keep: int | list[int]) -> None:
        """Of the columns appended since ``mark() == start``, row b keeps the first ``keep[b]``.

        ``max_keep`` is ``max(keep)`` as a host int (the caller has it from its one sync per
        step): columns past it hold no row's token and are cropped from the cache. A host list
        (``keep`` itself) also tells whether rows differ; with an int, rows of a batch > 1 are
        assumed to leave holes.
        """
        if isinstance(max_keep, (list, tuple)):
            uniform, max_keep = min(max_keep) == max(max_keep), max(max_keep)
        else:
            uniform = keep.shape[0] == 1
        if not uniform:
            self.dense = False
        L = self.valid.shape[1]
        cols = torch.arange(L - start, device=self.valid.device)[None, :]
        tail = self.valid[:, start:] & (cols < keep[:, None])
        self.lengths = self.lengths - self.valid[:, start:].sum(1) + tail.sum(1)
        drop = L - (start + max_keep)
        self.valid = torch.cat([self.valid[:, :start], tail], 1)[:, : start + max_keep]
        if drop > 0:
            self.cache.crop(-drop)
