"""The quality gate of a lossy forward-pass transform, measured the way the model is used: prefill a
prefix, then decode the continuation one token at a time (teacher forcing), so decode-only methods
(CoreInfer's restricted MLP) are judged on the steps they change.

``decode_quality(reference, model, windows, prefix=...)`` returns, over the continuation tokens:
perplexity of both models, the relative perplexity change, and the mean KL(reference || model) of
the next-token distributions.
"""

from __future__ import annotations

import math
from typing import Any

import torch


@torch.no_grad()
def decode_logits(model: Any, windows: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits (B, L - prefix, V) predicting tokens prefix+1..L of ``windows`` (B, L): the prefix in
    one forward, then one token per forward with the model's KV cache."""
    if not 0 < prefix < windows.shape[1]:
        raise ValueError(f"prefix must be in 1..{windows.shape[1] - 1}, got {prefix}")
    out = model(windows[:, :prefix], use_cache=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    logits = [out.logits[:, -1:].float()]
    for t in range(prefix, windows.shape[1] - 1):
        out = model(windows[:, t:t + 1], cache=cache, use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        logits.append(out.logits[:, -1:].float())
    return torch.cat(logits, 1)


def decode_quality(reference: Any, model: Any, windows: torch.Tensor, *, prefix: int,
                   reference_logits: torch.Tensor | None = None) -> dict[str, float]:
    ref = decode_logits(reference, windows, prefix) if reference_logits is None else reference_logits
    got = decode_logits(model, windows, prefix)
    target = windows[:, prefix:]                                              # (B, C)
    lp_ref, lp = ref.log_softmax(-1), got.log_softmax(-1)
    nll_ref = -lp_ref.gather(-1, target[..., None]).mean().item()
    nll = -lp.gather(-1, target[..., None]).mean().item()
    kl = (lp_ref.exp() * (lp_ref - lp)).sum(-1).mean().item()
    return {"ppl_ref": math.exp(nll_ref), "ppl": math.exp(nll), "ppl_change": math.exp(nll - nll_ref) - 1.0,
            "kl": kl, "top1_match": (ref.argmax(-1) == got.argmax(-1)).float().mean().item()}
