"""The tree speculative loop: prefill -> draft a tree -> one target forward over the tree -> accept a path.

The target scores every node of the drafted tree in one forward over its KV cache (4D tree mask,
position = prefix + depth); the cache then keeps only the accepted path (gathered into place, the
rest cropped). A chain draft is the one-path tree, so the same loop and verifier serve both.

Drafters (``accelerando.llm.drafters``) implement ``begin / propose / accept``:
  begin(target, input_ids, max_new)   once, after the target's prefill
  propose(root, hidden, sampling)     -> TreeProposal (tree shape, tokens with the root first, q)
  accept(path, emitted)               bookkeeping after verification (e.g. the draft's own cache)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from accelerando.llm.sampling import SamplingConfig
from accelerando.llm.tree import (TokenTree, check_tree_fits, check_tree_support, keep_accepted_path,
                                  tree_attention_mask, tree_position_ids)
from accelerando.llm.tree_verify import (TreeVerdict, accepted_tokens, greedy_tree_accept, rejection_tree_accept,
                                         typical_tree_accept)

BACKENDS = ("auto", "engine", "engine-eager", "hf")
DEFAULT_BACKEND = "auto"   # "auto": the compiled lean engine for Llama-family targets, else transformers


Sampling = SamplingConfig   # the chain loop's processing (temperature -> top-k -> top-p), shared by target and draft


@dataclass
class TreeProposal:
    tree: TokenTree
    tokens: list[int]                   # (N,), tokens[0] is the root
    q: torch.Tensor | None = None       # (N, V) draft distributions of each node's children (sampling)
    replacement: bool = False           # siblings drawn with replacement (SpecInfer) or without (RSD)


class TreeDrafter(Protocol):
    needs_hidden: bool

    def begin(self, target: Any, input_ids: torch.Tensor, max_new_tokens: int) -> None: ...

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


class _HFTarget:
    """Target on transformers' DynamicCache + a custom 4D tree mask (any checked architecture)."""

    def __init__(self, target: Any, max_len: int):
        from transformers import DynamicCache
        check_tree_support(target)
        self.target, self.cache = target, DynamicCache(config=target.config)
        self.max_pos = getattr(target.config, "max_position_embeddings", None)
        self.L = 0

    def _forward(self, ids: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.target.base_model(ids, past_key_values=self.cache, use_cache=True, **kw).last_hidden_state
        return h[0], self.target.get_output_embeddings()(h[0])

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, logits = self._forward(input_ids)
        self.L = input_ids.shape[1]
        return h[-1], logits[-1]

    def score_tree(self, tree: TokenTree, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden (N, H), logits (N, V)) after every node, in one forward over the cache."""
        check_tree_fits(tree, self.L, self.max_pos)
        dev = self.target.device
        mask = tree_attention_mask(tree, torch.ones(1, self.L, device=dev), dtype=self.target.dtype)
        pos = tree_position_ids(tree, torch.tensor([self.L], device=dev))
        return self._forward(torch.tensor([tokens], device=dev), attention_mask=mask, position_ids=pos)

    def keep(self, path: list[int]) -> None:
        keep_accepted_path(self.cache, self.L, torch.tensor(path, device=self.target.device))
        self.L += len(path)


class _EngineTarget:
    """Target on the lean engine (static cache, compiled steps): the tree is one fixed-shape step.

    Trees are padded to ``pad_to`` nodes (padding nodes are masked out) so one compiled graph
    serves every tree; the accepted path is gathered into place with ``StaticKVCache.keep_path``.
    """

    def __init__(self, target: Any, max_len: int, *, compile: bool, pad_to: int):
        from accelerando.llm.engine import engine_for
        self.eng = engine_for(target, batch_size=1, max_len=max_len, compile=compile)
        self.pad_to, self.L = pad_to, 0
        self.max_pos = getattr(target.config, "max_position_embeddings", None)

    def prefill(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, logits = self.eng.prefill(input_ids, return_hidden=True)
        self.L = input_ids.shape[1]
        return h[0, -1], logits[0, -1]

    def score_tree(self, tree: TokenTree, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        n, T = len(tree), pad_size(max(self.pad_to, len(tree)))
        check_tree_fits(tree, self.L, self.max_pos)
        if self.L + T > self.eng.max_len:
            raise ValueError(f"a tree of {n} nodes after {self.L} tokens does not fit the cache ({self.eng.max_len})")
        dev = self.eng.device
        anc = torch.eye(T, dtype=torch.bool, device=dev)          # padding nodes see themselves only
        anc[:n, :n] = tree.ancestor_mask(dev)
        ids = torch.zeros(1, T, dtype=torch.long, device=dev)
        ids[0, :n] = torch.tensor(tokens, device=dev)
        token_mask = (torch.arange(T, device=dev) < n)[None]
        h, logits = self.eng.step(ids, token_mask=token_mask, tree_mask=anc, return_hidden=True)
        return h[0, :n], logits[0, :n]

    def keep(self, path: list[int]) -> None:
        c = self.eng.cache
        c.rollback(self.L)
        c.keep_path(torch.tensor([path], device=self.eng.device))
        self.L += len(path)


def pad_size(n: int) -> int:
    """Trees are padded to a power of two (>= 4): few distinct compiled step shapes."""
    return max(4, 1 << (n - 1).bit_length())


def _make_target(target: Any, max_len: int, backend: str, pad_to: int) -> Any:
    from accelerando.llm.engine import unsupported_reason
    if backend == "engine" or (backend == "auto" and unsupported_reason(target) is None):
        return _EngineTarget(target, max_len, compile=True, pad_to=pad_to)
    if backend == "engine-eager":
        return _EngineTarget(target, max_len, compile=False, pad_to=pad_to)
    return _HFTarget(target, max_len)


def verify_tree(prop: TreeProposal, logits: torch.Tensor, sampling: Sampling, *, rule: str = "exact",
                epsilon: float = 0.09, alpha: float = 0.3, generator: torch.Generator | None = None) -> TreeVerdict:
    """One verifier for chains and trees: logits (N, V) are the target's after each node."""
    if sampling.greedy:
        return greedy_tree_accept(prop.tree, prop.tokens, logits.argmax(-1))
    p = sampling.probs(logits)
    if rule == "typical":
        return typical_tree_accept(prop.tree, prop.tokens, p, epsilon=epsilon, alpha=alpha, generator=generator)
    if prop.q is None and len(prop.tree) > 1:
        raise ValueError("lossless sampling needs the draft distributions q of the proposal")
    q = p if prop.q is None else prop.q.to(p.dtype)      # a root-only tree never reads q
    return rejection_tree_accept(prop.tree, prop.tokens, p, q, replacement=prop.replacement,
                                 generator=generator)


@torch.no_grad()
def tree_speculative_generate(target: Any, input_ids: torch.Tensor, *, drafter: TreeDrafter, max_new_tokens: int,
                              temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                              rule: str = "exact", epsilon: float = 0.09, alpha: float = 0.3,
                              generator: torch.Generator | None = None, seed: int | None = None,
                              eos_token_id: int | list[int] | None = None, backend: str | None = None,
                              stats: dict | None = None) -> torch.Tensor:
    """Tree speculative decoding (batch 1). ``rule``: "exact" (lossless) or "typical" (Medusa, lossy).

    At temperature 0 every rule is greedy tree acceptance, token for token ``model.generate``.
    ``backend``: "auto" (the lean engine for Llama-family targets, else transformers with a 4D
    mask), "engine", "engine-eager" or "hf".
    """

    if rule not in ("exact", "typical"):
        raise ValueError(f"rule must be 'exact' or 'typical', got {rule!r}")
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens must be positive")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError("tree speculation runs one sequence at a time (input_ids of shape (1, P))")
    backend = backend or DEFAULT_BACKEND
    if backend not in BACKENDS:
        raise ValueError(f"backend must be auto, engine, engine-eager or hf, got {backend!r}")
    sampling = Sampling(temperature, top_k, top_p)
    if generator is None and seed is not None:
        generator = torch.Generator(device="cpu").manual_seed(seed)
    eos = set() if eos_token_id is None else ({eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id))
    st = TreeStats()

    pad_to = getattr(drafter, "max_nodes", 0)
    tgt = _make_target(target, input_ids.shape[1] + max_new_tokens + pad_size(pad_to or 64) + 1, backend, pad_to)
    hidden, last = tgt.prefill(input_ids)
    st.target_calls += 1
    root = int(last.argmax()) if sampling.greedy else int(torch.multinomial(sampling.probs(last), 1, generator=generator))
    emitted = [root]
    drafter.begin(target, input_ids, max_new_tokens)
    while len(emitted) < max_new_tokens and root not in eos:
        prop = drafter.propose(root, hidden, sampling, generator, rule)
        h, logits = tgt.score_tree(prop.tree, prop.tokens)
        st.target_calls += 1
        verdict = verify_tree(prop, logits, sampling, rule=rule, epsilon=epsilon, alpha=alpha, generator=generator)
        tgt.keep(verdict.path)
        new = accepted_tokens(verdict, prop.tokens)
        drafter.accept(verdict.path, new)
        st.steps += 1
        st.nodes_verified += len(prop.tree)
        st.accepted_tokens += verdict.n_accepted
        st.accept_hist[verdict.n_accepted] = st.accept_hist.get(verdict.n_accepted, 0) + 1
        hidden = h[verdict.path[-1]]
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


def _row_eos(target: Any, eos_token_id: Any) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def speculative_tree_generate(target: Any, input_ids: torch.Tensor, *, drafter: Any, max_new_tokens: int = 128,
                              temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                              attention_mask: torch.Tensor | None = None, eos_token_id: Any = None,
                              pad_token_id: int | None = None, seed: int | None = None,
                              generator: torch.Generator | None = None, backend: str | None = None) -> Any:
    """``speculative_generate`` for tree drafters (Medusa heads, DraftTree): same output type.

    The drafter's ``acceptance`` ("exact" = lossless, "typical" = Medusa's lossy rule with its
    ``epsilon`` / ``alpha``) picks the rule. Rows of a batch run one after another (left padding
    removed per row); the output is right-padded with ``pad_token_id`` like ``generate``.
    """
    import time

    from accelerando.llm.speculative import SpeculativeOutput
    t0 = time.perf_counter()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = _row_eos(target, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(target, "generation_config", None), "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if generator is None and temperature > 0:
        generator = torch.Generator(device="cpu").manual_seed(seed if seed is not None else
                                                              int(torch.empty((), dtype=torch.int64).random_()))
    rule = getattr(drafter, "acceptance", "exact")
    opts = dict(epsilon=getattr(drafter, "epsilon", 0.09), alpha=getattr(drafter, "alpha", 0.3))
    rows, agg = [], {}
    for b in range(input_ids.shape[0]):
        ids = input_ids[b: b + 1, attention_mask[b].bool()]
        st: dict = {}
        out = tree_speculative_generate(target, ids, drafter=drafter, max_new_tokens=max_new_tokens,
                                        temperature=temperature, top_k=top_k, top_p=top_p, rule=rule,
                                        generator=generator, eos_token_id=eos or None, backend=backend,
                                        stats=st, **opts)
        rows.append(out[0, ids.shape[1]:])
        for key, v in st.items():
            if isinstance(v, (int, float)) and key != "tokens_per_step":
                agg[key] = agg.get(key, 0) + v
            elif isinstance(v, dict):
                h = agg.setdefault(key, {})
                for kk, vv in v.items():
                    h[kk] = h.get(kk, 0) + vv
    width = max(len(r) for r in rows)
    gen = torch.full((len(rows), width), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    for b, r in enumerate(rows):
        gen[b, : len(r)] = r
    agg["acceptance"] = rule
    agg["lossless"] = rule == "exact"
    agg["tokens_per_target_call"] = agg.get("new_tokens", 0) / max(1, agg.get("target_calls", 1))
    agg["wall_time_s"] = time.perf_counter() - t0
    return SpeculativeOutput(torch.cat([input_ids, gen], 1), agg)
