"""A smaller causal LM as drafter (Leviathan et al. 2023; Chen et al. 2023).

The draft keeps its own KV cache (``ctx.make_cache``: the engine's or transformers') across steps and rolls back exactly the rejected
drafts: after proposing ``x_1..x_k`` it has fed the pending tokens and ``x_1..x_{k-1}``; when row b
accepts ``n_b`` drafts it keeps ``min(n_b, k-1)`` of them, and its next *pending* input is the
target's next token (plus ``x_k`` when all k were accepted, since ``x_k`` was never fed).

Backing off costs the draft nothing per token (issue 22): it reads the prompt only at its first
proposal (a drafter that never drafts never prefills), and after a run of plain steps it reads
only the last ``window`` tokens it missed, in one forward, whatever the run's length. The draft's
cache then lacks the tokens before them (their positions close up): its later proposals see a
context with a hole, which can only lower acceptance, never change the output.
"""

from __future__ import annotations

from typing import Any

import torch

from accelerando.llm.cache import check_supports_cache
from accelerando.llm.drafters.adaptive import DraftLength
from accelerando.llm.drafters.base import DraftContext, DraftInput, Drafter, Proposal, Verified
from accelerando.llm.sampling import checked_argmax, checked_probs


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


CATCH_UP = 16       # default catch-up window after plain steps (one compiled width, one forward)


def last_real(block: torch.Tensor, valid: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's last (up to) ``n`` real entries of a block whose real entries are a prefix of the
    row, kept as a prefix: (B, n) tokens and validity."""
    count = valid.long().sum(1, keepdim=True)                                           # (B, 1)
    cols = torch.arange(n, device=block.device)[None, :]
    idx = (cols + (count - n).clamp(min=0)).clamp(max=block.shape[1] - 1)
    return block.gather(1, idx), cols < count.clamp(max=n)


class DraftModel(Drafter):
    """Drafts with a small causal LM. ``k``: drafts per step, ``"adaptive"`` (cost-aware, see
    ``AdaptiveK``; ``cost_ratio`` fixes its c) or ``"heuristic"`` (transformers' +2/-1 rule).
    ``window``: after plain steps the draft reads only the last ``window`` tokens it missed."""

    def __init__(self, model: Any, k: int | str = 4, *, k_max: int = 12, tokenizer: Any = None,
                 cost_ratio: float | None = None, window: int = CATCH_UP):
        if not isinstance(window, int) or isinstance(window, bool) or window < 2:
            raise ValueError(f"window must be an int >= 2, got {window!r}")
        self.length = DraftLength(k, k_max, cost_ratio)
        self.model, self.k, self.k_max, self.tokenizer, self.window = model, k, k_max, tokenizer, window
        self.max_nodes = self.length.cap + 1
        self.state: Any = None
        self._prompt: tuple | None = None      # set by begin: the prompt the draft has not read yet

    @property
    def ctrl(self) -> Any:
        return self.length.ctrl

    # -- set-up ---------------------------------------------------------------------------------
    def check_compatible(self, target: Any, tokenizer: Any = None) -> None:
        check_supports_cache(self.model, "draft model")
        check_same_vocabulary(target, self.model, tokenizer, self.tokenizer)

    def begin(self, ctx: DraftContext) -> None:
        self.v_target = vocab_size(ctx.target)
        self.sampling, self.generator = ctx.sampling, ctx.generator
        self.state = ctx.make_cache(self.model, "draft model")
        # the prompt is read at the first proposal, with the pending tokens (a draft that never
        # drafts never reads it)
        self._prompt = (ctx.input_ids, ctx.attention_mask.bool())
        self.pending = ctx.first[:, None]                              # (B, W) fed at the next propose
        self.pending_valid = torch.ones_like(self.pending, dtype=torch.bool)
        self.pending_dense = True                                      # host: every pending entry is real

    @property
    def draft_calls(self) -> int:
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
    def propose(self, x: DraftInput) -> Proposal:
        k = self.length.choose(x.budget)
        st, sampling = self.state, self.sampling
        B = self.pending.shape[0]
        self._start, self._width, self._k = st.mark(), self.pending.shape[1], k
        if k == 0:
            drafts = self.pending.new_zeros(B, 0)
            self.length.drafted(drafts)
            return Proposal.chain_of(x.root, drafts)
        logits = self._feed_pending()
        toks, qs, bad = [], [], torch.zeros(B, dtype=torch.bool, device=logits.device)
        for i in range(k):   # k forwards, no host sync: each draft stays on device
            logits = self._fit(logits.float())
            if sampling.greedy:
                tok, b = checked_argmax(logits)
                bad |= b
            else:
                q, b = checked_probs(logits, sampling)
                bad |= b
                tok = torch.multinomial(q, 1, generator=self.generator).squeeze(1)
                qs.append(q)
            toks.append(tok)
            if i < k - 1:
                logits = st.forward(tok[:, None]).logits[:, -1]
        self._last_tokens = torch.stack(toks, 1)
        self.length.drafted(self._last_tokens)
        return Proposal.chain_of(x.root, self._last_tokens, torch.stack(qs, 1) if qs else None, bad=bad)

    def _feed_pending(self) -> torch.Tensor:
        """Feed the pending entries; returns the logits after each row's last real one (B, V).

        After a run of plain steps the block is long: each row's real entries are moved to its end
        and the block goes in chunks of ``CATCH_UP`` columns (holes on the left), one compiled width
        whatever the run's length, computing only the last column's logits (``last=True``)."""
        st, pending, valid = self.state, self.pending, self.pending_valid
        B, W = pending.shape
        if self._prompt is not None:   # the first proposal: prompt + pending in one (eager) prefill
            ids, mask = self._prompt
            self._prompt = None
            if not self.pending_dense:   # right-align each row's real entries: the last column is real
                cols = torch.arange(W, device=pending.device)[None, :]
                shift = W - valid.long().sum(1, keepdim=True)
                pending, valid = pending.gather(1, (cols - shift).clamp(min=0)), cols >= shift
            ids, mask = torch.cat([ids, pending], 1), torch.cat([mask, valid.bool()], 1)
            dense = bool(mask.all())                   # one sync, once
            logits = st.forward(ids, None if dense else mask, last=True).logits
            self._width = ids.shape[1]                 # columns appended since mark(): prompt + pending
            return logits[:, -1]
        if W <= 2:
            logits = st.forward(pending, None if self.pending_dense else valid).logits
            last = valid.long().sum(1) - 1                             # last real pending entry per row
            return logits.gather(1, last[:, None, None].expand(B, 1, logits.shape[-1])).squeeze(1)
        pad = -W % CATCH_UP
        if not self.pending_dense:   # rows hold a prefix of real entries: right-align them
            cols = torch.arange(W, device=pending.device)[None, :]
            shift = W - valid.long().sum(1, keepdim=True)                               # (B, 1)
            pending, valid = pending.gather(1, (cols - shift).clamp(min=0)), cols >= shift
        ids = torch.cat([pending.new_zeros(B, pad), pending], 1)                          # (B, W + pad)
        ok = torch.cat([valid.new_zeros(B, pad), valid], 1)
        for s in range(0, W + pad, CATCH_UP):
            holes = not self.pending_dense or (s == 0 and pad > 0)
            logits = st.forward(ids[:, s: s + CATCH_UP], ok[:, s: s + CATCH_UP] if holes else None, last=True).logits
        self._width = W + pad
        return logits[:, -1]

    def plain_steps(self, budget: int) -> int:
        return self.length.plain_steps(budget)

    def accept_plain(self, tokens: torch.Tensor, host: list[list[int]], seconds: float) -> None:
        """Plain steps ran: their tokens join the pending block (fed at the next proposal), of which
        only each row's last ``window`` entries are kept (the draft will not read more)."""
        m = tokens.shape[1]
        self.length.plain_done(m, seconds)
        c = self.pending_valid.long().sum(1, keepdim=True) + torch.arange(m, device=tokens.device)[None, :]
        B = len(host)
        self.pending = torch.cat([self.pending, self.pending.new_zeros(B, m)], 1).scatter(1, c, tokens)
        self.pending_valid = torch.cat([self.pending_valid, self.pending_valid.new_zeros(B, m)], 1).scatter(
            1, c, torch.ones_like(c, dtype=torch.bool))
        self._bound_pending()

    def _bound_pending(self) -> None:
        if self.pending.shape[1] > self.window:
            self.pending, self.pending_valid = last_real(self.pending, self.pending_valid, self.window)

    def accept(self, step: Verified) -> None:
        k, W = self._k, self._width
        n, nxt, n_host = step.n_accepted, step.next_tokens, step.n_host
        self.length.update(k, n_host, step.active)
        if k == 0:   # nothing was fed: append the next token to each row's pending entries
            c = self.pending_valid.long().sum(1, keepdim=True)
            self.pending = torch.cat([self.pending, self.pending.new_zeros(len(nxt), 1)], 1).scatter(1, c, nxt[:, None])
            self.pending_valid = torch.cat([self.pending_valid, self.pending_valid.new_zeros(len(nxt), 1)], 1).scatter(
                1, c, torch.ones_like(c, dtype=torch.bool))
            self._bound_pending()
            return                   # a dense pending block stays dense: every row gained one real token
        keep = W + n.clamp(max=k - 1)                                  # pending + accepted drafts the draft has fed
        self.state.rollback(self._start, keep, W + min(max(n_host), k - 1))
        all_in = n == k                                                # x_k accepted but never fed
        if max(n_host) == k:
            self.pending = torch.stack([torch.where(all_in, self._last_tokens[:, -1], nxt), nxt], 1)
            self.pending_valid = torch.stack([torch.ones_like(all_in), all_in], 1)
            self.pending_dense = min(n_host) == k
        else:
            self.pending = nxt[:, None]
            self.pending_valid = torch.ones_like(self.pending, dtype=torch.bool)
            self.pending_dense = True
