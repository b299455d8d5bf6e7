"""The chain-drafter protocol the speculative loop talks to.

A drafter is a small stateful object; the loop calls, in order:
  begin(input_ids, attention_mask, first)   once after the target's prefill; ``first`` (B,) is the
                                            first generated token (not yet in any cache)
  propose(k, sampling, generator)           -> Proposal: k drafts per row after the committed text
  accept(step)                              -> bookkeeping after verification (roll back own cache,
                                            extend own history) with a ``StepResult``
Drafters never see the target's cache; the loop never sees a drafter's state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from accelerando.llm.sampling import SamplingConfig


@dataclass
class Proposal:
    tokens: torch.Tensor                  # (B, k) long, on the target's device (k may be 0)
    q: torch.Tensor | None = None         # (B, k, V) draft distributions; None = deterministic drafts
    n_valid: torch.Tensor | None = None   # (B,) real drafts per row (None = all k)
    draft_calls: int = 0                  # model forwards spent on this proposal
    bad: torch.Tensor | None = None       # (B,) bool: the draft produced non-finite logits (checked at the loop's sync)


@dataclass
class StepResult:
    k: int                                # drafts per row this step
    n_accepted: torch.Tensor              # (B,) long, device
    next_tokens: torch.Tensor             # (B,) long, device: correction or bonus token
    n_host: list[int]                     # n_accepted on the host (already synced by the loop)
    new_tokens: list[list[int]]           # per row: accepted drafts + next token (host)


class Drafter(Protocol):
    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: torch.Tensor,
              first_host: list[int]) -> None: ...

    def propose(self, k: int, sampling: SamplingConfig, generator: torch.Generator | None) -> Proposal: ...

    def accept(self, step: StepResult) -> None: ...

    def check_compatible(self, target: Any, tokenizer: Any = None) -> None: ...
