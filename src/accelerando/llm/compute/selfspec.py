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
step of a small model is paid once per step, not k times.

``reuse_generate`` (greedy, early exit, lean engine) goes further, as LayerSkip's self-speculation
does (its section 4.2, "exit query cache"): the draft's layers 0..E-1 of the root and of every
draft *are* the target's, so verification runs only layers E..L-1 on the draft's saved layer-E
states, and a whole round -- draft chain, verification, the greedy verdict and the cache pointer
update -- is one compiled call (``_reuse_round``) with one host read per round.

Fallback (stated): when the target is not on the lean engine (transformers' cache, an unsupported
architecture) the draft keeps its own cache, exactly like ``DraftModel``.
"""

from __future__ import annotations

import types
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from accelerando.llm.cache import check_attention_mask
from accelerando.llm.drafters.base import DraftContext, DraftInput, Proposal, Verified
from accelerando.llm.drafters.draft_model import DraftModel, vocab_size
from accelerando.llm.sampling import bad_rows, checked_argmax, checked_probs, process_logits
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
    model that is not one (the mark is read here: selfspec depends on layerskip only for building views)."""
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


# ------------------------------------------------------------------------------------------------
# LayerSkip reuse: one compiled call per round (greedy, early exit, lean engine)
# ------------------------------------------------------------------------------------------------
def self_speculative_draft(target: Any, cfg: Any, *, k: int | str = 4, k_max: int = 12,
                           exit_head: nn.Module | None = None, shared_cache: bool = True, fused: bool = False) -> Any:
    """A drafter for ``speculative_generate(target, ..., draft=...)`` whose draft model is the
    target's own skip view (lossless: the target verifies every token). ``shared_cache``: on the
    lean engine the draft reads and writes the target's KV cache (``selfspec.SelfDraft``); else
    (or on transformers' cache) it keeps its own. ``fused``: greedy, fixed k, on a CPU engine, the
    k draft steps run as one (compiled) call. ``cfg``: a ``layerskip.SkipConfig``."""
    from accelerando.llm.compute.layerskip import skip_view
    view = skip_view(target, cfg, exit_head=exit_head)
    return SelfDraft(view, k=k, k_max=k_max, fused=fused) if shared_cache else DraftModel(view, k=k, k_max=k_max)


def _inverse_cdf(q: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """A sample of each row of ``q`` (..., V) (unnormalised, >= 0) from uniforms ``u`` (...,) in
    [0, 1): the first index whose running sum reaches (1 - u) x total (a token of mass > 0)."""
    c = q.cumsum(-1)
    return (c < (1 - u)[..., None] * c[..., -1:]).sum(-1).clamp(max=q.shape[-1] - 1)


def _draft_early(decoder: Any, head: Any, root: torch.Tensor, one: torch.Tensor, cache: StaticKVCache, k: int, E: int,
                 u: torch.Tensor | None = None, warp: tuple = ()):
    """LayerSkip's draft (Elhoushi et al. 2024, section 4.2) on the target's ``LeanDecoder``: layers
    0..E-1 on the root x_0 and on each draft d_1..d_k, the exit (``head`` -- an ``ExitHead`` or
    None --, the final norm, the LM head) drafting the next token: greedy, or with ``u`` (B, k)
    uniforms sampled from q = the exit's distribution processed by ``warp`` (temperature, top_k,
    top_p: ``sampling.process_logits``, as the target's); the target's own K/V of those layers are
    written at slots ``lengths + j`` (``lengths`` is restored). d_k's early layers run too: the
    verification needs its layer-E state. Returns (block [x_0, d_1..d_k] (B, k+1), layer-E states
    (B, k+1, hidden), q (B, k, V) or None when greedy)."""
    toks, hs, qs = [root], [], []
    tok = root
    for j in range(k + 1):
        x = tok[:, None]
        h = decoder.run_layers(decoder.embed(x), 0, E, decoder.prepare(x, one, cache), cache)
        hs.append(h)
        cache.lengths.add_(1)
        if j < k:   # a non-finite exit only spoils a draft; the target's check decides (``_verify_late``)
            logits = decoder.norm(h if head is None else head(h))[:, -1] @ decoder.lm_head_t
            if u is None:
                tok = logits.argmax(-1)
            else:
                q = process_logits(logits, temperature=warp[0], top_k=warp[1], top_p=warp[2]).softmax(-1)
                q = torch.nan_to_num(q)
                tok = _inverse_cdf(q, u[:, j])
                qs.append(q)
            toks.append(tok)
    cache.lengths.sub_(k + 1)
    return torch.stack(toks, 1), torch.cat(hs, 1), (torch.stack(qs, 1) if qs else None)


def _verify_late(decoder: Any, block: torch.Tensor, hs: torch.Tensor, block_mask: torch.Tensor,
                 cache: StaticKVCache, E: int, q: torch.Tensor | None = None, u: torch.Tensor | None = None,
                 warp: tuple = ()):
    """LayerSkip's verification: layers E..L-1 on the block's saved layer-E states (one pass,
    T = k + 1; no early layer recomputed), then the verdict on device. Greedy: n = leading drafts
    equal to the target's argmax, next = the target's argmax after them. Sampling (``q`` the
    draft's distributions, ``u`` (B, k + 1) uniforms): the chain rule of speculative sampling
    (Leviathan et al. 2023) -- accept d_j+1 while u_j q_j(d) < p_j(d); next ~ norm(max(0, p_n - q_n))
    (q_k = 0: after k accepted drafts, p_k itself). ``cache.lengths`` advances by n + 1 (the
    rejected slots lie beyond it, never read). Returns (n (B,), next (B,), non-finite flag (B,):
    the target's logits at a position up to the verdict)."""
    h = decoder.run_layers(hs, E, len(decoder.layers), decoder.prepare(block, block_mask, cache), cache)
    logits = decoder.norm(h) @ decoder.lm_head_t                                          # (B, k+1, V)
    if q is None:
        top, arg = logits.max(-1)
        n = (block[:, 1:] == arg[:, :-1]).long().cumprod(1).sum(1)                        # accepted drafts
        nxt = arg.gather(1, n[:, None]).squeeze(1)
        bad = ~top.isfinite()
    else:
        B, T, V = logits.shape
        p = process_logits(logits, temperature=warp[0], top_k=warp[1], top_p=warp[2]).softmax(-1)
        d = block[:, 1:, None]
        ok = u[:, :-1] * q.gather(2, d)[..., 0] < p[:, :-1].gather(2, d)[..., 0]          # (B, k)
        n = ok.long().cumprod(1).sum(1)
        qz = torch.cat([q, q.new_zeros(B, 1, V)], 1)                                       # q_k = 0
        at = n[:, None, None].expand(B, 1, V)
        pn = p.gather(1, at)[:, 0]
        res = (pn - qz.gather(1, at)[:, 0]).clamp(min=0)
        # a residual that is all zeros numerically (p_n == q_n) falls back to p_n (vLLM's NaN bug)
        res = torch.where(res.sum(-1, keepdim=True) > 0, res, pn)
        nxt = _inverse_cdf(res, u[:, -1])
        bad = bad_rows(logits)
    upto = torch.arange(block.shape[1], device=block.device)[None, :] <= n[:, None]
    cache.lengths.add_(n + 1)
    return n, nxt, (bad & upto).any(1)


def _reuse_round(decoder: Any, head: Any, root: torch.Tensor, one: torch.Tensor, block_mask: torch.Tensor,
                 cache: StaticKVCache, k: int, E: int, u: torch.Tensor | None = None, warp: tuple = ()):
    """One round of self-speculation with reuse, as one call: ``_draft_early`` then ``_verify_late``
    (``u`` (B, 2k + 1) uniforms when sampling: k for the drafts, k + 1 for the verdict).
    Returns (block (B, k+1), n (B,), next (B,), non-finite flag (B,))."""
    block, hs, q = _draft_early(decoder, head, root, one, cache, k, E, None if u is None else u[:, :k], warp)
    return (block, *_verify_late(decoder, block, hs, block_mask, cache, E, q, None if u is None else u[:, k:], warp))


_ROUNDS: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def _round_fn(decoder: Any, head: Any, k: int, E: int, compiled: bool, step: Any = None, sampled: bool = False):
    """``step`` (default ``_reuse_round``; the benchmark times its parts alone) with a code object
    of its own per (decoder, head, k, E) (compiled graphs are kept per code object and the module
    guards are skipped, as in the engine), compiled like the engine's CPU step (on CUDA without
    graphs: the round mutates the cache pointer itself)."""
    step = _reuse_round if step is None else step
    per = _ROUNDS.setdefault(decoder, {})
    key = (step.__name__, id(head), k, E, compiled, sampled)
    if key not in per:
        fn = types.FunctionType(step.__code__.replace(), step.__globals__, step.__name__, step.__defaults__)
        if compiled:
            opts = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
            if next(decoder.parameters()).device.type == "cpu":
                opts["cpp_wrapper"] = True
            fn = torch.compile(fn, fullgraph=True, dynamic=False, options=opts)
        per[key] = (head, fn)        # the head is held, so its id stays unique while the entry lives
    return per[key][1]


@torch.no_grad()
def reuse_generate(target: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                   exit_layer: int, exit_head: nn.Module | None = None, k: int = 1, max_new_tokens: int,
                   eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   generator: torch.Generator | None = None, seed: int | None = None,
                   compile: bool = True, stats: dict | None = None) -> torch.Tensor:
    """Greedy self-speculative decoding with LayerSkip's reuse: the target's first ``exit_layer``
    layers (+ ``exit_head``) draft ``k`` tokens, layers ``exit_layer``.. verify them from the
    draft's states, one compiled call and one host read per round (``_reuse_round``). Greedy
    (``temperature=0``): the same tokens as ``generate(do_sample=False)``; sampling (temperature,
    top-k, top-p as ``sampling.py``; ``generator`` / ``seed``): the target's distribution, by the
    chain rule of speculative sampling. Any batch size (left-padded ``attention_mask``); returns
    (B, P + n) like ``engine.generate``. A model the lean engine cannot run falls back to
    ``speculative_generate`` with the same early-exit draft (stated)."""
    from accelerando.llm.sampling import SamplingConfig
    from accelerando.llm import engine as E_
    from accelerando.llm.sampling import NonFiniteLogitsError, non_finite_message
    n_layers = target.config.num_hidden_layers
    if not isinstance(exit_layer, int) or not 1 <= exit_layer < n_layers:
        raise ValueError(f"exit_layer must be an int in 1..{n_layers - 1} (the draft's last layer), got {exit_layer!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k (drafts per round) must be an int >= 1, got {k!r}")
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens must be positive")
    if exit_head is not None and getattr(exit_head, "exit_layer", exit_layer) != exit_layer:
        raise ValueError(f"this exit head was trained for exit_layer {exit_head.exit_layer}, not {exit_layer}")
    attention_mask = check_attention_mask(input_ids, attention_mask)
    sampling = SamplingConfig(temperature, top_k, top_p)
    if generator is None and not sampling.greedy:
        generator = torch.Generator(device=input_ids.device)
        generator.manual_seed(seed if seed is not None else int(torch.empty((), dtype=torch.int64).random_()))
    gen_cfg = getattr(target, "generation_config", None)
    eos = E_._as_id_list(eos_token_id if eos_token_id is not None else getattr(gen_cfg, "eos_token_id", None)) or []
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
    pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    reason = E_.unsupported_reason(target)
    if reason is not None:
        from accelerando.llm.compute.layerskip import SkipConfig
        from accelerando.llm.speculative import speculative_generate
        warnings.warn(f"reuse_generate: the lean engine cannot run this model ({reason}); falling back to "
                      "speculative_generate with the same early-exit draft (no reuse)", stacklevel=2)
        draft = self_speculative_draft(target, SkipConfig(exit_layer=exit_layer), k=k, exit_head=exit_head,
                                       shared_cache=False)
        out = speculative_generate(target, input_ids, draft=draft, attention_mask=attention_mask,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad_token_id,
                                   temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if stats is not None:
            stats.update(out.stats)
        return out.sequences
    B, P = input_ids.shape
    eng = E_.Engine.open(target, batch_size=B, max_len=P + max_new_tokens + k + 1, compile=compile, role="target")
    first, q, bad = _pick(eng.prefill(input_ids, attention_mask).logits[:, -1], sampling, generator)
    host = torch.cat([first[:, None], bad[:, None].long()], 1).tolist()          # sync: the first tokens, once
    if any(r[1] for r in host):
        raise NonFiniteLogitsError(non_finite_message("target", sum(r[1] for r in host)))
    rows = [[r[0]] for r in host]
    done = [r[0] in eos or max_new_tokens <= 1 for r in rows]
    warp = (sampling.temperature, sampling.top_k, sampling.top_p)
    fn = _round_fn(eng.decoder, exit_head, k, exit_layer, compile, sampled=not sampling.greedy)
    one, block_mask = eng._all_valid((B, 1)), eng._all_valid((B, k + 1))
    cache, top = eng.cache, eng.max_len - (k + 1)
    lengths = [P] * B                 # host copy of every row's pointer (from the verdicts: no extra sync)
    rounds = drafted = accepted = 0
    root = first
    while not all(done):
        if max(lengths) > top:        # only finished rows get here: pull them back to stay in bounds
            cache.lengths.clamp_(max=top)
            lengths = [min(n, top) for n in lengths]
        if sampling.greedy:
            block, n, root, bad = fn(eng.decoder, exit_head, root, one, block_mask, cache, k, exit_layer)
        else:     # the round's randomness, drawn here: the compiled call stays a pure function of it
            u = torch.rand(B, 2 * k + 1, generator=generator, device=root.device)
            block, n, root, bad = fn(eng.decoder, exit_head, root, one, block_mask, cache, k, exit_layer, u, warp)
        res = torch.cat([block, n[:, None], root[:, None], bad[:, None].long()], 1).tolist()   # the round's one sync
        rounds += 1
        for b, r in enumerate(res):
            lengths[b] += r[k + 1] + 1
            if done[b]:
                continue
            if r[k + 3]:
                raise NonFiniteLogitsError(non_finite_message("target", 1))
            rows[b] += r[1: 1 + r[k + 1]] + [r[k + 2]]
            drafted, accepted = drafted + k, accepted + r[k + 1]
            done[b] = len(rows[b]) >= max_new_tokens or any(t in eos for t in rows[b][-(r[k + 1] + 1):])
    from accelerando.llm.speculative import _trim
    rows = [_trim(r, max_new_tokens, eos) for r in rows]
    out = torch.full((B, max(len(r) for r in rows)), pad_token_id, dtype=input_ids.dtype)
    for b, r in enumerate(rows):
        out[b, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
    if stats is not None:
        stats.update(target_calls=rounds + 1, steps=rounds, drafted_tokens=drafted, accepted_tokens=accepted,
                     acceptance_rate=accepted / max(1, drafted), new_tokens=sum(len(r) for r in rows),
                     compiled_rounds=len(_ROUNDS.get(eng.decoder, {})))
    return torch.cat([input_ids, out.to(input_ids.device)], 1)
