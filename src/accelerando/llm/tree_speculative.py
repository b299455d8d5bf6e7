"""Tree drafters in the speculative loop: Medusa heads and multi-draft trees (SpecInfer, RSD).

There is one decode loop (``speculative._decode``): a tree drafter proposes a token tree, the target
scores every node in one forward over its KV cache (tree mask, position = prefix + depth), one
verifier (``tree_verify``) picks the accepted path, and the caches keep that path only (gathered
into place). A chain is the one-path tree, so chain drafters run through the same steps; this
module only adapts the tree drafters' protocol (``TreeDrafting``) and keeps the batch-1 entry point
``tree_speculative_generate`` used by the tree benchmarks.

Tree drafters (``accelerando.llm.drafters``) implement ``begin / propose / accept``:
  begin(target, input_ids, max_new)   once, after the target's prefill (one row, no padding)
  propose(root, hidden, sampling)     -> TreeProposal (tree shape, tokens with the root first, q)
  accept(path, emitted)               bookkeeping after verification (e.g. the draft's own cache)
and optionally step_hook(sampling, rule) -> ``engine.StepHook`` | None: work the engine does inside
the target's compiled step; ``propose`` then gets the hook's output at the accepted node as
``hidden`` (or the raw hidden state where no engine ran it: the prefill, transformers caches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from accelerando.llm.sampling import SamplingConfig
from accelerando.llm.tree import TokenTree

BACKENDS = ("auto", "engine", "engine-eager", "hf")
DEFAULT_BACKEND = "auto"   # "auto": the compiled lean engine for Llama-family targets, else transformers
_ENGINE_OF = {"auto": "auto", "engine": "static", "engine-eager": "static-eager", "hf": "hf"}


Sampling = SamplingConfig   # the loop's processing (temperature -> top-k -> top-p), shared by target and draft


@dataclass
class TreeProposal:
    tree: TokenTree
    tokens: list[int] | torch.Tensor    # (N,), tokens[0] is the root
    q: torch.Tensor | None = None       # (N, V) draft distributions of each node's children (sampling)
    replacement: bool = False           # siblings drawn with replacement (SpecInfer) or without (RSD)


class TreeDrafter(Protocol):
    needs_hidden: bool

    def begin(self, target: Any, input_ids: torch.Tensor, max_new_tokens: int) -> None: ...

    def propose(self, root: int, hidden: torch.Tensor | None, sampling: Sampling,
                generator: torch.Generator | None, rule: str) -> TreeProposal: ...

    def accept(self, path: list[int], emitted: list[int]) -> None: ...


def pad_size(n: int) -> int:
    """Trees are padded to a power of two (>= 4): few distinct compiled step shapes."""
    return max(4, 1 << (n - 1).bit_length())


def default_engine() -> str:
    """The loop's ``engine=`` for tree drafters when none is given (from ``DEFAULT_BACKEND``)."""
    return _ENGINE_OF[DEFAULT_BACKEND]


class TreeDrafting:
    """A tree drafter in the loop (batch 1): its ``TreeProposal`` becomes the loop's ``Candidates``."""

    def __init__(self, drafter: Any, sampling: SamplingConfig, generator: torch.Generator | None,
                 rule: tuple[str, float, float] | None = None):
        self.drafter, self.sampling, self.generator = drafter, sampling, generator
        default = (getattr(drafter, "acceptance", "exact"), getattr(drafter, "epsilon", 0.09),
                   getattr(drafter, "alpha", 0.3))
        self.rule, self.epsilon, self.alpha = rule or default
        self.needs_hidden = bool(getattr(drafter, "needs_hidden", False))
        # a drafter's StepHook (Medusa at T=0) rides on the loop's hidden= request: the engine runs it
        # inside the verification step; other caches hand the drafter the raw hidden state instead
        hook = getattr(drafter, "step_hook", None)
        hook = hook(sampling, self.rule) if self.needs_hidden and hook is not None else None
        if hook is not None:
            self.needs_hidden = hook
        self.max_nodes = getattr(drafter, "max_nodes", 0) or 64

    @property
    def calls(self) -> int:
        return getattr(self.drafter, "draft_calls", 0)

    def begin(self, target: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: torch.Tensor,
              first_host: list[int], max_new_tokens: int, make_cache: Any) -> None:
        if input_ids.shape[0] != 1:
            raise ValueError("tree drafters propose one tree per step: run rows one at a time")
        self.drafter.begin(target, input_ids, max_new_tokens)

    def propose(self, root: torch.Tensor, root_host: list[int], hidden: torch.Tensor | None, budget: int) -> Any:
        from accelerando.llm.speculative import Candidates
        prop = self.drafter.propose(root_host[0], None if hidden is None else hidden[0], self.sampling,
                                    self.generator, self.rule)
        if torch.is_tensor(prop.tokens):
            tokens = prop.tokens.to(device=root.device, dtype=torch.long).reshape(1, -1)  # (1, N)
        else:
            tokens = torch.tensor([prop.tokens], dtype=torch.long, device=root.device)
        q = None if prop.q is None else prop.q.to(root.device)[None]
        return Candidates(prop.tree, tokens, q, replacement=prop.replacement, chain=prop.tree.is_chain())

    def accept(self, n: torch.Tensor, nxt: torch.Tensor, n_host: list[int], paths: list[list[int]],
               new: list[list[int]], active: list[bool]) -> None:
        self.drafter.accept(paths[0], new[0])


@torch.no_grad()
def tree_speculative_generate(target: Any, input_ids: torch.Tensor, *, drafter: TreeDrafter, max_new_tokens: int,
                              temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                              rule: str = "exact", epsilon: float = 0.09, alpha: float = 0.3,
                              generator: torch.Generator | None = None, seed: int | None = None,
                              eos_token_id: int | list[int] | None = None, backend: str | None = None,
                              stats: dict | None = None) -> torch.Tensor:
    """Tree speculative decoding of one sequence with an explicit ``rule``: "exact" (lossless) or
    "typical" (Medusa, lossy); ``eos_token_id=None`` means no EOS. Returns the sequences tensor.

    At temperature 0 every rule is greedy tree acceptance, token for token ``model.generate``.
    ``backend``: "auto" (the lean engine for Llama-family targets, else transformers with a 4D
    mask), "engine", "engine-eager" or "hf". ``stats`` (a dict) receives the loop's counters.
    """
    from accelerando.llm.speculative import _generate
    if rule not in ("exact", "typical"):
        raise ValueError(f"rule must be 'exact' or 'typical', got {rule!r}")
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens must be positive")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("tree speculation runs one sequence at a time (input_ids of shape (1, P))")
    backend = backend or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"backend must be auto, engine, engine-eager or hf, got {backend!r}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    out = _generate(target, input_ids, drafter, max_new_tokens=max_new_tokens,
                    sampling=SamplingConfig(temperature, top_k, top_p), attention_mask=None,
                    eos_token_id=[] if eos_token_id is None else eos_token_id, pad_token_id=0, seed=seed,
                    generator=generator, engine=_ENGINE_OF[backend], rule=(rule, epsilon, alpha),
                    tree=True)
    if stats is not None:
        st = out.stats
        stats.update(st, accept_hist=st["acceptance_histogram"],
                     tokens_per_step=(st["accepted_tokens"] + st["steps"]) / max(1, st["steps"]))
    return out.sequences
