"""Prompt lookup decoding (Saxena 2023): draft by copying what followed the last n-gram earlier in
the context. No extra model; shines when the output repeats the input (code edits, extraction,
repetitive text). Drafts are deterministic (q = one-hot), which speculative sampling accepts
with probability p(x) -- still lossless.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from accelerando.llm.drafters.adaptive import DraftLength
from accelerando.llm.drafters.base import DraftContext, DraftInput, Drafter, Proposal, Verified


def lookup(history: np.ndarray, ngram_sizes: Sequence[int], k: int) -> np.ndarray:
    """Continuation (<= k tokens) of an earlier occurrence of the context's last n-gram, trying n
    in ``ngram_sizes`` order (largest first is usual); empty if none. Among the occurrences, the
    most recent one whose continuation is longest (up to k): in a run "a a a a" the latest match
    overlaps the tail and could only offer one token."""
    L = len(history)
    for n in ngram_sizes:
        if L <= n:
            continue
        tail = history[L - n:]
        win = np.lib.stride_tricks.sliding_window_view(history[: L - 1], n)   # starts 0 .. L-1-n
        hits = np.flatnonzero((win == tail).all(1))
        if len(hits):   # the most recent match among those with the longest continuation (runs!)
            lens = np.minimum(k, L - hits - n)
            s = int(hits[lens == lens.max()][-1]) + n
            return history[s: s + k]
    return history[:0]


class NgramIndex:
    """``lookup`` for a growing history in O(k) per query: for every n in ``ngram_sizes``, the
    start positions of each n-gram, extended as tokens are appended (the loop appends a few per
    step; rescanning the whole history each step cost ~0.2 ms per row)."""

    def __init__(self, tokens: Sequence[int], ngram_sizes: Sequence[int]):
        self.ngram_sizes = tuple(ngram_sizes)
        self.tokens: list[int] = []
        self.starts: dict[int, dict[tuple, list[int]]] = {n: {} for n in self.ngram_sizes}
        self.extend(tokens)

    def extend(self, new: Sequence[int]) -> None:
        toks = self.tokens
        for t in new:
            toks.append(int(t))
            L = len(toks)
            for n, idx in self.starts.items():
                if L >= n:
                    idx.setdefault(tuple(toks[L - n:]), []).append(L - n)

    def lookup(self, k: int) -> list[int]:
        toks, L = self.tokens, len(self.tokens)
        for n in self.ngram_sizes:
            if L <= n:
                continue
            hits = self.starts[n].get(tuple(toks[L - n:]), ())
            m = len(hits) - 1 if hits and hits[-1] == L - n else len(hits)    # the tail itself is no match
            if m == 0:
                continue
            # continuations min(k, L - s - n) shrink towards the end: the most recent full-length
            # one, else the earliest (longest) -- the same choice as ``lookup``
            for i in range(m - 1, -1, -1):
                if L - hits[i] - n >= k:
                    s = hits[i] + n
                    break
            else:
                s = hits[0] + n
            return toks[s: s + k]
        return []


class PromptLookup(Drafter):
    """n-gram copy drafter. ``ngram_sizes``: n-gram lengths to match, tried in order;
    ``k``: maximum drafts per step (int, ``"adaptive"`` or ``"heuristic"``). The adaptive
    controller takes drafting as free (``cost_ratio=0``) unless told otherwise."""

    def __init__(self, ngram_sizes: Sequence[int] = (3, 2, 1), k: int | str = 8, *, k_max: int = 16,
                 cost_ratio: float | None = 0.0):
        sizes = tuple(int(n) for n in ngram_sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"ngram_sizes must be a non-empty sequence of positive ints, got {ngram_sizes!r}")
        self.length = DraftLength(k, k_max, cost_ratio)
        self.ngram_sizes, self.k, self.k_max = sizes, k, k_max
        self.max_nodes = self.length.cap + 1

    def begin(self, ctx: DraftContext) -> None:
        ids, mask = ctx.input_ids.tolist(), ctx.attention_mask.bool().tolist()
        self.device = ctx.input_ids.device
        self._misses = 0                  # consecutive steps without a match
        self.index = [NgramIndex([t for t, m in zip(ids[b], mask[b]) if m] + [ctx.first_host[b]], self.ngram_sizes)
                      for b in range(len(ids))]

    def propose(self, x: DraftInput) -> Proposal:
        k = self.length.choose(x.budget)
        found = [ix.lookup(k) if k > 0 else [] for ix in self.index]
        width = max(len(f) for f in found)
        # filler after a short proposal (never accepted: n_valid): its last token, or the context's
        rows = [f + [f[-1] if f else ix.tokens[-1]] * (width - len(f)) for f, ix in zip(found, self.index)]
        drafts = torch.tensor(rows, dtype=torch.long, device=self.device).view(len(rows), width)
        n_valid = None if all(len(f) == width for f in found) else torch.tensor([len(f) for f in found],
                                                                                device=self.device)
        self._k = width                   # a lookup without a match proposes fewer than k
        self.length.drafted(drafts)
        return Proposal.chain_of(x.root, drafts, n_valid=n_valid)

    def accept(self, step: Verified) -> None:
        self.length.update(self._k, step.n_host, step.active)
        for ix, t in zip(self.index, step.new_tokens):
            ix.extend(t)

    def plain_steps(self, budget: int) -> int:
        """The controller's plain run, else plain steps when no row finds a match: one at first,
        then runs growing with the streak of misses (2 after 4, 4 after 8, 8 after 12), since
        text that has not repeated for a while rarely starts to at the very next token."""
        m = self.length.plain_steps(budget)
        if m:
            return m
        if any(ix.lookup(self.length.cap) for ix in self.index):
            self._misses = 0
            return 0
        self._misses += 1
        return min(budget, 1 << min(3, (self._misses - 1) // 4))

    def accept_plain(self, tokens: torch.Tensor, host: list[list[int]], seconds: float) -> None:
        self.length.plain_done(len(host[0]), seconds)
        for ix, t in zip(self.index, host):
            ix.extend(t)
