"""Prompt lookup decoding (Saxena 2023): draft by copying what followed the last n-gram earlier in
the context. No extra model; shines when the output repeats the input (code edits, extraction,
repetitive text). Drafts are deterministic (q = one-hot), which speculative sampling accepts
with probability p(x) -- still lossless.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from accelerando.llm.drafters.base import Proposal, StepResult
from accelerando.llm.sampling import SamplingConfig


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


class PromptLookup:
    """n-gram copy drafter. ``ngram_sizes``: n-gram lengths to match, tried in order;
    ``k``: maximum drafts per step (int, ``"adaptive"`` or ``"heuristic"``)."""

    def __init__(self, ngram_sizes: Sequence[int] = (3, 2, 1), k: int | str = 8, *, k_max: int = 16):
        sizes = tuple(int(n) for n in ngram_sizes)
        if not sizes or min(sizes) < 1:
            raise ValueError(f"ngram_sizes must be a non-empty sequence of positive ints, got {ngram_sizes!r}")
        if isinstance(k, str):
            if k not in ("adaptive", "heuristic"):
                raise ValueError(f"k must be a positive int, 'adaptive' or 'heuristic', got {k!r}")
        elif not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, 'adaptive' or 'heuristic', got {k!r}")
        self.ngram_sizes, self.k, self.k_max = sizes, k, k_max
        self.calls = 0          # no model calls

    def check_compatible(self, target: Any, tokenizer: Any = None) -> None:
        pass                    # copies the target's own tokens

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: torch.Tensor,
              first_host: list[int]) -> None:
        ids, mask = input_ids.cpu().numpy(), attention_mask.bool().cpu().numpy()
        self.device = input_ids.device
        self.hist = [np.concatenate([ids[b][mask[b]], [first_host[b]]]).astype(np.int64) for b in range(len(ids))]

    def propose(self, k: int, sampling: SamplingConfig, generator: torch.Generator | None) -> Proposal:
        found = [lookup(h, self.ngram_sizes, k) for h in self.hist] if k > 0 else [h[:0] for h in self.hist]
        width = max(len(f) for f in found)
        toks = np.zeros((len(found), width), dtype=np.int64)
        for b, f in enumerate(found):
            toks[b, : len(f)] = f
            toks[b, len(f):] = f[-1] if len(f) else self.hist[b][-1]   # filler, never accepted (n_valid)
        n_valid = torch.tensor([len(f) for f in found], device=self.device)
        return Proposal(tokens=torch.from_numpy(toks).to(self.device), q=None, n_valid=n_valid)

    def accept(self, step: StepResult) -> None:
        self.hist = [np.concatenate([h, np.asarray(t, dtype=np.int64)]) for h, t in zip(self.hist, step.new_tokens)]
