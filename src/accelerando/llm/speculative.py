"""Lossless speculative decoding for any transformers causal LM (Leviathan et al. 2023; Chen et al. 2023),
with chains and token trees (Medusa, SpecInfer, Recursive Speculative Decoding) on one loop.

The loop (``_decode``), in named steps, next to gpt-fast's ``speculative_decode``:
  prefill   the target reads the prompt once; the first token comes from its last logits
  propose   the drafter proposes a token tree per row whose root is the last emitted token (a
            chain of k drafts is the tree of width 1, see ``drafters/base.py``)
  verify    the target scores every node in one forward over its KV cache (a chain needs only
            the causal mask, a tree a tree mask) and one acceptance rule (``tree_verify.verify``)
            picks the accepted path + 1 token per row
  keep      target and drafter keep exactly the accepted path (per-row lengths; a tree's path is
            gathered into place first)
Greedy output equals ``target.generate(do_sample=False)`` token for token; sampled output has the
target's distribution (after the same temperature / top-k / top-p, ``sampling.py``).

Host syncs: one per step (accepted node, next token, non-finite flag and node tokens, read
together for control flow: EOS, budgets, crop lengths); the adaptive draft length adds one on GPU
to time the draft. Nothing else calls ``.item()`` in the loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from accelerando.llm.cache import VERDICT_COLUMNS, check_attention_mask, check_supports_cache, max_positions
from accelerando.llm.drafters.adaptive import AdaptiveK, HeuristicK, best_k, expected_tokens  # noqa: F401
from accelerando.llm.drafters.base import DraftContext, DraftInput, Proposal, Verified
from accelerando.llm.drafters.draft_model import DraftModel
from accelerando.llm.engine import check_engine, open_cache
from accelerando.llm.sampling import (NonFiniteLogitsError, SamplingConfig, checked_argmax, checked_probs,
                                     non_finite_message)
from accelerando.llm.tree_verify import verify


@dataclass
class SpeculativeOutput:
    sequences: torch.Tensor                       # (B, prompt + generated), like generate's output
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stats:
    """Every counter of a decode, updated in one place (``step``)."""
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

    def start(self, rows: int) -> None:
        """A prefill over ``rows`` rows."""
        self.target_calls += 1
        self.row_calls += rows
        self._first = len(self.accepted_per_row)
        self.accepted_per_row += [0] * rows
        self.calls_per_row += [1] * rows

    def step(self, n_nodes: int, drafted: list[int], accepted: list[int], active: list[bool]) -> None:
        """One verification of ``n_nodes`` nodes; per row: real drafts, accepted drafts, still generating."""
        self.target_calls += 1
        self.steps += 1
        self.k_used.append(n_nodes - 1)
        self.nodes_verified += n_nodes
        for b, (d, n, a) in enumerate(zip(drafted, accepted, active)):
            if a:
                self.row_calls += 1
                self.calls_per_row[self._first + b] += 1
                self.accepted_per_row[self._first + b] += n
                self.drafted_tokens += d
                self.accepted_tokens += n
                self.accept_hist[n] = self.accept_hist.get(n, 0) + 1

    def plain(self, m: int, active: list[bool]) -> None:
        """``m`` plain decoding steps (one token each, nothing drafted)."""
        self.target_calls += m
        self.steps += m
        self.k_used += [0] * m
        self.nodes_verified += m
        for b, a in enumerate(active):
            if a:
                self.row_calls += m
                self.calls_per_row[self._first + b] += m
                self.accept_hist[0] = self.accept_hist.get(0, 0) + m

    def as_dict(self, wall: float) -> dict[str, Any]:
        return dict(target_calls=self.target_calls, draft_calls=self.draft_calls, steps=self.steps,
                    drafted_tokens=self.drafted_tokens, accepted_tokens=self.accepted_tokens,
                    acceptance_rate=self.accepted_tokens / max(1, self.drafted_tokens),
                    acceptance_histogram=dict(sorted(self.accept_hist.items())),
                    new_tokens=self.new_tokens, nodes_verified=self.nodes_verified,
                    tokens_per_target_call=self.new_tokens / max(1, self.row_calls),
                    tokens_per_step=(self.accepted_tokens + self.steps) / max(1, self.steps),
                    mean_k=sum(self.k_used) / max(1, len(self.k_used)), wall_time_s=wall,
                    accepted_per_row=list(self.accepted_per_row), target_calls_per_row=list(self.calls_per_row))


# ------------------------------------------------------------------------------------------------
# the loop, in named steps
# ------------------------------------------------------------------------------------------------
def prefill(tgt: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, sampling: SamplingConfig,
            generator: torch.Generator | None, hidden: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """The target reads the prompt; returns (first token (B,), bad (B,), last hidden state (B, H) | None)."""
    padded = not bool(attention_mask.all())     # one sync, once: a dense prompt needs no attention mask
    # only the last position's logits are used: a vocabulary-wide projection of the whole prompt is waste
    out = tgt.forward(input_ids, attention_mask.bool() if padded else None, hidden=hidden, last=True)
    last = out.logits[:, -1]
    p, bad = checked_probs(last, sampling)
    tok = last.argmax(-1) if sampling.greedy else torch.multinomial(p, 1, generator=generator).squeeze(1)
    return tok, bad, None if out.hidden is None else out.hidden[:, -1]


@dataclass
class HostVerdict:
    """The loop's one host read per step, by name."""
    node: list[int]           # last accepted node per row
    next_token: list[int]
    bad: list[bool]
    drafted: list[int]        # real drafts per row
    tokens: list[list[int]]   # node tokens per row


def read_verdict(node: torch.Tensor, nxt: torch.Tensor, bad: torch.Tensor, prop: Proposal) -> HostVerdict:
    """One device -> host copy of everything control flow needs (the step's only sync)."""
    rows = torch.cat([node[:, None], nxt[:, None], bad[:, None].long(), prop.n_drafted[:, None], prop.tokens],
                     1).tolist()
    return HostVerdict([r[0] for r in rows], [r[1] for r in rows], [bool(r[2]) for r in rows],
                       [r[3] for r in rows], [r[4:] for r in rows])


def keep_path(tgt: Any, start: int, prop: Proposal, node: torch.Tensor, paths: list[list[int]]) -> torch.Tensor:
    """Roll the target's cache back to the accepted paths; returns accepted drafts per row (B,).

    A path of nodes 0, 1, ..., n (always so for a chain; for a tree, e.g. nothing accepted) is
    already in place: its node index is its depth and the cache just keeps n + 1 columns."""
    in_place = prop.chain or all(p[-1] == len(p) - 1 for p in paths)
    n = node if in_place else prop.tree.tensors(node.device)["depth"][node]
    width = max(len(p) for p in paths)
    path = None if in_place else torch.tensor([p + [0] * (width - len(p)) for p in paths], device=node.device)
    tgt.rollback(start, n + 1, width, path=path)
    return n


def plain_run(tgt: Any, root: torch.Tensor, m: int, sampling: SamplingConfig,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` plain decoding steps on the target's cache from ``root`` (B,) (in no cache yet), no
    host sync: the tokens (B, m) (the last is the next root) and a non-finite flag per row (B,)."""
    toks, checks = [], []
    tok = root
    for _ in range(m):
        logits = tgt.forward(tok[:, None]).logits[:, -1]
        if sampling.greedy:   # the max is finite iff the row is (``checked_argmax``): checked once, at the end
            top, tok = logits.max(-1)
            checks.append(top)
        else:
            p, b = checked_probs(logits, sampling)
            tok = torch.multinomial(p, 1, generator=generator).squeeze(1)
            checks.append(b)
        toks.append(tok)
    bad = (~torch.stack(checks, 1).isfinite()).any(1) if sampling.greedy else torch.stack(checks, 1).any(1)
    return torch.stack(toks, 1), bad


def _decode(target: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, drafter: Any, *,
            sampling: SamplingConfig, generator: torch.Generator | None, max_new_tokens: int, eos: list[int],
            engine: str, st: Stats) -> list[list[int]]:
    """prefill -> (propose -> verify -> keep the accepted path)*; each row's new tokens."""
    B, P = input_ids.shape
    rule = (drafter.acceptance, drafter.epsilon, drafter.alpha)
    room = dict(batch_size=B, max_len=P + max_new_tokens + drafter.max_nodes + 1, max_step=drafter.max_nodes + 1)
    make_cache = lambda model, role, engine=engine: open_cache(model, engine=engine, role=role, **room)  # noqa: E731
    tgt = make_cache(target, "target")
    hook = drafter.step_hook(sampling) if drafter.needs_hidden else None
    # -- prefill ----------------------------------------------------------------------------------
    first, bad, hidden = prefill(tgt, input_ids, attention_mask, sampling, generator, drafter.needs_hidden)
    st.start(B)
    first_host, bad_host = torch.stack([first, bad.long()]).tolist()      # sync: first tokens for control flow
    if any(bad_host):
        raise NonFiniteLogitsError(non_finite_message("target", sum(bad_host)))
    rows = [[t] for t in first_host]
    done = [t in eos or max_new_tokens <= 1 for t in first_host]
    drafter.begin(DraftContext(target, input_ids, attention_mask, first, first_host, max_new_tokens, sampling,
                               generator, make_cache, tgt))
    x = DraftInput(first, first_host, 0, hidden)
    while not all(done):
        x.budget = max(max_new_tokens - len(r) for r, d in zip(rows, done) if not d)
        m = drafter.plain_steps(x.budget)
        if m > 0:   # the drafter backs off: plain decoding, nothing drafted or verified
            t0 = time.perf_counter()
            toks, bad = plain_run(tgt, x.root, m, sampling, generator)
            host = torch.cat([toks, bad[:, None].long()], 1).tolist()          # sync: tokens for control flow
            if any(h.pop() for h in host):
                raise NonFiniteLogitsError(non_finite_message("target", int(bad.sum())))
            active = [not d for d in done]
            drafter.accept_plain(toks, host, time.perf_counter() - t0)
            st.plain(m, active)
            x = DraftInput(toks[:, -1], [h[-1] for h in host], 0)
            for b in range(B):
                if not done[b]:
                    rows[b].extend(host[b])
                    done[b] = len(rows[b]) >= max_new_tokens or any(t in eos for t in host[b])
            continue
        start = tgt.mark()
        # -- propose ----------------------------------------------------------------------------------
        prop = drafter.propose(x)
        # -- verify: one target forward over every node ------------------------------------------------
        out = tgt.forward(prop.tokens, tree=None if prop.chain else prop.tree, hidden=drafter.needs_hidden, hook=hook)
        if out.hook is not None and hook.verdict:     # greedy verification already ran inside the step
            node, nxt, bad = out.hook[:, 0, -VERDICT_COLUMNS:].unbind(-1)
            bad, out.hook = bad.bool(), out.hook[:, :, :-VERDICT_COLUMNS]
        else:
            node, nxt, bad = verify(out.logits, prop, sampling, generator, *rule)
        v = read_verdict(node, nxt, bad, prop)                              # the one sync per step
        if any(v.bad):
            raise NonFiniteLogitsError(non_finite_message("target or draft model", sum(v.bad)))
        paths = [prop.tree.path_to(n) for n in v.node]
        new = [[r[i] for i in p[1:]] + [t] for r, p, t in zip(v.tokens, paths, v.next_token)]
        # -- keep the accepted path (target, then drafter); a root-only step keeps its one column ----------
        n = keep_path(tgt, start, prop, node, paths) if prop.tokens.shape[1] > 1 else node
        active = [not d for d in done]
        drafter.accept(Verified(node, n, nxt, paths, new, active))
        st.step(prop.tokens.shape[1], v.drafted, [len(p) - 1 for p in paths], active)
        at = lambda t: None if t is None else t.gather(1, node[:, None, None].expand(B, 1, t.shape[-1])).squeeze(1)  # noqa: E731
        x = DraftInput(nxt, v.next_token, 0, at(out.hidden), at(out.hook))
        for b in range(B):
            if not done[b]:
                rows[b].extend(new[b])
                done[b] = len(rows[b]) >= max_new_tokens or any(t in eos for t in new[b])
    st.draft_calls += drafter.draft_calls
    return rows


# ------------------------------------------------------------------------------------------------
# the entry point
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def speculative_generate(target: Any, input_ids: torch.Tensor, *, draft: Any, max_new_tokens: int = 128,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         attention_mask: torch.Tensor | None = None, eos_token_id: int | list[int] | None = None,
                         pad_token_id: int | None = None, seed: int | None = None,
                         generator: torch.Generator | None = None, tokenizer: Any = None,
                         engine: str | None = None) -> SpeculativeOutput:
    """Generate with ``target`` using ``draft`` proposals; lossless (see the module docstring).

    ``draft``: a drafter (``accelerando.llm.drafters``): ``DraftModel(model, k=4 | "adaptive" |
    "heuristic")``, ``PromptLookup(...)``, ``Medusa`` heads (``use_acceptance`` picks the rule),
    a ``DraftTree(...)``, or a bare causal LM (= ``DraftModel(model)``). Drafters that propose one
    tree at a time (Medusa, DraftTree) run the rows of a batch one after another.
    ``attention_mask``: left padding only (as ``generate`` expects for decoder-only models).
    ``eos_token_id`` / ``pad_token_id`` default to the target's generation config, as in
    ``generate``; ``eos_token_id=[]`` disables EOS. ``seed`` / ``generator``: randomness for
    sampling (a generator on the target's device). ``tokenizer``: the target's, to compare with
    a ``DraftModel(..., tokenizer=...)``. ``engine``: where the KV caches live -- ``"auto"`` (None:
    ``engine.DEFAULT_ENGINE``; the lean engine, compiled, for Llama-family models, transformers'
    cache for others), ``"engine"``, ``"engine-eager"`` or ``"hf"`` (transformers' DynamicCache).
    """
    t0 = time.perf_counter()
    sampling = SamplingConfig(temperature, top_k, top_p)
    drafter = as_drafter(draft)
    engine = check_engine(engine)
    attention_mask = check_inputs(target, drafter, input_ids, attention_mask, max_new_tokens)
    drafter.check_compatible(target, tokenizer)
    if max_new_tokens == 0:
        return SpeculativeOutput(input_ids.clone(), Stats().as_dict(time.perf_counter() - t0))
    dev = input_ids.device
    if generator is None and not sampling.greedy:
        generator = torch.Generator(device=dev)
        generator.manual_seed(seed if seed is not None else int(torch.empty((), dtype=torch.int64).random_()))
    eos = _eos_set(target, eos_token_id)
    if pad_token_id is None:
        pad_token_id = getattr(getattr(target, "generation_config", None), "pad_token_id", None)
        pad_token_id = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    st = Stats()
    kw = dict(sampling=sampling, generator=generator, max_new_tokens=max_new_tokens, eos=eos, engine=engine, st=st)
    if drafter.batched:
        rows = _decode(target, input_ids, attention_mask, drafter, **kw)
    else:
        rows = []
        for b in range(input_ids.shape[0]):     # one tree per step: rows one after another, unpadded
            ids = input_ids[b: b + 1, attention_mask[b].bool()]
            rows += _decode(target, ids, torch.ones_like(ids), drafter, **kw)
    rows = [_trim(r, max_new_tokens, eos) for r in rows]
    gen = torch.full((len(rows), max(len(r) for r in rows)), pad_token_id, dtype=input_ids.dtype)
    for b, r in enumerate(rows):
        gen[b, : len(r)] = torch.tensor(r, dtype=input_ids.dtype)
    st.new_tokens = sum(len(r) for r in rows)
    stats = st.as_dict(time.perf_counter() - t0)
    stats.update(acceptance=drafter.acceptance, lossless=drafter.acceptance == "exact")
    return SpeculativeOutput(torch.cat([input_ids, gen.to(dev)], 1), stats)


def _trim(r: list[int], max_new: int, eos: list[int]) -> list[int]:
    """A row's tokens up to the budget and its first EOS (inclusive)."""
    r = r[:max_new]
    return next((r[: i + 1] for i, t in enumerate(r) if t in eos), r)


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


def check_inputs(target: Any, drafter: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 max_new_tokens: int) -> torch.Tensor:
    """One-line errors for bad arguments; returns the attention mask (all ones when None)."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not torch.is_tensor(input_ids) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        shape = tuple(input_ids.shape) if torch.is_tensor(input_ids) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a LongTensor of shape (batch, prompt_len), got {shape} "
                         f"{getattr(input_ids, 'dtype', '')}")
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
    return check_attention_mask(input_ids, attention_mask)
