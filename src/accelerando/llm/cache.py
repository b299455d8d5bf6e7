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
  forward(ids (B,T), valid (B,T) | None, tree=None, hidden=False)
                                  -> logits (B,T,V)          append T columns (with ``hidden``:
                                                             (final hidden states, logits))
  mark() -> int                                              column count now (host int, no sync)
  rollback(start, keep (B,), max_keep: int, path=None)       after ``start`` keep keep[b] columns
  lengths                                                    (B,) valid tokens per row (device)
Trees (``accelerando.llm.tree``): ``forward(..., tree=TokenTree)`` feeds the T = N nodes of a token
tree at once (node i sees the prefix and its ancestors; position = valid prefix + depth), and
``rollback(..., path=(B, P))`` keeps the accepted path's columns, gathered into place. A chain is
the tree whose path is a prefix of the block: ``tree=None`` / ``path=None``, no gather.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch

from accelerando.llm.tree import check_tree_support, keep_accepted_path, tree_attention_mask, tree_position_ids


class SpecCache(Protocol):
    lengths: torch.Tensor

    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None, *, tree: Any = None,
                hidden: bool = False) -> Any: ...

    def mark(self) -> int: ...

    def rollback(self, start: int, keep: torch.Tensor, max_keep: int, path: torch.Tensor | None = None) -> None: ...


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
        self._tree_checked = False

    def mark(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None, *, tree: Any = None,
                hidden: bool = False) -> Any:
        """Append ``ids`` (B, T); invalid entries become holes. Returns logits (B, T, V), or
        (last hidden states, logits) with ``hidden``.

        ``valid=None`` means every entry is real; pass a mask only when some are not (the cache
        then stops taking the mask-free fast path for good). ``tree``: the T entries are the nodes
        of a ``TokenTree`` (all real), scored with a 4D tree mask.
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
        prefix, self.valid = self.valid, torch.cat([self.valid, valid], 1)
        if tree is None:
            pos = self.lengths[:, None] + valid.long().cumsum(-1) - 1     # (B, T) valid tokens before
            mask = None if self.dense else self.valid.long()            # dense: plain causal attention
        else:
            if not self._tree_checked:
                check_tree_support(self.model)
                self._tree_checked = True
            pos = tree_position_ids(tree, self.lengths)                     # (B, N) prefix + depth
            mask = tree_attention_mask(tree, prefix, dtype=self.model.dtype)
        pos = pos.clamp_min(0)
        if self.max_pos is not None:      # only holes / tokens past the budget can exceed it
            pos = pos.clamp_max(self.max_pos - 1)
        before = self.cache.get_seq_length()
        kw = dict(attention_mask=mask, position_ids=pos, past_key_values=self.cache, use_cache=True)
        if hidden:      # Medusa heads read the final hidden state: run the backbone, then the lm_head
            h = self.model.base_model(ids, **kw).last_hidden_state
            out = (h, self.model.get_output_embeddings()(h))
        else:
            out = self.model(input_ids=ids, **kw).logits
        self.calls += 1
        if self.cache.get_seq_length() != before + T:
            raise TypeError(f"the {self.role} ({type(self.model).__name__}) did not extend its KV cache; "
                            "speculative decoding needs a model that keeps past_key_values")
        self.lengths = self.lengths + valid.sum(1)
        return out

    def rollback(self, start: int, keep: torch.Tensor, max_keep: int | list[int],
                 path: torch.Tensor | None = None) -> None:
        """Of the columns appended since ``mark() == start``, row b keeps the first ``keep[b]``.

        ``max_keep`` is ``max(keep)`` as a host int (the caller has it from its one sync per
        step): columns past it hold no row's token and are cropped from the cache. A host list
        (``keep`` itself) also tells whether rows differ; with an int, rows of a batch > 1 are
        assumed to leave holes. ``path`` (B, >= max_keep): a verified tree's accepted nodes per row
        (indices into the appended block, root first); their columns are gathered into place first.
        """
        if isinstance(max_keep, (list, tuple)):
            uniform, max_keep = min(max_keep) == max(max_keep), max(max_keep)
        else:
            uniform = keep.shape[0] == 1
        if not uniform:
            self.dense = False
        appended = self.valid[:, start:].sum(1)
        if path is not None:        # tree: the path's columns move to the front of the block
            path = path[:, :max_keep]
            keep_accepted_path(self.cache, start, path)
            self.valid = torch.cat([self.valid[:, :start], self.valid[:, start:].gather(1, path)], 1)
        L = self.valid.shape[1]
        cols = torch.arange(L - start, device=self.valid.device)[None, :]
        tail = self.valid[:, start:] & (cols < keep[:, None])
        self.lengths = self.lengths - appended + tail.sum(1)
        drop = L - (start + max_keep)
        self.valid = torch.cat([self.valid[:, :start], tail], 1)[:, : start + max_keep]
        if drop > 0:
            self.cache.crop(-drop)
