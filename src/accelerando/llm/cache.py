"""A KV cache with per-row validity around transformers' ``DynamicCache`` (any HF causal LM).

Batch > 1 design ("holes"): every row of a batch shares the cache's column count, but each column
has a per-row *valid* bit. A verification step appends k+1 columns to every row; row b keeps the
first ``keep[b]`` of them and the rest become holes (valid = False), masked out of attention
forever; columns no row keeps are cropped off with ``Cache.crop``. A token's position id is the
number of valid columns before it -- exactly transformers' ``attention_mask.cumsum(-1) - 1`` for
left padding -- so positions are passed explicitly and rows that accepted different numbers of
tokens never need re-alignment or re-prefill. (The engine's ``StaticKVCache`` uses the same
"valid slot + count of valid slots = position" rule, so it can implement this interface.)

The cache protocol (``DecodeCache``) the speculative loop and every drafter with a model use; two
objects implement it: ``HFCache`` here (any transformers causal LM) and the lean engine's
``accelerando.llm.engine.Engine`` (Llama family, static cache, compiled steps):
  forward(ids (B,T), valid (B,T) | None = None, *, tree=None, hidden=False, hook=None) -> CacheStep
                            append T columns (the first call is the prefill); ``valid`` marks real
                            entries (the rest become holes); ``tree``: the T entries are the nodes
                            of a ``TokenTree`` (node i sees the prefix and its ancestors, position
                            = valid prefix + depth); ``hidden``: also return the final hidden
                            states; ``hook``: a ``StepHook`` to run inside the step where the
                            cache can (else ``CacheStep.hidden`` holds the raw states)
  mark() -> int                            column count now (host int, no sync)
  rollback(start, keep (B,), max_keep, path=None)   of the columns appended since ``mark() == start``
                            row b keeps the first keep[b]; ``path`` (B, >= max_keep): a verified
                            tree's accepted nodes (indices into the block, root first), gathered
                            into place first
  lengths (B,)              valid tokens per row (device);  calls: forwards so far
A chain is the tree whose path is a prefix of the block: ``tree=None`` / ``path=None``, no gather.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from accelerando.llm.tree import check_tree_support, keep_accepted_path, tree_attention_mask, tree_position_ids


@dataclass
class CacheStep:
    """What one ``forward`` of a cache returns."""
    logits: torch.Tensor                      # (B, T, V)
    hidden: torch.Tensor | None = None        # (B, T, H) final-norm hidden states, if asked (or the hook could not run)
    hook: torch.Tensor | None = None          # (B, T, X) the StepHook's output, if the cache ran it


@dataclass(frozen=True, eq=False)
class StepHook:
    """What a drafter needs from a verification step, as a pure function
    ``fn(h (B, T, hidden), logits (B, T, V), input_ids (B, T), *args) -> (B, T, X)`` (``fn`` a
    module-level function, ``args`` tensors, ints or None; T may include padding columns past the
    caller's tokens). The engine computes it inside the compiled step (``CacheStep.hook``): no
    separate eager call, no (B, T, hidden) output. Caches that cannot (``HFCache``, a prefill)
    return ``CacheStep.hidden`` instead. ``verdict=True``: the output's last ``VERDICT_COLUMNS``
    columns are greedy verification's verdict of this step (accepted node, next token, 1 if any
    node's logits are not finite), which the loop then takes instead of verifying again."""
    fn: Callable[..., torch.Tensor]
    args: tuple = ()
    verdict: bool = False

    def __call__(self, h: torch.Tensor, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.fn(h, logits, input_ids, *self.args)

    def key(self) -> tuple:
        """What a compiled step specialises on: the function, tensor shapes and the ints (built once)."""
        k = self.__dict__.get("_key")
        if k is None:
            k = (self.fn,) + tuple((tuple(a.shape), a.dtype) if torch.is_tensor(a) else a for a in self.args)
            object.__setattr__(self, "_key", k)
        return k


VERDICT_COLUMNS = 3      # (node, next token, non-finite flag) at the end of a verdict hook's output


class DecodeCache(Protocol):
    lengths: torch.Tensor
    calls: int

    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None, *, tree: Any = None,
                hidden: bool = False, hook: StepHook | None = None, last: bool = False) -> CacheStep: ...

    def mark(self) -> int: ...

    def rollback(self, start: int, keep: torch.Tensor, max_keep: int, path: torch.Tensor | None = None) -> None: ...


def check_supports_cache(model: Any, role: str = "model") -> None:
    """Clear error for a model that cannot keep a KV cache across calls."""
    name = type(model).__name__
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if not {"cache", "past_key_values"} & set(params) and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        raise TypeError(f"the {role} ({name}) takes no KV cache (cache / past_key_values): speculative "
                        "decoding needs a causal LM with a KV cache (a transformers PreTrainedModel for causal LM)")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise TypeError(f"the {role} ({name}) is an encoder-decoder model; only decoder-only causal LMs are supported")


def check_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The attention mask of a batch to generate from, checked (one host sync); all ones when None.

    Decoder-only generation continues every row after its last column, so padding must be on the
    left: a row with a 0 after a 1 (right padding, or a hole) is refused, as are a mask of another
    shape than ``input_ids``, values other than 0 / 1, and a row with no real token.
    """
    if attention_mask is None:
        return torch.ones_like(input_ids)
    if not torch.is_tensor(attention_mask) or tuple(attention_mask.shape) != tuple(input_ids.shape):
        shape = tuple(attention_mask.shape) if torch.is_tensor(attention_mask) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {shape}")
    m = attention_mask.long()
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
    empty = (m.sum(1) == 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"attention_mask row {empty[0]} is all zeros: every row needs at least one real token")
    right = ((m[:, :-1] == 1) & (m[:, 1:] == 0)).any(1).nonzero().flatten().tolist()
    if right:
        raise ValueError(f"attention_mask row {right[0]} has padding after real tokens (right padding): generation "
                         "continues after the last column, so pad on the left (tokenizer.padding_side = 'left')")
    return attention_mask


def cache_kwarg(model: Any) -> str:
    """The name of the forward argument that takes the KV cache: ``cache`` (transformers >= 5.2x),
    else the deprecated ``past_key_values``."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def max_positions(model: Any) -> int | None:
    """The model's context length from its config (None if it has no fixed limit)."""
    cfg = getattr(model, "config", None)
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(cfg, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return None


class HFCache:
    """``DecodeCache`` over a transformers model + ``DynamicCache`` with per-row valid columns."""

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
        self._cache_arg = cache_kwarg(model)

    def mark(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None, *, tree: Any = None,
                hidden: bool = False, hook: StepHook | None = None, last: bool = False) -> CacheStep:
        """Append ``ids`` (B, T); invalid entries become holes. Returns the logits (B, T, V), with
        ``hidden`` or ``hook`` the final hidden states too (a hook never runs here); ``last``:
        only the last column's logits are wanted (B, 1, V).

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
        kw = {"attention_mask": mask, "position_ids": pos, self._cache_arg: self.cache, "use_cache": True}
        if hidden or hook is not None:      # Medusa heads read the final hidden state: backbone, then lm_head
            base = self.model.base_model
            kw = {**kw, cache_kwarg(base): kw.pop(self._cache_arg)}
            h = base(ids, **kw).last_hidden_state
            out = CacheStep(self.model.get_output_embeddings()(h), h)
        else:
            if last:
                kw["logits_to_keep"] = 1
            out = CacheStep(self.model(input_ids=ids, **kw).logits)
        self.calls += 1
        if self.cache.get_seq_length() != before + T:
            raise TypeError(f"the {self.role} ({type(self.model).__name__}) did not extend its KV cache; "
                            "speculative decoding needs a model that keeps its KV cache")
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
