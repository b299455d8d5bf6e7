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
BACKENDS = {"hf": "transformers", "engine": "lean engine"}


def triforce(model: Any, tok: Any, lengths: list[int], new: int, rounds: int, ratio: float, ks: list,
             backends: list[str], temps: list[float]) -> list:
    """TriForce vs plain decoding on the same backend (transformers' DynamicCache or the lean engine,
    compiled), greedy and sampled, in interleaved rounds (a warm-up round first: compiles).
    Decode only: plain = ``plain``'s loop after the prefill; TriForce = from its drafter's ``begin``
    (right after the target's prefill; the draft's set-up included) to the end. End to end: each
    call's wall time. Sampled runs use seed = the round for both (lossless in distribution: the
    tests' chi-square; greedy: token equality, checked here every round)."""
    from accelerando.llm.kv.triforce import TriForce
    from accelerando.llm.sampling import SamplingConfig
    from accelerando.llm.speculative import speculative_generate
    stream = corpus_filler(tok, "heldout")
    rows = []
    max_k = max([k for k in ks if isinstance(k, int)] + [12])
    for n in lengths:
        ids = stream[5000: 5000 + n][None]
        for be in backends:
            for temp in temps:
                arms = ["plain"] + list(ks)
                rec: dict = {a: [] for a in arms}
                same = {k: True for k in ks}
                for rnd in range(rounds + 1):          # round 0: warm-up (compiles), not recorded
                    for arm in arms:
                        t0 = time.perf_counter()
                        if arm == "plain":      # the loop TriForce's target runs, on the same pooled cache
                            ref, r = plain(model, ids, new, be, SamplingConfig(temp), torch.Generator().manual_seed(rnd),
                                           max_nodes=TriForce(model, k=max_k).max_nodes)
                        else:
                            d = TriForce(model, k=arm, ratio=ratio)
                            out = speculative_generate(model, ids, draft=d, max_new_tokens=new, engine=be,
                                                       temperature=temp, seed=rnd, eos_token_id=[])
                            t1 = time.perf_counter()
                            s = out.stats
                            r = {"e2e": t1 - t0, "dec": t1 - d.decode_t0, "acc": s["acceptance_rate"],
                                 "tps": (s["accepted_tokens"] + s["steps"]) / max(1, s["steps"]),
                                 "steps": s["steps"], "k": s["mean_k"], "setup": d.prefill_s}
                            if temp == 0:
                                same[arm] &= torch.equal(out.sequences, ref)
                        if rnd:
                            rec[arm].append(r)
                med = lambda a, key: statistics.median(x[key] for x in rec[a])  # noqa: E731
                for k in ks:
                    ratio_dec = statistics.median(p["dec"] / t["dec"] for p, t in zip(rec["plain"], rec[k]))
                    ratio_e2e = statistics.median(p["e2e"] / t["e2e"] for p, t in zip(rec["plain"], rec[k]))
                    rows.append([n, new, BACKENDS[be], "greedy" if temp == 0 else f"T={temp:g}", ratio, k,
                                 f"{med('plain', 'dec') * 1e3 / (new - 1):.2f}",
                                 f"{med(k, 'dec') * 1e3 / med(k, 'steps'):.2f}", f"{med(k, 'k'):.1f}",
                                 f"{statistics.mean(x['acc'] for x in rec[k]):.2f}",
                                 f"{statistics.mean(x['tps'] for x in rec[k]):.2f}",
                                 f"{ratio_dec:.2f}x", f"{ratio_e2e:.2f}x",
                                 ("yes" if same[k] else "NO") if temp == 0 else "(distribution: tests)"])
                    print("D", rows[-1], flush=True)
    return rows


@torch.no_grad()
def plain(model: Any, ids: torch.Tensor, new: int, backend: str, sampling: Any, generator: Any, *,
          max_nodes: int) -> tuple[torch.Tensor, dict]:
    """Plain decoding through the speculative loop's own pieces (``open_cache`` sized as for a
    drafter of ``max_nodes`` nodes, so the engine is the pooled one TriForce's target uses;
    ``plain_run``): (sequences, {"e2e": s, "dec": s after the prefill and first token})."""
    from accelerando.llm.engine import open_cache
    from accelerando.llm.sampling import pick
    from accelerando.llm.speculative import plain_run
    t0 = time.perf_counter()
    n = ids.shape[1]
    tgt = open_cache(model, engine=backend, batch_size=1, max_len=n + new + max_nodes + 1, max_step=max_nodes + 1,
                     role="target")
    first = pick(tgt.forward(ids, last=True).logits[:, -1], sampling, generator)
    first.tolist()                    # the speculative loop's first sync, at the same place
    t1 = time.perf_counter()
    toks, _ = plain_run(tgt, first, new - 1, sampling, generator)
    toks.tolist()
    t2 = time.perf_counter()
    return torch.cat([ids, first[:, None], toks], 1), {"e2e": t2 - t0, "dec": t2 - t1}


def _call_cost(cache: Any, t: int, repeats: int) -> float:
    """Median seconds of appending ``t`` tokens to a decode cache (``DecodeCache``: transformers'
    or the engine's), each call rolled back (a warm-up call first: a compiled width compiles)."""
    ts = []
    x = torch.ones(1, t, dtype=torch.long)
    for _ in range(repeats + 1):
        start = cache.mark()
        t0 = time.perf_counter()
        cache.forward(x)
        ts.append(time.perf_counter() - t0)
        cache.rollback(start, torch.zeros(1, dtype=torch.long), 0)
    return statistics.median(ts[1:])


@torch.no_grad()
def triforce_costs(model: Any, tok: Any, lengths: list[int], new: int, ratio: float, ks: list[int],
                   backends: list[str], repeats: int) -> dict:
    """Per-call costs at each context and backend, on caches sized as in the runs: a full-cache
    target step (1 token), a verification of k + 1 tokens, a draft step over the ``ratio``
    retrieval cache (the engine: the same pooled engines and compiled widths as TriForce's)."""
    from transformers import DynamicCache
    from accelerando.llm.engine import open_cache
    from accelerando.llm.kv.generate import engine_cache
    from accelerando.llm.kv.triforce import TriForce
    stream = corpus_filler(tok, "heldout")
    out = {}
    for n in lengths:
        ids = stream[5000: 5000 + n][None]
        keep = int(round(ratio * n))
        for be in backends:
            nodes = TriForce(model, k=max(ks)).max_nodes
            tgt = open_cache(model, engine=be, batch_size=1, max_len=n + new + nodes + 1, max_step=nodes + 1,
                             role="target")
            tgt.forward(ids, last=True)
            if be == "hf":
                drf = open_cache(model, engine="hf", batch_size=1, max_len=keep + new, role="draft")
                drf.forward(ids[:, :keep], last=True)
            else:
                view = DynamicCache(config=model.config)
                for i, layer in enumerate(tgt.cache.layers):
                    view.update(layer.k[:, :, :keep].clone(), layer.v[:, :, :keep].clone(), i)
                drf = engine_cache(model, view, n, room=new + 2 * nodes + 2, compile=True, role="TriForce draft")
            out[(n, be)] = {"target": _call_cost(tgt, 1, repeats), "draft": _call_cost(drf, 1, repeats),
                            **{f"verify{k}": _call_cost(tgt, k + 1, repeats) for k in ks},
                            "slots": (getattr(tgt, "max_len", n), getattr(drf, "max_len", keep))}
            print("D costs", n, be, {a: (round(b * 1e3, 3) if isinstance(b, float) else b)
                                     for a, b in out[(n, be)].items()}, flush=True)
    return out


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


def tiny_draft_cost(window: int, backend: str, repeats: int) -> float:
    """One decode step of the zoo's ``code-draft-tiny`` over a ``window``-token cache (a StreamingLLM
    cache's size) on ``backend``: what a third TriForce level's draft step would cost here."""
    from transformers import AutoModelForCausalLM
    from accelerando import zoo
    from accelerando.llm.engine import open_cache
    tiny = AutoModelForCausalLM.from_pretrained(zoo.path("code-draft-tiny")).float().eval()
    ids = torch.randint(1, tiny.config.vocab_size, (1, window), generator=torch.Generator().manual_seed(0))
    c = open_cache(tiny, engine=backend, batch_size=1, max_len=window + 64, role="third level")
    with torch.no_grad():
        c.forward(ids, last=True)
        return _call_cost(c, 1, repeats)


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
            ks, ratio, new, reps = ([3, "adaptive"] if q else [3, 7, "adaptive"]), 0.1, (32 if q else 256), (1 if q else 3)
            lens = [1024] if q else [4096, 7680]       # 7680 + 256 new + a step's slots fit 8192: one cache bucket
            backends, temps = ["engine", "hf"], [0.0, 1.0]
            fixed = [k for k in ks if isinstance(k, int)]
            rows = triforce(model, tok, lens, new, reps, ratio, ks, backends, temps)
            costs = triforce_costs(model, tok, lens, new, ratio, fixed, backends, 9)
            tiny = {be: tiny_draft_cost(256, be, 9) for be in backends}
            tiny_acc = tiny_agreement(model, tok, 2048, 256, windows=1 if q else 4)
            crow = []
            for r in rows:
                n, be, k = r[0], {v: b for b, v in BACKENDS.items()}[r[2]], r[5]
                if not isinstance(k, int):
                    continue
                c = costs[(n, be)]
                parts_ms = k * c["draft"] + c[f"verify{k}"]
                crow.append([n, r[2], r[3], k, f"{c['slots'][0]} / {c['slots'][1]}", f"{c['target'] * 1e3:.2f}",
                             f"{c['draft'] * 1e3:.2f}", f"{c[f'verify{k}'] * 1e3:.2f}",
                             f"{c[f'verify{k}'] / c['target']:.2f}", f"{parts_ms * 1e3:.2f}", r[7],
                             f"{float(r[7]) - parts_ms * 1e3:.2f}", r[10],
                             f"{projected(c, k, float(r[10])):.2f}x", r[11]])
            md = [header.replace("Greedy decoding.", "Greedy and sampled (temperature 1) decoding.")]
            md += ["", f"**D. TriForce** (the target with a {ratio:.0%} retrieval-chunk cache, cut from its own prefill, "
                   f"drafts k tokens for the full-cache target; {new} new tokens, EOS off; plain = the same loop's plain "
                   "steps on the same cache (`plain` in this script); on transformers' DynamicCache and on the lean "
                   "engine (compiled steps, static caches: the target's sized to the context, the draft's to what it "
                   "keeps); `adaptive` = k chosen every step from measured costs and acceptance (`AdaptiveK`, k = 0: "
                   "plain steps); decode only = from the end of the prefill (the draft's set-up included) to the last "
                   f"token; speed-ups are medians of per-round ratios over {reps} interleaved rounds after a warm-up "
                   "round; sampled runs seed both with the round; tokens/round = accepted drafts + 1)", "",
                   markdown_table(["context", "new tokens", "backend", "sampling", "draft cache ratio", "k",
                                   "plain ms/token", "TriForce ms/round", "mean k", "acceptance", "tokens/round",
                                   "speed-up, decode only", "speed-up, end to end", "greedy == plain"], rows),
                   "", "What a round costs (ms; per-call medians of 9 on caches sized as in the runs: a target step, "
                   "a draft step, a verification of k + 1 tokens; `loop` = the measured round minus k draft steps and "
                   "one verification: the speculative loop's own work per round); `projected` = tokens/round x target "
                   "step / (k draft steps + verification), i.e. with no loop cost at all:", "",
                   markdown_table(["context", "backend", "sampling", "k", "slots target / draft", "target step",
                                   "draft step", "verify k+1", "verify / step", "k drafts + verify", "measured round",
                                   "loop", "tokens/round", "projected", "measured decode only"], crow),
                   "", "Third level (a tiny draft with a StreamingLLM cache drafting for the retrieval-cache draft): a "
                   "step of `code-draft-tiny` (1 layer x 64) over a 256-token cache costs "
                   + " / ".join(f"{tiny[be] * 1e3:.2f} ms on {BACKENDS[be]}" for be in backends)
                   + ", against the retrieval draft's "
                   + " / ".join(f"{costs[(n, be)]['draft'] * 1e3:.2f}" for n in lens for be in backends)
                   + f" ms ({', '.join(f'{n} {BACKENDS[be]}' for n in lens for be in backends)}); its greedy "
                   f"agreement with this model (teacher-forced over held-out code at 2048 tokens) is {tiny_acc:.2f}: "
                   f"about {1 / (1 - tiny_acc):.2f} tokens per middle-level forward even if its steps were free, so it "
                   "cannot pay here (the zoo's drafts were distilled from `code-target`, not from this model); not built."]
            parts["D"] = "\n".join(md)
    print("\n".join(md))
    if not a.no_write:
        write_parts(parts, f"{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
