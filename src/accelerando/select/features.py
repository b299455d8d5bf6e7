"""Workload features: what the selector knows about a workload *without running the candidates*.

Every feature is cheap to get (read from a config, counted in the prompt, one timed forward pass)
and is here because it changes which acceleration method wins. ``FEATURES`` documents each one.

A history row's workload dict is the workload's ``key()`` (settings) plus an optional
``"features"`` dict (facts measured by the sweep or by ``recommend``); ``workload_features``
merges the two into one flat ``{name: float}`` dict. Missing facts are NaN; the models impute them.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

# name -> (family or "both", why it matters)
FEATURES: dict[str, tuple[str, str]] = {
    # -- the model
    "log_params": ("both", "log10 of the target's parameter count: bigger models are more memory-bound "
                           "per step, so spending spare compute on drafts (or fewer NFE) pays more"),
    "n_layers": ("both", "depth: per-step overhead and the cost of a forward grow with it"),
    "hidden": ("both", "width: arithmetic per token; with depth it sets compute- vs overhead-bound"),
    "vocab": ("llm", "vocabulary size: cost of the LM head and of sampling; large vocabularies make "
                     "draft/target disagreement more likely"),
    "draft_ratio": ("llm", "draft params / target params (0 = no draft model): speculative decoding "
                           "only pays if the draft is much cheaper than the target"),
    "draft_latency_ratio": ("llm", "measured draft forward time / target forward time: the real cost "
                                   "ratio c in the speed-up formula (1 - a^(k+1)) / ((1 - a)(k c + 1))"),
    "draft_alpha_min": ("llm", "draft_alpha of the batch row where it is lowest: with batch > 1 every row "
                               "waits for the row that accepts least, so the worst row sets the pace"),
    "draft_alpha": ("llm", "expected acceptance of one drafted token, sum_x min(p(x), q(x)) of the target's "
                           "and draft's next-token distributions (temperature applied; greedy: top-1 "
                           "agreement), averaged over the prompt's positions with teacher forcing, so no "
                           "candidate runs: with the cost ratio it gives speculation's expected speed-up"),
    "spec_gain": ("llm", "speculative decoding's expected speed-up from theory, max over k = 1..8 of "
                         "(1 - a^(k+1)) / ((1 - a)(k c + 1)) with a = draft_alpha and c = "
                         "draft_latency_ratio: the two measurements combined the way the method uses them"),
    "lookup_alpha": ("llm", "prompt lookup's expected acceptance, measured like draft_alpha on the prompt "
                            "(teacher forcing): at each position the (3,2,1)-gram lookup proposes the token "
                            "that followed the last earlier match; acceptance = the target's probability of "
                            "it at the workload's temperature (greedy: top-1 agreement), 0 without a match"),
    "lookup_alpha_min": ("llm", "lookup_alpha of the batch row where it is lowest (see draft_alpha_min)"),
    "lookup_gain": ("llm", "prompt lookup's expected speed-up from theory: spec_gain with a = lookup_alpha "
                           "and a near-free draft (c = 0.05)"),
    "target_top1": ("llm", "mean probability of the target's most likely next token on the prompt (at the "
                           "workload's temperature; greedy: at 1): a peaked target continues "
                           "predictably (and loops), which is what copying drafters and small drafts hit"),
    "target_markov": ("llm", "how far the target's next token is a function of the current token alone: "
                             "over pairs of prompt positions holding the same token, the probability that "
                             "the target's next tokens agree (greedy: same argmax; sampling: sum_x p_i(x) "
                             "p_j(x) at the temperature). Near 1, generation is a map on a finite set that "
                             "soon cycles, and the generated text repeats itself: what prompt lookup copies "
                             "even from a prompt with no repeats"),
    "gen_lookup_alpha": ("llm", "prompt lookup's acceptance on the target's *own continuation*: a short plain "
                                "decode of the target (the probe, ``PROBE_TOKENS`` tokens at the workload's "
                                "temperature and seed), then lookup_alpha measured at the continuation's "
                                "positions with the prompt plus the continuation so far as the lookup's "
                                "context. Prompt lookup copies from what the model generates as much as from "
                                "the prompt; a model whose output cycles is found here, not in the prompt"),
    "gen_lookup_alpha_min": ("llm", "gen_lookup_alpha of the batch row where it is lowest"),
    "gen_lookup_gain": ("llm", "lookup_gain with a = gen_lookup_alpha"),
    "gen_draft_alpha": ("llm", "draft_alpha measured on the probe's continuation (teacher forcing): the text "
                               "the draft will really be asked to predict, which is not the prompt's text"),
    "gen_draft_alpha_min": ("llm", "gen_draft_alpha of the batch row where it is lowest"),
    "gen_spec_gain": ("llm", "spec_gain with a = gen_draft_alpha"),
    "gen_rep3": ("llm", "trigram repetition within the probe's continuation (rep3 of the generated "
                        "tokens): how soon the output repeats itself"),
    "log_fwd_ms": ("both", "log10 of one measured target forward (ms) at the workload's batch and "
                           "length: tiny, overhead-bound forwards leave little to gain from batching "
                           "drafted tokens; diffusion: cost of one NFE"),
    # -- the data / prompts
    "prompt_len": ("llm", "prompt length in tokens: longer prompts give prompt lookup more to copy "
                          "and make the prefill a larger share of the time"),
    "rep1": ("llm", "fraction of prompt tokens seen earlier in the prompt (prompt lookup's last-resort "
                    "1-gram match)"),
    "rep2": ("llm", "fraction of prompt bigrams seen earlier in the prompt: repetitive input is what "
                    "prompt-lookup decoding copies from"),
    "rep3": ("llm", "same for trigrams (prompt lookup's default match length)"),
    "rep4": ("llm", "same for 4-grams: long repeats let lookup drafts of 4-8 tokens be accepted whole"),
    "unique_ratio": ("llm", "distinct tokens / tokens in the prompt: low = repetitive, predictable text"),
    # -- decoding / sampling settings
    "temperature": ("llm", "0 = greedy; higher temperature lowers draft acceptance (p and q flatten "
                           "differently), so speculation wins less"),
    "greedy": ("llm", "1 when temperature is 0: greedy acceptance is all-or-nothing per token"),
    "top_p": ("llm", "nucleus mass (1 = off): truncation changes the acceptance rate"),
    "batch": ("both", "batch size: larger batches make each step compute-bound, shrinking the gain "
                      "of verifying several drafted tokens per step"),
    "log_new_tokens": ("llm", "log2 of max_new_tokens: short generations cannot amortise drafting "
                              "overhead (prefill of the draft)"),
    "steps": ("diffusion", "NFE budget (timesteps on the grid): low budgets favour high-order "
                           "multistep solvers, large budgets make every solver accurate"),
    "log_steps": ("diffusion", "log2 of the NFE budget"),
    "image_size": ("diffusion", "pixels per side: cost per NFE"),
    "transformer": ("diffusion", "1 when the denoiser is a transformer over image patches (a DiT), 0 for a "
                                 "convolutional UNet: block caching (HarmoniCa, diffusers' hooks), region-"
                                 "adaptive sampling and token merging act on transformer blocks only, and "
                                 "the two architectures respond differently to the same solver and budget"),
    "channels": ("diffusion", "image channels"),
    "spacing_trailing": ("diffusion", "1 for trailing timestep spacing (reaches t = T-1), which "
                                      "changes the error of few-step samplers"),
    "spacing_linspace": ("diffusion", "1 for linspace spacing"),
    # -- the quality budget (set by the request, not by the workload)
    # -- the hardware
    "cores": ("both", "CPU cores: on CPU, parallel work per step is bounded by them"),
    "mem_gb": ("both", "host memory (GB)"),
    "mem_bw_gbs": ("both", "measured memory bandwidth (GB/s): decoding is bandwidth-bound, so the "
                           "bytes-per-token of target vs draft decide speculation's gain"),
    "accelerator": ("both", "1 with a GPU: kernel launch overhead and parallel verification change "
                            "the balance between draft and target"),
}


def feature_names(family: str) -> list[str]:
    """The feature names used for a family, in a fixed order."""
    return [n for n, (fam, _) in FEATURES.items() if fam in ("both", family)]


# ----------------------------------------------------------------------------- prompt statistics

def ngram_repetition(tokens: Sequence[Any], n: int = 3) -> float:
    """Fraction of the n-grams of ``tokens`` (after the first) that already occurred earlier.

    This is what prompt-lookup decoding can exploit: a repeated n-gram means the continuation of
    its earlier occurrence is a free draft. 0 for sequences shorter than n + 1.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if len(grams) < 2:
        return 0.0
    seen, hits = {grams[0]}, 0
    for g in grams[1:]:
        hits += g in seen
        seen.add(g)
    return hits / (len(grams) - 1)


REP_NS = (1, 2, 3, 4)


def prompt_stats(token_lists: Sequence[Sequence[Any]]) -> dict[str, float]:
    """Mean length, n-gram repetition (n = 1..4) and distinct-token ratio over prompts (token ids)."""
    lists = [list(t) for t in token_lists if len(t)]
    if not lists:
        return {"prompt_len": 0.0, **{f"rep{n}": 0.0 for n in REP_NS}, "unique_ratio": 1.0}
    mean = lambda xs: float(sum(xs) / len(xs))  # noqa: E731
    return {"prompt_len": mean([len(t) for t in lists]),
            **{f"rep{n}": mean([ngram_repetition(t, n) for t in lists]) for n in REP_NS},
            "unique_ratio": mean([len(set(t)) / len(t) for t in lists])}


def lookup_acceptance(tokens: Sequence[int], logits: Any, *, temperature: float = 0.0,
                      ngram_sizes: Sequence[int] = (3, 2, 1), start: int = 1) -> float:
    """Prompt lookup's acceptance of one drafted token, measured on the prompt with teacher forcing.

    ``logits[i]``: the target's next-token logits after ``tokens[:i + 1]``. At each position the
    lookup (the drafter's own rule) proposes the token that followed the last earlier match of the
    trailing n-gram; it is accepted with the target's probability of it (temperature > 0; the
    speculative-sampling acceptance of a one-hot draft) or when it is the target's argmax (greedy).
    Positions without a match count 0. Mean over the positions ``start`` .. len - 2 (0 if none);
    ``start`` = the prompt's length - 1 scores only a continuation's tokens, with the prompt as context.
    """
    import numpy as np
    from accelerando.llm.drafters.prompt_lookup import lookup
    toks = np.asarray(list(tokens), dtype=np.int64)
    L = len(toks)
    start = max(1, start)
    if L - 1 <= start:
        return 0.0
    lg = logits.float()
    probs = (lg / temperature).softmax(-1) if temperature > 0 else None
    top = lg.argmax(-1)
    acc = []
    for i in range(start, L - 1):
        prop = lookup(toks[: i + 1], ngram_sizes, 1)
        if not len(prop) or int(prop[0]) >= lg.shape[-1]:
            acc.append(0.0)
        elif probs is not None:
            acc.append(float(probs[i, int(prop[0])]))
        else:
            acc.append(float(int(top[i]) == int(prop[0])))
    return float(sum(acc) / len(acc))


# ----------------------------------------------------------------------------- models

def _cfg_get(cfg: Any, *names: str) -> Any:
    for n in names:
        v = cfg.get(n) if isinstance(cfg, Mapping) else getattr(cfg, n, None)
        if v is not None:
            return v
    return None


def model_stats(model: Any) -> dict[str, float]:
    """Parameter count (log10), depth, width and vocabulary from a transformers / diffusers model."""
    n = sum(p.numel() for p in model.parameters())
    cfg = getattr(model, "config", {}) or {}
    layers = _cfg_get(cfg, "num_hidden_layers", "n_layer", "num_layers")
    hidden = _cfg_get(cfg, "hidden_size", "n_embd", "d_model")
    if hidden is None and is_patch_transformer(model):      # diffusers DiT: heads x head width
        hidden = (_cfg_get(cfg, "num_attention_heads") or 0) * (_cfg_get(cfg, "attention_head_dim") or 0) or None
    if hidden is None:     # diffusers UNet: widest block
        boc = _cfg_get(cfg, "block_out_channels")
        hidden = max(boc) if boc else None
        if layers is None and boc:
            layers = len(boc) * (_cfg_get(cfg, "layers_per_block") or 1)
    out = {"log_params": math.log10(max(n, 1)), "n_layers": _num(layers), "hidden": _num(hidden)}
    vocab = _cfg_get(cfg, "vocab_size")
    if vocab is not None:
        out["vocab"] = float(vocab)
    return out


def _num(v: Any) -> float:
    return float(v) if v is not None else math.nan


def forward_latency_ms(fn, *, repeats: int = 3) -> float:
    """Median wall time (ms) of ``fn()`` after one warm-up call, via the shared harness."""
    from accelerando.bench.harness import default_sync, measure
    t = measure(fn, warmup=1, repeats=repeats, sync=default_sync())
    return t.median_s * 1e3


# ----------------------------------------------------------------------------- hardware

@functools.lru_cache(maxsize=1)
def memory_bandwidth_gbs(n_bytes: int = 32 * 2**20) -> float:
    """Copy bandwidth (GB/s, read + write counted) of a ``n_bytes`` tensor; best of 3 copies."""
    import torch
    src = torch.empty(n_bytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = math.inf
    for _ in range(3):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * n_bytes / best / 1e9


def hardware_features(hw: Mapping[str, Any] | None = None, *, measure_bandwidth: bool = True) -> dict[str, float]:
    """Cores, memory, accelerator flag (from a history row's ``hardware`` dict or this machine)."""
    if hw is None:
        from accelerando.bench.history import hardware_info
        hw = hardware_info()
    mem = hw.get("memory_bytes")
    accel = str(hw.get("accelerator", "none") or "none")
    out = {"cores": float(hw.get("cores") or os.cpu_count() or 1),
           "mem_gb": float(mem) / 2**30 if mem else math.nan,
           "accelerator": 0.0 if accel.lower() in ("none", "", "cpu") else 1.0}
    if "mem_bw_gbs" in hw:
        out["mem_bw_gbs"] = float(hw["mem_bw_gbs"])
    elif measure_bandwidth:
        out["mem_bw_gbs"] = memory_bandwidth_gbs()
    return out


# ----------------------------------------------------------------------------- measured facts

PROBE_TOKENS = 24     # the continuation probe's length: a few dozen forwards, far less than any candidate run


def acceptance_rate(target_logits: Any, draft_logits: Any, *, temperature: float = 0.0,
                    mask: Any = None) -> float:
    """Mean over positions of sum_x min(p(x), q(x)) (speculative sampling's acceptance probability
    of one drafted token); temperature 0 uses the argmax one-hots, i.e. top-1 agreement."""
    import torch
    V = min(target_logits.shape[-1], draft_logits.shape[-1])
    a, b = target_logits[..., :V].float(), draft_logits[..., :V].float()
    if temperature > 0:
        per = torch.minimum((a / temperature).softmax(-1), (b / temperature).softmax(-1)).sum(-1)
    else:
        per = (a.argmax(-1) == b.argmax(-1)).float()
    if mask is not None:
        m = mask.bool()
        return float(per[m].mean()) if m.any() else 0.0
    return float(per.mean())


def llm_facts(*, target: Any, input_ids: Any, attention_mask: Any = None,
              drafts: Mapping[str, Any] | None = None, pad_token_id: int | None = None,
              temperature: float = 0.0, top_p: float | None = None, seed: int = 0,
              probe_tokens: int = PROBE_TOKENS, repeats: int = 3) -> dict[str, float]:
    """Facts about an LLM workload that need the loaded models: sizes, one timed forward of the
    target (and of the first draft) on the real batch, the draft's acceptance rate on the prompt
    (teacher-forced), prompt statistics of the real tokens, and the same acceptances on the
    target's own first ``probe_tokens`` tokens (``continuation_probe``; 0 skips it)."""
    import torch
    facts = model_stats(target)
    with torch.no_grad():
        t_out = [None]

        def fwd_t():
            t_out[0] = target(input_ids=input_ids, attention_mask=attention_mask).logits
        t_ms = forward_latency_ms(fwd_t, repeats=repeats)
    facts["log_fwd_ms"] = math.log10(max(t_ms, 1e-6))
    facts["draft_ratio"] = 0.0
    facts["draft_latency_ratio"] = 0.0
    facts["draft_alpha"] = 0.0
    if drafts:
        draft = next(iter(drafts.values()))
        n_t = sum(p.numel() for p in target.parameters())
        facts["draft_ratio"] = sum(p.numel() for p in draft.parameters()) / n_t
        with torch.no_grad():
            d_out = [None]

            def fwd_d():
                d_out[0] = draft(input_ids=input_ids, attention_mask=attention_mask).logits
            d_ms = forward_latency_ms(fwd_d, repeats=repeats)
        facts["draft_latency_ratio"] = d_ms / t_ms
        facts["draft_alpha"] = acceptance_rate(t_out[0], d_out[0], temperature=temperature, mask=attention_mask)
    rows, lookups, alphas = [], [], []
    for r in range(input_ids.shape[0]):
        keep = torch.ones_like(input_ids[r], dtype=torch.bool)
        if attention_mask is not None:
            keep = attention_mask[r].bool()
        elif pad_token_id is not None:
            keep = input_ids[r] != pad_token_id
        rows.append(input_ids[r][keep].tolist())
        lookups.append(lookup_acceptance(rows[-1], t_out[0][r][keep], temperature=temperature))
        if drafts:
            alphas.append(acceptance_rate(t_out[0][r][keep], d_out[0][r][keep], temperature=temperature))
    facts.update(prompt_stats(rows))
    facts["lookup_alpha"] = float(sum(lookups) / len(lookups))
    facts["lookup_alpha_min"] = float(min(lookups))
    facts["draft_alpha_min"] = float(min(alphas)) if alphas else 0.0
    facts["target_top1"] = target_top1(t_out[0], temperature=temperature, mask=attention_mask)
    keeps = [attention_mask[r].bool() if attention_mask is not None else torch.ones_like(input_ids[r], dtype=torch.bool)
             for r in range(input_ids.shape[0])]
    tm = [target_markov(rows[r], t_out[0][r][keeps[r]], temperature=temperature) for r in range(len(rows))]
    tm = [v for v in tm if not math.isnan(v)]      # rows where no token repeats say nothing
    facts["target_markov"] = float(sum(tm) / len(tm)) if tm else math.nan
    if probe_tokens > 0:
        facts.update(continuation_probe(target=target, input_ids=input_ids, attention_mask=attention_mask,
                                        drafts=drafts, temperature=temperature, top_p=top_p,
                                        new_tokens=probe_tokens, pad_token_id=pad_token_id, seed=seed))
    return facts


def continuation_probe(*, target: Any, input_ids: Any, attention_mask: Any = None,
                       drafts: Mapping[str, Any] | None = None, temperature: float = 0.0,
                       top_p: float | None = None, new_tokens: int = PROBE_TOKENS, pad_token_id: int | None = None,
                       seed: int = 0) -> dict[str, float]:
    """Acceptance measured on the target's own continuation of the prompt (the ``gen_*`` features).

    A short plain decode (``new_tokens`` tokens, the workload's temperature / top-p, seeded; greedy
    at temperature 0, so then it *is* the start of the baseline's output) and one teacher-forced
    forward of the target and the first draft over prompt + continuation. Prompt lookup and the
    draft are then scored at the continuation's positions exactly as ``lookup_alpha`` and
    ``draft_alpha`` are on the prompt. No candidate method runs: this is the baseline's own first
    tokens, the text every method will have to produce.
    """
    import torch
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    pad = pad_token_id if pad_token_id is not None else (getattr(target.config, "pad_token_id", None) or 0)
    kw: dict[str, Any] = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad)
    if temperature > 0:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p or 1.0, top_k=0)
    else:
        kw.update(do_sample=False)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        full = target.generate(input_ids=input_ids, attention_mask=mask, **kw)
        full_mask = torch.cat([mask, torch.ones_like(full[:, input_ids.shape[1]:])], dim=1)
        pos = (full_mask.cumsum(-1) - 1).clamp(min=0)         # as generate numbers left-padded rows
        t_lg = target(input_ids=full, attention_mask=full_mask, position_ids=pos).logits
        draft = next(iter(drafts.values())) if drafts else None
        d_lg = (draft(input_ids=full, attention_mask=full_mask, position_ids=pos).logits
                if draft is not None else None)
    lookups, alphas, reps = [], [], []
    for r in range(full.shape[0]):
        keep = full_mask[r].bool()
        toks, lg = full[r][keep].tolist(), t_lg[r][keep]
        start = int(mask[r].sum()) - 1           # the logits there predict the first generated token
        lookups.append(lookup_acceptance(toks, lg, temperature=temperature, start=start))
        reps.append(ngram_repetition(toks[start + 1:], 3))
        if d_lg is not None:
            scored = torch.zeros(len(toks), dtype=torch.bool)
            scored[start:len(toks) - 1] = True
            alphas.append(acceptance_rate(lg, d_lg[r][keep], temperature=temperature, mask=scored))
    out = {"gen_lookup_alpha": sum(lookups) / len(lookups), "gen_lookup_alpha_min": min(lookups),
           "gen_rep3": sum(reps) / len(reps), "gen_draft_alpha": 0.0, "gen_draft_alpha_min": 0.0}
    if alphas:
        out.update(gen_draft_alpha=sum(alphas) / len(alphas), gen_draft_alpha_min=min(alphas))
    return {k: float(v) for k, v in out.items()}


def setup_facts(setup: Any, *, repeats: int = 3) -> dict[str, float]:
    """``llm_facts`` of a bench ``LLMSetup`` (its models, first batch and sampling settings): what the
    sweep, the facts refresh and ``recommend`` measure, one call for all three."""
    tok = getattr(setup, "tokenizer", None)
    return llm_facts(target=setup.target, input_ids=setup.input_ids, attention_mask=setup.attention_mask,
                     drafts=setup.drafts, temperature=setup.temperature, top_p=setup.top_p, seed=setup.seed,
                     pad_token_id=getattr(tok, "pad_token_id", None), repeats=repeats)


def target_markov(tokens: Sequence[int], logits: Any, *, temperature: float = 0.0) -> float:
    """Mean agreement of the target's next-token predictions at positions holding the same token
    (``logits[i]`` follows ``tokens[i]``): argmax equality when greedy, else the collision
    probability sum_x p_i(x) p_j(x). NaN when no token occurs twice."""
    import torch
    toks = torch.as_tensor(list(tokens))
    lg = logits.float()
    same = (toks[:, None] == toks[None, :]).triu(1)
    if not bool(same.any()):
        return math.nan
    if temperature > 0:
        p = (lg / temperature).softmax(-1)
        agree = p @ p.T
    else:
        top = lg.argmax(-1)
        agree = (top[:, None] == top[None, :]).float()
    return float(agree[same].mean())


def target_top1(logits: Any, *, temperature: float = 0.0, mask: Any = None) -> float:
    """Mean over positions of the target's largest next-token probability (temperature 0 -> 1)."""
    p = (logits.float() / (temperature if temperature > 0 else 1.0)).softmax(-1).amax(-1)
    if mask is not None:
        m = mask.bool()
        return float(p[m].mean()) if m.any() else 0.0
    return float(p.mean())


def is_patch_transformer(model: Any) -> bool:
    """True for a denoiser that runs transformer blocks over image patches (diffusers' DiT, PixArt,
    SD3 / Flux transformers: a ``patch_size`` in the config and no UNet block channels)."""
    cfg = getattr(model, "config", {}) or {}
    return _cfg_get(cfg, "patch_size") is not None and _cfg_get(cfg, "block_out_channels") is None


def diffusion_model_facts(model: Any) -> dict[str, float]:
    """The facts of a diffusion workload that come from the denoiser alone (no timing): size, depth,
    width and the architecture (``transformer``)."""
    return {**model_stats(model), "transformer": float(is_patch_transformer(model))}


def diffusion_facts(*, eps_fn: Any, model: Any, x_T: Any, repeats: int = 3) -> dict[str, float]:
    """Facts about a diffusion workload: the denoiser's (``diffusion_model_facts``) and one timed
    eps evaluation (one NFE)."""
    import torch
    facts = diffusion_model_facts(model) if model is not None else {}
    t = torch.full((x_T.shape[0],), 500, dtype=torch.long)
    with torch.no_grad():
        facts["log_fwd_ms"] = math.log10(max(forward_latency_ms(lambda: eps_fn(x_T, t), repeats=repeats), 1e-6))
    facts["image_size"] = float(x_T.shape[-1])
    facts["channels"] = float(x_T.shape[1])
    return facts


# ----------------------------------------------------------------------------- the feature vector

def workload_features(workload: Mapping[str, Any], hardware: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Flat numeric features of one workload dict (settings + stored ``features``), NaN if unknown.

    ``hardware``: a history row's hardware dict (cores, memory, accelerator); the bandwidth is
    taken from ``workload["features"]["mem_bw_gbs"]`` when the sweep measured it.
    """
    family = str(workload.get("family", "llm"))
    facts = dict(workload.get("features") or {})
    f: dict[str, float] = {n: math.nan for n in feature_names(family)}
    if family == "llm":
        temp = float(workload.get("temperature") or 0.0)
        f.update(temperature=temp, greedy=float(temp == 0.0),
                 top_p=float(workload.get("top_p") or 1.0),
                 batch=float(workload.get("batch_size") or 1),
                 log_new_tokens=math.log2(float(workload.get("max_new_tokens") or 1)))
        if not workload.get("drafts"):
            f.update(draft_ratio=0.0, draft_latency_ratio=0.0, draft_alpha=0.0, draft_alpha_min=0.0,
                     gen_draft_alpha=0.0, gen_draft_alpha_min=0.0)
    else:
        steps = float(workload.get("steps") or 1)
        spacing = str(workload.get("spacing", "trailing"))
        f.update(steps=steps, log_steps=math.log2(steps), batch=float(workload.get("batch") or 1),
                 spacing_trailing=float(spacing == "trailing"), spacing_linspace=float(spacing == "linspace"))
    # facts the bench runner stores at the top level of the workload (``llm_workload_facts``)
    if workload.get("target_params"):
        f["log_params"] = math.log10(float(workload["target_params"]))
        drafts = [v for k, v in workload.items() if k.startswith("draft_params.") and v]
        if drafts:
            f["draft_ratio"] = float(drafts[0]) / float(workload["target_params"])
    if workload.get("prompt_len") is not None and "prompt_len" in f:
        f["prompt_len"] = float(workload["prompt_len"])
    if hardware is not None:
        f.update({k: v for k, v in hardware_features(hardware, measure_bandwidth=False).items() if k in f})
    for k, v in facts.items():
        if k in f and v is not None:
            f[k] = float(v)
    if family == "llm":
        f["spec_gain"] = spec_gain(f["draft_alpha"], f["draft_latency_ratio"])
        f["lookup_gain"] = spec_gain(f["lookup_alpha"], LOOKUP_COST)
        f["gen_spec_gain"] = spec_gain(f["gen_draft_alpha"], f["draft_latency_ratio"])
        f["gen_lookup_gain"] = spec_gain(f["gen_lookup_alpha"], LOOKUP_COST)
    return f


LOOKUP_COST = 0.05     # prompt lookup's "draft" is a search in the context: nearly free


def spec_gain(alpha: float, c: float, k_max: int = 8) -> float:
    """max_k (1 - a^(k+1)) / ((1 - a)(k c + 1)): expected tokens per target call over the cost of
    one step with k drafts (Leviathan et al.); NaN if a or c is unknown, 1 without a draft."""
    if alpha is None or c is None or math.isnan(alpha) or math.isnan(c):
        return math.nan
    if alpha <= 0 or c <= 0:
        return 1.0
    a = min(alpha, 1 - 1e-9)
    return max((1 - a ** (k + 1)) / ((1 - a) * (k * c + 1)) for k in range(1, k_max + 1))
