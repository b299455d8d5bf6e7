"""Lean decode engine vs transformers' generate, greedy, batch 1 and 4, in one run.

    python benchmarks/llm_engine.py                 # full run (a few minutes on 2 CPU cores)
    python benchmarks/llm_engine.py --quick         # smoke run, nothing written

Methods: transformers default ``generate`` (the baseline every ratio is against), transformers'
own fast path (``cache_implementation="static"`` + compiled forward), our engine plain (eager and
compiled), our engine under each speculative method that exists in ``accelerando.llm``. Every
output is checked token for token against the baseline. Writes the ``llm_engine`` section of
BENCHMARKS.md and one history row per (method, batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from accelerando.bench.report import machine_line, markdown_table, write_section
from accelerando.llm import engine as eng_mod

TARGET_SHAPE = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=2048)


@dataclass
class Workload:
    target: Any
    drafts: dict[str, Any]
    prompts: torch.Tensor            # (4, P) left-padded
    mask: torch.Tensor
    source: str                      # "zoo" or a description of the stand-in models
    eos_token_id: list[int] = field(default_factory=list)


def _random_llama(seed: int, **shape):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    shape = {"max_position_embeddings": 1024, **shape}
    cfg = LlamaConfig(**shape, eos_token_id=None, bos_token_id=None, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def _truncated_draft(target, n_layers: int):
    """Stand-in draft before the zoo exists: the target's embedding, first layers and head."""
    import copy
    d = copy.deepcopy(target)
    d.model.layers = d.model.layers[:n_layers]
    d.config.num_hidden_layers = n_layers
    return d


def load_workload(prompt_len: int, seed: int = 0) -> Workload:
    from accelerando import zoo
    trained_drafts = [n for n in ("code-draft-small", "code-draft-tiny") if zoo.is_trained(n)]
    if zoo.is_trained("code-target") and trained_drafts:
        from accelerando.zoo import data
        target = zoo.load("code-target")
        drafts = {n: zoo.load(n) for n in trained_drafts}
        tok = zoo.load_tokenizer("code-target")
        tok.padding_side = "left"
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        texts = data.heldout_prompts("code", n=4, chars=400)
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=prompt_len)
        return Workload(target, drafts, enc.input_ids, enc.attention_mask,
                        f"zoo: code-target, {', '.join(trained_drafts)}; held-out stdlib code prompts")
    target = _random_llama(seed, **TARGET_SHAPE)
    drafts = {"first-1-layer": _truncated_draft(target, 1), "first-2-layers": _truncated_draft(target, 2)}
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, TARGET_SHAPE["vocab_size"], (4, prompt_len), generator=g)
    ids[:, prompt_len // 2:] = ids[:, : prompt_len - prompt_len // 2]      # some repetition to look up
    mask = torch.ones_like(ids)
    for b in range(1, 4):
        mask[b, : 3 * b] = 0
    ids = ids.masked_fill(mask == 0, 0)
    src = (f"random-init Llama {TARGET_SHAPE} (zoo weights not trained yet); stand-in drafts are the "
           f"target's first 1 / 2 layers with its embedding and head; random-token prompts")
    return Workload(target, drafts, ids, mask, src)


@dataclass
class Row:
    method: str
    batch: int
    median_s: float
    new_tokens: int
    target_calls: int
    equal: bool
    compile_s: float
    split: dict[str, float]
    vs_plain: float | None = None          # --interleave: median of per-round ratios to engine plain
    vs_hf: float | None = None             # ... and to transformers' generate


def _timer():
    from accelerando.bench.harness import measure
    return measure


def run_method(name: str, fn: Callable[[], tuple[torch.Tensor, dict]], ref: torch.Tensor | None,
               batch: int, repeats: int, prompt_len: int) -> tuple[Row, torch.Tensor]:
    measure = _timer()
    t0 = time.perf_counter()
    fn()                                   # first call: pays compilation, if any
    first = time.perf_counter() - t0
    timing = measure(fn, warmup=1, repeats=repeats)
    seqs, stats = timing.result
    new = (seqs.shape[1] - prompt_len) * batch
    equal = bool(ref is None or torch.equal(seqs, ref))
    compile_s = max(first - timing.median_s, 0.0) if stats.get("compiled") else 0.0
    return Row(name, batch, timing.median_s, new, int(stats.get("target_calls", 0)), equal, compile_s,
               stats.get("split", {})), seqs


def interleaved_rows(args, w: Workload, batch: int) -> list[Row]:
    """The zoo methods (``--only``: names containing one of these strings, plus the two baselines)
    in interleaved rounds (``_interleaved``): every ratio is a median of per-round ratios."""
    fns = methods(w, batch, args.new_tokens)
    keep = ("transformers generate (default)", "engine plain (compiled)")
    if args.only:
        fns = {k: f for k, f in fns.items() if k in keep or any(o in k for o in args.only)}
    cold, times, outs, _ = _interleaved(fns, args.repeats)
    hf, plain, P = times[keep[0]], times[keep[1]], w.prompts.shape[1]
    ref = outs[keep[0]][0]
    rows = []
    for name, t in times.items():
        seqs, stats = outs[name]
        med = statistics.median(t)
        rows.append(Row(name, batch, med, (seqs.shape[1] - P) * batch, int(stats.get("target_calls", 0)),
                        bool(torch.equal(seqs, ref)), max(cold[name] - med, 0.0) if stats.get("compiled") else 0.0,
                        stats.get("split", {}), _ratio(plain, t), _ratio(hf, t)))
        print(f"B={batch} {name:60s} {rows[-1].new_tokens / med:8.1f} tok/s  vs plain {rows[-1].vs_plain:.2f}x  "
              f"equal={rows[-1].equal}", flush=True)
    return rows


def methods(w: Workload, batch: int, new_tokens: int) -> dict[str, Callable[[], tuple[torch.Tensor, dict]]]:
    from transformers.generation.configuration_utils import CompileConfig
    ids, mask, target = w.prompts[:batch], w.mask[:batch], w.target
    # every method stops at the model's own EOS (if it has one), as generate does
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    cc = CompileConfig(fullgraph=True, mode="reduce-overhead" if ids.device.type == "cuda" else "default")
    cc._compile_all_devices = True   # transformers only auto-compiles on accelerators otherwise

    def hf_default():
        with torch.no_grad():
            return target.generate(ids, attention_mask=mask, **kw), {"target_calls": new_tokens}

    def hf_static():
        with torch.no_grad():
            out = target.generate(ids, attention_mask=mask, cache_implementation="static", compile_config=cc, **kw)
        return out, {"target_calls": new_tokens, "compiled": True}

    def ours(compile: bool):
        def run():
            st: dict = {}
            out = eng_mod.generate(target, ids, mask, max_new_tokens=new_tokens, pad_token_id=0,
                                   compile=compile, stats=st)
            return out, {"target_calls": st["target_calls"], "compiled": compile}
        return run

    table = {"transformers generate (default)": hf_default,
             "transformers static cache + compile": hf_static,
             "engine plain (eager)": ours(False),
             "engine plain (compiled)": ours(True)}
    table.update(speculative_methods(w, batch, new_tokens))
    return table


def _engines_of(model) -> list:
    return list(eng_mod._POOL.get(model, {}).values())


def _forward_s(models) -> float:
    return sum(e.stats.forward_s for m in models for e in _engines_of(m))


def speculative_methods(w: Workload, batch: int, new_tokens: int, k: int = 3) -> dict[str, Callable]:
    """Engine + each speculative method of ``accelerando.llm`` (greedy, so all must equal the baseline).

    k = 3 drafts make the verification step 4 tokens wide: a compiled width with no padding.
    """
    import inspect

    from accelerando.llm import DraftModel, PromptLookup, speculative_generate
    if "engine" not in inspect.signature(speculative_generate).parameters:
        return {}
    ids, mask, target = w.prompts[:batch], w.mask[:batch], w.target

    def spec(make_drafter, draft_models, engine="engine"):
        def run():
            before_t, before_d = _forward_s([target]), _forward_s(draft_models)
            t0 = time.perf_counter()
            out = speculative_generate(target, ids, attention_mask=mask, draft=make_drafter(),
                                       max_new_tokens=new_tokens, pad_token_id=0, engine=engine)
            total = time.perf_counter() - t0
            st = out.stats
            steps = max(st["steps"], 1)
            t_verify = (_forward_s([target]) - before_t) / (steps + 1)
            t_draft = (_forward_s(draft_models) - before_d) / (steps + 1)
            split = ({"draft": t_draft, "verify": t_verify, "rest": total / (steps + 1) - t_draft - t_verify}
                     if engine != "hf" else {})
            return out.sequences, {"target_calls": st["target_calls"], "compiled": engine == "engine",
                                   "split": split}
        return run

    table: dict[str, Callable] = {}
    for name, d in w.drafts.items():
        table[f"engine + draft model {name} (k={k})"] = spec(lambda d=d: DraftModel(d, k=k), [d])
        table[f"engine + draft model {name} (k=adaptive, k_max=7)"] = spec(
            lambda d=d: DraftModel(d, k="adaptive", k_max=7), [d])
    table[f"engine + prompt lookup (k<={k})"] = spec(lambda: PromptLookup(k=k), [])
    table["engine + prompt lookup (k=adaptive, k_max=7)"] = spec(lambda: PromptLookup(k="adaptive", k_max=7), [])
    first = next(iter(w.drafts))
    if batch == 1:   # the tree loop runs one sequence at a time
        table[f"engine + draft tree {first} (2 chains x 3)"] = _tree_method(w, first, new_tokens)
    table[f"transformers cache + draft model {first} (k={k})"] = spec(
        lambda: DraftModel(w.drafts[first], k=k), [], engine="hf")
    return table


def _tree_method(w: Workload, draft_name: str, new_tokens: int) -> Callable:
    from accelerando.llm import speculative_generate
    from accelerando.llm.drafters import DraftTree
    ids = w.prompts[:1][:, w.mask[0].bool()]          # row 0 has no padding

    def run():
        out = speculative_generate(w.target, ids, draft=DraftTree(w.drafts[draft_name], width=2, depth=3),
                                   max_new_tokens=new_tokens, engine="engine", pad_token_id=0,
                                   eos_token_id=w.target.generation_config.eos_token_id or [])
        seqs = torch.cat([w.prompts[:1], out.sequences[:, ids.shape[1]:]], 1)    # same layout as the padded baseline
        return seqs, {"target_calls": out.stats["target_calls"], "compiled": True}
    return run


# Random-initialised Llama-family models the engine was not tuned on (issue 22): ~15M and ~60M
# parameters, with and without GQA. Their outputs are meaningless; their timing is real.
RANDOM_SHAPES = {
    "rand-15m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=16000),
    "rand-15m-gqa": dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=16000),
    "rand-60m": dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                     num_key_value_heads=8, vocab_size=32000),
    "rand-60m-gqa": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=32000),
}
SPEC_ON = ("rand-15m", "rand-60m")      # speculation rows (the others: plain decoding only, fewer compiles)


def _matmul_ms(eng) -> tuple[float, float]:
    """(weights MB one decode step reads through its matmuls, ms for those matmuls alone at batch 1):
    x @ W over the engine's own fused, transposed weights, the floor a step cannot go below."""
    ws = [b for n, b in eng.decoder.named_buffers() if n.startswith(("wqkv", "wo", "wgu", "wd", "lm_head_t"))]
    xs = {w.shape[0]: torch.randn(1, w.shape[0]) for w in ws}
    for w in ws:                                            # touch every weight once (page faults)
        xs[w.shape[0]] @ w
    t0 = time.perf_counter()
    for w in ws:
        xs[w.shape[0]] @ w
    return sum(w.numel() * w.element_size() for w in ws) / 1e6, (time.perf_counter() - t0) * 1e3


def _interleaved(fns: dict[str, Callable[[], Any]], rounds: int, extra: Callable[[], Any] | None = None):
    """Cold (first call of each, in order), one more warm-up each, then ``rounds`` rounds in which every
    method runs once (round-robin, so load changes hit all methods alike). Returns (cold s per method,
    per-round seconds per method, last outputs, per-round results of ``extra``)."""
    cold, outs = {}, {}
    for k, f in fns.items():
        t0 = time.perf_counter()
        outs[k] = f()
        cold[k] = time.perf_counter() - t0
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    extras = []
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            outs[k] = f()
            times[k].append(time.perf_counter() - t0)
        if extra is not None:
            extras.append(extra())
    return cold, times, outs, extras


def _ratio(num: list[float], den: list[float]) -> float:
    """Median of the per-round ratios num / den (times: > 1 means den is faster)."""
    return statistics.median(a / b for a, b in zip(num, den))


def random_models(args) -> str:
    """Plain decoding (transformers vs engine, with the engine's per-step split into forward and
    loop, and the matmuls-only floor) and adaptive speculation on the engine, cold and warm
    (interleaved rounds), on the random models."""
    from accelerando.llm import DraftModel, PromptLookup, speculative_generate
    rows = []
    for name, shape in RANDOM_SHAPES.items():
        if args.models and name not in args.models:
            continue
        target = _random_llama(0, **shape, max_position_embeddings=1024)
        n_params = sum(p.numel() for p in target.parameters()) / 1e6
        g = torch.Generator().manual_seed(0)
        P, N = args.prompt_len, args.new_tokens
        ids = torch.randint(3, shape["vocab_size"], (1, P), generator=g)
        ids[:, P // 2:] = ids[:, : P - P // 2]                            # repetition for prompt lookup
        kw = dict(max_new_tokens=N, pad_token_id=0)
        eng = eng_mod.Engine.open(target, batch_size=1, max_len=P + N, role="target")
        split = []

        def plain():
            f0, c0 = eng.stats.forward_s, eng.stats.forward_calls
            t0 = time.perf_counter()
            out = eng_mod.generate(target, ids, max_new_tokens=N, pad_token_id=0, eos_token_id=[])
            wall = time.perf_counter() - t0
            calls = eng.stats.forward_calls - c0
            split.append(((eng.stats.forward_s - f0) / calls, wall / calls))
            return out

        fns = {"transformers generate": lambda: target.generate(ids, do_sample=False, **kw),
               "engine plain (compiled)": plain}
        if name in args.spec_on:
            draft = _truncated_draft(target, 2)
            spec = lambda make: (lambda: speculative_generate(target, ids, draft=make(), engine="engine",  # noqa: E731
                                                              eos_token_id=[], **kw))
            fns[f"engine + prompt lookup (k=adaptive, k_max={args.k_max})"] = spec(
                lambda: PromptLookup(k="adaptive", k_max=args.k_max))
            fns[f"engine + draft: first 2 layers (k=adaptive, k_max={args.k_max})"] = spec(
                lambda: DraftModel(draft, k="adaptive", k_max=args.k_max))
        cold, times, outs, mm = _interleaved(fns, args.repeats, extra=lambda: _matmul_ms(eng))
        ref = outs["transformers generate"]
        hf, pl = times["transformers generate"], times["engine plain (compiled)"]
        fwd = statistics.median(f for f, _ in split[-args.repeats:])
        per_call = statistics.median(c for _, c in split[-args.repeats:])
        mb, mm_ms = mm[0][0], statistics.median(m for _, m in mm)
        for label, t in times.items():
            o = outs[label]
            seqs = o if torch.is_tensor(o) else o.sequences
            st = None if torch.is_tensor(o) else o.stats
            is_plain = label == "engine plain (compiled)"
            rows.append([name, f"{n_params:.0f}M", label, f"{_ratio(hf, t):.2f}x", f"{_ratio(pl, t):.2f}x",
                         f"{N / statistics.median(t):.0f}", f"{cold[label]:.1f}",
                         f"{fwd * 1e3:.1f} / {(per_call - fwd) * 1e3:.1f} (matmuls alone {mm_ms:.1f}; {mb:.0f} MB)"
                         if is_plain else "-",
                         "-" if st is None else f"{st['acceptance_rate']:.2f} / {st['mean_k']:.2f}",
                         "yes" if torch.equal(seqs, ref) else "NO"])
        print("\n".join(" | ".join(map(str, r)) for r in rows[-len(fns):]), flush=True)
        del eng
    return markdown_table(["model", "params", "method", "vs transformers (warm)", "vs engine plain (warm)",
                           "tokens/s (warm)", "cold s (first call)",
                           "engine per step ms: forward / loop", "acceptance / mean k", "same tokens"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (--random: interleaved rounds)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny run, writes nothing")
    ap.add_argument("--dry", action="store_true", help="full run, print the table, write nothing")
    ap.add_argument("--random", action="store_true",
                    help="the random ~15M / ~60M Llama models instead (section llm_engine_random; --threads 1)")
    ap.add_argument("--k-max", type=int, default=7, help="adaptive k cap for --random (7: steps up to 8 wide)")
    ap.add_argument("--spec-on", nargs="*", default=list(SPEC_ON), help="--random models that also get speculation rows")
    ap.add_argument("--interleave", action="store_true",
                    help="zoo: run the methods in interleaved rounds (--repeats of them); ratios are per-round medians")
    ap.add_argument("--only", nargs="*", default=None,
                    help="zoo --interleave: only methods whose name contains one of these (plus the two baselines)")
    ap.add_argument("--models", nargs="*", choices=list(RANDOM_SHAPES), default=None,
                    help="--random: only these models (run the others in another locked run; --dry prints the table)")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.batches = 16, 1, [1]
    torch.set_num_threads(args.threads)
    if args.random:
        t0 = time.perf_counter()
        table = random_models(args)
        print(table)
        if not (args.quick or args.dry):
            _write_random(args, table, time.perf_counter() - t0)
        return
    w = load_workload(args.prompt_len)
    P = w.prompts.shape[1]
    rows: list[Row] = []
    for batch in args.batches:
        if args.interleave:
            rows += interleaved_rows(args, w, batch)
            continue
        ref = None
        for name, fn in methods(w, batch, args.new_tokens).items():
            row, seqs = run_method(name, fn, ref, batch, args.repeats, P)
            if ref is None:
                ref = seqs
            rows.append(row)
            print(f"B={batch} {name:45s} {row.new_tokens / row.median_s:8.1f} tok/s  equal={row.equal}", flush=True)
    table = _table(rows)
    print(table)
    if not (args.quick or args.dry):
        _write(args, w, rows, table)


def _table(rows: list[Row]) -> str:
    base = {r.batch: r for r in rows if r.method.startswith("transformers generate")}
    inter = any(r.vs_plain is not None for r in rows)
    out = []
    for r in rows:
        tps = r.new_tokens / r.median_s
        b = base[r.batch]
        split = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in r.split.items()) or "-"
        vs_hf = r.vs_hf if r.vs_hf is not None else tps / (b.new_tokens / b.median_s)
        out.append([r.method, r.batch, round(tps, 1), f"{vs_hf:.2f}x"]
                   + ([f"{r.vs_plain:.2f}x"] if inter else [])
                   + [round(r.new_tokens / r.batch / max(r.target_calls, 1), 2), split,
                      f"{r.compile_s:.1f}" if r.compile_s else "-", "yes" if r.equal else "NO"])
    return markdown_table(["method", "batch", "tokens/s", "vs transformers default"]
                          + (["vs engine plain"] if inter else [])
                          + ["tokens per target call", "per-step ms (draft / verify / rest)",
                             "compile s", "same tokens"], out)


def _write_random(args, table: str, wall: float) -> None:
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    md = (f"### The engine on models it was not tuned for (random-initialised Llama family)\n\n"
          f"`python benchmarks/llm_engine.py --random --threads {args.threads} --new-tokens {args.new_tokens} "
          f"--repeats {args.repeats} --spec-on {' '.join(args.spec_on)}` ({wall:.0f} s) -- {machine_line()}; load "
          f"average at the end {load} (a shared 2-core machine: other jobs ran on both cores). Batch 1, greedy, a "
          f"{args.prompt_len}-token random prompt whose second half repeats the first, {args.new_tokens} new tokens. "
          f"Shapes: {RANDOM_SHAPES}. Cold = the first call of each method in the process, in table order "
          f"(compiles every graph the method needs that an earlier row did not; inductor's on-disk cache may "
          f"already hold them). Warm: after one more warm-up call each, {args.repeats} interleaved rounds (every "
          f"method once per round, round-robin); a ratio is the median of the per-round ratios, so a load change "
          f"during the run hits every method alike. Per-step split of the engine's plain decoding: time inside "
          f"the compiled forward per call vs the rest of the decode loop per call, next to the step's matmuls "
          f"alone through torch's matmul (MKL x @ W over the engine's weights, batch 1, measured in each round) and "
          f"the weight bytes a step reads; the engine's one-token step multiplies by its own compiled dot-product "
          f"loop (`DOT_MAX_ROWS`), which runs below that. The draft is the target's first 2 layers "
          f"(random weights: it never agrees); prompt lookup copies the repeated half. Speculative rows run on "
          f"the same engine as plain decoding (`engine=\"engine\"`).\n\n{table}\n")
    write_section("llm_engine_random", md)


def _write(args, w: Workload, rows: list[Row], table: str) -> None:
    cmd = "python benchmarks/llm_engine.py" + ("" if args.new_tokens == 96 else f" --new-tokens {args.new_tokens}")
    cmd += "" if args.threads == 2 else f" --threads {args.threads}"
    n_pad = int((w.mask[: max(args.batches)] == 0).any(1).sum())
    pad_note = f"{n_pad} of the rows left-padded" if n_pad else "no padding"
    load = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    md = (f"### Lean decode engine (static KV cache + compiled forward) vs transformers\n\n"
          f"`{cmd}` -- {machine_line()}. Greedy, {args.new_tokens} new tokens, prompt {w.prompts.shape[1]} "
          f"tokens ({pad_note}), median of {args.repeats}. Models: {w.source}. No GPU in this "
          f"session: the CUDA-graph path (`mode=\"reduce-overhead\"`) is untested here. Machine load average at the end "
          f"of the run: {load} (shared with other jobs). \"compile s\" = first call minus a steady call (all "
          f"graphs a method needs; later methods reuse earlier graphs). Per-step split: time inside the draft's and "
          f"the target's engine forwards per step, the rest is the loop's bookkeeping.\n\n{table}\n")
    write_section("llm_engine", md)
    try:
        from accelerando.bench.history import Measurement, open_history
        with open_history() as h:
            h.record_many([Measurement(
                workload={"family": "llm", "model": w.source.split(";")[0], "batch": r.batch,
                          "prompt_len": int(w.prompts.shape[1]), "new_tokens": args.new_tokens, "greedy": True},
                method=r.method, knobs={"threads": args.threads},
                metrics={"median_s": r.median_s, "tokens_per_s": r.new_tokens / r.median_s,
                         "target_calls": r.target_calls, "equal_to_baseline": r.equal,
                         "compile_s": r.compile_s, **{f"step_{k}_s": v for k, v in r.split.items()}})
                for r in rows])
    except ImportError as exc:
        print(f"history store unavailable ({exc}); table written only")


if __name__ == "__main__":
    main()
