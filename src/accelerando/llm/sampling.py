"""Logits -> processed next-token distribution, shared by the target and every drafter.

Speculative sampling is exact only if the target's ``p`` and the draft's ``q`` are processed the
same way (temperature, then top-k, then top-p -- the order and tie rules of transformers'
``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``), so both go through
``SamplingConfig.probs``. ``temperature == 0`` means greedy (argmax of the raw logits).

Non-finite logits (NaN, +inf, or a row that is all -inf) are a model bug; they raise
``NonFiniteLogitsError`` instead of silently sampling garbage. Inside the decode loop the check is
a device flag (``bad_rows``) read together with the loop's one host sync per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class NonFiniteLogitsError(FloatingPointError):
    """Raised when a model produced NaN / +inf logits or a row with no finite logit."""


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_k / top_p as in transformers (None = off)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not isinstance(t, (int, float)) or t != t or t < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {t!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"top_k must be a positive integer or None, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Warped logits (float32): temperature, top-k, top-p; removed entries are -inf."""
        return process_logits(logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed distribution over the last dim (float32). Greedy: one-hot on the argmax."""
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return self.process(logits).softmax(-1)


def process_logits(logits: torch.Tensor, *, temperature: float, top_k: int | None = None,
                   top_p: float | None = None) -> torch.Tensor:
    """transformers' warper chain (temperature -> top-k -> top-p), batched over leading dims."""
    x = logits.float()
    if temperature > 0 and temperature != 1.0:
        x = x / temperature
    if top_k is not None and top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        s, idx = x.sort(dim=-1, descending=False)
        cum = s.softmax(-1).cumsum(-1)
        drop = cum <= (1.0 - top_p)
        drop[..., -1:] = False                       # always keep the most likely token
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x


def bad_rows(logits: torch.Tensor) -> torch.Tensor:
    """(...,) bool on device: NaN or +inf anywhere in the row, or no finite entry at all."""
    return (logits.isnan() | (logits == float("inf"))).any(-1) | (logits == float("-inf")).all(-1)


def checked_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(argmax, bad) in one reduction: ``bad`` equals ``bad_rows`` because max propagates NaN, is
    +inf if any entry is, and is -inf only when every entry is; ties go to the first index, as
    ``argmax`` (and ``generate``)."""
    top, arg = logits.max(-1)
    return arg, ~top.isfinite()


def check_finite(logits: torch.Tensor, who: str = "model") -> None:
    """Raise ``NonFiniteLogitsError`` if any row is bad (one host sync: use outside hot loops)."""
    bad = bad_rows(logits)
    if bool(bad.any()):
        raise NonFiniteLogitsError(non_finite_message(who, int(bad.sum())))


def non_finite_message(who: str, n_rows: int) -> str:
    return (f"the {who} produced non-finite logits (NaN, +inf, or every entry -inf) in {n_rows} row(s); "
            "check the model weights / dtype (fp16 overflow?) -- refusing to sample from them")


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One draw per row from probs (..., V); returns (...,) long. Same function for p and q."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.multinomial(flat, 1, generator=generator)
    return out.reshape(probs.shape[:-1])


def pick(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token from logits (..., V): argmax when greedy, else a draw from the processed p."""
    if sampling.greedy:
        return logits.argmax(-1)
    return sample(sampling.probs(logits), generator)


def checked_probs(logits: torch.Tensor, sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, bad): processed probs with bad rows replaced by uniform (so sampling never crashes on
    device), and the (...,) bool flag the caller must check at its next host sync."""
    bad = bad_rows(logits)
    p = sampling.probs(logits.masked_fill(bad[..., None], 0.0))
    return p, bad
