"""A diffusers ``DiTTransformer2DModel`` split into named steps, so acceleration methods can run
blocks selectively, on token subsets or on merged tokens, while the unmodified composition equals
``model(x, t, class_labels=y).sample`` exactly.

Notation (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): x (B, C, H, W) ->
patch tokens h (B, N, D) with N = (H/p)(W/p); each block is adaLN-Zero attention + MLP; the final
layer maps tokens to (B, N, p*p*C) patches of the noise prediction.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

SUPPORTED_CLASSES = ("DiTTransformer2DModel",)


def check_dit(model: Any, *, who: str = "accelerando.diffusion.dit") -> None:
    """One-line error unless ``model`` is a diffusers DiTTransformer2DModel (adaLN-Zero, patched)."""
    name = type(model).__name__
    if name not in SUPPORTED_CLASSES:
        raise TypeError(f"{who}: unsupported model class {name}; supported: {', '.join(SUPPORTED_CLASSES)}")
    if getattr(model.config, "norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise TypeError(f"{who}: norm_type {model.config.norm_type!r} is unsupported; only 'ada_norm_zero'")


def embed(model: Any, x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> patch tokens with position embedding (B, N, D)."""
    return model.pos_embed(x)


def modulation(block: Any, t: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """adaLN-Zero parameters of one block: (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp),
    each (B, D)."""
    n1 = block.norm1
    emb = n1.linear(n1.silu(n1.emb(t, y, hidden_dtype=dtype)))
    return emb.chunk(6, dim=1)


def attention(attn: Any, n_h: torch.Tensor, *,
              kv: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """Self-attention of a diffusers ``Attention`` (no mask, no q/k norm) on tokens (B, n, D), the
    steps of its default processor; equals ``attn(n_h)``. ``kv(k, v)`` -> the keys and values (B, m, D)
    the queries attend over, given the tokens' own (Region-Adaptive Sampling: the active tokens'
    fresh K/V written into the cached K/V of all tokens)."""
    b = n_h.shape[0]
    q, k, v = attn.to_q(n_h), attn.to_k(n_h), attn.to_v(n_h)
    if kv is not None:
        k, v = kv(k, v)
    hd = k.shape[-1] // attn.heads
    q, k, v = (z.view(b, -1, attn.heads, hd).transpose(1, 2) for z in (q, k, v))     # (B, heads, n, hd)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return attn.to_out[1](attn.to_out[0](o.transpose(1, 2).reshape(b, -1, attn.heads * hd)))


def block_forward_parts(block: Any, h: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                        kv: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                        merge: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One DiT block on tokens h (B, n, D) -> (output, a, f): the output equals
    ``block(h, timestep=t, class_labels=y)`` and is ``h + gate_msa * a + gate_mlp * f`` with a, f the
    attention and MLP outputs before their adaLN-Zero gates (B, n, D) each.

    ``kv(k, v)``: the keys and values attention uses, given the tokens' own (see ``attention``).
    ``merge``: a token merge with ``merge(x) -> (B, n', D)`` and ``merge.unmerge(x') -> (B, n, D)``
    around attention and MLP (ToMe).
    """
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation(block, t, y, h.dtype)
    n_h = block.norm1.norm(h) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    if merge is not None:
        a = merge.unmerge(block.attn1(merge(n_h)))
    elif kv is not None:
        a = attention(block.attn1, n_h, kv=kv)
    else:
        a = block.attn1(n_h)
    h = gate_msa.unsqueeze(1) * a + h
    m = block.norm3(h) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    f = merge.unmerge(block.ff(merge(m))) if merge is not None else block.ff(m)
    return gate_mlp.unsqueeze(1) * f + h, a, f


def block_forward(block: Any, h: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                  kv: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                  merge: Any = None) -> torch.Tensor:
    """One DiT block on tokens h (B, n, D); equals ``block(h, timestep=t, class_labels=y)`` (see
    ``block_forward_parts`` for ``kv`` and ``merge``)."""
    return block_forward_parts(block, h, t, y, kv=kv, merge=merge)[0]


def gates(block: Any, t: torch.Tensor, y: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A block's adaLN-Zero gates (gate_msa, gate_mlp), each (B, D): cheap, they depend on (t, y) only."""
    m = modulation(block, t, y, dtype)
    return m[2], m[5]


def final_layer(model: Any, h: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Tokens (B, n, D) -> noise patches (B, n, p*p*C) (the DiT's adaLN final layer)."""
    cond = model.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=h.dtype)
    shift, scale = model.proj_out_1(F.silu(cond)).chunk(2, dim=1)
    return model.proj_out_2(model.norm_out(h) * (1 + scale[:, None]) + shift[:, None])


def unpatchify(model: Any, patches: torch.Tensor) -> torch.Tensor:
    """(B, N, p*p*C) -> (B, C, H, W), as the DiT does."""
    p, c = model.patch_size, model.out_channels
    side = int(patches.shape[1] ** 0.5)
    x = patches.reshape(-1, side, side, p, p, c)                          # (B, h, w, p, q, C)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(-1, c, side * p, side * p)


def patchify(model: Any, img: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): the inverse of ``unpatchify``."""
    p = model.patch_size
    b, c, hh, ww = img.shape
    x = img.reshape(b, c, hh // p, p, ww // p, p)                         # (B, C, h, p, w, q)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(b, (hh // p) * (ww // p), p * p * c)


def full_forward(model: Any, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The whole DiT by the steps above: embed -> blocks -> final layer -> image."""
    h = embed(model, x)
    for blk in model.transformer_blocks:
        h = block_forward(blk, h, t, y)
    return unpatchify(model, final_layer(model, h, t, y))
