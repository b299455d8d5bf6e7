"""The tree speculative loop: prefill -> draft a tree -> one target forward over the tree -> accept a path.

The target scores every node of the drafted tree in one forward over its KV cache (4D tree mask,
position = prefix + depth); the cache then keeps only the accepted path (gathered into place, the
rest cropped). A chain draft is the one-path tree, so the same loop and verifier serve both.

Drafters (``accelerando.llm.drafters``) implement ``begin / propose / accept``:
  begin(target, input_ids)            once, after the target's prefill
  propose(root, hidden, sampling)     -> TreeProposal (tree shape, tokens with the root first, q)
  accept(path, emitted)               bookkeeping after verification (e.g. the draft's own cache)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch

from accelerando.llm.tree import (TokenTree, check_tree_fits, check_tree_support, keep_accepted_path,
                                  tree_attention_mask, tree_position_ids)
from accelerando.llm.tree_verify import (TreeVerdict, accepted_tokens, greedy_tree_accept, rejection_tree_accept,
                                         typical_tree_accept)

RULES = ("auto", "exact", "typical")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError("top_k must be >= 1")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed distribution (temperature, top-k, top-p), the same for target and draft."""
        x = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < x.shape[-1]:
            kth = x.topk(self.top_k, dim=-1).values[..., -1:]
            x = x.masked_fill(x < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            s, idx = x.sort(dim=-1, descending=True)
            cum = s.softmax(-1).cumsum(-1)
            drop = cum - s.softmax(-1) >= self.top_p          # keep the smallest set reaching top_p
            x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
        return x.softmax(-1)


@dataclass
class TreeProposal:
    tree: TokenTree
    tokens: list[int]                   # (N,), tokens[0] is the root
    q: torch.Tensor | None = None       # (N, V) draft distributions of each node's children (sampling)
    replacement: bool = False           # siblings drawn with replacement (SpecInfer) or without (RSD)


class TreeDrafter(Protocol):
    needs_hidden: bool

    def begin(self, target: Any, input_ids: torch.Tensor) -> None: ...

    def propose(self, root: int, hidden: torch.Tensor | None, sampling: Sampling,
                generator: torch.Generator | None, rule: str) -> TreeProposal: ...

    def accept(self, path: list[int], emitted: list[int]) -> None: ...


@dataclass
class TreeStats:
    target_calls: int = 0
    draft_calls: int = 0
    steps: int = 0
    nodes_verified: int = 0
    accepted_tokens: int = 0
    accept_hist: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["tokens_per_step"] = (self.accepted_tokens + self.steps) / max(1, self.steps)
        return d


def _target_forward(target: Any, ids: torch.Tensor, cache: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden states, logits) -- the hidden states feed Medusa heads."""
    h = target.base_model(ids, past_key_values=cache, use_cache=True, **kw).last_hidden_state
    return h, target.get_output_embeddings()(h)


def verify_tree(prop: TreeProposal, logits: torch.Tensor, sampling: Sampling, *, rule: str = "exact",
                epsilon: float = 0.09, alpha: float = 0.3, generator: torch.Generator | None = None) -> TreeVerdict:
    """One verifier for chains and trees: logits (N, V) are the target's after each node."""
    if sampling.greedy:
        return greedy_tree_accept(prop.tree, prop.tokens, logits.argmax(-1).tolist())   # one host sync
    p = sampling.probs(logits)
    if rule == "typical":
        return typical_tree_accept(prop.tree, prop.tokens, p, epsilon=epsilon, alpha=alpha, generator=generator)
    if prop.q is None:
        raise ValueError("lossless sampling needs the draft distributions q of the proposal")
    return rejection_tree_accept(prop.tree, prop.tokens, p, prop.q.to(p.dtype), replacement=prop.replacement,
                                 generator=generator)


@torch.no_grad()
def tree_speculative_generate(target: Any, input_ids: torch.Tensor, *, drafter: TreeDrafter, max_new_tokens: int,
                              temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                              rule: str = "exact", epsilon: float = 0.09, alpha: float = 0.3,
                              generator: torch.Generator | None = None, seed: int | None = None,
                              eos_token_id: int | list[int] | None = None,
                              stats: dict | None = None) -> torch.Tensor:
    """Tree speculative decoding (batch 1). ``rule``: "exact" (lossless) or "typical" (Medusa, lossy).

    At temperature 0 every rule is greedy tree acceptance, token for token ``model.generate``.
    """
    from transformers import DynamicCache

    if rule not in ("exact", "typical"):
        raise ValueError(f"rule must be 'exact' or 'typical', got {rule!r}")
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens must be positive")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("tree speculation runs one sequence at a time (input_ids of shape (1, P))")
    check_tree_support(target)
    sampling = Sampling(temperature, top_k, top_p)
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    eos = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    max_pos = getattr(target.config, "max_position_embeddings", None)
    st = TreeStats()

    cache = DynamicCache(config=target.config)
    h, logits = _target_forward(target, input_ids, cache)
    st.target_calls += 1
    last = logits[0, -1]
    root = int(last.argmax()) if sampling.greedy else int(torch.multinomial(sampling.probs(last), 1, generator=generator))
    hidden = h[0, -1]
    emitted = [root]
    L = input_ids.shape[1]
    drafter.begin(target, input_ids)
    while len(emitted) < max_new_tokens and root not in eos:
        prop = drafter.propose(root, hidden, sampling, generator, rule)
        check_tree_fits(prop.tree, L, max_pos)
        ids = torch.tensor([prop.tokens], device=input_ids.device)
        mask = tree_attention_mask(prop.tree, torch.ones(1, L, device=input_ids.device), dtype=h.dtype)
        pos = tree_position_ids(prop.tree, torch.tensor([L], device=input_ids.device))
        h, logits = _target_forward(target, ids, cache, attention_mask=mask, position_ids=pos)
        st.target_calls += 1
        verdict = verify_tree(prop, logits[0], sampling, rule=rule, epsilon=epsilon, alpha=alpha, generator=generator)
        keep_accepted_path(cache, L, torch.tensor(verdict.path, device=input_ids.device))
        L += len(verdict.path)
        new = accepted_tokens(verdict, prop.tokens)
        drafter.accept(verdict.path, new)
        st.steps += 1
        st.nodes_verified += len(prop.tree)
        st.accepted_tokens += verdict.n_accepted
        st.accept_hist[verdict.n_accepted] = st.accept_hist.get(verdict.n_accepted, 0) + 1
        hidden = h[0, verdict.path[-1]]
        root = verdict.next_token
        for t in new:
            emitted.append(t)
            if t in eos:
                break
        if emitted[-1] in eos:
            break
    emitted = emitted[:max_new_tokens]
    if eos:
        for i, t in enumerate(emitted):
            if t in eos:
                emitted = emitted[: i + 1]
                break
    st.draft_calls = getattr(drafter, "draft_calls", 0)
    if stats is not None:
        stats.update(st.as_dict(), new_tokens=len(emitted))
    return torch.cat([input_ids, torch.tensor([emitted], dtype=input_ids.dtype, device=input_ids.device)], 1)
