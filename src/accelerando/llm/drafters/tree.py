"""DraftTree: a small draft model proposes a token tree (SpecInfer / Recursive Speculative Decoding).

Shapes (N = number of drafted nodes):
  "chains"  ``width`` siblings under the root, each continued as a chain to ``depth`` (N = width * depth)
  "beam"    stochastic beam search over draft sequences, ``width`` beams kept per level (RSD-S,
            N <= width * depth; needs ``replacement=False``)
  "full"    every node has ``width`` children down to ``depth`` (N = width + ... + width^depth)
Siblings are drawn from the draft with replacement (SpecInfer) or without (RSD: Gumbel-top-k);
the matching recursive rejection rule in ``tree_verify`` keeps the target's distribution exactly.

The draft model keeps its own KV cache and grows the tree level by level, one draft forward per
level. On the lean engine (Llama-family drafts) each level re-feeds the whole tree so far as one
fixed-size tree block (a tiny draft pays per call, not per token, so this costs about one decode
step and needs one compiled shape); with transformers (other drafts) only the new frontier is fed
with a 4D tree mask. After verification the draft cache keeps the accepted path's entries and
catches up on the rest next time.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from accelerando.llm.tree import TokenTree, check_tree_support, keep_accepted_path, tree_attention_mask
from accelerando.llm.tree_verify import draft_tree, stochastic_beam_tree

SHAPES = ("chains", "beam", "full")
_ENGINES: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _draft_engine(model: Any, max_len: int, compile: bool):
    """The draft's own engine (never the target's, even when draft and target are one model)."""
    from accelerando.llm.engine import LEN_BUCKET, Engine
    bucket = -(-max_len // LEN_BUCKET) * LEN_BUCKET
    per_model = _ENGINES.setdefault(model, {})
    if (bucket, compile) not in per_model:
        per_model[(bucket, compile)] = Engine(model, batch_size=1, max_len=bucket, compile=compile)
    return per_model[(bucket, compile)]


class DraftTree:
    needs_hidden = False
    is_tree_drafter = True
    acceptance = "exact"        # multi-draft trees are verified losslessly

    def __init__(self, draft_model: Any, *, width: int = 3, depth: int = 4, replacement: bool = False,
                 shape: str = "chains", backend: str = "auto", compile: bool | None = None):
        if width < 1 or depth < 1:
            raise ValueError("width and depth must be >= 1")
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
        if shape == "beam" and replacement:
            raise ValueError("stochastic beam search draws without replacement (replacement=False)")
        if backend not in ("auto", "engine", "hf"):
            raise ValueError(f"backend must be auto, engine or hf, got {backend!r}")
        check_tree_support(draft_model)
        if compile is None:   # follow the tree loop's default (tests set it to "engine-eager")
            from accelerando.llm import tree_speculative
            compile = tree_speculative.DEFAULT_BACKEND != "engine-eager"
        self.backend, self.compile = backend, compile
        self.model, self.width, self.depth, self.replacement, self.shape = draft_model, width, depth, replacement, shape
        self.draft_calls = 0

    @property
    def branching(self) -> list[int]:
        if self.shape == "chains":
            return [self.width] + [1] * (self.depth - 1)
        return [self.width] * self.depth

    @property
    def max_nodes(self) -> int:
        """Upper bound on the tree size (root included): the verifier pads every tree to it."""
        if self.shape == "full":
            return sum(self.width ** d for d in range(self.depth + 1))
        return 1 + self.width * self.depth

    def begin(self, target: Any, input_ids: torch.Tensor, max_new_tokens: int = 256) -> None:
        from accelerando.llm.engine import unsupported_reason
        vt = target.get_output_embeddings().weight.shape[0]
        vd = self.model.get_output_embeddings().weight.shape[0]
        if vt != vd:
            raise ValueError(f"draft vocabulary ({vd}) differs from the target's ({vt}): use a draft with the same tokenizer")
        self.draft_calls = 0
        self.use_engine = self.backend == "engine" or (self.backend == "auto" and unsupported_reason(self.model) is None)
        if self.use_engine:
            # block = pending chain + the tree so far, padded to a fixed size: one compiled step shape
            from accelerando.llm.tree_speculative import pad_size
            self.block = pad_size(self.max_nodes + self.depth + 1)
            self.eng = _draft_engine(self.model, input_ids.shape[1] + max_new_tokens + 2 * self.block, self.compile)
            self.eng.prefill(input_ids)
            self.cache_len, self.pending = input_ids.shape[1], []
        else:
            from transformers import DynamicCache
            self.cache = DynamicCache(config=self.model.config)
            self.pending = input_ids[0].tolist()      # accepted tokens not yet in the draft cache
            self.cache_len = 0

    def _forward(self, ids: list[int], **kw: Any) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        out = self.model(torch.tensor([ids], device=dev), past_key_values=self.cache, use_cache=True, **kw)
        self.draft_calls += 1
        return out.logits[0]

    def _hf_expand(self, probs, state):
        dev = next(self.model.parameters()).device

        def expand(tree: TokenTree, tokens: list[int], frontier: list[int]) -> torch.Tensor:
            if frontier == [0]:                     # catch up on accepted tokens, then the root: a plain chain
                logits = self._forward(self.pending + [tokens[0]])[-1:]
                self.cache_len += len(self.pending)
                self.pending = []
                state["fed"] = 1
                return probs(logits)
            n0, F = state["fed"], len(frontier)
            assert frontier == list(range(n0, n0 + F)), "frontier nodes must be the next node indices"
            anc = tree.ancestor_mask(dev)[frontier][:, : n0 + F]                       # (F, n0 + F)
            pre = torch.ones(F, self.cache_len, dtype=torch.bool, device=dev)
            allowed = torch.cat([pre, anc], 1)[None, None]
            mask = torch.zeros(allowed.shape, device=dev).masked_fill(~allowed, torch.finfo(torch.float32).min)
            pos = self.cache_len + tree.depth_tensor(dev)[frontier][None]
            logits = self._forward([tokens[f] for f in frontier], attention_mask=mask, position_ids=pos)
            state["fed"] = n0 + F
            return probs(logits)
        return expand

    def _engine_expand(self, probs, state):
        """Each level re-feeds (pending chain + tree so far) as one tree block after the cached prefix."""
        dev, T, m = self.eng.device, self.block, len(self.pending)

        def expand(tree: TokenTree, tokens: list[int], frontier: list[int]) -> torch.Tensor:
            n = len(tree)
            anc = torch.eye(T, dtype=torch.bool, device=dev)        # padding slots see themselves only
            anc[:m, :m] = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
            anc[m:m + n, :m] = True
            anc[m:m + n, m:m + n] = tree.ancestor_mask(dev)
            ids = torch.zeros(1, T, dtype=torch.long, device=dev)
            ids[0, :m + n] = torch.tensor(self.pending + tokens, device=dev)
            token_mask = (torch.arange(T, device=dev) < m + n)[None]
            self.eng.cache.rollback(self.cache_len)
            logits = self.eng.step(ids, token_mask=token_mask, tree_mask=anc)[0]
            self.draft_calls += 1
            state["fed"] = n
            return probs(logits[[m + f for f in frontier]])
        return expand

    @torch.no_grad()
    def propose(self, root: int, hidden: Any, sampling: Any, generator: torch.Generator | None = None,
                rule: str = "exact"):
        from accelerando.llm.tree_speculative import TreeProposal
        deterministic = sampling.greedy or rule == "typical"
        probs = (lambda lg: lg.float().softmax(-1)) if deterministic else sampling.probs
        state = {"fed": 0}
        expand = self._engine_expand(probs, state) if self.use_engine else self._hf_expand(probs, state)
        if self.shape == "beam":
            d = stochastic_beam_tree(expand, root, self.width, self.depth, generator=generator,
                                     deterministic=deterministic)
        else:
            d = draft_tree(expand, root, self.branching, replacement=self.replacement, generator=generator,
                           deterministic=deterministic)
        self._fed = state["fed"]
        self._tokens = d.tokens
        return TreeProposal(d.tree, d.tokens, None if deterministic else d.q, replacement=self.replacement)

    def accept(self, path: list[int], emitted: list[int]) -> None:
        fed = [n for n in path if n < self._fed]                   # a prefix of the path (indices grow with depth)
        dev = next(self.model.parameters()).device
        if self.use_engine:   # the last block held pending + nodes [0, fed): keep pending + the fed path
            m = len(self.pending)
            keep = list(range(m)) + [m + n for n in fed]
            self.eng.cache.rollback(self.cache_len)
            self.eng.cache.keep_path(torch.tensor([keep], device=dev))
            self.cache_len += len(keep)
        else:
            keep_accepted_path(self.cache, self.cache_len, torch.tensor(fed, device=dev))
            self.cache_len += len(fed)
        self.pending = [self._tokens[n] for n in path[len(fed):]]
