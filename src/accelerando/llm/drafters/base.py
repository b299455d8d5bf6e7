"""The one drafter protocol the speculative loop talks to, and its records.

Every drafter -- a draft model, prompt lookup, Medusa heads, a draft tree -- proposes a token tree
per row whose root is the last emitted token; a chain of k drafts is the tree of width 1
(``Proposal.chain``). The loop (``speculative.speculative_generate``) calls, in order:

  check_compatible(target, tokenizer)   before anything runs (vocabulary, cache support)
  begin(ctx: DraftContext)              once, after the target's prefill
  propose(x: DraftInput) -> Proposal    every step: the tree to verify
  accept(step: Verified)                after verification: keep the accepted path (own cache, history)
  plain_steps(budget) -> int            before propose: plain decoding steps wanted first (0: none);
  accept_plain(tokens, host, seconds)   the loop then ran them (no verification) and reports them

Drafters leave the target's cache alone (the exceptions read or share it through
``DraftContext.target_cache``: a self-speculative draft made of the target's own layers shares it,
TriForce cuts its partial cache from the target's prefill at ``begin``); the loop never sees a drafter's state. A drafter that
keeps a KV cache opens it with ``ctx.make_cache(model, role)``: the same cache protocol
(``accelerando.llm.cache.DecodeCache``) the target uses, on the lean engine or transformers'.
Subclass ``Drafter`` for the defaults (all class attributes, so ``nn.Module`` drafters mix it in).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from accelerando.llm.sampling import SamplingConfig
from accelerando.llm.tree import TokenTree


@dataclass
class DraftContext:
    """What ``begin`` gets: the prompt the target just read and how to open caches."""
    target: Any
    input_ids: torch.Tensor            # (B, P), left-padded
    attention_mask: torch.Tensor       # (B, P)
    first: torch.Tensor                # (B,) first generated token (in no cache yet), device
    first_host: list[int]              # the same on the host
    max_new_tokens: int
    sampling: SamplingConfig
    generator: torch.Generator | None
    make_cache: Callable[..., Any]     # make_cache(model, role) -> a DecodeCache for this decode
    # the target's own DecodeCache: only for a draft made of the target's layers (the K/V it writes
    # past the target's length are the target's own or overwritten by the verification forward);
    # such a drafter restores the target's lengths before propose returns
    # (TriForce only reads it, at begin)
    target_cache: Any = None


@dataclass
class DraftInput:
    """What ``propose`` gets each step."""
    root: torch.Tensor                 # (B,) last emitted token (in no cache yet), device
    root_host: list[int]
    budget: int                        # tokens still wanted by the row furthest from done
    hidden: torch.Tensor | None = None     # (B, H) target's final hidden state that produced root (needs_hidden)
    hook: torch.Tensor | None = None       # (B, X) the drafter's StepHook output at that node, when the engine ran it


@dataclass
class Proposal:
    """One step's drafts for B rows as a token tree (one shape for the batch, N nodes, node 0 = root).

    tokens (B, N): node tokens, root first. q (B, N, V) | None: the draft distribution node i's
    children were drawn from (None: deterministic drafts, q = one-hot; a leaf's row is unused).
    valid (B, N) | None: real nodes (rows with shorter proposals). ``replacement``: siblings drawn
    with replacement (SpecInfer) or without (RSD). ``bad`` (B,) | None: the draft saw non-finite
    logits (read at the loop's one sync).
    """
    tree: TokenTree
    tokens: torch.Tensor
    q: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    replacement: bool = True
    bad: torch.Tensor | None = None

    @property
    def chain(self) -> bool:
        """Host flag: one path, so the target needs no tree mask and the caches no gather."""
        return self.tree.is_chain()

    @property
    def n_drafted(self) -> torch.Tensor:
        """(B,) real drafted nodes per row."""
        if self.valid is None:
            return torch.full((self.tokens.shape[0],), self.tokens.shape[1] - 1, device=self.tokens.device)
        return self.valid.sum(1) - 1

    @classmethod
    def chain_of(cls, root: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None = None,
                 n_valid: torch.Tensor | None = None, bad: torch.Tensor | None = None) -> "Proposal":
        """k drafts per row after ``root`` (B,): drafts (B, k), q (B, k, V) the distribution each was
        drawn from, n_valid (B,) real drafts per row (None: all k)."""
        k = drafts.shape[1]
        tokens = torch.cat([root[:, None], drafts], 1)                                  # (B, k+1)
        if q is not None:   # node i's child x_{i+1} came from q_{i+1}; the leaf has none (bonus from p)
            q = torch.cat([q, q.new_zeros(q.shape[0], 1, q.shape[2])], 1)
        valid = None
        if n_valid is not None:
            valid = torch.arange(k + 1, device=tokens.device)[None, :] <= n_valid[:, None]
        return cls(chain_tree(k), tokens, q, valid, True, bad)


@dataclass
class Verified:
    """What ``accept`` gets: the verdict of one step (device tensors and their host copies)."""
    node: torch.Tensor                 # (B,) last accepted node, device
    n_accepted: torch.Tensor           # (B,) accepted drafts (the node's depth), device
    next_tokens: torch.Tensor          # (B,) correction or bonus token, device
    paths: list[list[int]]             # per row: accepted nodes, root first (host)
    new_tokens: list[list[int]]        # per row: accepted drafts + next token (host)
    active: list[bool] = field(default_factory=list)   # rows still generating before this step

    @property
    def n_host(self) -> list[int]:
        return [len(p) - 1 for p in self.paths]


class Drafter:
    """Defaults of the protocol (see the module docstring); subclasses implement ``begin``,
    ``propose`` and ``accept``.

    max_nodes      largest proposal, root included: the caches keep room for it
    needs_hidden   ``DraftInput.hidden`` wanted (Medusa)
    batched        proposes for every row at once; False: the loop runs rows one at a time
    acceptance     "exact" (lossless) or "typical" (Medusa's, lossy at T > 0); epsilon, alpha its knobs
    draft_calls    model forwards spent so far (the loop reports it)
    """
    max_nodes: int = 16
    needs_hidden: bool = False
    batched: bool = True
    acceptance: str = "exact"
    epsilon: float = 0.09
    alpha: float = 0.3
    draft_calls: int = 0

    def check_compatible(self, target: Any, tokenizer: Any = None) -> None:
        pass

    def step_hook(self, sampling: SamplingConfig) -> Any:
        """An ``accelerando.llm.cache.StepHook`` the engine runs inside the target's verification
        step (its output arrives as ``DraftInput.hook``), or None."""
        return None

    def begin(self, ctx: DraftContext) -> None:
        raise NotImplementedError

    def propose(self, x: DraftInput) -> Proposal:
        raise NotImplementedError

    def accept(self, step: Verified) -> None:
        raise NotImplementedError

    def plain_steps(self, budget: int) -> int:
        """How many plain decoding steps (the target alone, one token each) the loop should take
        before the next ``propose``, at most ``budget``: an adaptive drafter backing off. 0: none."""
        return 0

    def accept_plain(self, tokens: torch.Tensor, host: list[list[int]], seconds: float) -> None:
        """The loop took ``plain_steps`` plain steps: ``tokens`` (B, m) emitted (device; ``host``
        the same lists), in ``seconds`` of wall time. The last column is the next root."""
        raise NotImplementedError


_CHAINS: dict[int, TokenTree] = {}


def chain_tree(k: int) -> TokenTree:
    """``TokenTree.chain(k)``, one object per k (its index tensors are built once)."""
    if k not in _CHAINS:
        _CHAINS[k] = TokenTree.chain(k)
    return _CHAINS[k]
