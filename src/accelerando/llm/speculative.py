"""Lossless speculative decoding for any transformers causal LM (Leviathan et al. 2023; Chen et al. 2023),
with chains and token trees (Medusa, SpecInfer, Recursive Speculative Decoding) on one loop.

The loop (``_decode``), in named steps:
  prefill   target reads the prompt once; the first token comes from its last logits
  propose   the drafter proposes ``Candidates``: a token tree per row whose root is the last
            emitted token. A chain drafter's k drafts (``DraftModel`` / ``PromptLookup``) are the
            one-path tree ``TokenTree.chain(k)``; tree drafters (``Medusa``, ``DraftTree``, see
            ``tree_speculative.py``) give any tree
  verify    the target scores every node in one forward over its kept KV cache (a chain needs only
            the causal mask, a tree a tree mask), and one acceptance rule (``tree_verify.py``)
            picks the accepted path + 1 token per row
  keep      target and drafter keep exactly the accepted path (per-row holes, see cache.py; a
            tree's path is gathered into place first)
Chains and trees differ only in the proposal adapter (``ChainDrafting`` / ``TreeDrafting``).
Greedy output equals ``target.generate(do_sample=False)`` token for token; sampled output has the
target's distribution (after the same temperature / top-k / top-p, ``sampling.py``).

Host syncs: one per step (the accepted node, next token, non-finite flag and node tokens, read
together for control flow: EOS, budgets, crop lengths); the adaptive controller adds one on GPU to
time the draft. Nothing else calls ``.item()`` in the loop (tree drafters read their own picks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from accelerando.llm.cache import check_supports_cache, max_positions
from accelerando.llm.drafters.base import StepResult
from accelerando.llm.drafters.draft_model import DraftModel
from accelerando.llm.drafters.prompt_lookup import PromptLookup
from accelerando.llm.engine import VERDICT_COLUMNS, spec_cache_factory
from accelerando.llm.sampling import NonFiniteLogitsError, SamplingConfig, checked_argmax, checked_probs, non_finite_message
from accelerando.llm.tree import TokenTree
from accelerando.llm.tree_verify import greedy_accept_tree, rejection_accept_tree, typical_accept_tree


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
    draft_calls: int = 0
    steps: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    new_tokens: int = 0
    nodes_verified: int = 0       # tree nodes scored by the target (a chain of k drafts: k + 1)
    row_calls: int = 0            # (row, target call) pairs for rows still generating
    accept_hist: dict[int, int] = field(default_factory=dict)
    k_used: list[int] = field(default_factory=list)
    accepted_per_row: list[int] = field(default_factory=list)      # per row of the batch, in order
    calls_per_row: list[int] = field(default_factory=list)         # target calls while the row generated

    def as_dict(self, wall: float) -> dict[str, Any]:
        return dict(target_calls=self.target_calls, draft_calls=self.draft_calls, steps=self.steps,
                    drafted_tokens=self.drafted_tokens, accepted_tokens=self.accepted_tokens,
                    acceptance_rate=self.accepted_tokens / max(1, self.drafted_tokens),
                    acceptance_histogram=dict(sorted(self.accept_hist.items())),
                    new_tokens=self.new_tokens, nodes_verified=self.nodes_verified,
                    tokens_per_target_call=self.new_tokens / max(1, self.row_calls),
                    mean_k=sum(self.k_used) / max(1, len(self.k_used)), wall_time_s=wall,
                    accepted_per_row=list(self.accepted_per_row), target_calls_per_row=list(self.calls_per_row))


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------
def as_drafter(draft: Any) -> Any:
    """A drafter object as is; a bare model means ``DraftModel(model)`` with defaults."""
    if draft is None:
        raise ValueError("draft= is required: a DraftModel(...), a PromptLookup(...), Medusa heads, a DraftTree(...) "
                         "or a causal LM")
    if hasattr(draft, "propose") and hasattr(draft, "accept"):
        return draft
    if hasattr(draft, "config") and callable(draft):
        return DraftModel(draft)
    raise TypeError(f"draft must be a drafter (DraftModel, PromptLookup, Medusa, DraftTree) or a causal LM, "
                    f"got {type(draft).__name__}")


def _eos_set(target: Any, eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        eos_token_id = getattr(getattr(target, "generation_config", None), "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]


def _validate(target: Any, drafter: Any, input_ids: torch.Tensor, max_new_tokens: int) -> None:
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
# proposals: every drafter's output as a token tree per row
# ------------------------------------------------------------------------------------------------
@dataclass
class Candidates:
    """One step's drafts in the verifier's form (B rows, N nodes, one tree shape for the batch).

    tokens (B, N): node tokens, node 0 = the root, the last emitted token (in no cache yet).
    q (B, N, V) | None: the draft distribution each node's children were drawn from (None:
    deterministic drafts, q = one-hot). valid (B, N) | None: real nodes (rows with shorter
    proposals). drafted (B,) | None: real drafts per row (None: N - 1). ``chain``: host flag,
    the tree is one path, so the target needs no tree mask and the caches no gather.
    """
    tree: TokenTree
    tokens: torch.Tensor
    q: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    drafted: torch.Tensor | None = None
    bad: torch.Tensor | None = None       # (B,) bool: the drafter saw non-finite logits
    replacement: bool = True              # siblings drawn with replacement (SpecInfer) or without (RSD)
    chain: bool = True


def _sync_if_cuda(t: torch.Tensor) -> None:
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


class ChainDrafting:
    """Chain drafters (``DraftModel``, ``PromptLookup``) in the loop: k drafts per row, k from a
    controller (fixed, transformers' heuristic, or cost-aware ``AdaptiveK``)."""

    needs_hidden = False
    rule, epsilon, alpha = "exact", 0.0, 0.0

    def __init__(self, drafter: Any, sampling: SamplingConfig, generator: torch.Generator | None,
                 cost_ratio: float | None):
        self.drafter, self.sampling, self.generator = drafter, sampling, generator
        k_spec = drafter.k
        self.k_cap = drafter.k_max if isinstance(k_spec, str) else k_spec
        if isinstance(drafter, PromptLookup) and k_spec == "adaptive" and cost_ratio is None:
            cost_ratio = 0.0            # no model: drafting costs ~nothing next to a target forward
        self.ctrl = make_controller(k_spec, self.k_cap, cost_ratio)
        self.max_nodes = self.k_cap + 1

    @property
    def calls(self) -> int:
        return getattr(self.drafter, "calls", 0)

    def begin(self, target: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, first: torch.Tensor,
              first_host: list[int], max_new_tokens: int, make_cache: Any) -> None:
        if hasattr(self.drafter, "make_cache"):       # drafters with a model cache build it like the target's
            self.drafter.make_cache = make_cache
        self.drafter.begin(input_ids, attention_mask, first, first_host)

    def propose(self, root: torch.Tensor, root_host: list[int], hidden: Any, budget: int) -> Candidates:
        k = max(0, min(self.ctrl.choose(), budget - 1))   # drafts past every row's budget are wasted
        self._td = time.perf_counter()
        prop = self.drafter.propose(k, self.sampling, self.generator)
        if isinstance(self.ctrl, AdaptiveK) and self.ctrl.fixed_c is None:
            _sync_if_cuda(prop.tokens)   # unavoidable for a measured c on GPU: time the draft alone
        self._tv = time.perf_counter()
        self._k = k = prop.tokens.shape[1]                # a drafter may propose fewer (lookup without a match)
        tokens = torch.cat([root[:, None], prop.tokens], 1)                          # (B, k+1)
        q = None
        if prop.q is not None:   # node i's child x_{i+1} was drawn from q_{i+1}; the leaf has none (bonus from p)
            q = torch.cat([prop.q, prop.q.new_zeros(prop.q.shape[0], 1, prop.q.shape[2])], 1)
        valid = None
        if prop.n_valid is not None:
            valid = torch.arange(k + 1, device=tokens.device)[None, :] <= prop.n_valid[:, None]
        return Candidates(_chain(k), tokens, q, valid, prop.n_valid, prop.bad)

    def accept(self, n: torch.Tensor, nxt: torch.Tensor, n_host: list[int], paths: list[list[int]],
               new: list[list[int]], active: list[bool]) -> None:
        self.drafter.accept(StepResult(k=self._k, n_accepted=n, next_tokens=nxt, n_host=n_host, new_tokens=new))
        self.ctrl.update(self._k, [h for h, a in zip(n_host, active) if a] or n_host, self._tv - self._td,
                         time.perf_counter() - self._tv)


_CHAINS: dict[int, TokenTree] = {}


def _chain(k: int) -> TokenTree:
    if k not in _CHAINS:
        _CHAINS[k] = TokenTree.chain(k)      # one object per k: its index tensors are built once
    return _CHAINS[k]


# ------------------------------------------------------------------------------------------------
# the loop, in named steps
# ------------------------------------------------------------------------------------------------
def prefill(tgt: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig,
            generator: torch.Generator | None, hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Target reads the prompt; returns (first token (B,), bad (B,), last hidden state (B, H) | None)."""
    padded = not bool(attention_mask.all())     # one sync, once: a dense prompt needs no attention mask
    out = tgt.forward(input_ids, attention_mask.bool() if padded else None, hidden=hidden)
    h, logits = out if hidden else (None, out)
    last = logits[:, -1]
    p, bad = checked_probs(last, sampling)
    tok = last.argmax(-1) if sampling.greedy else torch.multinomial(p, 1, generator=generator).squeeze(1)
    return tok, bad, None if h is None else h[:, -1]


def verify(logits: torch.Tensor, c: Candidates, sampling: SamplingConfig, generator: torch.Generator | None,
           rule: str = "exact", epsilon: float = 0.09, alpha: float = 0.3
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One acceptance step for chains and trees: logits (B, N, V) are the target's after each node.

    Returns (last accepted node (B,), next token (B,), bad (B,)). ``rule``: "exact" (greedy at
    temperature 0, recursive rejection sampling otherwise -- lossless) or "typical" (Medusa, lossy).
    """
    if sampling.greedy:
        arg, bad = checked_argmax(logits)
        bad = bad.any(-1)
        node, nxt = greedy_accept_tree(c.tree, c.tokens, arg, c.valid)
    else:
        p, bad = checked_probs(logits, sampling)
        bad = bad.any(-1)
        if rule == "typical":
            node, nxt = typical_accept_tree(c.tree, c.tokens, p, epsilon=epsilon, alpha=alpha, generator=generator,
                                            valid=c.valid)
        else:
            q = c.q.to(p.dtype) if c.q is not None else _one_hot_q(c, p)
            node, nxt = rejection_accept_tree(c.tree, c.tokens, p, q, replacement=c.replacement, generator=generator,
                                              valid=c.valid)
    if c.bad is not None:
        bad = bad | c.bad
    return node, nxt, bad


def _one_hot_q(c: Candidates, p: torch.Tensor) -> torch.Tensor:
    """Deterministic drafts (prompt lookup): node i's children distribution is one-hot on its child."""
    if not c.chain:
        raise ValueError("lossless sampling of a tree needs the draft distributions q of the proposal")
    B, N, V = p.shape
    kids = torch.nn.functional.one_hot(c.tokens[:, 1:], V).to(p.dtype)                    # (B, N-1, V)
    return torch.cat([kids, p.new_zeros(B, 1, V)], 1)


def _decode(target: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, drafting: Any, make_cache: Any, *,
            sampling: SamplingConfig, generator: torch.Generator | None, max_new_tokens: int, eos: list[int],
            st: _Stats) -> list[list[int]]:
    """prefill -> (propose -> verify -> keep the accepted path -> bookkeeping)*; each row's new tokens."""
    B = input_ids.shape[0]
    needs_hidden = drafting.needs_hidden
    tgt = make_cache(target, role="target")
    last, bad, hidden = prefill(tgt, input_ids, attention_mask, sampling, generator, needs_hidden)
    st.target_calls += 1
    packed = torch.cat([last[:, None], bad[:, None].long()], 1).tolist()   # sync: first tokens for control flow
    if any(r[1] for r in packed):
        raise NonFiniteLogitsError(non_finite_message("target", sum(r[1] for r in packed)))
    last_host = [r[0] for r in packed]
    rows = [[t] for t in last_host]
    done = [t in eos or max_new_tokens <= 1 for t in last_host]
    st.row_calls += B
    acc_row, calls_row = [0] * B, [1] * B     # a batch runs until its slowest row is done: per-row counts show it
    drafting.begin(target, input_ids, attention_mask, last, last_host, max_new_tokens, make_cache)

    while not all(done):
        budget = max(max_new_tokens - len(r) for r, d in zip(rows, done) if not d)
        start = tgt.mark()
        # -- propose --------------------------------------------------------------------------------
        c = drafting.propose(last, last_host, hidden, budget)
        N = c.tokens.shape[1]
        # -- verify: one target forward over every node ----------------------------------------------
        out = tgt.forward(c.tokens, tree=None if c.chain else c.tree, hidden=needs_hidden)
        h, logits = out if needs_hidden else (None, out)
        st.target_calls += 1
        if h is not None and not h.is_floating_point() and getattr(needs_hidden, "verdict", False):
            # the drafter's step hook ran greedy verification inside the compiled step (engine.StepHook)
            node, nxt, bad = h[:, 0, -VERDICT_COLUMNS:].unbind(-1)
            bad, h = bad.bool(), h[:, :, :-VERDICT_COLUMNS]
        else:
            node, nxt, bad = verify(logits, c, sampling, generator, drafting.rule, drafting.epsilon, drafting.alpha)
        # the one sync per step: accepted nodes, next tokens and node tokens drive EOS / budgets / crops
        drafted = c.drafted if c.drafted is not None else torch.full_like(node, N - 1)
        host = torch.cat([node[:, None], nxt[:, None], bad[:, None].long(), drafted[:, None], c.tokens], 1).tolist()
        if any(r[2] for r in host):
            raise NonFiniteLogitsError(non_finite_message("target or draft model", sum(r[2] for r in host)))
        paths = [list(range(r[0] + 1)) if c.chain else c.tree.path_to(r[0]) for r in host]
        new = [[r[4 + i] for i in p[1:]] + [r[1]] for r, p in zip(host, paths)]
        n_host = [len(p) - 1 for p in paths]
        # -- keep the accepted path (target, then drafter) ----------------------------------------------
        # a path of nodes 0, 1, ..., n (always so for a chain; for a tree, e.g. nothing accepted) is
        # already in place: its node index is its depth and the caches just keep n + 1 columns
        in_place = c.chain or all(p[-1] == len(p) - 1 for p in paths)
        n = node if in_place else c.tree.tensors(node.device)["depth"][node]
        width = max(n_host) + 1
        path = None if in_place else torch.tensor([p + [0] * (width - len(p)) for p in paths], device=node.device)
        tgt.rollback(start, n + 1, width, path=path)
        drafting.accept(n, nxt, n_host, paths, new, [not d for d in done])
        if needs_hidden:
            hidden = h.gather(1, node[:, None, None].expand(B, 1, h.shape[-1])).squeeze(1)
        last, last_host = nxt, [r[1] for r in host]
        # -- bookkeeping (host lists only) ------------------------------------------------------------
        st.steps += 1
        st.k_used.append(N - 1)
        st.nodes_verified += N
        for b in range(B):
            if done[b]:
                continue
            st.row_calls += 1
            calls_row[b] += 1
            acc_row[b] += n_host[b]
            st.drafted_tokens += host[b][3]
            st.accepted_tokens += n_host[b]
            st.accept_hist[n_host[b]] = st.accept_hist.get(n_host[b], 0) + 1
            rows[b].extend(new[b])
            if len(rows[b]) >= max_new_tokens or any(t in eos for t in new[b]):
                done[b] = True
    st.draft_calls += drafting.calls
    st.accepted_per_row += acc_row
    st.calls_per_row += calls_row
    return rows


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
                         cost_ratio: float | None = None, engine: str | None = None) -> SpeculativeOutput:
    """Generate with ``target`` using ``draft`` proposals; lossless (see the module docstring).

    ``draft``: ``DraftModel(model, k=4 | "adaptive" | "heuristic")``, ``PromptLookup(...)``, a
    bare causal LM (= ``DraftModel(model)``), ``Medusa`` heads or a ``DraftTree`` (tree drafters:
    one tree per row, rows one after another; Medusa's ``acceptance`` picks the rule).
    ``eos_token_id`` / ``pad_token_id`` default to the target's generation config, as in
    ``generate``. ``seed`` / ``generator``: randomness for sampling (a generator on the target's
    device). ``tokenizer``: the target's, to compare with a ``DraftModel(..., tokenizer=...)``.
    ``cost_ratio``: fix c for ``k="adaptive"``. ``engine``: where the target's and a draft model's
    KV caches live -- ``"hf"`` (transformers' DynamicCache, any causal LM), ``"static"`` (the lean
    engine: static cache, compiled steps; Llama-family models, others fall back to "hf" with a
    notice), ``"static-eager"``, or ``"auto"`` (static where supported). None: "hf" for chain
    drafters, ``tree_speculative.DEFAULT_BACKEND`` ("auto") for tree drafters.
    """
    return _generate(target, input_ids, as_drafter(draft), max_new_tokens=max_new_tokens,
                     sampling=SamplingConfig(temperature, top_k, top_p), attention_mask=attention_mask,
                     eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, generator=generator,
                     tokenizer=tokenizer, cost_ratio=cost_ratio, engine=engine)


def _generate(target: Any, input_ids: torch.Tensor, drafter: Any, *, max_new_tokens: int, sampling: SamplingConfig,
              attention_mask: torch.Tensor | None, eos_token_id: Any, pad_token_id: int | None, seed: int | None,
              generator: torch.Generator | None, tokenizer: Any = None, cost_ratio: float | None = None,
              engine: str | None = None, rule: tuple[str, float, float] | None = None,
              tree: bool | None = None) -> SpeculativeOutput:
    """``speculative_generate`` after argument parsing; ``rule`` overrides a tree drafter's acceptance;
    ``tree``: the drafter speaks the tree protocol (default: its ``is_tree_drafter`` flag)."""
    t0 = time.perf_counter()
    tree = getattr(drafter, "is_tree_drafter", False) if tree is None else tree
    _validate(target, drafter, input_ids, max_new_tokens)
    if not tree:
        drafter.check_compatible(target, tokenizer)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if max_new_tokens == 0:
        return SpeculativeOutput(input_ids.clone(), _Stats().as_dict(time.perf_counter() - t0))
    dev = input_ids.device
    if generator is None and not sampling.greedy:
        generator = torch.Generator(device=dev)
        generator.manual_seed(seed if seed is not None else int(torch.empty((), dtype=torch.int64).random_()))
    eos = _eos_set(target, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(target, "generation_config", None), "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    st = _Stats()
    kw = dict(sampling=sampling, generator=generator, max_new_tokens=max_new_tokens, eos=eos, st=st)
    if tree:
        from accelerando.llm.tree_speculative import TreeDrafting, default_engine
        drafting = TreeDrafting(drafter, sampling, generator, rule)
        engine = engine or default_engine()
        rows = []
        for b in range(input_ids.shape[0]):     # one tree per row: rows run one after another, unpadded
            ids = input_ids[b: b + 1, attention_mask[b].bool()]
            rows += _decode(target, ids, torch.ones_like(ids), drafting, _cache_factory(engine, ids, drafting,
                                                                                        max_new_tokens), **kw)
    else:
        drafting = ChainDrafting(drafter, sampling, generator, cost_ratio)
        rows = _decode(target, input_ids, attention_mask, drafting,
                       _cache_factory(engine, input_ids, drafting, max_new_tokens), **kw)

    rows = _finish(rows, max_new_tokens, eos)
    width = max(len(r) for r in rows)
    gen = torch.full((len(rows), width), pad_token_id, dtype=input_ids.dtype)
    for b, r in enumerate(rows):
        gen[b, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
    st.new_tokens = sum(len(r) for r in rows)
    stats = st.as_dict(time.perf_counter() - t0)
    stats.update(acceptance=drafting.rule, lossless=drafting.rule == "exact")
    return SpeculativeOutput(torch.cat([input_ids, gen.to(dev)], 1), stats)


def _cache_factory(engine: str | None, input_ids: torch.Tensor, drafting: Any, max_new_tokens: int) -> Any:
    """``make(model, role)``: the KV caches of one decode, sized for the prompt, budget and widest step."""
    return spec_cache_factory(engine, batch_size=input_ids.shape[0],
                              max_len=input_ids.shape[1] + max_new_tokens + drafting.max_nodes + 1,
                              max_step=drafting.max_nodes + 1)
