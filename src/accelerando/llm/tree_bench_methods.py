"""Tree speculation in the bench registry: Medusa heads (exact / typical) and multi-draft trees
(SpecInfer with replacement, RSD without replacement: constant branching, stochastic beam search,
and two budgeted shapes -- a static sparse tree and best-first growth by draft path probability).

Builders return zero-argument callables producing an ``LLMOutput`` (sequences + the tree loop's
counters: target_calls, steps, nodes_verified, accepted_tokens, tokens_per_target_call).
"""

from __future__ import annotations

from typing import Any, Callable

from accelerando.bench.methods import LLMOutput, LLMSetup, MethodEntry, register

DEFAULT_HEADS = "code-target-medusa"


def _heads(s: LLMSetup, heads: str | None) -> Any:
    from pathlib import Path

    from accelerando.llm.drafters import Medusa
    from accelerando import zoo
    path = Path(heads) if heads and Path(heads).exists() else zoo.path(heads or DEFAULT_HEADS)
    return Medusa.load(path, target=s.target)


def _draft(s: LLMSetup, name: str | None) -> Any:
    if not s.drafts:
        raise ValueError("this method needs a draft model; the setup has none (LLMWorkload.drafts)")
    name = name or next(iter(s.drafts))
    if name not in s.drafts:
        raise ValueError(f"unknown draft {name!r}; the setup has {', '.join(s.drafts)}")
    return s.drafts[name]


def _run(s: LLMSetup, drafter: Any) -> Callable[[], LLMOutput]:
    from accelerando.llm.speculative import speculative_generate

    def run() -> LLMOutput:
        out = speculative_generate(s.target, s.input_ids, draft=drafter, max_new_tokens=s.max_new_tokens,
                                   temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                   attention_mask=s.attention_mask, eos_token_id=s.eos_token_id, seed=s.seed)
        return LLMOutput(out.sequences, out.stats)
    return run


def build_medusa(s: LLMSetup, heads: str | None = None, nodes: int = 3) -> Callable[[], LLMOutput]:
    return _run(s, _heads(s, heads).use_tree(int(nodes)))


def build_medusa_typical(s: LLMSetup, heads: str | None = None, nodes: int = 3, epsilon: float = 0.09,
                         alpha: float = 0.3) -> Callable[[], LLMOutput]:
    h = _heads(s, heads).use_tree(int(nodes)).use_acceptance("typical", epsilon=float(epsilon), alpha=float(alpha))
    return _run(s, h)


def _tree_builder(replacement: bool, shape: str):
    def build(s: LLMSetup, draft: str | None = None, width: int = 2, depth: int = 3) -> Callable[[], LLMOutput]:
        from accelerando.llm.drafters import DraftTree
        return _run(s, DraftTree(_draft(s, draft), width=int(width), depth=int(depth), replacement=replacement,
                                 shape=shape))
    return build


def build_rsd_sparse(s: LLMSetup, draft: str | None = None, nodes: int | None = 4, widths: Any = None,
                     replacement: bool = False) -> Callable[[], LLMOutput]:
    from accelerando.llm.drafters import DraftTree
    if isinstance(widths, str):          # "2,1,1" from a CLI knob as well as a JSON list
        widths = [int(w) for w in widths.split(",") if w.strip()]
    return _run(s, DraftTree(_draft(s, draft), shape="sparse", nodes=None if widths is not None else int(nodes),
                             widths=widths, replacement=bool(replacement)))


def build_rsd_dyn(s: LLMSetup, draft: str | None = None, nodes: int = 4, width: int = 2, depth: int | None = None,
                  replacement: bool = False) -> Callable[[], LLMOutput]:
    from accelerando.llm.drafters import DraftTree
    return _run(s, DraftTree(_draft(s, draft), shape="dynamic", nodes=int(nodes), width=int(width),
                             depth=None if depth is None else int(depth), replacement=bool(replacement)))


register(MethodEntry("medusa", "llm", build_medusa, lossless=True,
                     description="Medusa heads + sparse tree; exact (greedy at T=0, recursive rejection at T>0)",
                     default_knobs={"nodes": 3}))
register(MethodEntry("medusa-typical", "llm", build_medusa_typical, lossless=False,
                     description="Medusa heads + typical acceptance (lossy at T>0; exact at T=0)",
                     default_knobs={"nodes": 3, "epsilon": 0.09, "alpha": 0.3}))
register(MethodEntry("specinfer", "llm", _tree_builder(True, "chains"), lossless=True,
                     description="multi-draft tree, siblings with replacement (SpecInfer)",
                     default_knobs={"width": 2, "depth": 3}))
register(MethodEntry("rsd-c", "llm", _tree_builder(False, "chains"), lossless=True,
                     description="Recursive Speculative Decoding, siblings without replacement (Gumbel-top-k)",
                     default_knobs={"width": 2, "depth": 3}))
register(MethodEntry("rsd-s", "llm", _tree_builder(False, "beam"), lossless=True,
                     description="Recursive Speculative Decoding with stochastic beam search drafts",
                     default_knobs={"width": 2, "depth": 3}))
register(MethodEntry("rsd-sparse", "llm", build_rsd_sparse, lossless=True,
                     description="static sparse draft tree: a main chain plus siblings at the shallow levels (RSD rule)",
                     default_knobs={"nodes": 4}))
register(MethodEntry("rsd-dyn", "llm", build_rsd_dyn, lossless=True,
                     description="draft tree grown best-first by draft path probability under a node budget (RSD rule)",
                     default_knobs={"nodes": 4, "width": 2}))
