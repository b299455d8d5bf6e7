"""DraftTree: a small draft model proposes a token tree (SpecInfer / Recursive Speculative Decoding).

Shapes (N = number of drafted nodes):
  "chains"  ``width`` siblings under the root, each continued as a chain to ``depth`` (N = width * depth)
  "beam"    stochastic beam search over draft sequences, ``width`` beams kept per level (RSD-S,
            N <= width * depth; needs ``replacement=False``)
  "full"    every node has ``width`` children down to ``depth`` (N = width + ... + width^depth)
  "sparse"  a static sparse tree: a main chain (rank-0 children) whose node at level l has
            ``widths[l-1]`` children, the extra ones leaves (N = sum(widths)); ``nodes=N`` alone
            picks ``sparse_widths(N)`` (depth N - N//4, one extra sibling at each of the first N//4 levels)
  "dynamic" best-first growth under a budget of ``nodes`` drafted nodes (EAGLE-2's idea: spend
            nodes where the draft is unsure): the next node added is the open child slot with the
            highest draft path probability; at most ``width`` children per node, ``depth`` levels
Siblings are drawn from the draft with replacement (SpecInfer) or without (RSD: Gumbel-top-k);
the matching recursive rejection rule in ``tree_verify`` keeps the target's distribution exactly.

Why a dynamic shape stays lossless (at T > 0 too). The recursive rejection rule is exact for any
tree drawn by a process that, each time it adds a child to a node n, (a) decides to add it *before*
drawing it, from what has been drawn so far (the draft's q's, tokens drawn anywhere in the tree,
independent coins) but never from the target or the verifier's uniforms, and (b) draws it from q_n
with n's earlier children removed (without replacement) or from q_n itself (with replacement).
Sketch: let every possible node (token prefix) carry its own independent sequence of child draws,
used if that node gets children. Fix a node n reached by the accepted path, with target
distribution p after it, and condition on every other node's draws, the coins and the verifier's
uniforms outside n: what remains is a sequential process on n's own children in which "is there a
child i+1?" is a function of x_1..x_i only (a stopping rule), and x_{i+1} ~ q_{i+1} given
x_1..x_i. Backward induction on i: if the process from state (p_{i+1}, q_{i+1}) emits p_{i+1}
for every x_1..x_i, the process from (p_i, q_i) emits
min(p_i, q_i) + (1 - sum min(p_i, q_i)) norm(max(0, p_i - q_i)) = p_i; with no further child it
samples p_i directly. So each node emits exactly p, and by induction along the
path the sequence has the target's law. ``best_first_tree`` satisfies (a) and (b): a slot's
score is fixed before its child is drawn (the parent's score + log of the i-th largest q_n value),
and a drawn child only shapes the tree through its own q (its future children's slots), which
competes with later slots. What it must not do -- and does not -- is EAGLE-2's rerank-and-prune
of already drawn nodes at T > 0, whose kept siblings depend on their own values
(``tests/test_llm_tree_shapes.py`` shows such a peeking rule failing the chi-square test).

The draft model keeps its own KV cache (``ctx.make_cache``: the cache protocol the target uses,
on the lean engine or transformers') and grows the tree level by level, one draft forward per
level (per best-first round for "dynamic"): each level re-feeds the whole tree so far as one
fixed-size tree block (a tiny draft pays per call, not per token, so this costs about one decode
step and needs one compiled shape). After verification the draft cache keeps the accepted path's
entries and catches up on the rest next time.
"""

from __future__ import annotations

import heapq
import math
from typing import Any, Sequence

import torch

from accelerando.llm.drafters.base import DraftContext, DraftInput, Drafter, Proposal, Verified
from accelerando.llm.drafters.tree_draws import (DraftedTree, Expand, draft_tree, drafted_tree, sample_siblings,
                                                 stochastic_beam_tree)
from accelerando.llm.engine import check_engine
from accelerando.llm.tree import TokenTree, check_tree_support

SHAPES = ("chains", "beam", "full", "sparse", "dynamic")


def sparse_widths(nodes: int) -> list[int]:
    """Default static sparse shape for a budget of ``nodes`` drafted nodes: one extra sibling per
    4 nodes, at the shallowest levels of the main chain (4 -> [2, 1, 1], 8 -> [2, 2, 1, 1, 1, 1])."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    extra = nodes // 4
    return [2] * extra + [1] * (nodes - 2 * extra)


def sparse_shape(widths: Sequence[int]) -> TokenTree:
    """Main chain of depth ``len(widths)``; its node at level l has ``widths[l-1]`` children (rank 0
    continues the chain, ranks >= 1 are leaves)."""
    if not widths or any(int(w) < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty list of integers >= 1, got {list(widths)}")
    paths = [[0] * level + [r] for level, w in enumerate(widths) for r in range(int(w))]
    return TokenTree.from_paths(paths)


def draft_shape(expand: Expand, root_token: int, shape: TokenTree, *, replacement: bool,
                generator: torch.Generator | None = None, deterministic: bool = False) -> DraftedTree:
    """Fill a fixed tree shape (breadth-first node order) with draft tokens, one draft forward per level.

    Every node of a level is fed (the hf path feeds consecutive nodes); only those with children in
    ``shape`` draw them: ``len(children)`` tokens from q (``sample_siblings``), in rank order.
    """
    tokens = [int(root_token)] + [0] * (len(shape) - 1)
    qs: dict[int, torch.Tensor] = {}
    by_depth: dict[int, list[int]] = {}
    for i, d in enumerate(shape.depths):
        by_depth.setdefault(d, []).append(i)
    for d in range(shape.max_depth):
        level = by_depth[d]
        n = level[-1] + 1                                     # nodes [0, n) are drafted so far
        sub = TokenTree(shape.parents[:n], shape.ranks[:n])
        dists = expand(sub, tokens[:n], level)
        for node, qn in zip(level, dists):
            kids = shape.children[node]
            if not kids:
                continue
            qs[node] = qn
            xs = sample_siblings(qn, len(kids), replacement=replacement, generator=generator,
                                 deterministic=deterministic).tolist()
            for c, x in zip(kids, xs + [xs[-1]] * (len(kids) - len(xs))):   # q with fewer tokens: repeat
                tokens[c] = int(x)
    return drafted_tree(shape, tokens, qs)


def best_first_tree(expand: Expand, root_token: int, nodes: int, *, width: int, depth: int, replacement: bool,
                    generator: torch.Generator | None = None, deterministic: bool = False) -> DraftedTree:
    """Grow a tree of at most ``nodes`` drafted nodes best-first by the draft's path probability.

    A *slot* is "the i-th child of node n" (i < width, n above ``depth``), scored before it is
    drawn: S = S(n) + log q_n^(i), with q_n^(i) the i-th largest value of q_n and S(root) = 0; the
    child drawn into it keeps S. Slots are filled highest score first; each is drawn then (the i-th
    of n's siblings, with or without replacement), so the tree is the top-``nodes`` by score. At
    temperature 0 children are q's top tokens, S is the log of the draft's path probability and
    the tree is EAGLE-2's (the nodes of highest cumulative draft probability). Scores need q_n,
    i.e. a draft forward over n: a slot is filled only while its score is >= every not-yet-forwarded
    node's score (their children can only score lower), else the pending nodes are forwarded first
    (one draft call per round; about one round per level). Lossless by the argument in the module
    docstring.
    """
    parents, ranks, tokens, logp, depths = [-1], [0], [int(root_token)], [0.0], [0]
    qs: dict[int, torch.Tensor] = {}
    drawn: dict[int, list[int]] = {}      # node -> its children's tokens, drawn up front, revealed in rank order
    heap: list[tuple[float, int, int]] = []   # (-score, node, rank)
    fed = 0
    while len(tokens) - 1 < nodes:
        frontier = list(range(fed, len(tokens)))
        if frontier:
            dists = expand(TokenTree(tuple(parents), tuple(ranks)), tokens, frontier)
            fed = len(tokens)
            for n, qn in zip(frontier, dists):
                if depths[n] >= depth:
                    continue
                qs[n] = qn
                # the draw happens now but is looked at only when slot r is filled: no decision
                # reads a child's token before that child is in the tree (i.i.d. / Gumbel order)
                drawn[n] = sample_siblings(qn, width, replacement=replacement, generator=generator,
                                           deterministic=deterministic).tolist()
                top = qn.topk(min(width, qn.shape[-1])).values.tolist()
                for r in range(len(drawn[n])):
                    if top[r] > 0:
                        heapq.heappush(heap, (-(logp[n] + math.log(top[r])), n, r))
        bound = max((logp[m] for m in range(fed, len(tokens)) if depths[m] < depth), default=-math.inf)
        added = 0
        while heap and len(tokens) - 1 < nodes and -heap[0][0] >= bound:
            neg, n, r = heapq.heappop(heap)
            x = drawn[n][r]
            parents.append(n); ranks.append(r); tokens.append(x); depths.append(depths[n] + 1)
            # the child's path score is its slot's (= log P(n) + log q_n(x) at T = 0, where x is q's
            # i-th top token); at T > 0 the drawn x's own q is a worse guide to acceptance
            # (sum min(p, q) does not depend on which x was drawn) than the slot's rank
            logp.append(-neg)
            if depths[-1] < depth:
                bound = max(bound, logp[-1])
            added += 1
        if not heap and fed == len(tokens):
            break                                   # nothing left to draw (width / depth / support exhausted)
        if added == 0 and fed == len(tokens):
            break
    return drafted_tree(TokenTree(tuple(parents), tuple(ranks)), tokens, qs)


def pad_size(n: int) -> int:
    """Blocks are padded to a power of two (>= 4): few distinct compiled step shapes."""
    return max(4, 1 << (n - 1).bit_length())


class DraftTree(Drafter):
    """A draft model proposing a token tree per step (see the module docstring for the shapes).

    ``engine``: where the draft's KV cache lives (``accelerando.llm.engine.ENGINES``); None: the
    same as the target's (the ``engine=`` of ``speculative_generate``).
    """
    batched = False             # one tree per step: the loop runs rows one at a time
    acceptance = "exact"        # multi-draft trees are verified losslessly

    def __init__(self, draft_model: Any, *, width: int = 3, depth: int | None = None, replacement: bool = False,
                 shape: str = "chains", nodes: int | None = None, widths: Sequence[int] | None = None,
                 engine: str | None = None):
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
        if shape == "sparse":
            if widths is None and nodes is None:
                raise ValueError('shape="sparse" needs widths=[...] (children per main-chain level) or nodes=N')
            self.widths = [int(w) for w in widths] if widths is not None else sparse_widths(int(nodes))
            self.tree_shape = sparse_shape(self.widths)
            if nodes is not None and int(nodes) != len(self.tree_shape) - 1:
                raise ValueError(f"widths {self.widths} give {len(self.tree_shape) - 1} nodes, not nodes={nodes}")
            if depth is not None and depth != len(self.widths):
                raise ValueError(f"a sparse tree's depth is len(widths) = {len(self.widths)}, not depth={depth}")
            nodes, depth = len(self.tree_shape) - 1, len(self.widths)
        elif shape == "dynamic":
            if nodes is None or int(nodes) < 1:
                raise ValueError('shape="dynamic" needs a node budget nodes=N >= 1')
            nodes = int(nodes)
            depth = nodes if depth is None else depth
        else:
            if nodes is not None or widths is not None:
                raise ValueError(f"nodes= and widths= apply to the sparse and dynamic shapes, not {shape!r}")
            depth = 4 if depth is None else depth
        if width < 1 or depth < 1:
            raise ValueError("width and depth must be >= 1")
        if shape == "beam" and replacement:
            raise ValueError("stochastic beam search draws without replacement (replacement=False)")
        if engine is not None:
            check_engine(engine)
        check_tree_support(draft_model)
        self.model, self.width, self.depth, self.replacement, self.shape = draft_model, width, depth, replacement, shape
        self.nodes, self.engine = nodes, engine
        self.draft_calls = 0
        self._blocks: dict[tuple, TokenTree] = {}

    @property
    def branching(self) -> list[int]:
        if self.shape == "chains":
            return [self.width] + [1] * (self.depth - 1)
        return [self.width] * self.depth

    @property
    def max_nodes(self) -> int:
        """Upper bound on the tree size (root included)."""
        if self.shape in ("sparse", "dynamic"):
            return 1 + self.nodes
        if self.shape == "full":
            return sum(self.width ** d for d in range(self.depth + 1))
        return 1 + self.width * self.depth

    def begin(self, ctx: DraftContext) -> None:
        vt = ctx.target.get_output_embeddings().weight.shape[0]
        vd = self.model.get_output_embeddings().weight.shape[0]
        if vt != vd:
            raise ValueError(f"draft vocabulary ({vd}) differs from the target's ({vt}): use a draft with the same tokenizer")
        self.sampling, self.generator = ctx.sampling, ctx.generator
        self.draft_calls = 0
        self.cache = ctx.make_cache(self.model, "draft tree", **({} if self.engine is None else {"engine": self.engine}))
        self.cache.forward(ctx.input_ids)             # one row, unpadded
        # each level re-feeds (pending + the tree so far) as one block padded to a fixed size: one
        # compiled step shape (a tiny draft pays per call, not per token). Every shape feeds all its
        # nodes but the last-drawn ones, and an accepted path has at most one of those (its parent
        # was fed), so at most one accepted token is pending
        self.block = pad_size(self.max_nodes + 1)
        self.pending: list[int] = []                  # accepted tokens not yet in the draft cache

    def _block_tree(self, m: int, tree: TokenTree) -> TokenTree:
        """The pending chain (m nodes), the tree under its last node, then padding leaves under
        node 0 (masked out: no real node sees them) up to ``self.block`` nodes; one object per shape."""
        key = (m, tree.parents, tree.ranks)
        b = self._blocks.get(key)
        if b is None:
            n = len(tree)
            parents = list(range(-1, m - 1)) + [m - 1 if j == 0 else m + tree.parents[j] for j in range(n)]
            ranks = [0] * m + list(tree.ranks)
            pad = self.block - m - n
            b = self._blocks[key] = TokenTree(tuple(parents + [0] * pad), tuple(ranks + [1 + self.block + i for i in range(pad)]))
        return b

    def _expand(self, probs: Any):
        dev, T, m = self.model.get_output_embeddings().weight.device, self.block, len(self.pending)
        state = {"fed": 0, "written": False}
        zero = torch.zeros(1, dtype=torch.long, device=dev)

        def expand(tree: TokenTree, tokens: list[int], frontier: list[int]) -> torch.Tensor:
            n = len(tree)
            if m + n > T:
                raise RuntimeError(f"draft block of {T} slots cannot hold {m} pending tokens + {n} tree nodes")
            if state["written"]:        # forget the previous level's block
                self.cache.rollback(self.start, zero, 0)
            ids = torch.tensor([self.pending + tokens + [0] * (T - m - n)], device=dev)
            valid = (torch.arange(T, device=dev) < m + n)[None]
            logits = self.cache.forward(ids, valid, tree=self._block_tree(m, tree)).logits[0]
            self.draft_calls += 1
            state.update(fed=n, written=True)
            return probs(logits[[m + f for f in frontier]])
        return expand, state

    @torch.no_grad()
    def propose(self, x: DraftInput) -> Proposal:
        root, sampling, generator = x.root_host[0], self.sampling, self.generator
        deterministic = sampling.greedy or self.acceptance == "typical"
        probs = (lambda lg: lg.float().softmax(-1)) if deterministic else sampling.probs
        self.start = self.cache.mark()
        expand, state = self._expand(probs)
        if self.shape == "beam":
            d = stochastic_beam_tree(expand, root, self.width, self.depth, generator=generator,
                                     deterministic=deterministic)
        elif self.shape == "sparse":
            d = draft_shape(expand, root, self.tree_shape, replacement=self.replacement, generator=generator,
                            deterministic=deterministic)
        elif self.shape == "dynamic":
            d = best_first_tree(expand, root, self.nodes, width=self.width, depth=self.depth,
                                replacement=self.replacement, generator=generator, deterministic=deterministic)
        else:
            d = draft_tree(expand, root, self.branching, replacement=self.replacement, generator=generator,
                           deterministic=deterministic)
        self._fed = state["fed"]
        self._tokens = d.tokens
        dev = x.root.device
        return Proposal(d.tree, torch.tensor([d.tokens], dtype=torch.long, device=dev),
                        None if deterministic else d.q.to(dev)[None], replacement=self.replacement)

    def accept(self, step: Verified) -> None:
        """The last block held pending + nodes [0, fed): keep pending + the fed part of the path."""
        path = step.paths[0]
        fed = [n for n in path if n < self._fed]                   # a prefix of the path (indices grow with depth)
        m = len(self.pending)
        keep = list(range(m)) + [m + n for n in fed]
        dev = step.node.device
        self.cache.rollback(self.start, torch.tensor([len(keep)], device=dev), len(keep),
                            path=torch.tensor([keep], device=dev))
        self.pending = [self._tokens[n] for n in path[len(fed):]]
