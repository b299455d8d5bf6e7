"""Lossless speculative decoding for any transformers causal LM (Leviathan et al. 2023; Chen et al. 2023).

The loop, in named steps (one screen each):
  prefill   target reads the prompt once; the first token comes from its last logits
  draft     the drafter proposes k tokens per row (``drafters.DraftModel`` / ``PromptLookup``)
  verify    the target scores ``[last, x_1..x_k]`` in one forward over its kept KV cache (k+1
            positions), and the acceptance rule (``verify.py``) keeps n_b drafts + 1 token per row
  rollback  target and drafter keep exactly the accepted positions (per-row holes, see cache.py)
Greedy output equals ``target.generate(do_sample=False)`` token for token; sampled output has the
target's distribution (after the same temperature / top-k / top-p, ``sampling.py``).

Host syncs: one per step (the accepted counts, next tokens and non-finite flags, read together
for control flow: EOS, budgets, crop lengths); the adaptive controller adds one on GPU to time the
draft (see ``_timed``). Nothing else calls ``.item()`` in the loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from accelerando.llm.cache import HFCache, check_supports_cache, max_positions
from accelerando.llm.drafters.base import Proposal, StepResult
from accelerando.llm.drafters.draft_model import DraftModel
from accelerando.llm.drafters.prompt_lookup import PromptLookup
from accelerando.llm.engine import spec_cache_factory
from accelerando.llm.sampling import NonFiniteLogitsError, SamplingConfig, bad_rows, checked_probs, non_finite_message
from accelerando.llm.verify import greedy_accept, speculative_accept


# ------------------------------------------------------------------------------------------------
# draft length controllers
# ------------------------------------------------------------------------------------------------
def expected_tokens(alpha: float, k: int) -> float:
    """Expected tokens per verification with k drafts and per-token acceptance alpha:
    (1 - alpha^(k+1)) / (1 - alpha)  (Leviathan et al., eq. 1)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_k(alpha: float, cost_ratio: float, k_max: int, k_min: int = 0) -> int:
    """argmax_k expected_tokens(alpha, k) / (1 + k c): tokens per unit of time when a draft
    token costs c target forwards (c = draft time per token / target verification time)."""
    return max(range(k_min, k_max + 1), key=lambda k: (expected_tokens(alpha, k) / (1.0 + k * cost_ratio), -k))


class FixedK:
    def __init__(self, k: int):
        self.k = k

    def choose(self) -> int:
        return self.k

    def update(self, k: int, n_host: list[int], t_draft: float, t_target: float) -> None:
        pass


class HeuristicK:
    """transformers' ``num_assistant_tokens_schedule="heuristic"``: +2 if all drafts accepted, else -1."""

    def __init__(self, k0: int = 5, k_max: int = 32):
        self.k, self.k_max = k0, k_max

    def choose(self) -> int:
        return self.k

    def update(self, k: int, n_host: list[int], t_draft: float, t_target: float) -> None:
        if k == 0:
            return
        self.k = min(self.k_max, self.k + 2) if min(n_host) == k else max(1, self.k - 1)


class AdaptiveK:
    """Cost-aware draft length: k = argmax (1 - a^(k+1)) / (1 - a) / (1 + k c), k in [0, k_max].

    alpha: running (exponentially weighted) estimate of per-token acceptance from the truncated
    geometric counts -- a step that accepted n of k drafts is n successes and (n < k) failures.
    c: running estimate of (draft time per drafted token) / (target verification time), measured
    with the wall clock. ``cost_ratio`` fixes c instead (e.g. 0 for prompt lookup).
    k = 0 (plain decoding) wins when drafting does not pay; every ``probe_every``-th such step
    drafts one token anyway so alpha and c keep being measured.
    """

    def __init__(self, k_max: int = 12, *, k_min: int = 0, alpha0: float = 0.6, decay: float = 0.9,
                 cost_ratio: float | None = None, c0: float = 0.2, probe_every: int = 8):
        if not 0 <= k_min <= k_max or k_max < 1:
            raise ValueError(f"need 0 <= k_min <= k_max and k_max >= 1, got {k_min}, {k_max}")
        self.k_max, self.k_min, self.decay, self.fixed_c = k_max, k_min, decay, cost_ratio
        self.succ, self.fail = 4.0 * alpha0, 4.0 * (1 - alpha0)     # a weak prior worth 4 drafts
        self.c = c0 if cost_ratio is None else cost_ratio
        self.probe_every, self._idle = probe_every, 0
        self.history: list[int] = []

    @property
    def alpha(self) -> float:
        return self.succ / max(1e-9, self.succ + self.fail)

    def choose(self) -> int:
        k = best_k(min(self.alpha, 0.999), self.c, self.k_max, self.k_min)
        if k == 0:
            self._idle += 1
            if self._idle >= self.probe_every:
                k, self._idle = 1, 0
        self.history.append(k)
        return k

    def update(self, k: int, n_host: list[int], t_draft: float, t_target: float) -> None:
        if k == 0:
            return
        s = float(sum(n_host))
        f = float(sum(1 for n in n_host if n < k))
        self.succ = self.decay * self.succ + s
        self.fail = self.decay * self.fail + f
        if self.fixed_c is None and t_target > 0:
            c = (t_draft / k) / t_target
            self.c = 0.7 * self.c + 0.3 * c


def make_controller(k: int | str, k_max: int, cost_ratio: float | None = None):
    if k == "adaptive":
        return AdaptiveK(k_max, cost_ratio=cost_ratio)
    if k == "heuristic":
        return HeuristicK(min(5, k_max), k_max)
    return FixedK(int(k))


# ------------------------------------------------------------------------------------------------
# output and stats
# ------------------------------------------------------------------------------------------------
@dataclass
class SpeculativeOutput:
    sequences: torch.Tensor                       # (B, prompt + generated), like generate's output
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Stats:
    target_calls: int = 0
    steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    new_tokens: int = 0
    row_calls: int = 0            # (row, target call) pairs for rows still generating
    accept_hist: dict[int, int] = field(default_factory=dict)
    k_used: list[int] = field(default_factory=list)

    def as_dict(self, batch: int, draft_calls: int, wall: float) -> dict[str, Any]:
        return dict(target_calls=self.target_calls, draft_calls=draft_calls, steps=self.steps,
                    drafted_tokens=self.drafted_tokens, accepted_tokens=self.accepted_tokens,
                    acceptance_rate=self.accepted_tokens / max(1, self.drafted_tokens),
                    acceptance_histogram=dict(sorted(self.accept_hist.items())),
                    new_tokens=self.new_tokens,
                    tokens_per_target_call=self.new_tokens / max(1, self.row_calls),
                    mean_k=sum(self.k_used) / max(1, len(self.k_used)), wall_time_s=wall)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def as_drafter(draft: Any) -> Any:
    """A drafter object as is; a bare model means ``DraftModel(model)`` with defaults."""
    if draft is None:
        raise ValueError("draft= is required: a DraftModel(...), a PromptLookup(...) or a causal LM")
    if hasattr(draft, "propose") and hasattr(draft, "accept"):
        return draft
    if hasattr(draft, "config") and callable(draft):
        return DraftModel(draft)
    raise TypeError(f"draft must be a drafter (DraftModel, PromptLookup) or a causal LM, got {type(draft).__name__}")


def _eos_set(target: Any, eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def _validate(target: Any, drafter: Any, input_ids: torch.Tensor, max_new_tokens: int, k_cap: int) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a LongTensor of shape (batch, prompt_len), got {tuple(input_ids.shape)} "
                         f"{input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty; give at least one token (e.g. BOS)")
    check_supports_cache(target, "target")
    need = input_ids.shape[1] + max_new_tokens
    models = [("target", target)] + ([("draft model", drafter.model)] if isinstance(drafter, DraftModel) else [])
    for role, m in models:
        ctx = max_positions(m)
        if ctx is not None and need > ctx:
            raise ValueError(f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {need} "
                             f"exceeds the {role}'s context of {ctx} positions")


# ------------------------------------------------------------------------------------------------
# the loop, in named steps
# ------------------------------------------------------------------------------------------------
def _sync_if_cuda(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def prefill(tgt: HFCache, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Target reads the prompt; returns (first token (B,), bad (B,))."""
    padded = not bool(attention_mask.all())     # one sync, once: a dense prompt needs no attention mask
    last = tgt.forward(input_ids, attention_mask.bool() if padded else None)[:, -1]
    p, bad = checked_probs(last, sampling)
    tok = last.argmax(-1) if sampling.greedy else torch.multinomial(p, 1, generator=generator).squeeze(1)
    return tok, bad


def verify(tgt: HFCache, last: torch.Tensor, prop: Proposal, sampling: SamplingConfig,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One target forward over [last, x_1..x_k] (k+1 positions); returns (n_accepted, next, bad)."""
    logits = tgt.forward(torch.cat([last[:, None], prop.tokens], 1))            # (B, k+1, V)
    if sampling.greedy:
        bad = bad_rows(logits).any(-1)
        n, nxt = greedy_accept(prop.tokens, logits.argmax(-1), prop.n_valid)
    else:
        p, bad = checked_probs(logits, sampling)
        bad = bad.any(-1)
        n, nxt = speculative_accept(prop.tokens, p, prop.q, generator, prop.n_valid)
    if prop.bad is not None:
        bad = bad | prop.bad
    return n, nxt, bad


def _finish(rows: list[list[int]], max_new: int, eos: list[int]) -> list[list[int]]:
    out = []
    for r in rows:
        r = r[:max_new]
        for i, t in enumerate(r):
            if t in eos:
                r = r[: i + 1]
                break
        out.append(r)
    return out


@torch.no_grad()
def speculative_generate(target: Any, input_ids: torch.Tensor, *, draft: Any, max_new_tokens: int = 128,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         attention_mask: torch.Tensor | None = None, eos_token_id: int | list[int] | None = None,
                         pad_token_id: int | None = None, seed: int | None = None,
                         generator: torch.Generator | None = None, tokenizer: Any = None,
                         cost_ratio: float | None = None, engine: str = "hf") -> SpeculativeOutput:
    """Generate with ``target`` using ``draft`` proposals; lossless (see the module docstring).

    ``draft``: ``DraftModel(model, k=4 | "adaptive" | "heuristic")``, ``PromptLookup(...)`` or a
    bare causal LM (= ``DraftModel(model)``); tree drafters (``Medusa`` heads, ``DraftTree``) run
    the tree loop of ``tree_speculative.py``. ``eos_token_id`` / ``pad_token_id`` default to the
    target's generation config, as in ``generate``. ``seed`` / ``generator``: randomness for
    sampling (a generator on the target's device). ``tokenizer``: the target's, to compare with a
    ``DraftModel(..., tokenizer=...)``. ``cost_ratio``: fix c for ``k="adaptive"``.
    ``engine``: where the target's and a draft model's KV caches live -- ``"hf"`` (transformers'
    DynamicCache, any causal LM), ``"static"`` (the lean engine: static cache, compiled steps;
    Llama-family models, others fall back to "hf" with a notice) or ``"static-eager"``.
    """
    if getattr(draft, "is_tree_drafter", False):   # Medusa heads / DraftTree: the tree loop (tree_speculative.py)
        from accelerando.llm.tree_speculative import speculative_tree_generate
        return speculative_tree_generate(target, input_ids, drafter=draft, max_new_tokens=max_new_tokens,
                                         temperature=temperature, top_k=top_k, top_p=top_p,
                                         attention_mask=attention_mask, eos_token_id=eos_token_id,
                                         pad_token_id=pad_token_id, seed=seed, generator=generator)
    t0 = time.perf_counter()
    sampling = SamplingConfig(temperature, top_k, top_p)
    drafter = as_drafter(draft)
    k_spec = drafter.k
    k_cap = drafter.k_max if isinstance(k_spec, str) else k_spec
    _validate(target, drafter, input_ids, max_new_tokens, k_cap)
    drafter.check_compatible(target, tokenizer)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if max_new_tokens == 0:
        return SpeculativeOutput(input_ids.clone(), _Stats().as_dict(input_ids.shape[0], 0, time.perf_counter() - t0))
    dev = input_ids.device
    if generator is None and not sampling.greedy:
        generator = torch.Generator(device=dev)
        generator.manual_seed(seed if seed is not None else int(torch.empty((), dtype=torch.int64).random_()))
    eos = _eos_set(target, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(target, "generation_config", None), "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    if isinstance(drafter, PromptLookup) and k_spec == "adaptive" and cost_ratio is None:
        cost_ratio = 0.0            # no model: drafting costs ~nothing next to a target forward
    ctrl = make_controller(k_spec, k_cap, cost_ratio)
    B = input_ids.shape[0]
    st = _Stats()

    # -- prefill ----------------------------------------------------------------------------------
    make_cache = spec_cache_factory(engine, batch_size=B, max_len=input_ids.shape[1] + max_new_tokens + k_cap + 2,
                                    max_step=k_cap + 2)
    tgt = make_cache(target, role="target")
    if hasattr(drafter, "make_cache"):       # drafters with a model cache build it the same way
        drafter.make_cache = make_cache
    last, bad = prefill(tgt, input_ids, attention_mask, sampling, generator)
    st.target_calls += 1
    packed = torch.cat([last[:, None], bad[:, None].long()], 1).tolist()   # sync: first tokens for control flow
    if any(r[1] for r in packed):
        raise NonFiniteLogitsError(non_finite_message("target", sum(r[1] for r in packed)))
    rows = [[r[0]] for r in packed]
    done = [r[0] in eos or max_new_tokens <= 1 for r in rows]
    st.row_calls += B
    drafter.begin(input_ids, attention_mask, last, [r[0] for r in packed])

    while not all(done):
        remaining = max(max_new_tokens - len(r) for r, d in zip(rows, done) if not d)
        k = max(0, min(ctrl.choose(), remaining - 1))    # drafts past every row's budget are wasted
        start = tgt.mark()
        # -- draft --------------------------------------------------------------------------------
        td = time.perf_counter()
        prop = drafter.propose(k, sampling, generator)
        if isinstance(ctrl, AdaptiveK) and ctrl.fixed_c is None:
            _sync_if_cuda(prop.tokens)   # unavoidable for a measured c on GPU: time the draft alone
        tv = time.perf_counter()
        k = prop.tokens.shape[1]         # a drafter may propose fewer (prompt lookup without a match)
        # -- verify -------------------------------------------------------------------------------
        n, nxt, bad = verify(tgt, last, prop, sampling, generator)
        st.target_calls += 1
        # the one sync per step: accepted counts, drafts and next tokens drive EOS / budgets / crops
        nval = prop.n_valid if prop.n_valid is not None else torch.full_like(n, k)
        host = torch.cat([n[:, None], nxt[:, None], bad[:, None].long(), nval[:, None], prop.tokens], 1).tolist()
        te = time.perf_counter()
        if any(h[2] for h in host):
            raise NonFiniteLogitsError(non_finite_message("target or draft model", sum(h[2] for h in host)))
        n_host = [h[0] for h in host]
        new = [h[4: 4 + h[0]] + [h[1]] for h in host]
        # -- rollback -----------------------------------------------------------------------------
        tgt.rollback(start, n + 1, max(n_host) + 1)
        step = StepResult(k=k, n_accepted=n, next_tokens=nxt, n_host=n_host, new_tokens=new)
        drafter.accept(step)
        ctrl.update(k, [h for h, d in zip(n_host, done) if not d] or n_host, tv - td, te - tv)
        last = nxt
        # -- bookkeeping (host lists only) -------------------------------------------------------
        st.steps += 1
        st.k_used.append(k)
        for b in range(B):
            if done[b]:
                continue
            st.row_calls += 1
            st.drafted_tokens += host[b][3]
            st.accepted_tokens += n_host[b]
            st.accept_hist[n_host[b]] = st.accept_hist.get(n_host[b], 0) + 1
            rows[b].extend(new[b])
            if len(rows[b]) >= max_new_tokens or any(t in eos for t in new[b]):
                done[b] = True

    rows = _finish(rows, max_new_tokens, eos)
    width = max(len(r) for r in rows)
    gen = torch.full((B, width), pad_token_id, dtype=input_ids.dtype)
    for b, r in enumerate(rows):
        gen[b, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
    st.new_tokens = sum(len(r) for r in rows)
    seqs = torch.cat([input_ids, gen.to(dev)], 1)
    return SpeculativeOutput(seqs, st.as_dict(B, getattr(drafter, "calls", 0), time.perf_counter() - t0))
