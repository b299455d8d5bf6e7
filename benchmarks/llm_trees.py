"""Tree speculation on the zoo target: plain vs chain vs Medusa trees vs multi-draft trees, in one run.

    python benchmarks/llm_trees.py                  # full run (zoo models), writes BENCHMARKS.md + history
    python benchmarks/llm_trees.py --quick          # smoke run on random stand-ins, nothing written
    python benchmarks/llm_trees.py --no-write --no-history   # full run, tables printed only

Workloads: code and prose prompts, greedy and temperature 0.7, batch 1. Every method runs on the
same lean engine (static cache, compiled fixed-shape steps) so ratios compare algorithms, not
backends. Lossless methods must reproduce the greedy baseline token for token (checked); at
temperature 0.7 every method reports the target's perplexity of its text; typical acceptance
(lossy) also reports its agreement with the greedy text. The fixed-budget table follows the RSD
paper: at a fixed number of drafted nodes per verification, tokens per target call of a chain,
SpecInfer trees (with replacement) and RSD trees (without replacement: constant branching,
stochastic beam search, a static sparse tree and best-first growth by draft path probability);
a summary per budget says whether the best tree or the chain wins, in tokens per target call (the
issue's measure) and in tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from accelerando.bench.report import machine_line, markdown_table, write_section
from accelerando.llm.drafters import DraftTree, Medusa
from accelerando.llm.drafters.tree import sparse_widths
from accelerando.llm.drafters.base import Drafter, Proposal
from accelerando.llm.speculative import speculative_generate

MEDUSA_NAME, TARGET_NAME = "code-target-medusa", "code-target"
PROMPT_TOKENS = 80
# Draft-model engines run eagerly here: with compiled draft steps we saw every timed call of a
# DraftTree take 30-160 s on this machine (apparently recompiling; not yet diagnosed).
DRAFT_ENGINE = "engine-eager"


class PlainDrafter(Drafter):
    """No drafts: every step verifies the root only -- plain decoding on the same engine and loop."""
    max_nodes, batched = 1, False

    def begin(self, ctx):
        pass

    def propose(self, x):
        return Proposal.chain_of(x.root, x.root.new_zeros(x.root.shape[0], 0))

    def accept(self, step):
        pass


def tree_generate(target, ids, *, drafter, rule="exact", **kw):
    """One sequence with ``drafter`` (``rule`` = Medusa's acceptance), no EOS; (sequences, stats)."""
    if isinstance(drafter, Medusa):
        drafter = drafter.use_acceptance(rule)
    out = speculative_generate(target, ids, draft=drafter, eos_token_id=[], pad_token_id=0, **kw)
    return out.sequences, out.stats


@dataclass
class Method:
    name: str
    knobs: dict[str, Any]
    make: Callable[[], Any] | None            # drafter factory (None: a plain baseline with its own fn)
    rule: str = "exact"
    lossless: bool = True
    fn: Callable[..., tuple[torch.Tensor, dict]] | None = None
    group: str = "main"


@dataclass
class Result:
    method: Method
    seconds: list[float] = field(default_factory=list)
    new_tokens: int = 0
    target_calls: int = 0
    steps: int = 0
    accepted: int = 0
    nodes: int = 0
    outputs: list[torch.Tensor] = field(default_factory=list)


def load_models(quick: bool):
    if quick:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)
        t = LlamaForCausalLM(LlamaConfig(**shape)).eval()
        d = LlamaForCausalLM(LlamaConfig(**{**shape, "num_hidden_layers": 1})).eval()
        ids = [torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)]
        return t, d, Medusa.for_target(t, n_heads=3), {"code": ids[:1], "prose": ids[1:]}, "random stand-ins"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from accelerando import zoo
    t = AutoModelForCausalLM.from_pretrained(zoo.path(TARGET_NAME)).eval()
    draft_name = "code-draft-small" if "code-draft-small" in zoo.names() else "code-draft-tiny"
    d = AutoModelForCausalLM.from_pretrained(zoo.path(draft_name)).eval()
    heads = Medusa.load(zoo.path(MEDUSA_NAME), target=t)
    tok = AutoTokenizer.from_pretrained(zoo.path(TARGET_NAME))
    prompts = prompt_texts()
    # every prompt cut to the same length (the held-out prompts have >= 80 tokens): one engine size
    # and one set of compiled shapes per method, so one warm-up run per method covers all prompts
    enc = {k: [tok(p, return_tensors="pt").input_ids[:, -PROMPT_TOKENS:] for p in v] for k, v in prompts.items()}
    short = [ids.shape[1] for v in enc.values() for ids in v if ids.shape[1] < PROMPT_TOKENS]
    if short:
        raise SystemExit(f"held-out prompts shorter than {PROMPT_TOKENS} tokens: {short}; use fewer --prompts")
    return t, d, heads, enc, f"zoo: {TARGET_NAME}, draft {draft_name}, {MEDUSA_NAME}"


def prompt_texts() -> dict[str, list[str]]:
    """Held-out code and prose prompts from the zoo corpus (documents the target never trained on)."""
    from accelerando.zoo import data
    n = ARGS.prompts
    out = {k: data.heldout_prompts(k, n=n, chars=300) for k in ("code", "prose")}
    for k, v in out.items():
        if len(v) < n:
            raise SystemExit(f"the zoo corpus has {len(v)} held-out {k} prompts of >= 300 characters; use --prompts <= {len(v)}")
    return out


def methods(target, draft, heads, temperature: float) -> list[Method]:
    from accelerando.llm import engine as eng

    greedy = temperature == 0.0
    ms: list[Method] = []
    if greedy:
        ms.append(Method("plain-engine", {}, None, fn=lambda ids, seed: (
            eng.generate(target, ids, max_new_tokens=ARGS.new_tokens, eos_token_id=[]), {"target_calls": ARGS.new_tokens})))
        ms.append(Method("plain-hf-generate", {}, None, fn=lambda ids, seed: (
            target.generate(ids, max_new_tokens=ARGS.new_tokens, do_sample=False, eos_token_id=None,
                            pad_token_id=0), {"target_calls": ARGS.new_tokens})))
    ms.append(Method("plain-tree-loop", {}, lambda: PlainDrafter()))
    for k in ARGS.chain_k:
        ms.append(Method("chain-draft", {"k": k}, (lambda k=k: DraftTree(draft, width=1, depth=k, engine=DRAFT_ENGINE))))
    for n in ARGS.medusa_nodes:
        ms.append(Method("medusa", {"nodes": n}, (lambda n=n: heads.use_tree(n))))
        if not greedy:
            if n <= 15:
                ms.append(Method("medusa-typical", {"nodes": n, "epsilon": 0.09, "alpha": 0.3},
                                 (lambda n=n: heads.use_tree(n)), rule="typical", lossless=False))
    for n in ARGS.chain_k:   # the budgeted shapes at the chain's node counts
        ms.append(Method("rsd-sparse", {"nodes": n, "widths": ",".join(map(str, sparse_widths(n)))},
                         (lambda n=n: DraftTree(draft, shape="sparse", nodes=n, engine=DRAFT_ENGINE))))
        ms.append(Method("rsd-dyn", {"nodes": n, "width": 2},
                         (lambda n=n: DraftTree(draft, shape="dynamic", nodes=n, width=2, engine=DRAFT_ENGINE))))
    for w, d in ARGS.tree_shapes:
        ms.append(Method("rsd-c", {"width": w, "depth": d}, (lambda w=w, d=d: DraftTree(draft, width=w, depth=d, engine=DRAFT_ENGINE))))
        ms.append(Method("rsd-s", {"width": w, "depth": d},
                         (lambda w=w, d=d: DraftTree(draft, width=w, depth=d, shape="beam", engine=DRAFT_ENGINE))))
        if not greedy:   # at temperature 0 sibling sampling is deterministic: with/without replacement coincide
            ms.append(Method("specinfer", {"width": w, "depth": d},
                             (lambda w=w, d=d: DraftTree(draft, width=w, depth=d, replacement=True, engine=DRAFT_ENGINE))))
    from accelerando.llm import DraftModel, speculative_generate   # the chain agent's loop
    for k in (4,):
        def fn(ids, seed, k=k):
            kw = dict(max_new_tokens=ARGS.new_tokens, temperature=temperature, seed=seed, eos_token_id=[])
            try:
                out = speculative_generate(target, ids, draft=DraftModel(draft, k=k), engine="engine-eager", **kw)
            except TypeError:                                  # a loop without the engine option
                out = speculative_generate(target, ids, draft=DraftModel(draft, k=k), **kw)
            return out.sequences, out.stats
        ms.append(Method("chain-loop", {"k": k}, None, fn=fn))
    return ms


def run_one(m: Method, target, prompts: list[torch.Tensor], temperature: float) -> Result:
    r = Result(m)

    def call(ids, seed):
        if m.fn is not None:
            return m.fn(ids, seed)
        return tree_generate(target, ids, drafter=m.make(), max_new_tokens=ARGS.new_tokens,
                             temperature=temperature, rule=m.rule, seed=seed)

    for i, ids in enumerate(prompts):
        if i == 0:
            call(ids, i)          # warm-up (compiles the tree steps once; every prompt has the same length)
        times = []
        for _ in range(ARGS.repeats):
            t0 = time.perf_counter()
            out, st = call(ids, i)
            times.append(time.perf_counter() - t0)
        r.seconds.append(statistics.median(times))
        r.new_tokens += out.shape[1] - ids.shape[1]
        r.target_calls += int(st.get("target_calls", 0))
        r.steps += int(st.get("steps", 0))
        r.accepted += int(st.get("accepted_tokens", 0))
        r.nodes += int(st.get("nodes_verified", 0))
        r.outputs.append(out)
    return r


@torch.no_grad()
def perplexity(target, outs: list[torch.Tensor], prompts: list[torch.Tensor]) -> float:
    from accelerando.bench.metrics import perplexity as ppl
    nll, n = 0.0, 0
    for o, p in zip(outs, prompts):
        k = o.shape[1] - p.shape[1]
        nll += k * torch.log(torch.tensor(ppl(target, o, prompt_len=p.shape[1]))).item()
        n += k
    return float(torch.exp(torch.tensor(nll / max(1, n))))


def main() -> None:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="random stand-in models, 16 tokens, nothing written")
    ap.add_argument("--new-tokens", type=int, default=64, help="new tokens per prompt (default 64)")
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts per domain (default 4)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per prompt, after one warm-up run")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--no-history", action="store_true", help="do not record the rows in the history store")
    ap.add_argument("--no-write", action="store_true", help="print the tables, do not write BENCHMARKS.md")
    ARGS = ap.parse_args()
    for name in ("new_tokens", "prompts", "repeats", "threads"):
        if getattr(ARGS, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    ARGS.chain_k = [2, 4] if ARGS.quick else [4, 8]
    ARGS.medusa_nodes = [1, 3] if ARGS.quick else [1, 3, 7, 15]   # + root: 2, 4, 8, 16 nodes (compiled sizes)
    ARGS.tree_shapes = [(2, 2)] if ARGS.quick else [(2, 2), (4, 2)]
    if ARGS.quick:
        ARGS.new_tokens, ARGS.repeats = 16, 1
    torch.set_num_threads(ARGS.threads)
    started = time.perf_counter()
    target, draft, heads, prompts, source = load_models(ARGS.quick)
    rows_hist, sections = [], []
    main_rows, budget_rows = [], []
    def emit(partial: bool) -> None:
        budget_rows.sort(key=lambda x: (x[0], x[1], x[2], -x[5]))
        summary = budget_summary(budget_rows)
        headers = ["T", "prompts", "method", "knobs", "lossless", "tokens/s ratio", "tokens/s", "tokens / target call",
                   "accepted / step", "nodes / verify", "quality"]
        md = "\n".join([
            "## Tree speculation (Medusa, SpecInfer, RSD) vs plain and chain decoding",
            "",
            f"`python benchmarks/llm_trees.py` -- {machine_line()}; models: {source}; batch 1, "
            f"{ARGS.new_tokens} new tokens, median of {ARGS.repeats} timed run(s) per prompt after one warm-up run per method, "
            f"{ARGS.prompts} held-out prompt(s) per domain (each cut to its last {PROMPT_TOKENS} tokens; rates pool the prompts). The machine was shared with other jobs (2 cores, load > 2): "
            "absolute times are noisy, ratios within one row group are the comparison. "
            "Draft models (chain-draft, rsd-*, specinfer, chain-loop) run on the engine *eagerly*; the target is compiled "
            "except in chain-loop (the chain agent's loop with engine='engine-eager'). "
            "Ratio = tokens/s over `plain-engine` (the lean engine's greedy `generate`) at T=0, over `plain-tree-loop` "
            "(the same loop verifying no drafts) at T=0.7. All methods run on the same lean engine. "
            "Quality: `exact` = identical to the greedy baseline; ppl = the target's perplexity of the generated text "
            "(lower is more 'typical'); agree = token agreement with the greedy text (typical acceptance is lossy).",
            "",
            "**Partial run** (interrupted before every group finished)." if partial else "",
            markdown_table(headers, main_rows),
            "",
            "### At a fixed target budget (drafted nodes per verification; RSD paper's comparison)",
            "",
            "Drafted nodes = the tree's node budget per verification (the root excluded); the target scores them "
            "(+ the root) in one call. `vs chain` = tokens per target call minus the chain's (`chain-draft`) at "
            "the same budget and workload.",
            "",
            markdown_table(["T", "prompts", "drafted nodes", "method", "knobs", "tokens / target call", "vs chain",
                            "tokens/s", "tokens/s ratio"], [r[:6] + [_vs_chain(r, budget_rows)] + r[6:] for r in budget_rows]),
            "",
            "#### Tree vs chain per budget (draft-model trees: specinfer, rsd-c, rsd-s, rsd-sparse, rsd-dyn)",
            "",
            markdown_table(["T", "prompts", "drafted nodes", "chain tokens / call", "best tree (tokens / call)",
                            "tree tokens / call", "winner: tokens / call", "chain tokens/s", "fastest tree",
                            "tree tokens/s", "winner: tokens/s"], summary),
        ])
        print(md)
        if ARGS.quick or ARGS.no_write:
            return
        write_section("llm_trees", md)

    for temperature in (0.0, 0.7):
        for domain, ps in prompts.items():
            greedy_ref = None
            results = []
            for m in methods(target, draft, heads, temperature):
                r = run_one(m, target, ps, temperature)
                results.append(r)
                if m.name == "plain-tree-loop" and temperature == 0.0:
                    greedy_ref = r.outputs
                print(f"T={temperature} {domain} {m.name} {m.knobs} {sum(r.seconds):.2f}s", flush=True)
            if temperature > 0:   # greedy reference for agreement of the lossy rule
                greedy_ref = [tree_generate(target, p, drafter=PlainDrafter(), max_new_tokens=ARGS.new_tokens)[0]
                              for p in ps]
            base = next(r for r in results if r.method.name == ("plain-engine" if temperature == 0 else "plain-tree-loop"))
            base_tps = base.new_tokens / sum(base.seconds)
            for r in results:
                tps = r.new_tokens / sum(r.seconds)
                calls = r.target_calls or r.new_tokens
                exact = (all(torch.equal(a, b) for a, b in zip(r.outputs, greedy_ref)) if temperature == 0 else None)
                ppl = perplexity(target, r.outputs, ps)
                from accelerando.bench.metrics import token_agreement
                agree = statistics.mean(token_agreement(o, g, prompt_len=p.shape[1])
                                        for o, g, p in zip(r.outputs, greedy_ref, ps))
                tree_nodes = (r.nodes / r.steps) if r.steps else 1.0
                acc_rate = r.accepted / r.steps if r.steps else 0.0
                quality = ("exact" if exact else "MISMATCH") if temperature == 0 else (
                    f"ppl {ppl:.2f}, agree {agree:.2f}" if not r.method.lossless else f"ppl {ppl:.2f}")
                main_rows.append([f"{temperature:g}", domain, r.method.name, _knobs(r.method.knobs),
                                  "yes" if r.method.lossless else "no (typical)", tps / base_tps, tps,
                                  r.new_tokens / calls, acc_rate, tree_nodes, quality])
                metrics = {"tokens_per_s": tps, "speedup": tps / base_tps, "tokens_per_target_call": r.new_tokens / calls,
                           "accepted_per_step": acc_rate, "nodes_per_step": tree_nodes, "perplexity": ppl,
                           "agreement_with_greedy": agree, "exact_match": exact, "new_tokens": r.new_tokens,
                           "target_calls": calls, "seconds": sum(r.seconds)}
                rows_hist.append(({"family": "llm", "model": TARGET_NAME, "domain": domain, "temperature": temperature,
                                   "max_new_tokens": ARGS.new_tokens, "batch": 1, "source": source},
                                  r.method.name, r.method.knobs, metrics))
                if r.method.name in ("chain-draft",) + TREES or r.method.name.startswith("medusa"):
                    budget_rows.append([f"{temperature:g}", domain, drafted_nodes(r.method), r.method.name,
                                        _knobs(r.method.knobs), r.new_tokens / calls, tps, tps / base_tps])
            if not ARGS.quick:
                emit(True)
    emit(False)
    print(f"total run time {time.perf_counter() - started:.0f} s", flush=True)
    if not ARGS.no_history:
        from accelerando.bench.history import Measurement, open_history
        with open_history() as h:
            h.record_many([Measurement(workload=w, method=f"tree/{m}", knobs=k, metrics=x) for w, m, k, x in rows_hist])


TREES = ("specinfer", "rsd-c", "rsd-s", "rsd-sparse", "rsd-dyn")   # draft-model trees


def drafted_nodes(m: Method) -> int:
    """The method's node budget per verification (root excluded)."""
    k = m.knobs
    if m.name == "chain-draft":
        return k["k"]
    if "nodes" in k:
        return k["nodes"]
    return k["width"] * k["depth"]          # chains / beam: width chains or beams of depth nodes


def _vs_chain(row: list, rows: list[list]) -> str:
    chain = [r for r in rows if r[:3] == row[:3] and r[3] == "chain-draft"]
    if not chain or row[3] == "chain-draft":
        return "-"
    return f"{row[5] - chain[0][5]:+.2f}"


def budget_summary(rows: list[list]) -> list[list]:
    """One row per (T, workload, budget) with a chain: the best tree by tokens per target call and
    the fastest tree, each against the chain, and which wins."""
    out = []
    for key in sorted({tuple(r[:3]) for r in rows if r[3] == "chain-draft"}):
        chain = next(r for r in rows if tuple(r[:3]) == key and r[3] == "chain-draft")
        trees = [r for r in rows if tuple(r[:3]) == key and r[3] in TREES]
        if not trees:
            continue
        best = max(trees, key=lambda r: r[5])
        fast = max(trees, key=lambda r: r[6])

        def winner(tree: float, ch: float) -> str:
            return "tie" if abs(tree - ch) < 1e-9 else ("tree" if tree > ch else "chain")
        out.append(list(key) + [chain[5], f"{best[3]} ({best[4]})", best[5], winner(best[5], chain[5]), chain[6],
                                f"{fast[3]} ({fast[4]})", fast[6], winner(fast[6], chain[6])])
    return out


def _knobs(k: dict) -> str:
    return ", ".join(f"{a}={b}" for a, b in k.items()) or "-"


ARGS: Any = None

if __name__ == "__main__":
    main()
