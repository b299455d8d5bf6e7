"""TriForce (Sun et al., 2024, "TriForce: Lossless Acceleration of Long Sequence Generation with
Hierarchical Speculative Decoding"): the target itself, reading only a retrieval-selected part of
its KV cache (``RetrievalChunkPress``), drafts for the full-cache target. Lossless through the
project's one verifier: greedy output equals ``generate``, sampled output has the target's
distribution. The draft's cache is a few chunks of the prompt plus the generated text, so each
draft step reads ``ratio`` of what a target step reads.

Not done here: the paper's third level (a tiny model with a StreamingLLM cache drafting for the
retrieval-cache draft).
"""
from __future__ import annotations

import time
from typing import Any

import torch

from accelerando.llm.cache import HFCache
from accelerando.llm.drafters.base import DraftContext
from accelerando.llm.drafters.draft_model import DraftModel, vocab_size
from accelerando.llm.kv.generate import prefill
from accelerando.llm.kv.presses import RetrievalChunkPress, check_kv_model


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
        # the draft's own prefill (the loop keeps the target's cache to itself), then the press
        t0 = time.perf_counter()
        _, run = prefill(self.model, input_ids, press=self.press)
        self.prefill_s = time.perf_counter() - t0
        st = HFCache(self.model, role="TriForce draft")
        B, n = input_ids.shape
        st.cache = run.cache
        st.valid = torch.ones(B, run.cache.get_seq_length(), dtype=torch.bool, device=input_ids.device)
        st.lengths = torch.full((B,), n, dtype=torch.long, device=input_ids.device)   # true positions
        st.calls = 1
        self.state = st
        self.kv_bytes_draft = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in run.cache.layers)
        self.pending = first[:, None]
        self.pending_valid = torch.ones_like(self.pending, dtype=torch.bool)
        self.pending_dense = True
