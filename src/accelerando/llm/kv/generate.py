"""Decoding and scoring with a KV method: prefill -> compress -> decode, on any supported
transformers causal LM (named steps; positions passed explicitly because a pressed cache is
shorter than the text it stands for)."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from accelerando.llm.cache import cache_kwarg
from accelerando.llm.kv.attention import kv_attention_enabled
from accelerando.llm.kv.presses import Press, check_kv_model, kv_bytes
from accelerando.llm.sampling import SamplingConfig, pick


def _full_bytes(model: Any, input_ids: torch.Tensor) -> int:
    """KV bytes a full cache of this prompt holds (keys + values, every layer)."""
    cfg = model.config
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * input_ids.shape[0] * hkv * input_ids.shape[1] * hd * model.dtype.itemsize


@dataclass
class KVState:
    """What the attention function consults (passed as the ``kv_state`` forward kwarg)."""
    press: Press | None = None
    policy: Any = None                 # TokenSelect / RecycledAttention (decode-time)
    observing: bool = False            # True during the prompt's prefill forward

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               mask: torch.Tensor | None, scaling: float) -> torch.Tensor | None:
        q_len = query.shape[2]
        if self.observing and self.press is not None and self.press.needs_scores:
            self.press.observe(layer, query, key, scaling)
            return None
        if q_len == 1 and self.policy is not None and not self.observing:
            return self.policy.attend(layer, query, key, value, scaling)
        return None


@dataclass
class KVRun:
    """A method's state for one sequence batch: the cache, the next position, the held bytes."""
    cache: Any
    state: KVState
    position: int
    stats: dict = field(default_factory=dict)


def _method_name(press: Any, policy: Any) -> str:
    return " + ".join(repr(x) for x in (press, policy) if x is not None) or "full cache"


def check_method(model: Any, press: Any = None, policy: Any = None) -> None:
    check_kv_model(model, _method_name(press, policy))


@torch.no_grad()
def prefill(model: Any, input_ids: torch.Tensor, *, press: Press | None = None, policy: Any = None) -> tuple[torch.Tensor, KVRun]:
    """Read the prompt (B, n) -- unpadded rows of equal length -- compress the cache with `press`.
    Returns the last position's logits (B, V) and the run state."""
    from transformers import DynamicCache

    check_method(model, press, policy)
    if input_ids.ndim != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be (batch, n >= 1), got {tuple(input_ids.shape)}")
    n = input_ids.shape[1]
    if press is not None:
        press.check_context(n)
        press.reset()
    if policy is not None:
        policy.reset()
    cache = DynamicCache(config=model.config)
    state = KVState(press=press, policy=policy, observing=True)
    t0 = time.perf_counter()
    pctx = press.prefill_context(model) if press is not None else contextlib.nullcontext()
    with kv_attention_enabled(model), pctx:
        logits = model(input_ids=input_ids, **{cache_kwarg(model): cache}, use_cache=True, kv_state=state).logits[:, -1]
    full = _full_bytes(model, input_ids)   # computed: kvpress shrinks the cache inside the prefill
    if press is not None:
        press.compress(cache)
    state.observing = False
    stats = {"prefill_s": time.perf_counter() - t0, "kv_bytes_full": full, "kv_bytes_prefill": kv_bytes(cache),
             "kv_bytes_masked": full if policy is not None else 0}
    return logits, KVRun(cache=cache, state=state, position=n, stats=stats)


@torch.no_grad()
def step(model: Any, run: KVRun, ids: torch.Tensor) -> torch.Tensor:
    """Feed ids (B, T) at the run's next positions; returns logits (B, T, V)."""
    B, T = ids.shape
    pos = torch.arange(run.position, run.position + T, device=ids.device).expand(B, T)
    with kv_attention_enabled(model):
        out = model(input_ids=ids, position_ids=pos, **{cache_kwarg(model): run.cache}, use_cache=True,
                    kv_state=run.state).logits
    run.position += T
    return out


def engine_cache(model: Any, cache: Any, position: int, *, room: int, compile: bool = False,
                 role: str = "kv press") -> Any:
    """The lean engine (``accelerando.llm.engine``) holding a pressed DynamicCache ``cache`` that
    stands for ``position`` tokens: a static cache of the kept columns + ``room`` slots (physically
    smaller: its steps attend over fewer slots), new tokens at their true positions."""
    from accelerando.llm.engine import Engine, length_bucket, unsupported_reason
    reason = unsupported_reason(model)
    if reason is not None:
        raise TypeError(f"engine= cannot run {type(model).__name__}: {reason} (use engine='hf')")
    B = cache.layers[0].keys.shape[0]
    size = length_bucket(cache.get_seq_length() + room + 1)
    # pooled per size, so a long request does not leave a later short one a larger (slower) cache
    eng = Engine.open(model, batch_size=B, max_len=size, compile=compile, role=f"{role} {size}")
    eng.load_prefix([layer.keys for layer in cache.layers], [layer.values for layer in cache.layers], position)
    return eng


ENGINES = ("hf", "engine", "engine-eager")


@torch.no_grad()
def kv_generate(model: Any, input_ids: torch.Tensor, *, press: Press | None = None, policy: Any = None,
                max_new_tokens: int = 32, sampling: SamplingConfig | None = None,
                generator: torch.Generator | None = None, eos_token_id: int | None = None,
                engine: str = "hf") -> tuple[torch.Tensor, dict[str, Any]]:
    """Generate with a pressed prefill cache and / or a decode-time selection policy. Returns
    (sequences (B, n + new), stats: prefill_s, decode_s, kv bytes full / held, tokens).
    ``engine``: "hf" decodes on transformers' DynamicCache; "engine" / "engine-eager" moves the
    pressed cache into the lean engine's static cache (compiled / eager steps; prefill presses only)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "hf" and policy is not None:
        raise ValueError(f"engine={engine!r} runs prefill presses only; {policy!r} selects at decode time: use engine='hf'")
    sampling = sampling or SamplingConfig()
    logits, run = prefill(model, input_ids, press=press, policy=policy)
    eng = None
    if engine != "hf":
        eng = engine_cache(model, run.cache, run.position, room=max_new_tokens, compile=engine == "engine")
        run.stats["kv_slots_engine"] = eng.max_len
    out = [pick(logits, sampling, generator)]
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    t0 = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None:
            done |= out[-1] == eos_token_id
            if bool(done.all()):            # host sync: stopping is control flow
                break
        if eng is None:
            logits = step(model, run, out[-1][:, None])[:, -1]
        else:
            logits = eng.step(out[-1][:, None], last_only=True).logits[:, -1]
        nxt = pick(logits, sampling, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
        out.append(nxt)
    run.stats["decode_s"] = time.perf_counter() - t0
    run.stats["new_tokens"] = len(out)
    run.stats["kv_bytes_held"] = kv_bytes(run.cache)
    if policy is not None:
        run.stats.update({f"policy_{k}": v for k, v in policy.stats.items()})
    return torch.cat([input_ids, torch.stack(out, 1)], 1), run.stats


@torch.no_grad()
def kv_continuation_logits(model: Any, context: torch.Tensor, continuation: torch.Tensor, *,
                           press: Press | None = None, policy: Any = None) -> torch.Tensor:
    """Teacher-forced logits (B, T, V) predicting continuation[:, t] after context + continuation[:, :t]
    with the method's cache (a decode-time policy steps one token at a time, as in decoding)."""
    logits, run = prefill(model, context, press=press, policy=policy)
    outs = [logits[:, None]]
    T = continuation.shape[1]
    if T > 1:
        if policy is None:
            outs.append(step(model, run, continuation[:, :-1]))
        else:
            outs.extend(step(model, run, continuation[:, t: t + 1]) for t in range(T - 1))
    return torch.cat(outs, 1)
