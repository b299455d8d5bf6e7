"""A static KV cache (an ``nn.Module``): preallocated buffers, explicit write slots, rollback by moving a pointer.

Layout (one tensor per layer: a compiled step then mutates each buffer in place, no copies)::

    k[i], v[i]  (B, H_kv, L_max, D)          keys already rotated (RoPE) at their own position
    valid    (B, L_max) bool                 slot holds a real token (False: left padding, holes)
    lengths  (B,) long                       slots written so far = the next write slot, per row
    pos_shift (B,) long                      added to every position id (0; a pressed cache's kept
                                             tokens stand for a longer text: accelerando.llm.kv)

Every forward writes its T new tokens at slots ``lengths[b] + t`` and may only attend to slots
``<= `` its own, so whatever lies beyond ``lengths`` (rejected drafts) is never read: rolling back
is ``lengths[b] = n`` with no copy, row by row. A token's position id is the number of valid slots
before it -- exactly transformers' ``attention_mask.cumsum(-1) - 1`` -- so left padding and holes
need no extra bookkeeping.

Notation: the papers' "prefix" is slots ``[0, lengths)``; "draft block" is the T slots written by
the verification forward.
"""

from __future__ import annotations

import torch


class LayerKV(torch.nn.Module):
    """One layer's keys and values, (B, H_kv, L_max, D) buffers written in place."""

    def __init__(self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, T, H_kv, D) at slots ``input_pos`` (B, T); returns the whole buffers."""
        B, T = input_pos.shape
        rows = torch.arange(B, device=input_pos.device)[:, None].expand(B, T)
        # index_put on the buffers themselves: inductor mutates them in place, no copy
        self.k[rows, :, input_pos] = k
        self.v[rows, :, input_pos] = v
        return self.k, self.v


class StaticKVCache(torch.nn.Module):
    """The engine's KV cache: ``layers[i].update(input_pos, k, v)`` plus the per-row ``valid`` slots
    and ``lengths`` (next write slot) shared by every layer."""

    def __init__(self, *, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        super().__init__()
        if min(n_layers, batch, n_kv_heads, max_len, head_dim) <= 0:
            raise ValueError("all cache dimensions must be positive")
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.layers = torch.nn.ModuleList([LayerKV(shape, dtype, device) for _ in range(n_layers)])
        self.register_buffer("valid", torch.zeros(batch, max_len, dtype=torch.bool, device=device), persistent=False)
        self.register_buffer("lengths", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("pos_shift", torch.zeros(batch, dtype=torch.long, device=device), persistent=False)
        if torch.device(device).type == "cuda":
            # CUDA graphs replay fixed addresses: the buffers must never be reallocated.
            for t in (*self.k, *self.v, self.valid, self.lengths, self.pos_shift):
                torch._dynamo.mark_static_address(t)

    @classmethod
    def allocate(cls, **shape) -> "StaticKVCache":
        return cls(**shape)

    @property
    def k(self) -> list[torch.Tensor]:
        return [layer.k for layer in self.layers]

    @property
    def v(self) -> list[torch.Tensor]:
        return [layer.v for layer in self.layers]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def n_layers(self) -> int:
        return len(self.k)

    def reset(self) -> None:
        """Forget everything (the buffers keep their addresses)."""
        self.lengths.zero_()
        self.valid.zero_()
        self.pos_shift.zero_()

    def get_seq_length(self) -> int:
        """Longest row, in slots (host sync)."""
        return int(self.lengths.max())

    def advance(self, n: int | torch.Tensor) -> None:
        """Accept ``n`` (int or per-row (B,) tensor) freshly written slots."""
        self.lengths.add_(n)         # in place: no nn.Module attribute assignment per step

    def rollback(self, lengths: int | torch.Tensor) -> None:
        """Keep only the first ``lengths`` slots of each row (int or (B,) tensor); no copy."""
        if isinstance(lengths, int):
            self.lengths.fill_(lengths)
        else:
            self.lengths.copy_(lengths)

    def crop(self, max_length: int) -> None:
        """transformers' ``Cache.crop``: keep ``max_length`` slots (negative: drop that many)."""
        if max_length < 0:
            self.lengths.sub_(-max_length).clamp_(min=0)
        else:
            self.lengths.clamp_(max=max_length)

    def keep_path(self, path: torch.Tensor, n_keep: torch.Tensor | None = None) -> None:
        """Tree verification: move the accepted nodes' entries into place and advance.

        ``path`` (B, P) holds, per row, indices into the block just written at
        ``[lengths, lengths + T)`` (node order of the tree); the entries of ``path[b, :n_keep[b]]``
        are gathered to ``[lengths, lengths + n_keep)`` and ``lengths`` advances by ``n_keep``
        (default: P for every row). Entries of ``path`` past ``n_keep`` are ignored (pad them
        with any valid index, e.g. 0).
        """
        B, P = path.shape
        src = self.lengths[:, None] + path                              # (B, P) source slots
        dst = self.lengths[:, None] + torch.arange(P, device=path.device)[None, :]
        L = self.max_len
        src, dst = src.clamp(max=L - 1), dst.clamp(max=L - 1)
        _, H, _, D = self.k[0].shape
        src_idx = src[:, None, :, None].expand(B, H, P, D)
        dst_idx = dst[:, None, :, None].expand(B, H, P, D)
        if n_keep is None:      # every row keeps all P: a plain move (half the ops of the masked one)
            for buf in (*self.k, *self.v):
                buf.scatter_(2, dst_idx, buf.gather(2, src_idx))         # gather reads all before scatter writes
            self.valid.scatter_(1, dst, self.valid.gather(1, src))
            self.lengths.add_(P)
            return
        keep = (torch.arange(P, device=path.device)[None, :] < n_keep[:, None])   # (B, P)
        m = keep[:, None, :, None]
        for buf in (*self.k, *self.v):
            moved = buf.gather(2, src_idx)                               # read all before writing
            buf.scatter_(2, dst_idx, torch.where(m, moved, buf.gather(2, dst_idx)))
        moved_valid = self.valid.gather(1, src)
        self.valid.scatter_(1, dst, torch.where(keep, moved_valid, self.valid.gather(1, dst)))
        self.lengths.add_(n_keep)
