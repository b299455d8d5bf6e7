"""Token trees for tree speculation: structure, tree attention, position ids, accepted-path bookkeeping.

One tree-attention builder serves Medusa and multi-draft trees (SpecInfer, Medusa, RSD papers).
Notation: node 0 is the *root* -- the last emitted token, not yet in the KV cache; every other node
is a drafted token. Nodes are stored in topological (breadth-first) order, siblings by *rank* (the
top-k index for Medusa, the sampling order for multi-draft trees), so a chain of k drafts is the
tree ``parents = (-1, 0, 1, ..., k-1)``.

A verification forward feeds all N nodes at once after a prefix of L cached tokens: node i sees
the prefix and its ancestors-or-self, and its position id is ``L + depth(i)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch


@dataclass(frozen=True)
class TokenTree:
    """Shape of a token tree (no tokens): parent pointers and sibling ranks, node 0 the root."""

    parents: tuple[int, ...]
    ranks: tuple[int, ...]
    depths: tuple[int, ...] = field(init=False)
    children: tuple[tuple[int, ...], ...] = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.parents)
        if n == 0 or self.parents[0] != -1:
            raise ValueError("a token tree starts with its root: parents[0] must be -1")
        if len(self.ranks) != n:
            raise ValueError("parents and ranks must have the same length")
        depths = [0] * n
        kids: list[list[int]] = [[] for _ in range(n)]
        for i in range(1, n):
            p = self.parents[i]
            if not 0 <= p < i:
                raise ValueError(f"node {i}: parent {p} must be an earlier node (topological order)")
            depths[i] = depths[p] + 1
            kids[p].append(i)
        for i, ks in enumerate(kids):
            rs = [self.ranks[k] for k in ks]
            if rs != sorted(rs) or len(set(rs)) != len(rs):
                raise ValueError(f"children of node {i} must have distinct ranks in increasing order")
        object.__setattr__(self, "depths", tuple(depths))
        object.__setattr__(self, "children", tuple(tuple(k) for k in kids))

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> "TokenTree":
        """Medusa-style choices: each path lists the rank taken at depth 1, 2, ... (e.g. [[0], [1], [0, 0]]).

        Every prefix of a path must be present too. The root is added; nodes are ordered by
        (depth, path), so node order is breadth-first with siblings by rank.
        """
        ps = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        index = {(): 0}
        parents, ranks = [-1], [0]
        for p in ps:
            if len(p) == 0:
                continue
            if min(p) < 0:
                raise ValueError(f"path {list(p)}: ranks must be >= 0")
            if p[:-1] not in index:
                raise ValueError(f"path {list(p)} has no parent path {list(p[:-1])}")
            index[p] = len(parents)
            parents.append(index[p[:-1]])
            ranks.append(p[-1])
        return cls(tuple(parents), tuple(ranks))

    @classmethod
    def chain(cls, k: int) -> "TokenTree":
        """k drafted tokens in a row (classic speculative decoding): the one-path tree."""
        if k < 0:
            raise ValueError("k must be >= 0")
        return cls(tuple(range(-1, k)), (0,) * (k + 1))

    @classmethod
    def chains(cls, width: int, depth: int) -> "TokenTree":
        """``width`` siblings under the root, each continued as a chain to ``depth`` (SpecInfer-style)."""
        if width < 1 or depth < 1:
            raise ValueError("width and depth must be >= 1")
        return cls.from_paths([[w] + [0] * d for w in range(width) for d in range(depth)])

    @classmethod
    def full(cls, width: int, depth: int) -> "TokenTree":
        """Every node has ``width`` children down to ``depth`` (k-ary tree)."""
        if width < 1 or depth < 1:
            raise ValueError("width and depth must be >= 1")
        paths: list[list[int]] = [[]]
        frontier: list[list[int]] = [[]]
        for _ in range(depth):
            frontier = [p + [r] for p in frontier for r in range(width)]
            paths += frontier
        return cls.from_paths(paths)

    # --- structure ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.parents)

    @property
    def n_nodes(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return max(self.depths)

    def is_chain(self) -> bool:
        """One path (every node has at most one child); computed once (the tree is immutable)."""
        c = self.__dict__.get("_chain")
        if c is None:
            c = self.__dict__["_chain"] = all(len(k) <= 1 for k in self.children)
        return c

    def path_to(self, i: int) -> list[int]:
        """Nodes from the root to ``i`` (inclusive)."""
        out = [i]
        while self.parents[out[-1]] != -1:
            out.append(self.parents[out[-1]])
        return out[::-1]

    def paths(self) -> list[list[int]]:
        """Rank paths (the ``from_paths`` form) of every non-root node."""
        return [[self.ranks[j] for j in self.path_to(i)[1:]] for i in range(1, len(self))]

    def leaves(self) -> list[int]:
        return [i for i, c in enumerate(self.children) if not c]

    def ancestor_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """(N, N) bool: ``m[i, j]`` iff node j is an ancestor of node i or i itself."""
        n = len(self)
        m = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            m[i, self.path_to(i)] = True
        return m.to(device) if device is not None else m

    def depth_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.depths, dtype=torch.long, device=device)

    def tensors(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Cached index tensors for batched rules: parent (N,) (root -> 0), depth (N,), anc (N, N),
        kids (N, R) children by rank, -1 padded; for the accepted-path search, fail_of (N, N) float
        (``fail_of[j, i]``: j is a non-root ancestor-or-self of i, i.e. anc transposed without the
        root) and score (N,) (depth * N + N - 1 - i: deepest first, then lowest index)."""
        key = str(torch.device(device) if device is not None else torch.device("cpu"))
        cache = self.__dict__.setdefault("_tensors", {})
        if key not in cache:
            R = max(1, max(len(c) for c in self.children))
            kids = torch.full((len(self), R), -1, dtype=torch.long)
            for i, c in enumerate(self.children):
                kids[i, : len(c)] = torch.tensor(c, dtype=torch.long)
            anc, n = self.ancestor_mask(), len(self)
            fail_of = anc.t().float()
            fail_of[0] = 0.0
            score = torch.tensor([d * n + n - 1 - i for i, d in enumerate(self.depths)], dtype=torch.long)
            cache[key] = {"parent": torch.tensor((0,) + self.parents[1:], dtype=torch.long, device=device),
                          "depth": self.depth_tensor(device), "anc": anc.to(device),
                          "kids": kids.to(device), "fail_of": fail_of.to(device), "score": score.to(device)}
        return cache[key]

    def padded_mask(self, width: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(width, width) bool: ``ancestor_mask`` padded for a compiled step of ``width`` columns
        (padding nodes see themselves only). Built once per (width, device): the tree's shape is
        fixed, so a verification step reuses it."""
        key = (width, str(torch.device(device) if device is not None else torch.device("cpu")))
        cache = self.__dict__.setdefault("_padded", {})
        if key not in cache:
            n = len(self)
            if width < n:
                raise ValueError(f"width {width} is smaller than the tree ({n} nodes)")
            m = torch.eye(width, dtype=torch.bool)
            m[:n, :n] = self.tensors()["anc"]          # the cached mask, not a second build
            cache[key] = m.to(device) if device is not None else m
        return cache[key]


# ---------------------------------------------------------------------------------------------
# Tree attention for Hugging Face models (custom 4D masks)
# ---------------------------------------------------------------------------------------------

def tree_position_ids(tree: TokenTree, prefix_positions: torch.Tensor) -> torch.Tensor:
    """(B, N) position ids: the next position of each row + the node's depth.

    ``prefix_positions`` (B,) is the position id the root takes (the number of real prefix tokens,
    which differs from the cache length under left padding).
    """
    return prefix_positions[:, None] + tree.tensors(prefix_positions.device)["depth"][None, :]


def tree_attention_mask(tree: TokenTree, prefix_mask: torch.Tensor, *, dtype: torch.dtype = torch.float32
                        ) -> torch.Tensor:
    """Additive 4D mask (B, 1, N, L + N): node i sees the real prefix tokens and its ancestors-or-self.

    ``prefix_mask`` (B, L) is 1 for real cached tokens, 0 for padding. Allowed entries are 0, the
    rest the dtype's most negative finite value (what transformers' eager and SDPA paths expect).
    """
    B, L = prefix_mask.shape
    anc = tree.tensors(prefix_mask.device)["anc"]                                    # (N, N)
    n = anc.shape[0]
    allowed = torch.cat([prefix_mask.bool()[:, None, :].expand(B, n, L), anc[None].expand(B, n, n)], dim=-1)
    mask = torch.zeros(B, 1, n, L + n, dtype=dtype, device=prefix_mask.device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


# transformers 5.23 architectures checked to honour a custom 4D additive mask with explicit position
# ids over a DynamicCache (tree logits == logits of each root-to-node path run as a plain sequence;
# tests/test_llm_tree.py checks llama, qwen2, mistral). Checked and *not* working: bloom (ALiBi
# biases are built from a 2D mask). Others are refused until checked.
FOUR_D_MASK_MODEL_TYPES = ("llama", "qwen2", "mistral", "qwen3", "phi3", "gemma", "gemma2", "olmo", "granite",
                           "stablelm", "phi", "gpt2", "gpt_neox", "opt", "falcon", "gptj", "gpt_bigcode",
                           "codegen", "starcoder2", "cohere")


def check_tree_support(model: Any) -> None:
    """Raise a clear error for a model whose forward cannot take a custom 4D tree mask."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in FOUR_D_MASK_MODEL_TYPES:
        raise ValueError(
            f"tree speculation needs a model that accepts custom 4D attention masks; model_type {mt!r} "
            f"is not one of the checked architectures ({', '.join(FOUR_D_MASK_MODEL_TYPES)}). "
            "Use a chain method (draft model / prompt lookup) for this model.")


def keep_accepted_path(past_key_values: Any, start: int, path: torch.Tensor) -> None:
    """Keep only the accepted nodes of a verified tree in a Hugging Face cache.

    The tree block was appended at ``[start, start + N)``; ``path`` (P,) -- or (B, P), one path
    per row, padded to a common P -- holds the accepted node indices in order (root first). Their
    entries are gathered into ``[start, start + P)`` and the rest is cropped: one gather + slice
    per layer, whatever the tree size.
    """
    idx = start + path.to(torch.long)
    layers = getattr(past_key_values, "layers", None)
    if layers is None:
        raise TypeError(f"{type(past_key_values).__name__} has no .layers (expected a transformers Cache)")
    for layer in layers:
        if getattr(layer, "keys", None) is None or layer.keys.numel() == 0:
            continue
        if not isinstance(getattr(layer, "keys", None), torch.Tensor) or layer.keys.dim() != 4:
            raise TypeError(f"cache layer {type(layer).__name__} cannot be cropped for tree verification")
        sliding = hasattr(layer, "cumulative_length")
        if sliding and layer.keys.shape[-2] != layer.cumulative_length:
            raise ValueError("a sliding-window cache that has already wrapped cannot keep a tree path")
        k_idx = idx.to(layer.keys.device)
        if k_idx.dim() == 1:
            take = lambda t: t.index_select(-2, k_idx)                               # noqa: E731
        else:                                                                         # (B, P): a path per row
            B, H, _, D = layer.keys.shape
            g = k_idx[:, None, :, None].expand(B, H, k_idx.shape[1], D)
            take = lambda t: t.gather(-2, g)                                          # noqa: E731
        layer.keys = torch.cat([layer.keys[..., :start, :], take(layer.keys)], dim=-2)
        layer.values = torch.cat([layer.values[..., :start, :], take(layer.values)], dim=-2)
        if sliding:
            layer.cumulative_length = layer.keys.shape[-2]
