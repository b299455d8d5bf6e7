"""Quality metrics, one function each; every speed figure is reported next to one of these.

Sequences are ``(batch, length)`` LongTensors or lists of token lists. When ``pad_token_id`` is
given, trailing pad tokens are dropped before comparing (generation that stops at EOS pads the
rest, and two methods may pad to different lengths).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def _rows(seqs: Any, prompt_len: int = 0, pad_token_id: int | None = None) -> list[list[int]]:
    rows = seqs.tolist() if hasattr(seqs, "tolist") else [list(r) for r in seqs]
    out = []
    for r in rows:
        r = list(r[prompt_len:])
        if pad_token_id is not None:
            while r and r[-1] == pad_token_id:
                r.pop()
        out.append(r)
    return out


def exact_match_rate(sequences: Any, reference: Any, *, prompt_len: int = 0,
                     pad_token_id: int | None = None) -> float:
    """Fraction of rows identical to the reference row (after dropping trailing padding)."""
    a, b = _rows(sequences, prompt_len, pad_token_id), _rows(reference, prompt_len, pad_token_id)
    if len(a) != len(b):
        raise ValueError(f"batch sizes differ: {len(a)} vs {len(b)}")
    if not a:
        raise ValueError("no sequences to compare")
    return sum(x == y for x, y in zip(a, b)) / len(a)


def token_agreement(sequences: Any, reference: Any, *, prompt_len: int = 0,
                    pad_token_id: int | None = None) -> float:
    """Fraction of reference positions (after the prompt) holding the same token.

    Positions past the end of the shorter row count as disagreements, over the longer length.
    """
    a, b = _rows(sequences, prompt_len, pad_token_id), _rows(reference, prompt_len, pad_token_id)
    if len(a) != len(b):
        raise ValueError(f"batch sizes differ: {len(a)} vs {len(b)}")
    same = total = 0
    for x, y in zip(a, b):
        n = max(len(x), len(y))
        total += n
        same += sum(1 for i in range(min(len(x), len(y))) if x[i] == y[i])
    return same / total if total else 1.0


def first_divergence(sequences: Any, reference: Any, *, prompt_len: int = 0) -> list[int | None]:
    """Per row, the first generated position where the two differ (None when identical)."""
    out: list[int | None] = []
    for x, y in zip(_rows(sequences, prompt_len), _rows(reference, prompt_len)):
        pos = next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), None)
        if pos is None and len(x) != len(y):
            pos = min(len(x), len(y))
        out.append(pos)
    return out


@torch.no_grad()
def perplexity(model: Any, sequences: torch.Tensor, *, prompt_len: int,
               attention_mask: torch.Tensor | None = None, pad_token_id: int | None = None) -> float:
    """exp(mean negative log-likelihood) of the generated tokens (after ``prompt_len``) under ``model``.

    ``attention_mask`` covers the prompt (left padding); generated positions equal to
    ``pad_token_id`` after a row's first pad are ignored.
    """
    seqs = sequences.to(next(model.parameters()).device)
    batch, length = seqs.shape
    if length <= prompt_len:
        raise ValueError("no generated tokens to score")
    mask = torch.ones_like(seqs)
    if attention_mask is not None:
        mask[:, : attention_mask.shape[1]] = attention_mask.to(seqs.device)
    if pad_token_id is not None:
        gen = seqs[:, prompt_len:] == pad_token_id
        mask[:, prompt_len:] = (~(gen.cumsum(1) > 0)).long()
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=seqs, attention_mask=mask, position_ids=position_ids).logits.float()
    logp = torch.log_softmax(logits[:, prompt_len - 1 : -1], dim=-1)     # predicts tokens prompt_len..
    target = seqs[:, prompt_len:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)              # (batch, generated)
    keep = mask[:, prompt_len:].bool()
    if not keep.any():
        raise ValueError("no generated tokens to score")
    return float(math.exp(nll[keep].mean().item()))


def rmse(x: Any, reference: Any) -> float:
    """Root mean squared error over all elements (float64)."""
    a = torch.as_tensor(x).double()
    b = torch.as_tensor(reference).double()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float(torch.sqrt(torch.mean((a - b) ** 2)).item())


def frechet_distance(feats_a: Any, feats_b: Any, *, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples):

    ``|mu_a - mu_b|^2 + Tr(C_a + C_b - 2 (C_a C_b)^{1/2})`` (the FID formula).
    Guards: a singular product gets ``eps * I`` added to both covariances; a small imaginary part
    of the matrix square root (numerical noise) is dropped, a large one is an error.
    """
    from scipy import linalg

    a = np.asarray(feats_a, dtype=np.float64)
    b = np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (n, d) feature arrays with the same d, got {a.shape} and {b.shape}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("need at least 2 samples in each feature set")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain NaN or inf")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(cov_a.shape[0]) * eps
        covmean = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(max(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(covmean), 0.0))


def new_token_count(sequences: Any, *, prompt_len: int, pad_token_id: int | None = None) -> int:
    """Generated tokens over the batch, not counting trailing padding."""
    return sum(len(r) for r in _rows(sequences, prompt_len, pad_token_id))


__all__ = ["exact_match_rate", "token_agreement", "first_divergence", "perplexity", "rmse",
           "frechet_distance", "new_token_count"]
