"""Cheaper forward passes on the zoo target: quality gate + speed, every method in one run.

    python benchmarks/llm_compute.py            # full run (~10-20 min on 2 busy CPU cores)
    python benchmarks/llm_compute.py --quick    # smoke run, nothing written
    python benchmarks/llm_compute.py --dry      # full run, print, write nothing

(a) Quality of every lossy transform on held-out stdlib code and pydoc prose: 64-token prefix
prefilled, the next 64 tokens decoded one at a time under teacher forcing; perplexity change and
KL(original || transformed) per token; greedy-continuation match = fraction of the 4 code prompts'
greedy tokens equal to the original model's (same positions); bits per weight actually stored.
(b) Speed: greedy tokens/s at batch 1 and 4 against plain ``generate`` and the lean engine in the
same run; lossless methods must reproduce ``generate``'s tokens exactly. Anchors: torchao's int8
weight-only (if installed) and transformers' ``assistant_early_exit``.
Writes the ``llm_compute`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from accelerando.bench.methods import LLMSetup, NotApplicable, get_method
from accelerando.bench.metrics import token_agreement
from accelerando.bench.report import machine_line, markdown_table, write_section
from accelerando.llm.compute import coreinfer as C
from accelerando.llm.compute import layerskip as L
from accelerando.llm.compute import quant as Q
from accelerando.llm.compute import sage as S
from accelerando.llm.compute.quality import decode_logits, decode_quality

GROUP = 64          # divides the zoo target's 192 and 512


def lossy_transforms() -> dict[str, tuple[Callable[[Any], Any], str, dict]]:
    """name -> (transform of a model copy, registry method for timing, its knobs)."""
    def q(method, **kw):
        return lambda m: Q.quantize_model(m, Q.QuantConfig(method=method, **kw))
    return {
        "int8 weight-only (ours, packed)": (q("int8", packed=True), "quant-int8", {}),
        "int8 weight-only (torchao, anchor)": (Q.torchao_int8, "torchao-int8", {}),
        f"int4 RTN asym g{GROUP} (packed)": (q("int4", group_size=GROUP, packed=True), "quant-int4", {"group_size": GROUP}),
        f"int4 RTN sym g{GROUP} (simulated)": (q("int4-sym", group_size=GROUP), None, {}),
        f"BitMoD 4-bit g{GROUP} (simulated)": (q("bitmod", group_size=GROUP, bits=4), "quant-bitmod",
                                               {"bits": 4, "group_size": GROUP, "packed": False}),
        f"BitMoD 4-bit g{GROUP} (packed, dequant+matmul)": (q("bitmod", group_size=GROUP, bits=4, packed=True),
                                                          "quant-bitmod", {"bits": 4, "group_size": GROUP, "packed": True}),
        f"BitMoD 3-bit g{GROUP} (simulated)": (q("bitmod", group_size=GROUP, bits=3), "quant-bitmod",
                                               {"bits": 3, "group_size": GROUP, "packed": False}),
        "CoreInfer a=0.4 b=0.2": (lambda m: C.apply_coreinfer(m, C.CoreInferConfig(0.4, 0.2)), "coreinfer",
                                  {"alpha": 0.4, "beta": 0.2}),
        "CoreInfer a=0.6 b=0.3": (lambda m: C.apply_coreinfer(m, C.CoreInferConfig(0.6, 0.3)), "coreinfer",
                                  {"alpha": 0.6, "beta": 0.3}),
        "layer skip, balanced 1 of 4 (ULS)": (lambda m: L.skip_view(m, L.SkipConfig(skip=1)), "layer-skip", {"skip": 1}),
        "early exit after 3 of 4 layers": (lambda m: L.skip_view(m, L.SkipConfig(exit_layer=3)), "layer-skip",
                                           {"exit_layer": 3}),
        "SageAttention INT8 QK + FP8 PV": (lambda m: S.use_sage_attention(m, qk="int8", pv="fp8"), "sage-attn", {"pv": "fp8"}),
        "SageAttention INT4 QK + FP8 PV": (lambda m: S.use_sage_attention(m, qk="int4", pv="fp8"), None, {}),
    }


def lossless_methods(batch: int) -> list[tuple[str, str, dict]]:
    rows = [("self-spec exit 2, k=3 (engine)", "self-spec", {"exit_layer": 2, "k": 3, "engine": "static"}),
            ("self-spec ULS skip 1, k=3 (engine)", "self-spec", {"skip": 1, "k": 3, "engine": "static"}),
            ("self-spec exit 2, k=3 (transformers cache)", "self-spec", {"exit_layer": 2, "k": 3, "engine": "hf"})]
    if batch == 1:
        rows.append(("assistant_early_exit=2, k=3 (transformers, anchor)", "hf-early-exit", {"exit_layer": 2, "k": 3}))
    return rows


@dataclass
class Data:
    target: Any
    tok: Any
    windows: dict[str, torch.Tensor]   # domain -> (N, 128) held-out token windows
    prompts: torch.Tensor              # (4, P) left-padded code prompts
    mask: torch.Tensor


def load(n_windows: int, win: int, prompt_len: int) -> Data:
    from accelerando import zoo
    from accelerando.zoo import data
    target = zoo.load("code-target")
    tok = zoo.load_tokenizer("code-target")
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    windows = {}
    for kind in ("code", "prose"):
        ids = torch.tensor(tok("\n".join(data.texts(kind, "heldout"))).input_ids)
        n = min(n_windows, len(ids) // win)
        stride = len(ids) // n
        windows[kind] = torch.stack([ids[i * stride: i * stride + win] for i in range(n)])
    texts = data.heldout_prompts("code", n=4, chars=400)
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=prompt_len)
    return Data(target, tok, windows, enc.input_ids, enc.attention_mask)


def setup(d: Data, batch: int, new_tokens: int) -> LLMSetup:
    return LLMSetup(target=d.target, tokenizer=d.tok, input_ids=d.prompts[:batch], attention_mask=d.mask[:batch],
                    max_new_tokens=new_tokens, eos_token_id=None)


def timed_rows(fns: dict[str, tuple[Callable, bool]], batch: int, P: int, rounds: int) -> list[dict[str, Any]]:
    """Interleaved rounds (every method once per round, order rotated); a ratio is the median over
    rounds of the per-round ratio, so load drift on this shared machine hits both sides alike."""
    import statistics

    from accelerando.bench.harness import measure_interleaved
    timings = measure_interleaved({n: f for n, (f, _) in fns.items()}, rounds=rounds, warmup_rounds=1)
    names = list(fns)
    base, eng = timings[names[0]], timings[names[1]]
    ref = base.result.sequences
    rows = []
    for name, (_, lossless) in fns.items():
        t = timings[name]
        out = t.result
        new = (out.sequences.shape[1] - P) * batch
        ratio = lambda other: statistics.median(o / x for o, x in zip(other.samples, t.samples))  # noqa: E731
        rows.append(dict(method=name, batch=batch, s=t.median_s, tps=new / t.median_s, vs_generate=ratio(base),
                         vs_engine=ratio(eng), exact=bool(torch.equal(out.sequences, ref)), lossless=lossless,
                         agree=token_agreement(out.sequences, ref, prompt_len=P, pad_token_id=None)))
        print(f"B={batch} {name:50s} {new / t.median_s:8.1f} tok/s  x{rows[-1]['vs_generate']:.2f} vs generate  "
              f"x{rows[-1]['vs_engine']:.2f} vs engine  exact={rows[-1]['exact']}", flush=True)
    return rows


BIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8,
           num_key_value_heads=8, vocab_size=2048)


def memory_bound_speed(args) -> list[dict[str, Any]]:
    """The weight-only kernels where weights dominate a step: a random-init Llama of BIG's shape
    (54M parameters in the decoder linears); speed only (random weights have no quality to keep)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**BIG, max_position_embeddings=512, pad_token_id=0)).eval()
    ids = torch.randint(3, 2048, (4, 32), generator=torch.Generator().manual_seed(0))
    rows = []
    for batch in (1, 4):
        s = LLMSetup(target=model, tokenizer=None, input_ids=ids[:batch], attention_mask=torch.ones_like(ids[:batch]),
                     max_new_tokens=32, eos_token_id=None)
        fns: dict[str, tuple[Callable, bool]] = {
            "transformers generate (baseline)": (get_method("generate").build(s), True),
            "lean engine generate (compiled)": (get_method("engine-generate").build(s), True),
            "int8 weight-only (ours, packed)": (get_method("quant-int8").build(s), False),
            f"int4 RTN asym g{GROUP} (packed)": (get_method("quant-int4").build(s, group_size=GROUP), False)}
        try:
            fns["int8 weight-only (torchao, anchor)"] = (get_method("torchao-int8").build(s), False)
        except NotApplicable as exc:
            print(f"torchao: {exc}")
        rows += timed_rows(fns, batch, 32, args.rounds)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=48)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--heldout", action="store_true",
                    help="only the whole-held-out-set perplexity table (section llm_compute_heldout)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--dry", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.windows, args.rounds = 16, 2, 1
    torch.set_num_threads(args.threads)
    if args.heldout:
        md = heldout_table(args)
        print(md)
        if not (args.quick or args.dry):
            write_section("llm_compute_heldout", md)
        return
    d = load(args.windows, 128, args.prompt_len)
    P = d.prompts.shape[1]

    # ---------------------------------------------------------------- (a) quality
    ref_logits = {k: decode_logits(d.target, w, 64) for k, w in d.windows.items()}
    s4 = setup(d, 4, args.new_tokens)
    base4 = get_method("generate").build(s4)().sequences
    quality: dict[str, dict[str, Any]] = {}
    for name, (fn, _, _) in lossy_transforms().items():
        try:
            m = fn(copy.deepcopy(d.target))
        except ImportError as exc:
            quality[name] = {"error": str(exc)}
            print(f"{name}: {exc}")
            continue
        row: dict[str, Any] = {"bpw": Q.bits_per_weight(m) if hasattr(m, "_accelerando_quant") else None}
        for kind, w in d.windows.items():
            q = decode_quality(d.target, m, w, prefix=64, reference_logits=ref_logits[kind])
            row[kind] = q
        with torch.no_grad():
            out = m.generate(s4.input_ids, attention_mask=s4.attention_mask, max_new_tokens=args.new_tokens,
                             do_sample=False, pad_token_id=d.tok.pad_token_id)
        row["greedy_match"] = token_agreement(out, base4, prompt_len=P, pad_token_id=None)
        if name.startswith("SageAttention"):
            row["attn_cos"] = S.attention_cosine(m, d.windows["code"][:2])
        if name.startswith("CoreInfer"):
            m.generate(s4.input_ids, attention_mask=s4.attention_mask, max_new_tokens=1, do_sample=False)
            row["core_fraction"] = C.core_fraction(m)
        quality[name] = row
        print(f"{name:45s} code ppl {row['code']['ppl_change']:+.2%} prose {row['prose']['ppl_change']:+.2%} "
              f"KL {row['code']['kl']:.4f} match {row['greedy_match']:.2f}", flush=True)

    # ---------------------------------------------------------------- (b) speed
    speed: list[dict[str, Any]] = []
    for batch in (1, 4):
        s = setup(d, batch, args.new_tokens)
        fns: dict[str, tuple[Callable, bool]] = {
            "transformers generate (baseline)": (get_method("generate").build(s), True),
            "lean engine generate (compiled)": (get_method("engine-generate").build(s), True)}
        for name, (_, method, knobs) in lossy_transforms().items():
            if method is None or "error" in quality.get(name, {}):
                continue
            try:
                fns[name] = (get_method(method).build(s, **knobs), False)
            except NotApplicable as exc:
                print(f"{name}: n/a ({exc})")
        for name, method, knobs in lossless_methods(batch):
            fns[name] = (get_method(method).build(s, **knobs), True)
        speed += timed_rows(fns, batch, P, args.rounds)
    big: list[dict[str, Any]] = []
    if not args.quick:
        big = memory_bound_speed(args)

    md = render(args, d, quality, speed, big)
    print(md)
    if not (args.quick or args.dry):
        write_section("llm_compute", md)


@torch.no_grad()
def _nll(model: Any, windows: torch.Tensor, chunk: int = 16) -> float:
    tot = 0.0
    for i in range(0, len(windows), chunk):
        w = windows[i:i + chunk]
        logits = model(w).logits[:, :-1].float()
        tot += torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
    return tot / (windows.shape[0] * (windows.shape[1] - 1))


def heldout_table(args) -> str:
    """Every held-out token of both domains, teacher-forced in full forwards (256-token windows):
    a sharper perplexity comparison for the transforms that act on every forward (weights,
    attention, layer skipping). CoreInfer acts on decode steps only and is judged in (a)."""
    import math
    d = load(10_000, 256, args.prompt_len)
    base = {k: _nll(d.target, w) for k, w in d.windows.items()}
    rows = []
    for name, (fn, _, _) in lossy_transforms().items():
        if name.startswith("CoreInfer"):
            continue
        try:
            m = fn(copy.deepcopy(d.target))
        except ImportError as exc:
            rows.append([name, "-", f"not run: {exc}", ""])
            continue
        ch = {k: math.exp(_nll(m, w) - base[k]) - 1 for k, w in d.windows.items()}
        bpw = Q.bits_per_weight(m) if hasattr(m, "_accelerando_quant") else None
        rows.append([name, "-" if bpw is None else f"{bpw:.2f}", _pct(ch["code"]), _pct(ch["prose"])])
        print(rows[-1], flush=True)
    n = {k: w.numel() for k, w in d.windows.items()}
    return (f"### (d) Perplexity change over every held-out token (zoo `code-target`)\n\n"
            f"`python benchmarks/llm_compute.py --heldout` -- {machine_line()}. Teacher-forced full forwards over "
            f"256-token windows: {n['code']} code tokens (original perplexity {math.exp(base['code']):.2f}), "
            f"{n['prose']} prose tokens ({math.exp(base['prose']):.2f}). CoreInfer changes decode steps only: see (a).\n\n"
            + markdown_table(["method", "bits/weight stored", "ppl change code", "ppl change prose"], rows) + "\n")


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.2%}"


def render(args, d: Data, quality: dict, speed: list[dict], big: list[dict]) -> str:
    qrows = []
    for name, r in quality.items():
        if "error" in r:
            qrows.append([name, "-", "not run: " + r["error"].split(":")[0], "", "", "", "", ""])
            continue
        extra = ""
        if "attn_cos" in r:
            extra = "attn cos/layer " + ", ".join(f"{c:.4f}" for c in r["attn_cos"])
        if "core_fraction" in r:
            extra = f"core neurons kept: {r['core_fraction']:.0%}"
        qrows.append([name, "-" if r["bpw"] is None else f"{r['bpw']:.2f}", _pct(r["code"]["ppl_change"]),
                      _pct(r["prose"]["ppl_change"]), f"{r['code']['kl']:.4f}", f"{r['prose']['kl']:.4f}",
                      f"{r['greedy_match']:.2f}", extra])
    qt = markdown_table(["method", "bits/weight stored", "ppl change code", "ppl change prose", "KL code",
                         "KL prose", "greedy match", "notes"], qrows)
    srows = [[r["method"], r["batch"], round(r["tps"], 1), f"{r['vs_generate']:.2f}x", f"{r['vs_engine']:.2f}x",
              ("yes" if r["exact"] else "NO") if r["lossless"] else f"{r['agree']:.2f}"] for r in speed]
    heads = ["method", "batch", "tokens/s", "vs generate", "vs engine", "same tokens (lossless) / match (lossy)"]
    st = markdown_table(heads, srows)
    bt = markdown_table(heads, [[r["method"], r["batch"], round(r["tps"], 1), f"{r['vs_generate']:.2f}x",
                                 f"{r['vs_engine']:.2f}x", ("yes" if r["exact"] else "NO") if r["lossless"]
                                 else f"{r['agree']:.2f}"] for r in big]) if big else "(not run)"
    base = quality.get(f"int4 RTN asym g{GROUP} (packed)", {})
    verdicts = targets(quality, speed, big)
    load_avg = f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"
    ppl0 = {k: base.get(k, {}).get("ppl_ref") for k in ("code", "prose")}
    return (
        f"## Cheaper forward passes (issue 19)\n\n"
        f"`python benchmarks/llm_compute.py` -- {machine_line()}; load average at the end {load_avg} (shared machine). "
        f"Model: zoo `code-target` (Llama, 4 layers, hidden 192, 2.2M parameters, fp32). No GPU in this run.\n\n"
        f"### (a) Quality gate (teacher-forced decoding, {d.windows['code'].shape[0]} held-out windows per domain: "
        f"64-token prefix, 64 decoded tokens; original perplexity code {ppl0['code'] or 0:.2f}, prose {ppl0['prose'] or 0:.2f})\n\n"
        f"Greedy match: 4 held-out code prompts, {args.new_tokens} new tokens, fraction of positions equal to the original's. "
        f"Bits/weight: over the decoder linears, scales / zeros / datatype ids included (embeddings and the tied LM head stay fp32). "
        f"\"simulated\" = dequantised fp32 weights (same outputs as the packed format); \"packed\" = the low-bit codes are what is stored.\n\n"
        f"{qt}\n\n"
        f"### (b) Speed on the zoo target (greedy, {args.new_tokens} new tokens, {args.rounds} interleaved rounds: "
        f"every method once per round; a ratio is the median of the per-round ratios)\n\n{st}\n\n"
        f"### (c) Weight-only kernels where weights dominate: random-init Llama {BIG} (32-token prompt, 32 new tokens, "
        f"same protocol; speed only, the quality gate is (a))\n\n{bt}\n\n"
        f"### Targets of the issue\n\n" + "\n".join(f"- {v}" for v in verdicts) + "\n\n"
        f"### What is real and what is simulated\n\n"
        f"- int8: int8 weights + per-row scales through `torch.ops.aten._weight_int8pack_mm` (activations cast to bf16); "
        f"torchao's `Int8WeightOnlyConfig` is the anchor. int4 RTN: tinygemm-packed nibbles through "
        f"`_weight_int4pack_mm_for_cpu`. torchao's int4 needs CUDA / mslk and does not run on this CPU.\n"
        f"- BitMoD: the packed module stores the codes (two per byte), 2-bit datatype ids and fp16 group scales, "
        f"but a CPU has no bit-serial datapath: its forward dequantises and multiplies in fp32, so it is slower, not faster. "
        f"Quality numbers are exact for the format.\n"
        f"- SageAttention: the INT8 product is computed exactly (integer-valued fp32 matmul) and FP8 rounding by torch's float8 casts, "
        f"so the numerics are the method's; on this CPU it is slower than exact attention (no INT8/FP8 units). "
        f"The `sageattention` GPU package was not run (no GPU).\n"
        f"- CoreInfer: decoding multiplies gathered (core-neuron) weights, a real smaller matmul; the prefill runs the full MLP.\n"
        f"- Self-speculation drafts with a view of the target's own layers (shared weights); the draft keeps its own "
        f"KV cache (the target's early layers' cache is not shared yet).\n")


def targets(quality: dict, speed: list[dict], big: list[dict]) -> list[str]:
    out = []

    def sp(method, batch, key="vs_engine"):
        r = next((r for r in speed if r["method"] == method and r["batch"] == batch), None)
        return None if r is None else r[key]

    best = max((r for r in speed if r["batch"] == 1 and r["method"].startswith("self-spec") and r["exact"]),
               key=lambda r: r["vs_engine"], default=None)
    if best:
        ok = best["vs_engine"] >= 1.3
        out.append(f"self-speculation lossless and >= 1.3x the plain engine at batch 1: **{'met' if ok else 'not met'}** "
                   f"(best: {best['method']}, {best['vs_engine']:.2f}x the engine, exact tokens; no skip schedule or "
                   f"adapter was trained)")
    se, ae = sp("self-spec exit 2, k=3 (engine)", 1, "s"), sp("assistant_early_exit=2, k=3 (transformers, anchor)", 1, "s")
    if se and ae:
        out.append(f">= 10% faster than assistant_early_exit at the same exit layer (2): "
                   f"**{'met' if ae / se >= 1.1 else 'not met'}** ({ae / se:.2f}x)")
    i8 = quality.get("int8 weight-only (ours, packed)")
    s8 = sp("int8 weight-only (ours, packed)", 1, "vs_generate")
    big8 = next((r["vs_generate"] for r in big if r["method"].startswith("int8 weight-only (ours") and r["batch"] == 1), None)
    if i8 and s8:
        ppl = max(abs(i8["code"]["ppl_change"]), abs(i8["prose"]["ppl_change"]))
        out.append(f"int8 weight-only >= 1.3x with perplexity change <= 1%: speed **{'met' if s8 >= 1.3 else 'not met'}** "
                   f"({s8:.2f}x generate at batch 1 on the zoo target"
                   + (f", {big8:.2f}x on the 54M-weight model of (c)" if big8 else "") + f"), perplexity **{'met' if ppl <= 0.01 else 'not met'}** ({ppl:.2%})")
    bm4, bm3 = quality.get(f"BitMoD 4-bit g{GROUP} (simulated)"), quality.get(f"BitMoD 3-bit g{GROUP} (simulated)")
    i4 = quality.get(f"int4 RTN asym g{GROUP} (packed)")
    if bm4 and i4:
        for tag, bm in (("4-bit", bm4), ("3-bit", bm3)):
            if not bm:
                continue
            better = all(bm[k]["ppl_change"] < i4[k]["ppl_change"] for k in ("code", "prose"))
            out.append(f"BitMoD {tag} ({bm['bpw']:.2f} bits/weight) perplexity change below int4 RTN's "
                       f"({i4['bpw']:.2f} bits/weight) at group {GROUP}: **{'met' if better else 'not met'}** "
                       f"(code {_pct(bm['code']['ppl_change'])} vs {_pct(i4['code']['ppl_change'])}, prose "
                       f"{_pct(bm['prose']['ppl_change'])} vs {_pct(i4['prose']['ppl_change'])})")
    return out


if __name__ == "__main__":
    main()
