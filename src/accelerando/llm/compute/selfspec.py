"""Self-speculation with a shared KV cache: the draft is the target's own kept layers (an early exit,
optionally with a trained ``ExitHead``, or a skip schedule) and reads and writes the *target's*
static KV cache on the lean engine (LayerSkip, Elhoushi et al. 2024, section 4: the draft's early
layers' K/V of accepted tokens are the target's own, so the draft needs no prefill, no cache of
its own and no catch-up forward after a rejection).

Per step: the draft writes its layers' K/V for the root and its first k-1 drafts at the slots
just past the target's length, then restores the target's length; the target's verification
forward writes *every* layer's K/V at those same slots (the same values for an early exit's
layers; a skip schedule's approximate ones are overwritten), so the target only ever attends to
its own K/V and decoding stays lossless. ``fused=True`` (greedy, fixed k, CPU engine): the k draft
steps run as one compiled call (``_draft_chain``), so the per-call fixed cost that dominates a
step of a small model is paid once per step, not k times. Not done here: LayerSkip's reuse of the
draft's early-layer *computation* in verification (the verify forward recomputes every layer;
BENCHMARKS.md (b2) estimates what it would lift the step-cost ceiling to on the zoo target).

Fallback (stated): when the target is not on the lean engine (transformers' cache, an unsupported
architecture) the draft keeps its own cache, exactly like ``DraftModel``.
"""

from __future__ import annotations

import types
import warnings
from typing import Any

import torch
from torch import nn

from accelerando.llm.drafters.base import DraftContext, DraftInput, Proposal, Verified
from accelerando.llm.drafters.draft_model import DraftModel, vocab_size
from accelerando.llm.sampling import checked_argmax, checked_probs
from accelerando.llm.static_cache import StaticKVCache


class SharedKV(StaticKVCache):
    """The target's ``StaticKVCache`` as its kept layers see it: layer j is the target's layer
    ``keep[j]``; its per-row buffers (``valid``, ``lengths``, ...) are the target's own tensors."""

    def __init__(self, cache: StaticKVCache, keep: tuple[int, ...]):
        nn.Module.__init__(self)
        self.target = cache
        self.layers = nn.ModuleList([cache.layers[i] for i in keep])
        for name, buf in cache.named_buffers(recurse=False):     # valid, lengths, pos_shift, ...: the same tensors
            self.register_buffer(name, buf, persistent=False)


def _pick(logits: torch.Tensor, sampling: Any, generator: Any) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(token (B,), processed q (B, V) or None when greedy, non-finite flag (B,))."""
    if sampling.greedy:
        tok, bad = checked_argmax(logits)
        return tok, None, bad
    q, bad = checked_probs(logits, sampling)
    return torch.multinomial(q, 1, generator=generator).squeeze(1), q, bad


def _draft_chain(decoder: Any, tok: torch.Tensor, token_mask: torch.Tensor, cache: StaticKVCache, k: int):
    """k greedy draft steps in one call (one compiled graph per k instead of k calls, each paying
    the call's fixed cost): each step writes the kept layers' K/V at ``cache.lengths`` and advances
    it; returns (drafts (B, k), non-finite flag (B,)). Same tokens as k ``Engine.step`` calls +
    ``checked_argmax`` (ties to the first index, max propagates NaN / inf)."""
    toks = []
    bad = torch.zeros_like(tok, dtype=torch.bool)
    for _ in range(k):
        logits = decoder(tok[:, None], token_mask, cache)[0]
        cache.lengths.add_(1)
        top, tok = logits[:, -1].max(-1)
        bad = bad | ~top.isfinite()
        toks.append(tok)
    return torch.stack(toks, 1), bad


def _chain_fn(compiled: bool):
    """``_draft_chain`` with a code object of its own (compiled graphs are kept per code object and
    the module guards are skipped, as in the engine), compiled like the engine's CPU step."""
    fn = types.FunctionType(_draft_chain.__code__.replace(), _draft_chain.__globals__, "_draft_chain")
    if not compiled:
        return fn
    return torch.compile(fn, fullgraph=True, dynamic=False,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                  "cpp_wrapper": True})


def kept_layers(model: Any) -> tuple[int, ...] | None:
    """The layers a skip view (``layerskip.skip_view``, which marks its views) keeps; None for a
    model that is not one. Read here, not imported from layerskip, which imports this module."""
    return getattr(model, "_accelerando_kept_layers", None)


class SelfDraft(DraftModel):
    """A skip view of the target (``layerskip.skip_view``) drafting on the target's own KV cache."""

    def __init__(self, view: Any, k: int | str = 4, *, k_max: int = 12, fused: bool = False):
        keep = kept_layers(view)
        if keep is None:
            raise ValueError("SelfDraft needs a skip view of the target (accelerando.llm.compute.layerskip.skip_view)")
        super().__init__(view, k=k, k_max=k_max)
        self.keep = keep
        # id(target engine) -> (its cache, the view's engine); kept on the view, so every drafter
        # made from one view (a benchmark makes one per run) reuses the compiled steps
        self._engines: dict[int, tuple[Any, Any]] = view.__dict__.setdefault("_accelerando_self_engines", {})
        self.shared = False
        self._calls = 0
        # fused: greedy drafts of a fixed k in one call per step (``_draft_chain``) on CPU engines
        self.fused = bool(fused) and isinstance(k, int)

    def begin(self, ctx: DraftContext) -> None:
        from accelerando.llm.engine import Engine
        tc = ctx.target_cache
        self.shared = isinstance(tc, Engine) and getattr(self.model, "_accelerando_skip_of", None) is ctx.target
        if not self.shared:
            warnings.warn("self-speculation: the target is not on the lean engine, so the draft keeps its own "
                          "KV cache (no sharing)", stacklevel=2)
            super().begin(ctx)
            return
        self.v_target = vocab_size(ctx.target)
        self.sampling, self.generator = ctx.sampling, ctx.generator
        self.target_engine = tc
        self.engine = self._view_engine(tc)
        self.state = None
        self._chain = None
        if self.fused and self.sampling.greedy and tc.device.type == "cpu":
            key = ("chain", id(self.engine))
            if key not in self._engines:      # one compiled chain per view engine, kept on the view
                self._engines[key] = (None, _chain_fn(tc.compiled))
            self._chain = self._engines[key][1]

    def _view_engine(self, tc: Any) -> Any:
        """The view's engine, its steps compiled once per target cache (a pooled target engine
        keeps its cache, so the steps are reused across decodes); its cache is the target's."""
        from accelerando.llm.engine import Engine
        ent = self._engines.get(id(tc))
        if ent is None or ent[0] is not tc.cache:
            eng = Engine(self.model, batch_size=tc.batch_size, max_len=tc.max_len, compile=tc.compiled, role="self-draft")
            eng.cache = SharedKV(tc.cache, self.keep)     # its own (unused) cache is dropped
            ent = self._engines[id(tc)] = (tc.cache, eng)
        ent[1].decoder.refresh_fused()
        return ent[1]

    @property
    def draft_calls(self) -> int:
        return self._calls if self.shared else super().draft_calls

    def propose(self, x: DraftInput) -> Proposal:
        if not self.shared:
            return super().propose(x)
        tc = self.target_engine
        # the target's pointer is at most its host bound; the drafts must stay inside the buffer
        k = min(self.length.choose(x.budget), max(0, tc.max_len - tc._bound - 1))
        self._k = k
        B = x.root.shape[0]
        if k == 0:
            drafts = x.root.new_zeros(B, 0)
            self.length.drafted(drafts)
            return Proposal.chain_of(x.root, drafts)
        kv = self.engine.cache
        lengths0 = kv.lengths.clone()
        if self._chain is not None:
            eng = self.engine
            with torch.no_grad():
                drafts, bad = self._chain(eng.decoder, x.root, eng._all_valid((B, 1)), kv, k)
            kv.lengths.copy_(lengths0)
            self._calls += k
            self.length.drafted(drafts)
            return Proposal.chain_of(x.root, drafts, None, bad=bad)
        tok, toks, qs = x.root, [], []
        bad = torch.zeros(B, dtype=torch.bool, device=x.root.device)
        for _ in range(k):   # k forwards on the target's cache, no host sync
            logits = self._fit(self.engine.step(tok[:, None]).logits[:, -1].float())
            tok, q, b = _pick(logits, self.sampling, self.generator)
            bad |= b
            toks.append(tok)
            if q is not None:
                qs.append(q)
        kv.lengths.copy_(lengths0)     # the target verifies from its own length (and rewrites these slots)
        self._calls += k
        drafts = torch.stack(toks, 1)
        self.length.drafted(drafts)
        return Proposal.chain_of(x.root, drafts, torch.stack(qs, 1) if qs else None, bad=bad)

    def accept_plain(self, tokens: torch.Tensor, host: list[list[int]], seconds: float) -> None:
        """Plain steps ran on the target, so their K/V are already in the shared cache."""
        if not self.shared:
            super().accept_plain(tokens, host, seconds)
            return
        self.length.plain_done(tokens.shape[1], seconds)

    def accept(self, step: Verified) -> None:
        if not self.shared:
            super().accept(step)
            return
        self.length.update(self._k, step.n_host, step.active)    # nothing to roll back: the cache is the target's
