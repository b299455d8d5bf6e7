"""KV-cache selection and compression on the long-context zoo target, next to kvpress.

    python benchmarks/llm_kvcache.py                 # full run, writes BENCHMARKS.md
    python benchmarks/llm_kvcache.py --quick --no-write

Measured in one run, same model, same prompts:
  A. retrieval exact match (multi-key needles in held-out code haystacks) by context length and depth
  B. long held-out code (context = the trained length): teacher-forced KL(full || method) and
     perplexity over the continuation, greedy-continuation token match with the full cache
  C. cost: prefill time, decode tokens/s, KV bytes held after the prefill (decode-time methods keep
     the full cache: they are marked "masked")
  D. TriForce (lossless) vs plain decoding with the full cache
Ours: StreamingLLM, SnapKV, H2O, Elastic Cache (prefill presses), TokenSelect, Recycled Attention
(decode-time). Anchor: kvpress's SnapKV, StreamingLLM, Knorm, ExpectedAttention, TOVA presses.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from accelerando.bench.report import machine_line, markdown_table, write_section
from accelerando.llm.kv.dynamic import RecycledAttention, TokenSelect
from accelerando.llm.kv.generate import kv_continuation_logits, kv_generate
from accelerando.llm.kv.presses import ElasticCachePress, H2OPress, SnapKVPress, StreamingLLMPress
from accelerando.llm.kv.tasks import HaystackBuilder, corpus_filler

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def methods(ratio: float, *, anchor: bool = True) -> dict[str, dict[str, Any]]:
    """name -> kv_generate kwargs (fresh objects: presses keep per-call state)."""
    out: dict[str, dict[str, Any]] = {
        "streaming": {"press": StreamingLLMPress(ratio=ratio)},
        "snapkv": {"press": SnapKVPress(ratio=ratio)},
        "h2o": {"press": H2OPress(ratio=ratio)},
        "elastic": {"press": ElasticCachePress(ratio=ratio)},
        "tokenselect": {"policy": TokenSelect(ratio=ratio)},
        "recycled": {"policy": RecycledAttention(ratio=ratio)},
    }
    if anchor:
        try:
            from accelerando.llm.kv.anchor import KVPRESS_PRESSES, KVPressAnchor
            for name in KVPRESS_PRESSES:
                out[name] = {"press": KVPressAnchor(name, ratio=ratio)}
        except ModuleNotFoundError:
            pass
    return out


def load(model_dir: str | None) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from accelerando import zoo
    path = model_dir or zoo.path("code-long-target")
    model = AutoModelForCausalLM.from_pretrained(path).float().eval()
    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 1 << 20
    return model, tok


# ------------------------------------------------------------------------------------------- A
def retrieval(model: Any, tok: Any, lengths: list[int], ratios: list[float], per_cell: int,
              anchor: bool) -> tuple[dict, list]:
    """EM[(method, ratio)][length] and the per-depth EM of every method at each length."""
    b = HaystackBuilder(tok, corpus_filler(tok, "heldout"))
    samples = {n: [] for n in lengths}
    for n in lengths:
        for d in DEPTHS:
            g = torch.Generator().manual_seed(7 + n + int(100 * d))
            samples[n] += [(d, b.sample("multikey", n, gen=g, depth=d, n_keys=4)[2]) for _ in range(per_cell)]
    arms = [("full", 1.0, {})] + [(name, r, kw) for r in ratios for name, kw in methods(r, anchor=anchor).items()]
    em: dict = {}
    by_depth: list = []
    solved = list(lengths)
    for i, (name, r, kw) in enumerate(arms):
        if i == 1:     # a method's retrieval means something only where the full cache retrieves
            solved = [n for n in lengths if em[("full", 1.0, n)] >= 0.5]
            if not solved:
                print("A: full-cache exact match < 0.5 at every length: the methods' retrieval is not measured")
                break
        for n in (lengths if name == "full" else solved):
            hits = {d: [] for d in DEPTHS}
            for d, s in samples[n]:
                try:
                    out, _ = kv_generate(model, s.prompt[None], max_new_tokens=len(s.answer), **kw)
                    hits[d].append(int(torch.equal(out[0, len(s.prompt):], s.answer)))
                except (ValueError, AssertionError) as exc:        # a window that does not fit
                    hits[d].append(float("nan"))
                    print(f"  {name} r={r} n={n}: {exc}")
            allh = [h for v in hits.values() for h in v]
            em[(name, r, n)] = sum(allh) / len(allh)
            by_depth.append((name, r, n, {d: sum(v) / len(v) for d, v in hits.items()}))
        print(f"A {name} r={r}: " + ", ".join(f"{n}:{em[(name, r, n)]:.2f}" for n in lengths if (name, r, n) in em),
              flush=True)
    return em, by_depth


# ------------------------------------------------------------------------------------------- B
def code_quality(model: Any, tok: Any, ctx: int, cont: int, gen: int, windows: int, ratios: list[float],
                 anchor: bool) -> dict:
    stream = corpus_filler(tok, "heldout")
    starts = [int(i * (len(stream) - ctx - cont - 1) / max(1, windows - 1)) for i in range(windows)]
    res: dict = {}
    full_logits, full_gen = [], []
    for s in starts:
        c, y = stream[s: s + ctx][None], stream[s + ctx: s + ctx + cont][None]
        full_logits.append(kv_continuation_logits(model, c, y).float())
        full_gen.append(kv_generate(model, c, max_new_tokens=gen)[0][0, ctx:])
    for r in ratios:
        for name, kw0 in methods(r, anchor=anchor).items():
            kl, nll, match = [], [], []
            for i, s in enumerate(starts):
                kw = methods(r, anchor=anchor)[name]
                c, y = stream[s: s + ctx][None], stream[s + ctx: s + ctx + cont][None]
                lg = kv_continuation_logits(model, c, y, **kw).float()
                lp, lq = F.log_softmax(full_logits[i], -1), F.log_softmax(lg, -1)
                kl.append(float((lp.exp() * (lp - lq)).sum(-1).mean()))
                nll.append(float(F.cross_entropy(lg[0], y[0])))
                out = kv_generate(model, c, max_new_tokens=gen, **methods(r, anchor=anchor)[name])[0][0, ctx:]
                match.append(float((out == full_gen[i]).float().mean()))
            res[(name, r)] = (statistics.mean(kl), float(torch.tensor(nll).mean().exp()), statistics.mean(match))
            print(f"B {name} r={r}: KL {res[(name, r)][0]:.4f} ppl {res[(name, r)][1]:.2f} match {res[(name, r)][2]:.2f}", flush=True)
    res[("full", 1.0)] = (0.0, float(torch.tensor([float(F.cross_entropy(fl[0], stream[s + ctx: s + ctx + cont]))
                                                   for fl, s in zip(full_logits, starts)]).mean().exp()), 1.0)
    return res


# ------------------------------------------------------------------------------------------- C
def speed(model: Any, tok: Any, cells: list[tuple[int, int]], ratio: float, new: int, repeats: int,
          anchor: bool) -> list:
    """Decode tokens/s with each method on transformers' DynamicCache and, for the prefill presses,
    on the lean engine (eager steps: the pressed cache in a smaller static cache) next to the
    engine's full cache."""
    stream = corpus_filler(tok, "heldout")
    rows = []
    for n, batch in cells:
        ids = torch.stack([stream[i * 997: i * 997 + n] for i in range(batch)])
        ms = methods(ratio, anchor=anchor)
        arms = [("full", "hf")] + [(k, "hf") for k in ms if k in ("streaming", "snapkv", "h2o", "tokenselect",
                                                                   "recycled", "kvpress-snapkv")]
        arms += [("full", "engine-eager")] + [(k, "engine-eager") for k in ("streaming", "snapkv", "h2o")]
        stats: dict = {a: [] for a in arms}
        for _ in range(repeats):          # interleaved rounds: load drifts hit every method alike
            for name, eng in arms:
                kw = dict(methods(ratio, anchor=anchor).get(name, {}))
                _, st = kv_generate(model, ids, max_new_tokens=new, engine=eng, **kw)
                stats[(name, eng)].append(st)
        base = {e: statistics.median(batch * (new - 1) / s["decode_s"] for s in stats[("full", e)])
                for e in ("hf", "engine-eager")}
        for name, eng in arms:
            st = stats[(name, eng)]
            tps = statistics.median(batch * (new - 1) / s["decode_s"] for s in st)
            pre = statistics.median(s["prefill_s"] for s in st)
            held = st[0]["kv_bytes_prefill"] / 2 ** 20
            rows.append([n, batch, name, "transformers" if eng == "hf" else "lean engine",
                         ratio if name != "full" else 1.0, f"{pre:.2f}", f"{tps:.1f}",
                         f"{tps / base[eng]:.2f}x", f"{tps / base['hf']:.2f}x",
                         f"{held:.1f}" + (" (full cache, masked)" if st[0]["kv_bytes_masked"] else "")])
            print("C", rows[-1], flush=True)
    return rows


# ------------------------------------------------------------------------------------------- D
def triforce(model: Any, tok: Any, lengths: list[int], new: int, repeats: int, ratio: float, ks: list[int]) -> list:
    """TriForce vs plain decoding, both on transformers' DynamicCache; the draft's retrieval cache
    is cut from the target's prefill (``TriForce.shared_prefill``), its set-up time is reported.
    ``decode only`` subtracts the prompt's prefill (timed alone, the same for both) from both."""
    from accelerando.llm.kv.generate import prefill
    from accelerando.llm.kv.triforce import TriForce
    from accelerando.llm.speculative import speculative_generate
    stream = corpus_filler(tok, "heldout")
    rows = []
    for n in lengths:
        ids = stream[5000: 5000 + n][None]
        t_plain, t_fill, t_tri, t_pre, acc, same, shared = [], [], {k: [] for k in ks}, {k: [] for k in ks}, \
            {k: [] for k in ks}, {k: True for k in ks}, True
        tps = {k: [] for k in ks}
        for _ in range(repeats):          # interleaved: plain, the prefill alone, TriForce at each k
            t0 = time.perf_counter()
            ref, _ = kv_generate(model, ids, max_new_tokens=new)
            t_plain.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            prefill(model, ids)
            t_fill.append(time.perf_counter() - t0)
            for k in ks:
                t0 = time.perf_counter()
                drafter = TriForce(model, k=k, ratio=ratio)
                out = speculative_generate(model, ids, draft=drafter, max_new_tokens=new, engine="hf")  # same cache as plain
                t_tri[k].append(time.perf_counter() - t0)
                t_pre[k].append(drafter.prefill_s)
                acc[k].append(out.stats["acceptance_rate"])
                tps[k].append(out.stats["tokens_per_step"])
                same[k] &= torch.equal(out.sequences, ref)
                shared &= drafter.shared_prefill
        tp, tf = statistics.median(t_plain), statistics.median(t_fill)
        for k in ks:
            tt, pre = statistics.median(t_tri[k]), statistics.median(t_pre[k])
            rows.append([n, new, ratio, k, f"{tp:.2f}", f"{tt:.2f}", f"{tp / tt:.2f}x", f"{tf:.2f}",
                         f"{(tp - tf) / max(1e-9, tt - tf):.2f}x", f"{pre:.3f}", "yes" if shared else "no",
                         f"{statistics.mean(acc[k]):.2f}", f"{statistics.mean(tps[k]):.2f}", "yes" if same[k] else "NO"])
            print("D", rows[-1], flush=True)
    return rows


def widened(model: Any, *, hidden: int = 512, heads: int = 8, head_dim: int = 64, intermediate: int = 1024) -> Any:
    """``model`` (a Llama, MHA) zero-padded into a wider Llama that computes the same function: the
    trained heads keep their RoPE frequencies (dim pair j -> j * head_dim / hd), the norms and the
    query scale absorb the wider RMS and head_dim, every other weight is zero. Its steps cost what
    the wide model's do (the extra heads' zero keys and values are stored and read), its tokens are
    the trained model's: timing where the KV cache dominates, with a trained model's acceptance."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = model.config
    d, h, hd, I = c.hidden_size, c.num_attention_heads, c.head_dim, c.intermediate_size
    assert c.num_key_value_heads == h and head_dim % hd == 0 and hidden >= d and heads >= h
    cfg = LlamaConfig(**{**c.to_dict(), "hidden_size": hidden, "num_attention_heads": heads, "num_key_value_heads": heads,
                         "head_dim": head_dim, "intermediate_size": intermediate,
                         "rms_norm_eps": c.rms_norm_eps * d / hidden})   # the same eps on the d live dims
    big = LlamaForCausalLM(cfg).float().eval()
    f = head_dim // hd
    # trained head dim j -> big dim f*j (first half) / f*(j-hd/2)+head_dim/2 (second half): same RoPE frequency
    idx = torch.tensor([f * j if j < hd // 2 else f * (j - hd // 2) + head_dim // 2 for j in range(hd)])
    rows = torch.cat([hh * head_dim + idx for hh in range(h)])          # big q/k/v output rows for the trained heads
    sd, new = model.state_dict(), {k: torch.zeros_like(v) for k, v in big.state_dict().items()}
    g = math.sqrt(hidden / d)          # RMSNorm over `hidden` dims, d of them non-zero
    sq = math.sqrt(head_dim / hd)      # 1/sqrt(head_dim) scaling instead of 1/sqrt(hd)
    for k, v in sd.items():
        t = new[k]
        if k.endswith("embed_tokens.weight") or k == "lm_head.weight":
            t[:, :d] = v
        elif "norm" in k:
            t[:d] = v / g
        elif k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            t[rows, :d] = v * (sq if "q_proj" in k else 1.0)
        elif k.endswith("o_proj.weight"):
            t[:d, rows] = v
        elif k.endswith(("gate_proj.weight", "up_proj.weight")):
            t[:I, :d] = v
        elif k.endswith("down_proj.weight"):
            t[:d, :I] = v
        else:
            raise KeyError(k)
    big.load_state_dict(new, strict=False)
    big.tie_weights()
    return big


def _step_cost(model: Any, cache: Any, keep: int, t: int, repeats: int) -> float:
    """Median seconds of one forward of ``t`` tokens over the first ``keep`` columns of ``cache``
    (what a step costs depends on how many columns it reads, not on which)."""
    from accelerando.llm.cache import cache_kwarg
    from transformers import DynamicCache
    view = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        view.update(layer.keys[:, :, :keep].clone(), layer.values[:, :, :keep].clone(), i)
    ids = torch.ones(1, t, dtype=torch.long)
    pos = torch.arange(keep, keep + t)[None]
    ts = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        model(input_ids=ids, position_ids=pos, **{cache_kwarg(model): view}, use_cache=True)
        ts.append(time.perf_counter() - t0)
        view.crop(-t)           # drop the t columns this call appended
    return statistics.median(ts[1:])


def triforce_costs(model: Any, lengths: list[int], ratio: float, ks: list[int], repeats: int) -> dict:
    """Per-call costs on transformers' cache at each context: a full-cache target step (1 token),
    a verification (k + 1 tokens), a draft step over the ``ratio`` retrieval cache."""
    from accelerando.llm.kv.generate import prefill
    out = {}
    for n in lengths:
        ids = torch.randint(1, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        cache = prefill(model, ids)[1].cache
        keep = int(round(ratio * n))
        out[n] = {"target": _step_cost(model, cache, n, 1, repeats), "draft": _step_cost(model, cache, keep, 1, repeats),
                  **{f"verify{k}": _step_cost(model, cache, n, k + 1, repeats) for k in ks}}
        print("D costs", n, {a: round(b * 1e3, 2) for a, b in out[n].items()}, flush=True)
    return out


def tiny_draft_cost(window: int, repeats: int) -> float:
    """One decode step of the zoo's ``code-draft-tiny`` over a ``window``-token cache (a StreamingLLM
    cache's size): what a third TriForce level's draft step would cost here."""
    from transformers import AutoModelForCausalLM
    from accelerando import zoo
    from accelerando.llm.kv.generate import prefill
    tiny = AutoModelForCausalLM.from_pretrained(zoo.path("code-draft-tiny")).float().eval()
    ids = torch.randint(1, tiny.config.vocab_size, (1, window), generator=torch.Generator().manual_seed(0))
    return _step_cost(tiny, prefill(tiny, ids)[1].cache, window, 1, repeats)


@torch.no_grad()
def tiny_agreement(model: Any, tok: Any, n: int, window: int, cont: int = 64, windows: int = 4) -> float:
    """Teacher-forced greedy agreement of ``code-draft-tiny`` reading a StreamingLLM cache (the first
    4 tokens + the last ``window - 4``, positions within the cache) with ``model`` reading all ``n``
    tokens, over ``cont`` held-out code tokens: a third level's acceptance (greedy) per draft token."""
    from transformers import AutoModelForCausalLM
    from accelerando import zoo
    tiny = AutoModelForCausalLM.from_pretrained(zoo.path("code-draft-tiny")).float().eval()
    s = corpus_filler(tok, "heldout")
    agree = []
    for st in [int(i * (len(s) - n - cont - 1) / max(1, windows - 1)) for i in range(windows)]:
        ids = s[st: st + n + cont][None]
        ref = model(input_ids=ids).logits[0, n - 1: n + cont - 1].argmax(-1)
        win = torch.cat([ids[:, :4], ids[:, n - window + 4: n + cont]], 1)
        agree.append(float((tiny(input_ids=win).logits[0, window - 1: window + cont - 1].argmax(-1) == ref).float().mean()))
    return statistics.mean(agree)


def projected(costs: dict, k: int, tokens_per_step: float) -> float:
    """Decode speed-up of a draft/verify loop from its per-call costs and its tokens per step
    (Leviathan et al., 2023: tokens per step / (k draft steps + one verification), in target steps)."""
    return costs["target"] * tokens_per_step / (k * costs["draft"] + costs[f"verify{k}"])


SECTION = "## KV-cache selection and compression vs kvpress (issue 18)"


def write_parts(parts: dict[str, str], took: str) -> None:
    """Each part owns its own marked block (llm_kvcache, llm_kvcache_B, ...), created in order."""
    from accelerando.bench.report import BENCHMARKS_MD
    names = {p: "llm_kvcache" if p == "A" else f"llm_kvcache_{p}" for p in "ABCD"}
    text = BENCHMARKS_MD.read_text()
    for p in "ABCD":       # create missing blocks in order, so parts run separately still read A..D
        if f"<!-- BEGIN {names[p]} -->" not in text:
            write_section(names[p], (SECTION + "\n\n" if p == "A" else "") + f"(part {p} not run yet)")
            text = BENCHMARKS_MD.read_text()
    for p, body in parts.items():
        write_section(names[p], (SECTION + "\n\n" if p == "A" else "") + body + f"\n\n(this run: {took})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model dir (default: the zoo's code-long-target)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--no-write", action="store_true", help="print the tables, do not write BENCHMARKS.md")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parts", default="ABCD")
    ap.add_argument("--per-cell", type=int, default=6, help="A: retrieval samples per (length, depth)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model, tok = load(a.model)
    q = a.quick
    lengths = [512, 1024] if q else [1024, 2048, 4096, 8192]
    ratios = [0.25, 0.5]
    t0 = time.time()
    md: list[str] = []
    parts: dict[str, str] = {}
    header = (f"Command: `python benchmarks/llm_kvcache.py{' --quick' if q else ''} --parts {a.parts}`. Machine: "
              f"{machine_line()} (2 cores shared with other jobs: absolute times are noisy, ratios within one "
              f"part compare). Model: {a.model or 'zoo `code-long-target`'} (trained at 2048 tokens). Greedy decoding.")
    with torch.no_grad():
        if "A" in a.parts:
            per_cell = 1 if q else a.per_cell
            em, by_depth = retrieval(model, tok, lengths, ratios, per_cell, anchor=True)
            names = ["full"] + list(methods(0.25).keys())
            rows = []
            for name in names:
                for r in ([1.0] if name == "full" else ratios):
                    if not any((name, r, n) in em for n in lengths):
                        continue
                    ns = [n for n in lengths if (name, r, n) in em]
                    full = [em[("full", 1.0, n)] for n in ns]
                    vals = [em[(name, r, n)] for n in ns]
                    rows.append([name, r] + [f"{em[(name, r, n)]:.2f}" if (name, r, n) in em else "-" for n in lengths] +
                                [f"{sum(vals) / max(1e-9, sum(full)):.2f}"])
            md = [header]
            md += ["", f"**A. Retrieval exact match** (multi-key: 4 needles `#@ <key> <two words>` in held-out "
                   f"code, one queried; depths {DEPTHS}, {per_cell} sample(s) per depth: {per_cell * len(DEPTHS)} per "
                   "length; greedy answer == the needle's value. Methods run only at lengths where the full cache "
                   "retrieves >= 0.5 (`-`: not run); `vs full` = the method's hits / the full cache's over those lengths)",
                   "", markdown_table(["method", "kept ratio"] + [f"EM @ {n}" for n in lengths] + ["vs full"], rows)]
            dl = 2048 if 2048 in lengths else lengths[-1]
            drow = [[nm, r, n] + [f"{v[d]:.2f}" for d in DEPTHS] for nm, r, n, v in by_depth if n == dl]
            md += ["", f"By depth at {dl} tokens (the trained length):", "",
                   markdown_table(["method", "kept ratio", "length"] + [f"depth {d}" for d in DEPTHS], drow)]
            parts["A"] = "\n".join(md)
        if "B" in a.parts:
            ctx = 512 if q else 2048
            res = code_quality(model, tok, ctx, 32 if q else 64, 16 if q else 32, 1 if q else 4, ratios, anchor=True)
            rows = [[nm, r, f"{v[0]:.4f}", f"{v[1]:.2f}", f"{v[2]:.2f}"] for (nm, r), v in res.items()]
            rows.sort(key=lambda x: (x[1] != 1.0, x[1], x[0]))
            md = [header]
            md += ["", f"**B. Long held-out code** (context {ctx} tokens; teacher-forced over the next "
                   f"{32 if q else 64}; greedy continuation of {16 if q else 32} tokens compared with the full cache's; "
                   f"{1 if q else 4} windows spread over the held-out split, means)",
                   "", markdown_table(["method", "kept ratio", "KL(full || method) nats/token", "perplexity",
                                       "greedy match"], rows)]
            parts["B"] = "\n".join(md)
        if "C" in a.parts:
            cells = [(512, 1), (1024, 1)] if q else [(n, b) for b in (1, 4) for n in (1024, 2048, 4096, 8192)]
            rows = speed(model, tok, cells, 0.25, 8 if q else 64, 1 if q else 5, anchor=True)
            md = [header]
            md += ["", "**C. Cost at 25% kept** (prefill includes the press; decode tokens/s over "
                   f"{8 if q else 64} new tokens (per row), median of {1 if q else 5} interleaved rounds; "
                   "`vs full` is against the full cache on the same backend, `vs transformers full` against "
                   "transformers' full DynamicCache; the lean engine runs eager steps (no compile) over a static "
                   "cache sized to what is kept; KV MiB held after the prefill, all layers)", "",
                   markdown_table(["context", "batch", "method", "decode on", "kept ratio", "prefill s", "decode tok/s",
                                   "vs full", "vs transformers full", "KV MiB held"], rows)]
            parts["C"] = "\n".join(md)
        if "D" in a.parts:
            ks, ratio, new, reps = ([3] if q else [3, 4, 6]), 0.1, (16 if q else 64), (1 if q else 3)
            lens = [1024] if q else [2048, 4096, 8100]
            lens_l = lens
            rows = triforce(model, tok, lens, new, reps, ratio, ks)
            costs = triforce_costs(model, lens, ratio, ks, 5)
            tiny = tiny_draft_cost(256, 5)
            tiny_acc = tiny_agreement(model, tok, lens[0], 256, windows=1 if q else 4)
            large = widened(model)
            probe = corpus_filler(tok, "heldout")[:512][None]
            gap = float((large(input_ids=probe).logits - model(input_ids=probe).logits).abs().max())
            kv_x = (large.config.num_key_value_heads * large.config.head_dim) / (
                model.config.num_key_value_heads * model.config.head_dim)
            rows_l = triforce(large, tok, lens_l, new, reps, ratio, ks)
            costs_l = triforce_costs(large, lens_l, ratio, ks, 5)
            crow, ref_n = [], lens[0]       # the trained length: where the model's own text is not degenerate
            ref_tps = {(r[3]): float(r[12]) for r in rows if r[0] == ref_n}
            for name, rs, cs in (("code-long-target (trained)", rows, costs), ("code-long-target widened to 512", rows_l, costs_l)):
                for r in rs:
                    n, k = r[0], r[3]
                    c = cs[n]
                    crow.append([name, n, k, f"{c['target'] * 1e3:.2f}", f"{c['draft'] * 1e3:.2f}",
                                 f"{c[f'verify{k}'] * 1e3:.2f}", f"{c['draft'] / c['target']:.2f}", r[12],
                                 f"{projected(c, k, float(r[12])):.2f}x", r[8], f"{ref_tps[k]:.2f}",
                                 f"{projected(c, k, ref_tps[k]):.2f}x"])
            md = [header]
            md += ["", f"**D. TriForce** (the target with a {ratio:.0%} retrieval-chunk cache drafts k tokens for the full "
                   "target; both on transformers' DynamicCache; wall time includes the prompt's prefill, `decode "
                   "only` subtracts it (timed alone, median) from both; the draft's cache is cut from the target's "
                   "prefill: its set-up is one forward of the first token over the full cache; median of "
                   f"{reps} interleaved rounds; {new} new tokens; tokens/step = accepted drafts + 1 per verification)", "",
                   markdown_table(["context", "new tokens", "draft cache ratio", "k", "plain s", "TriForce s",
                                   "speed-up", "prefill s", "speed-up, decode only", "draft set-up s", "prefill shared",
                                   "acceptance", "tokens/step", "greedy == plain"], rows),
                   "", f"Where the KV cache dominates the step: `code-long-target` zero-padded into a Llama 512 wide "
                   f"(8 heads of 64, MLP 1024, {sum(p.numel() for p in large.parameters()) / 1e6:.1f}M parameters, "
                   f"{kv_x:.0f}x the KV bytes per token; `widened` in this script). It computes the trained model's "
                   f"function (max logit difference {gap:.1e} over 512 held-out tokens), so its acceptance is a "
                   "trained model's, and each of its steps costs what a 512-wide model's does (the zero heads' "
                   "keys and values are stored and read):", "",
                   markdown_table(["context", "new tokens", "draft cache ratio", "k", "plain s", "TriForce s",
                                   "speed-up", "prefill s", "speed-up, decode only", "draft set-up s", "prefill shared",
                                   "acceptance", "tokens/step", "greedy == plain"], rows_l),
                   "", "Per-call costs (ms, median of 5, transformers' cache) and the decode speed-up they imply: "
                   "tokens/step x target step / (k draft steps + one verification of k + 1 tokens), next to the "
                   "measured decode-only speed-up:", "",
                   markdown_table(["model", "context", "k", "target step ms", "draft step ms", "verify ms",
                                   "draft / target", "tokens/step", "projected", "measured decode only",
                                   f"tokens/step at {ref_n}", f"projected with {ref_n}'s tokens/step"], crow),
                   "", "The model's greedy continuation of held-out code falls into a loop at every length (a repeated "
                   "`_opt` at 2048, newlines at 4096, one character at 8100; a 2-layer model, 2.4 bits/byte on code): a "
                   "loop is as easy for the partial cache as for the full one, so these acceptances (0.5-1.0) overstate "
                   f"what real text would give. The last columns price each context's steps with the {ref_n}-token "
                   "run's tokens per step.",
                   "", f"Third level (a tiny draft with a StreamingLLM cache drafting for the retrieval-cache draft): "
                   f"a step of `code-draft-tiny` (1 layer x 64) over a 256-token cache costs {tiny * 1e3:.2f} ms "
                   f"against the trained model's retrieval-draft step of "
                   + " / ".join(f"{costs[n]['draft'] * 1e3:.2f} ms at {n}" for n in lens)
                   + ": on this CPU a step of any of these tiny models is mostly fixed per-call work, so a third "
                   "level would replace draft steps with steps costing "
                   + " / ".join(f"{tiny / costs[n]['draft']:.0%}" for n in lens)
                   + f" as much, but its greedy agreement with the trained model (teacher-forced over held-out code at "
                   f"{lens[0]} tokens) is {tiny_acc:.2f}: about {1 / (1 - tiny_acc):.2f} tokens per middle-level "
                   "forward even if the tiny steps were free, so it cannot pay here (the zoo's drafts were distilled "
                   "from `code-target`, not from this model); not built."]
            parts["D"] = "\n".join(md)
    print("\n".join(md))
    if not a.no_write:
        write_parts(parts, f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
