"""TriForce (Sun et al., 2024, "TriForce: Lossless Acceleration of Long Sequence Generation with
Hierarchical Speculative Decoding"): the target itself, reading only a retrieval-selected part of
its KV cache (``RetrievalChunkPress``), drafts for the full-cache target. Lossless through the
project's one verifier: greedy output equals ``generate``, sampled output has the target's
distribution. The draft's cache is a few chunks of the prompt plus the generated text, so each
draft step reads ``ratio`` of what a target step reads.

The draft's cache is a subset of the target's, so it is cut from the target's prefill (no second
prefill): one forward of the first generated token over a view of the target's full cache scores
the chunks with that token's query (the paper retrieves with the latest query), then the kept
chunks are gathered (from transformers' cache or the lean engine's).

Not done here: the paper's third level (a tiny model with a StreamingLLM cache drafting for the
retrieval-cache draft).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from accelerando.llm.cache import HFCache, cache_kwarg
from accelerando.llm.drafters.base import DraftContext
from accelerando.llm.drafters.draft_model import DraftModel, vocab_size
from accelerando.llm.kv.attention import kv_attention_enabled
from accelerando.llm.kv.generate import KVState, engine_cache, prefill
from accelerando.llm.kv.presses import RetrievalChunkPress, check_kv_model


def _prompt_kv(target_cache: Any, n: int) -> list | None:
    """Per-layer (keys, values) of the target's unpadded n-token prompt, slots [0, n), if readable:
    transformers' DynamicCache (``HFCache``) or the lean engine's static cache."""
    from accelerando.llm.static_cache import StaticKVCache
    if isinstance(target_cache, HFCache) and target_cache.cache.get_seq_length() == n:
        return [(layer.keys, layer.values) for layer in target_cache.cache.layers]
    c = getattr(target_cache, "cache", None)
    if isinstance(c, StaticKVCache) and c.get_seq_length() == n:     # unpadded: the prompt fills [0, n)
        return [(layer.k, layer.v) for layer in c.layers]
    return None


class TriForce(DraftModel):
    """Drafter: the target model with a retrieval cache of ``ratio`` of the prompt (chunks of
    ``chunk`` tokens). ``k``: drafts per step (as ``DraftModel``)."""

    def __init__(self, model: Any, k: int | str = 4, *, ratio: float = 0.1, chunk: int = 8, k_max: int = 12):
        super().__init__(model, k, k_max=k_max)
        self.press = RetrievalChunkPress(ratio=ratio, chunk=chunk)

    def check_compatible(self, target: Any, tokenizer: Any = None) -> None:
        if target is not self.model:
            raise ValueError("TriForce drafts with the target itself: pass TriForce(target) for that target")
        check_kv_model(target, "TriForce")
        super().check_compatible(target, tokenizer)

    def begin(self, ctx: DraftContext) -> None:
        input_ids, attention_mask, first = ctx.input_ids, ctx.attention_mask, ctx.first
        if not bool(attention_mask.all()):      # one sync, once
            raise ValueError("TriForce needs unpadded prompts (rows of equal length, attention_mask all ones)")
        self.v_target = vocab_size(ctx.target)
        self.sampling, self.generator = ctx.sampling, ctx.generator
        t0 = self.decode_t0 = time.perf_counter()      # the decode starts here: after the target's prefill
        B, n = input_ids.shape
        prompt_kv = _prompt_kv(ctx.target_cache, n)
        if prompt_kv is not None:
            cache, self.shared_prefill = self._retrieve(prompt_kv, ctx.first, n), True
        else:      # a target cache it cannot read: the draft's own prefill, then the press
            cache, self.shared_prefill = prefill(self.model, input_ids, press=self.press)[1].cache, False
        self.prefill_s = time.perf_counter() - t0
        eng = getattr(ctx.target_cache, "compiled", None)
        if eng is not None:     # the target decodes on the lean engine: so does the draft, on a small static cache
            st = engine_cache(self.model, cache, n, room=ctx.max_new_tokens + 2 * self.max_nodes + 2,
                              compile=eng, role="TriForce draft")
        else:
            st = HFCache(self.model, role="TriForce draft")
            st.cache = cache
            st.valid = torch.ones(B, cache.get_seq_length(), dtype=torch.bool, device=input_ids.device)
            st.lengths = torch.full((B,), n, dtype=torch.long, device=input_ids.device)   # true positions
            st.calls = 1
        self.state = st
        self._prompt = None          # DraftModel reads the prompt at its first proposal; this cache holds it already
        self.kv_bytes_draft = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in cache.layers)
        self.pending = first[:, None]
        self.pending_valid = torch.ones_like(self.pending, dtype=torch.bool)
        self.pending_dense = True

    @torch.no_grad()
    def _retrieve(self, prompt_kv: list, first: torch.Tensor, n: int) -> Any:
        """The retrieval cache from the target's prompt keys / values (per layer, left intact):
        feed ``first`` at position n over a copy, score chunks with its query, keep the top chunks,
        drop ``first`` again (the draft's first propose feeds it)."""
        from transformers import DynamicCache
        self.press.check_context(n + 1)
        self.press.reset()
        view = DynamicCache(config=self.model.config)
        for i, (k, v) in enumerate(prompt_kv):
            view.update(k[:, :, :n], v[:, :, :n], i)        # a copy: the target's cache stays as it is
        pos = torch.full((first.shape[0], 1), n, dtype=torch.long, device=first.device)
        with kv_attention_enabled(self.model):
            self.model(input_ids=first[:, None], position_ids=pos, **{cache_kwarg(self.model): view},
                       use_cache=True, kv_state=KVState(press=self.press, observing=True))
        self.press.compress(view)
        view.crop(-1)           # the last chunk always stays: its last column is `first`
        return view
