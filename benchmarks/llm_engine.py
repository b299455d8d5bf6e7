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
    cfg = LlamaConfig(**shape, max_position_embeddings=1024, eos_token_id=None, bos_token_id=None,
                      pad_token_id=0)
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
    table[f"engine + prompt lookup (k<={k})"] = spec(lambda: PromptLookup(k=k), [])
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny run, writes nothing")
    ap.add_argument("--dry", action="store_true", help="full run, print the table, write nothing")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.batches = 16, 1, [1]
    torch.set_num_threads(args.threads)
    w = load_workload(args.prompt_len)
    P = w.prompts.shape[1]
    rows: list[Row] = []
    for batch in args.batches:
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
    out = []
    for r in rows:
        tps = r.new_tokens / r.median_s
        b = base[r.batch]
        split = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in r.split.items()) or "-"
        out.append([r.method, r.batch, round(tps, 1), f"{tps / (b.new_tokens / b.median_s):.2f}x",
                    round(r.new_tokens / r.batch / max(r.target_calls, 1), 2), split,
                    f"{r.compile_s:.1f}" if r.compile_s else "-", "yes" if r.equal else "NO"])
    return markdown_table(["method", "batch", "tokens/s", "vs transformers default",
                           "tokens per target call", "per-step ms (draft / verify / rest)",
                           "compile s", "same tokens"], out)


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
