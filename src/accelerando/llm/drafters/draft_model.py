"""A smaller causal LM as drafter (Leviathan et al. 2023; Chen et al. 2023).

The draft keeps its own KV cache (``HFCache``) across steps and rolls back exactly the rejected
drafts: after proposing ``x_1..x_k`` it has fed the pending tokens and ``x_1..x_{k-1}``; when row b
accepts ``n_b`` drafts it keeps ``min(n_b, k-1)`` of them, and its next *pending* input is the
target's next token (plus ``x_k`` when all k were accepted, since ``x_k`` was never fed).
"""

from __future__ import annotations

from typing import Any

import torch

from accelerando.llm.cache import HFCache, check_supports_cache
from accelerando.llm.drafters.base import Proposal, StepResult
from accelerando.llm.sampling import SamplingConfig, checked_argmax, checked_probs


def vocab_size(model: Any) -> int:
    """Rows of the output embedding (what the logits' last dim will be)."""
    emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def check_same_vocabulary(target: Any, draft: Any, target_tokenizer: Any = None, draft_tokenizer: Any = None) -> None:
    """Raise a clear error if draft and target cannot share token ids.

    With both tokenizers given their vocabularies must be identical (the logits may still be
    padded to different sizes); without, the output-embedding sizes must match.
    """
    vt, vd = vocab_size(target), vocab_size(draft)
    if target_tokenizer is not None and draft_tokenizer is not None:
        a, b = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
        if a != b:
            raise ValueError(f"draft and target use different tokenizers (target vocabulary {len(a)} tokens, "
                             f"draft {len(b)}; {len(set(a.items()) ^ set(b.items()))} entries differ): "
                             "speculative decoding needs the same token ids")
        if max(a.values(), default=-1) >= min(vt, vd):
            raise ValueError(f"tokenizer ids go up to {max(a.values())} but a model has only {min(vt, vd)} logits "
                             f"(target {vt}, draft {vd})")
        return
    if vt != vd:
        raise ValueError(f"draft and target have different vocabularies: target vocab size {vt}, draft vocab size {vd}. "
                         "If they share a tokenizer and one model pads its vocabulary, pass tokenizer= and "
                         "draft_tokenizer= so the tokenizers can be compared instead")


class DraftModel:
    """Drafts with a small causal LM. ``k``: drafts per step, ``"adaptive"`` (cost-aware, see
    ``AdaptiveK``) or ``"heuristic"`` (transformers' +2/-1 rule)."""

    def __init__(self, model: Any, k: int | str = 4, *, k_max: int = 12, tokenizer: Any = None):
        if isinstance(k, str):
            if k not in ("adaptive", "heuristic"):
                raise ValueError(f"k must be a positive int, 'adaptive' or 'heuristic', got {k!r}")
        elif not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, 'adaptive' or 'heuristic', got {k!r}")
        if k_max < 1:
            raise ValueError("k_max must be >= 1")
        self.model, self.k, self.k_max, self.tokenizer = model, k, k_max, tokenizer
        self.state: HFCache | None = None
        self.make_cache: Any = None          # set by the loop: HFCache or the engine's cache

    # -- set-up ---------------------------------------------------------------------------------
    def check_compatible(self, target: Any, tokenizer: Any = None) -> None:
        check_supports_cache(self.model, "draft model")
        check_same_vocabulary(target, self.model, tokenizer, self.tokenizer)
        self.v_target = vocab_size(target)

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: torch.Tensor,
              first_host: list[int]) -> None:
        self.state = (self.make_cache or HFCache)(self.model, role="draft model")
        if not hasattr(self, "v_target"):
            self.v_target = vocab_size(self.model)
        padded = not bool(attention_mask.all())     # one sync, once
        self.state.forward(input_ids, attention_mask.bool() if padded else None)
        self.pending = first[:, None]                                  # (B, W) fed at the next propose
        self.pending_valid = torch.ones_like(self.pending, dtype=torch.bool)
        self.pending_dense = True                                      # host: every pending entry is real

    @property
    def calls(self) -> int:
        return 0 if self.state is None else self.state.calls

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        """Draft logits onto the target's vocabulary (padded vocabularies differ in size)."""
        vd, vt = logits.shape[-1], self.v_target
        if vd > vt:
            return logits[..., :vt]
        if vd < vt:
            return torch.cat([logits, logits.new_full((*logits.shape[:-1], vt - vd), float("-inf"))], -1)
        return logits

    # -- the step -------------------------------------------------------------------------------
    def propose(self, k: int, sampling: SamplingConfig, generator: torch.Generator | None) -> Proposal:
        st = self.state
        B = self.pending.shape[0]
        self._start, self._width, self._k = st.mark(), self.pending.shape[1], k
        if k == 0:
            return Proposal(tokens=self.pending.new_zeros(B, 0))
        logits = st.forward(self.pending, None if self.pending_dense else self.pending_valid)
        last = self.pending_valid.long().sum(1) - 1                    # last real pending entry per row
        logits = logits.gather(1, last[:, None, None].expand(B, 1, logits.shape[-1])).squeeze(1)
        toks, qs, bad = [], [], torch.zeros(B, dtype=torch.bool, device=logits.device)
        for i in range(k):   # k forwards, no host sync: each draft stays on device
            logits = self._fit(logits.float())
            if sampling.greedy:
                tok, b = checked_argmax(logits)
                bad |= b
            else:
                q, b = checked_probs(logits, sampling)
                bad |= b
                tok = torch.multinomial(q, 1, generator=generator).squeeze(1)
                qs.append(q)
            toks.append(tok)
            if i < k - 1:
                logits = st.forward(tok[:, None])[:, -1]
        self._last_tokens = torch.stack(toks, 1)
        return Proposal(tokens=self._last_tokens, q=torch.stack(qs, 1) if qs else None, draft_calls=k, bad=bad)

    def accept(self, step: StepResult) -> None:
        k, W = self._k, self._width
        n, nxt = step.n_accepted, step.next_tokens
        if k == 0:   # nothing was fed: append the next token to each row's pending entries
            c = self.pending_valid.long().sum(1, keepdim=True)
            self.pending = torch.cat([self.pending, self.pending.new_zeros(len(nxt), 1)], 1).scatter(1, c, nxt[:, None])
            self.pending_valid = torch.cat([self.pending_valid, self.pending_valid.new_zeros(len(nxt), 1)], 1).scatter(
                1, c, torch.ones_like(c, dtype=torch.bool))
            return                   # a dense pending block stays dense: every row gained one real token
        keep = W + n.clamp(max=k - 1)                                  # pending + accepted drafts the draft has fed
        self.state.rollback(self._start, keep, W + min(max(step.n_host), k - 1))
        all_in = n == k                                                # x_k accepted but never fed
        if max(step.n_host) == k:
            self.pending = torch.stack([torch.where(all_in, self._last_tokens[:, -1], nxt), nxt], 1)
            self.pending_valid = torch.stack([torch.ones_like(all_in), all_in], 1)
            self.pending_dense = min(step.n_host) == k
        else:
            self.pending = nxt[:, None]
            self.pending_valid = torch.ones_like(self.pending, dtype=torch.bool)
            self.pending_dense = True
