"""A lean decode engine: static KV cache + a tight (optionally compiled) forward for the Llama family.

Small and medium models pay for per-step overhead, not arithmetic: transformers' ``generate``
builds masks, cache objects and output records every token. ``LeanDecoder`` reuses the HF module's
weights and sub-modules (embedding, q/k/v/o projections, MLP, RMSNorm, rotary tables) but runs its
own loop over a preallocated ``StaticKVCache`` with explicit write slots, so one decode step is a
fixed-shape function that ``torch.compile`` can fuse (and, on CUDA, capture as a CUDA graph).

Supported: HF ``llama``, ``qwen2``, ``mistral`` causal LMs (incl. GQA, attention/MLP biases,
sliding-window layers, RoPE scaling that does not depend on the sequence length). Anything else
falls back to the model's own ``generate`` with a one-line notice (``unsupported_reason``).
"""

from __future__ import annotations

import functools
import os
import sys
import time
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from accelerando.llm.cache import (VERDICT_COLUMNS, CacheStep, DecodeCache, HFCache, StepHook,  # noqa: F401
                                   check_attention_mask)
from accelerando.llm.static_cache import StaticKVCache

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_UNSUPPORTED_ROPE = ("dynamic", "longrope")


def unsupported_reason(model: Any) -> str | None:
    """None if the engine can run ``model`` exactly; else a one-line reason."""
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        return f"model_type {mt!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(model, "lm_head"):
        return f"{type(model).__name__} is not a *ForCausalLM with .model.layers and .lm_head"
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
    if rope_type in _UNSUPPORTED_ROPE:
        return f"rope_type {rope_type!r} changes with the sequence length"
    for lt in getattr(cfg, "layer_types", None) or ():
        if lt not in ("full_attention", "sliding_attention"):
            return f"layer type {lt!r} is not supported"
    attn = base.layers[0].self_attn
    if any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
        return "per-head q/k norms are not supported"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
               rep: int) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v in plain ops, so the compiler can fuse it; GQA by grouping."""
    B, H, T, D = q.shape
    qg = q.reshape(B, H // rep, rep * T, D)               # query heads of one kv head, stacked
    s = (qg @ k.transpose(-1, -2)).view(B, H, T, -1) * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return (p.view(B, H // rep, rep * T, -1) @ v).view(B, H, T, D)


def _attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                     rep: int) -> torch.Tensor:
    """``_attention`` by torch's fused kernel (no score tensor held): the eager prefill's, where a
    chunk of hundreds of queries meets thousands of slots."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=rep > 1)


# Rows (batch x step width) up to which a projection runs as dot products against the (out, in)
# weight (``_linear_t``) instead of torch's matmul. On a 1-thread AVX2 CPU (58M-parameter model,
# 167 MB of weights) MKL's x @ W costs about rows x one row for 2-8 rows (22.6 / 35.9 / 43.6 ms
# a step for 2 / 4 / 8 tokens against 12.3 for one); the compiled dot loops read each weight row
# once for all rows: 10.1 / 11.2 / 21.8 / 39.8 ms for 1 / 2 / 4 / 8 (docs/engine.md)
DOT_MAX_ROWS = 8


def _linear_t(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None, s: torch.Tensor | None = None,
              w: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the weight stored transposed (in, out) ``w_t``, or for at most
    ``DOT_MAX_ROWS`` rows by dot products against the (out, in) weight ``w`` where given; with row
    scales ``s``, ``w_t`` is int8 (out, in) weight-only quantised (``compute.quant.Int8Linear``):
    torch's int8 kernel."""
    if s is not None:
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).to(torch.bfloat16), w_t, s)
        y = y.to(x.dtype).reshape(*x.shape[:-1], -1)
    elif (w is not None and x.device.type == "cpu" and x.numel() // x.shape[-1] <= DOT_MAX_ROWS
          and torch.compiler.is_compiling()):   # measured on CPU only (a GPU keeps its BLAS)
        # one dot-product reduction per row of x, contiguous along in (the loop's vector axis);
        # inductor fuses them into one pass over the weight (eagerly each would hold an (out, in)
        # product: compiled steps only)
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.stack([(w * x2[r]).sum(-1) for r in range(x2.shape[0])]).reshape(*x.shape[:-1], -1)
    else:
        y = x @ w_t
    return y if b is None else y + b


def _weight(mod: Any) -> torch.Tensor:
    """A projection's weight: ``nn.Linear``'s, or an int8 module's dequantised (``qweight``, ``scales``)."""
    w = getattr(mod, "weight", None)
    return w if w is not None else mod.qweight.float() * mod.scales.float()[:, None]


_TRANSPOSED: dict[int, tuple] = {}


def transposed(w: torch.Tensor) -> torch.Tensor:
    """A contiguous (in, out) copy of an (out, in) weight, one per weight for every user (the
    engine's lm_head and Medusa's shared projection read the same memory, so a step streams it
    once), rebuilt when ``w`` changes in place (storage or ``_version``); freed with ``w``."""
    ent = _TRANSPOSED.get(id(w))
    ver = (w.data_ptr(), w._version)
    if ent is None or ent[0]() is not w or ent[1] != ver:
        if ent is None or ent[0]() is not w:
            weakref.finalize(w, _TRANSPOSED.pop, id(w), None)
        with torch.no_grad():
            ent = _TRANSPOSED[id(w)] = (weakref.ref(w), ver, w.detach().t().contiguous())
    return ent[2]


def _layer_windows(model: Any) -> list[int | None]:
    cfg = model.config
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return [None] * n
    types = getattr(cfg, "layer_types", None)
    if types is None:   # Mistral: every layer slides when a window is set
        return [window] * n
    return [window if t == "sliding_attention" else None for t in types]


class LeanDecoder(torch.nn.Module):
    """The HF model's weights behind one forward that reads and writes a ``StaticKVCache``.

    ``forward(input_ids, token_mask, cache, tree_mask, last_only, return_hidden, head)`` writes the
    T new tokens at slots ``cache.lengths + t`` (``cache.layers[i].update``, in place; ``valid``
    too) and returns (logits (B, T, V), final-norm hidden states or None, hook output or None); it
    does not move ``lengths`` (the caller advances or rolls back). Position ids are the count of
    valid slots before each token (transformers' ``attention_mask.cumsum(-1) - 1``); with a
    ``tree_mask`` (node x ancestor-or-self, (T, T) or (B, T, T), nodes in topological order) a
    node's position is the block's first position + its depth, and it attends to the prefix and
    its ancestors only. ``head`` = (fn, args): a ``StepHook`` computed inside the step on the
    hidden states (e.g. Medusa's heads).

    The projections multiply by fused, transposed copies of the weights (``refresh_fused``): q/k/v
    one matrix, gate/up one, all (in, out) -- on CPU a skinny ``x @ Wt`` with a contiguous operand
    is ~1.5-2.5x faster than through an nn.Linear's (out, in) weight, and every call has a fixed cost.
    """

    def __init__(self, model: Any, max_len: int):
        super().__init__()
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean engine cannot run this model: {reason}")
        base, cfg = model.model, model.config
        self.embed, self.layers, self.norm, self.lm_head = base.embed_tokens, base.layers, base.norm, model.lm_head
        self.rotary = base.rotary_emb
        self.head_dim = base.layers[0].self_attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.windows = _layer_windows(model)
        mlp_ok = all(hasattr(l.mlp, n) for l in self.layers for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        if not mlp_ok:
            raise ValueError("the lean engine cannot run this model: its MLPs are not gate/up/down projections")
        self._fused_key: tuple = ()
        self.set_max_len(max_len)
        self.refresh_fused()

    def set_max_len(self, max_len: int) -> None:
        """RoPE tables for every slot: the rotary module's own (scaled) cos / sin, computed once."""
        p = self.lm_head.weight
        with torch.no_grad():
            pos = torch.arange(max_len, device=p.device)[None, :]
            cos, sin = self.rotary(torch.zeros(1, dtype=p.dtype, device=p.device), pos)
        self.register_buffer("cos", cos[0], persistent=False)   # (L, D)
        self.register_buffer("sin", sin[0], persistent=False)

    def _fused_sources(self) -> list[torch.Tensor]:
        out = [self.lm_head.weight]
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            for mod in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                w = getattr(mod, "weight", None)
                out += [mod.qweight if w is None else w] + ([mod.bias] if mod.bias is not None else [])
        return out

    def refresh_fused(self) -> None:
        """(Re)build the fused, transposed projection weights if the model's weights changed
        (checked by storage and ``_version``: an optimizer step, ``load_state_dict`` or ``.to()``
        changes it), cheaply. A second copy of the weights: the price of the faster step."""
        src = self._fused_sources()
        key = tuple((t.data_ptr(), t._version) for t in src)
        if key == self._fused_key:
            return
        cat_b = lambda bs: None if bs[0] is None else torch.cat(bs).contiguous()      # noqa: E731

        def fused(name: str, mods: tuple) -> None:
            """w{name}: the projections' weights fused along out and transposed; int8 (out, in)
            + row scales s{name} when every one of them is int8 weight-only (``qweight``)."""
            int8 = all(getattr(mod, "qweight", None) is not None and mod.qweight.dtype == torch.int8 for mod in mods)
            w = torch.cat([mod.qweight for mod in mods]) if int8 else torch.cat([_weight(mod) for mod in mods]).t()
            self.register_buffer(f"w{name}", w.contiguous(), persistent=False)
            self.register_buffer(f"s{name}", torch.cat([mod.scales for mod in mods]) if int8 else None, persistent=False)
            # (out, in) for the few-row dot products: the module's own weight when not fused
            oi = None if int8 else (_weight(mods[0]).detach() if len(mods) == 1 else w.t())
            self.register_buffer(f"v{name}", None if oi is None else oi.contiguous(), persistent=False)
        with torch.no_grad():
            self.register_buffer("lm_head_t", transposed(self.lm_head.weight), persistent=False)
            self.register_buffer("lm_head_w", self.lm_head.weight.detach(), persistent=False)
            for i, layer in enumerate(self.layers):
                a, m = layer.self_attn, layer.mlp
                qkv = (a.q_proj, a.k_proj, a.v_proj)
                fused(f"qkv{i}", qkv)
                self.register_buffer(f"bqkv{i}", cat_b([l.bias for l in qkv]), persistent=False)
                fused(f"o{i}", (a.o_proj,))
                fused(f"gu{i}", (m.gate_proj, m.up_proj))
                self.register_buffer(f"bgu{i}", cat_b([m.gate_proj.bias, m.up_proj.bias]), persistent=False)
                fused(f"d{i}", (m.down_proj,))
        self._fused_key = key

    def prepare(self, input_ids: torch.Tensor, token_mask: torch.Tensor, cache: StaticKVCache,
                tree_mask: torch.Tensor | None = None, kv_len: int | None = None) -> tuple:
        """The block of T tokens at slots ``cache.lengths + t``: marks their ``valid`` slots and returns
        (slots (B, T), cos, sin (B, 1, T, D), {window: mask (B, 1, T, L)}) for ``run_layers``."""
        B, T = input_ids.shape
        valid, lengths = cache.valid, cache.lengths
        L = valid.shape[1] if kv_len is None else kv_len
        slots = lengths[:, None] + torch.arange(T, device=input_ids.device)[None, :]      # (B, T)
        valid.scatter_(1, slots, token_mask)
        pos = (valid.cumsum(1) - 1).gather(1, slots).clamp(min=0) + cache.pos_shift[:, None]   # (B, T)
        if tree_mask is not None:   # a node's position is the block start + its depth in the tree
            pos = pos[:, :1] + (tree_mask.expand(B, T, T).sum(-1) - 1)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)                  # (B, 1, T, D)

        j = torch.arange(L, device=input_ids.device)
        allowed = valid[:, None, :L] & (j[None, None, :] <= slots[:, :, None])             # (B, T, L)
        if tree_mask is not None:   # draft block: node sees its ancestors only (B, T, T) or (T, T)
            block = tree_mask.expand(B, T, T) & token_mask[:, None, :]
            allowed = allowed.scatter(2, slots[:, None, :].expand(B, T, T), block)
        diag = j[None, None, :] == slots[:, :, None]
        masks = {}
        for w in set(self.windows):
            m = allowed if w is None else allowed & (j[None, None, :] > slots[:, :, None] - w)
            # a padding query sees itself, so no row is fully masked (which would give NaN)
            masks[w] = (m | diag)[:, None]                                                  # (B, 1, T, L)
        return slots, cos, sin, masks

    def run_layers(self, h: torch.Tensor, lo: int, hi: int, block: tuple, cache: StaticKVCache,
                   kv_len: int | None = None) -> torch.Tensor:
        """Decoder layers ``lo..hi-1`` on hidden states ``h`` (B, T, hidden) of the block ``prepare``
        returned, writing those layers' K/V at its slots; returns the layer-``hi`` states (not
        normed). Layers can run in pieces: LayerSkip's verification reuses the draft's states."""
        slots, cos, sin, masks = block
        B, T = slots.shape
        D = self.head_dim
        rep = self.n_heads // self.n_kv_heads
        nq, nkv = self.n_heads * D, self.n_kv_heads * D
        for i in range(lo, hi):
            layer = self.layers[i]
            attn, mlp = layer.self_attn, layer.mlp
            qkv = _linear_t(layer.input_layernorm(h), getattr(self, f"wqkv{i}"), getattr(self, f"bqkv{i}"), getattr(self, f"sqkv{i}"),
                            getattr(self, f"vqkv{i}"))
            q, kn, vn = qkv.split([nq, nkv, nkv], dim=-1)                                   # (B, T, nq + 2 nkv)
            q = q.reshape(B, T, -1, D).transpose(1, 2)                                      # (B, H, T, D)
            kn, vn = kn.reshape(B, T, -1, D), vn.reshape(B, T, -1, D)                      # (B, T, Hkv, D)
            q = q * cos + _rotate_half(q) * sin
            kn = kn * cos.transpose(1, 2) + _rotate_half(kn) * sin.transpose(1, 2)
            k_all, v_all = cache.layers[i].update(slots, kn, vn)
            if kv_len is not None:
                k_all, v_all = k_all[:, :, :kv_len], v_all[:, :, :kv_len]
            o = (_attention if kv_len is None else _attention_fused)(
                q, k_all, v_all, masks[self.windows[i]], attn.scaling, rep)                  # (B, H, T, D)
            h = h + _linear_t(o.transpose(1, 2).reshape(B, T, -1), getattr(self, f"wo{i}"), attn.o_proj.bias, getattr(self, f"so{i}"),
                              getattr(self, f"vo{i}"))
            gu = _linear_t(layer.post_attention_layernorm(h), getattr(self, f"wgu{i}"), getattr(self, f"bgu{i}"), getattr(self, f"sgu{i}"),
                           getattr(self, f"vgu{i}"))
            g, u = gu.chunk(2, dim=-1)                                                        # (B, T, I) each
            h = h + _linear_t(mlp.act_fn(g) * u, getattr(self, f"wd{i}"), mlp.down_proj.bias, getattr(self, f"sd{i}"),
                              getattr(self, f"vd{i}"))
        return h

    def forward(self, input_ids: torch.Tensor, token_mask: torch.Tensor, cache: StaticKVCache,
                tree_mask: torch.Tensor | None = None, last_only: bool = False, return_hidden: bool = False,
                head: tuple | None = None, kv_len: int | None = None):
        """``kv_len``: attend to the first ``kv_len`` cache slots only (the prefill's, which fills the
        cache from slot 0: the slots past its chunk are empty, and scoring them cost O(T x max_len))."""
        block = self.prepare(input_ids, token_mask, cache, tree_mask, kv_len)
        h = self.run_layers(self.embed(input_ids), 0, len(self.layers), block, cache, kv_len)
        h = self.norm(h)
        if last_only:
            h = h[:, -1:]
        logits = _linear_t(h, self.lm_head_t, None, None, self.lm_head_w)
        hooked = None if head is None else head[0](h, logits, input_ids, *head[1])
        return logits, (h if return_hidden else None), hooked


def _own_code(decoder: LeanDecoder):
    """``decoder.forward`` with a code object of its own.

    Dynamo keeps compiled graphs per code object; with the module guards skipped (below), two
    decoders of the same layer count could otherwise share a graph. A private copy of the code
    gives every engine its own graphs, checked only by the cheap input guards.
    """
    fn = LeanDecoder.forward
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, decoder)


@dataclass
class EngineStats:
    compile_s: dict[str, float] = field(default_factory=dict)   # first call per compiled graph (its cost)
    shapes: set[str] = field(default_factory=set)              # step shapes run (= graphs, when compiled)
    forward_calls: int = 0
    forward_s: float = 0.0        # host wall time inside forwards (on CUDA: launch time, not synced)

    @property
    def graphs(self) -> int:
        """Compiled graphs so far."""
        return len(self.compile_s)


ENGINES = ("auto", "engine", "engine-eager", "hf")
# the default engine= : "auto" = the lean engine, compiled, where the model is supported, else
# transformers' cache; ACCELERANDO_ENGINE overrides it (tests set "engine-eager": no compile time)
DEFAULT_ENGINE = os.environ.get("ACCELERANDO_ENGINE", "auto")
STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)   # compiled step widths; narrower steps are padded up
MIN_LEN = 128                                  # smallest cache; larger ones are powers of two
PREFILL_CHUNK = 512                            # prompt tokens per prefill forward (bounds its T x slots mask)


def length_bucket(n: int) -> int:
    """Cache length for n slots: the next power of two >= MIN_LEN, so a stream of prompts of any
    lengths meets only a few lengths (each a compiled graph per step width)."""
    return max(MIN_LEN, 1 << max(0, n - 1).bit_length())


def _step_bucket(t: int) -> int:
    return next((b for b in STEP_BUCKETS if b >= t), t)


# One engine per (model, batch, compile, role, device, dtype), kept while the model lives: the
# compiled steps are paid for once per model and batch size, whatever the prompts' lengths.
_POOL: "weakref.WeakKeyDictionary[Any, dict[tuple, Engine]]" = weakref.WeakKeyDictionary()


class Engine:
    """One model's ``LeanDecoder`` on one ``StaticKVCache``, implementing the decode cache protocol
    (``accelerando.llm.cache.DecodeCache``): the first ``forward`` is the prefill (eager), later
    ones are steps (compiled with ``compile=True``: on CUDA with ``mode="reduce-overhead"`` (CUDA
    graphs), on CPU with inductor's C++ wrapper). ``Engine.open`` hands out the pooled engine of a
    model and batch size, grown to the length asked for.

    Steps are padded up to the next of ``STEP_BUCKETS`` (padding tokens are masked and the write
    pointer advances over the real ones only), so a variable draft length reuses a few graphs.
    ``rollback`` moves each row's write pointer (no copy, no hole left behind), so rows that
    accepted different numbers of drafts simply have different lengths.
    """

    prefill_chunk = PREFILL_CHUNK
    # CPU: materialise any pointwise result of more than 4 ops that reads two or more buffers (inductor's
    # default: 50) -- else a one-token step's dot products (``DOT_MAX_ROWS``) recompute their input
    # per weight row: SiLU(gate) * up re-evaluated for every row of down_proj, the residual stream
    # re-summed from the embedding for every row of the next projection (1.1-1.2x on a 58M model)
    inductor_options: dict = {"realize_opcount_threshold": 4}

    def __init__(self, model: Any, *, batch_size: int, max_len: int, compile: bool = True, role: str = "model",
                 cpp_wrapper: bool | None = None):
        if batch_size <= 0 or max_len <= 0:
            raise ValueError("batch_size and max_len must be positive")
        self.model, self.role, self.compiled = model, role, compile
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # CPU: the compiled step's wrapper (the code calling ~50 kernels per step) in C++ instead of
        # Python: 25-40% off a step of the zoo target (~15 s more compile time per new graph, once:
        # inductor's on-disk cache keeps it)
        self.cpp_wrapper = p.device.type == "cpu" if cpp_wrapper is None else bool(cpp_wrapper)
        self.stats = EngineStats()
        self._batch = batch_size
        self.decoder = LeanDecoder(model, length_bucket(max_len))
        self._allocate(length_bucket(max_len))
        self.reset()

    @classmethod
    def open(cls, model: Any, *, batch_size: int, max_len: int, compile: bool = True, role: str = "model") -> "Engine":
        """The pooled engine for (model, batch_size, compile, role), holding >= ``max_len`` slots, reset.
        ``role`` separates engines that must not share a cache (one model as target and draft)."""
        p = next(model.parameters())
        key = (batch_size, compile, role, str(p.device), p.dtype)
        per_model = _POOL.setdefault(model, {})
        eng = per_model.get(key)
        if eng is None:
            eng = per_model[key] = cls(model, batch_size=batch_size, max_len=max_len, compile=compile, role=role)
        else:
            eng.reserve(max_len)
            eng.reset()
        return eng

    def _allocate(self, L: int) -> None:
        cfg = self.model.config
        self.cache = StaticKVCache(n_layers=cfg.num_hidden_layers, batch=self._batch, n_kv_heads=cfg.num_key_value_heads,
                                   max_len=L, head_dim=self.decoder.head_dim, dtype=self.dtype, device=self.device)
        self.decoder.set_max_len(L)
        self._fns: dict[Any, Any] = {}        # compiled steps for this length: one per hook (own code objects)
        self._seen: set[tuple] = set()
        self._ones: dict[torch.Size, torch.Tensor] = {}

    def reserve(self, max_len: int) -> None:
        """Grow the cache (to the next power of two) if it holds fewer than ``max_len`` slots;
        the steps compile again for the new length (once)."""
        if max_len > self.max_len:
            self._allocate(length_bucket(max_len))

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def reset(self) -> None:
        """Forget the sequence (the buffers keep their addresses); the next forward is a prefill."""
        self.cache.reset()
        self.calls = 0
        self._started = False
        self._bound = 0                      # host upper bound of every row's pointer (no device sync)
        self._mark_bound = -1
        self._mark_lengths: torch.Tensor | None = None

    def load_prefix(self, keys: list[torch.Tensor], values: list[torch.Tensor], position: int) -> None:
        """Start from a given cache instead of a prefill: per-layer keys / values (B, H_kv, m, D),
        already rotated, standing for ``position`` tokens (a pressed cache: m < position); the next
        token goes to slot m at position ``position`` (``StaticKVCache.pos_shift``)."""
        m = keys[0].shape[2]
        if m + 1 > self.max_len:
            raise ValueError(f"a prefix of {m} slots does not fit a cache of {self.max_len}")
        self.reset()
        if self.decoder.cos.shape[0] < position + self.max_len - m:     # rotary tables up to the true positions
            self.decoder.set_max_len(length_bucket(position + self.max_len - m))
        c = self.cache
        with torch.no_grad():
            for layer, k, v in zip(c.layers, keys, values):
                layer.k[:, :, :m] = k
                layer.v[:, :, :m] = v
            c.valid[:, :m] = True
            c.lengths.fill_(m)
            c.pos_shift.fill_(position - m)
        self._started, self._bound, self.calls = True, m, 1

    # -- prefill and step: the one forward -----------------------------------------------------------
    def _compiled(self, hook: StepHook | None):
        key = None if hook is None else hook.key()
        fn = self._fns.get(key)
        if fn is None:
            if self.device.type == "cuda":   # CUDA graphs: one replay per step instead of many launches
                fn = torch.compile(self.decoder.forward, fullgraph=True, dynamic=False, mode="reduce-overhead")
            else:   # guarding every parameter costs ~0.2 ms per call on CPU; weights are read at run time
                fn = torch.compile(_own_code(self.decoder), fullgraph=True, dynamic=False,
                                   options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                            "cpp_wrapper": self.cpp_wrapper, **self.inductor_options})
            self._fns[key] = fn
        return fn

    def _run(self, fn, input_ids, token_mask, tree_mask, last_only, return_hidden, hook) -> CacheStep:
        t0 = time.perf_counter()
        head = None if hook is None else (hook.fn, hook.args)
        with torch.no_grad():
            logits, h, hooked = fn(input_ids, token_mask, self.cache, tree_mask, last_only, return_hidden, head)
        self.stats.forward_s += time.perf_counter() - t0
        self.stats.forward_calls += 1
        return CacheStep(logits, h, hooked)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                last_only: bool = True, return_hidden: bool = False) -> CacheStep:
        """Write a (left-padded) prompt from slot 0 of every row, eagerly (any length)."""
        self.cache.reset()
        B, P = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"engine was built for batch {self.batch_size}, got {B}")
        if P > self.max_len:
            raise ValueError(f"prompt of {P} tokens does not fit a cache of {self.max_len}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        self.decoder.refresh_fused()      # the model's weights may have changed since the last request
        # in chunks of queries, each scoring only the slots written so far: the plain-ops attention
        # over the whole cache scored every prompt token against all max_len slots (a 4096-token
        # prompt in an 8192-slot cache: 5-19 s instead of transformers' 0.4 s); a chunk's queries see
        # the earlier chunks through the cache, so the result is the same
        parts = []
        for s in range(0, P, self.prefill_chunk):
            e = min(P, s + self.prefill_chunk)
            parts.append(self._run(functools.partial(self.decoder.forward, kv_len=e), input_ids[:, s:e], mask[:, s:e], None,
                                   last_only, return_hidden and (not last_only or e == P), None))
            self.cache.advance(e - s)
        if last_only or len(parts) == 1:
            return parts[-1]
        return CacheStep(torch.cat([p.logits for p in parts], 1),
                         torch.cat([p.hidden for p in parts], 1) if return_hidden else None)

    def step(self, input_ids: torch.Tensor, *, token_mask: torch.Tensor | None = None,
             tree_mask: torch.Tensor | None = None, last_only: bool = False, return_hidden: bool = False,
             hook: StepHook | None = None) -> CacheStep:
        """Append T tokens per row at ``cache.lengths`` and advance by T (compiled with ``compile``).

        The caller must keep ``lengths + T <= max_len`` (slots past the end are not checked here,
        to avoid a host sync per step). Reject tokens afterwards with ``cache.rollback``.
        """
        if token_mask is None:
            token_mask = self._all_valid(input_ids.shape)
        B, T = input_ids.shape
        last_only = last_only and T > 1        # one token is its own last: share the plain T = 1 graph
        key = (B, T, self.max_len, tree_mask is not None, last_only, return_hidden, None if hook is None else hook.key())
        first = key not in self._seen
        if first:     # a new step shape: a new graph when compiled
            self._seen.add(key)
            shape = f"B{B}xT{T}xL{self.max_len}" + ("-tree" if key[3] else "") + ("-last" if last_only else "") \
                + ("-hidden" if return_hidden else "") + ("" if hook is None else f"-{hook.fn.__name__}")
            self.stats.shapes.add(shape)
        if not self.compiled:
            out = self._run(self.decoder.forward, input_ids, token_mask, tree_mask, last_only, return_hidden, hook)
        else:
            if first:
                _notice_compile(f"compiling a decode step ({self.role}, {shape}): once per shape, "
                                f"{'seconds' if self.device.type == 'cuda' else '~10-60 s on CPU'}")
            t0 = time.perf_counter()
            out = self._run(self._compiled(hook), input_ids, token_mask, tree_mask, last_only, return_hidden, hook)
            if first:
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                self.stats.compile_s[shape] = time.perf_counter() - t0
            if self.device.type == "cuda":   # CUDA-graph outputs are overwritten by the next replay
                out = CacheStep(*(None if o is None else o.clone() for o in (out.logits, out.hidden, out.hook)))
        self.cache.advance(T)
        return out

    def _all_valid(self, shape: torch.Size) -> torch.Tensor:
        ones = self._ones.get(shape)
        if ones is None:
            ones = self._ones[shape] = torch.ones(shape, dtype=torch.bool, device=self.device)
        return ones

    # -- the decode cache protocol -------------------------------------------------------------------
    @property
    def lengths(self) -> torch.Tensor:
        """(B,) valid tokens per row."""
        c = self.cache
        live = torch.arange(c.max_len, device=c.valid.device)[None, :] < c.lengths[:, None]
        return (c.valid & live).sum(1)

    def mark(self) -> int:
        self._mark_lengths = self.cache.lengths.clone()
        self._mark_bound = self._bound
        return self._bound

    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None, *, tree: Any = None,
                hidden: bool = False, hook: StepHook | None = None, last: bool = False) -> CacheStep:
        """Append ``ids`` (B, T) (see ``DecodeCache``); the first call is the (eager) prefill, whose
        ``hidden`` holds the raw states when a hook is asked for. ``last``: logits of the last
        column only (B, 1, V), e.g. a draft catching up on tokens it did not see."""
        self.calls += 1
        B, T = ids.shape
        mask = None if valid is None else valid.bool()
        if not self._started:
            self._started, self._bound = True, T
            return self.prefill(ids, mask, last_only=last, return_hidden=hidden or hook is not None)
        if T == 1 and mask is None and tree is None and not hidden and hook is None:   # a plain decoding step
            if self._bound + 1 > self.max_len:
                self._make_room(1)
            self._bound += 1
            return self.step(ids)
        width = _step_bucket(T) if self.compiled else T
        if self._bound + width > self.max_len:
            self._make_room(width)
        self._bound += T
        tree_mask = None if tree is None else tree.padded_mask(width, self.device)   # built once per tree and width
        want = dict(return_hidden=hidden, hook=hook)
        if last and tree is None and hook is None and not hidden:
            want["last_only"] = True
        if width == T:
            return self.step(ids, token_mask=mask, tree_mask=tree_mask, **want)
        pad = width - T                      # pad to a compiled width; the padding is masked, then forgotten
        if mask is None:
            mask = self._all_valid(ids.shape)
        want.pop("last_only", None)          # the last column would be padding: slice afterwards
        out = self.step(torch.cat([ids, ids.new_zeros(B, pad)], 1),
                        token_mask=torch.cat([mask, mask.new_zeros(B, pad)], 1), tree_mask=tree_mask, **want)
        self.cache.lengths.sub_(pad)
        lo = T - 1 if last else 0
        return CacheStep(*(None if o is None else o[:, lo:T] for o in (out.logits, out.hidden, out.hook)))

    def _make_room(self, width: int) -> None:
        """The host bound (a sum of per-step maxima over rows) ran past the buffer: read the real
        pointers (a rare host sync). A row still past the end has already emitted its token budget
        (the loop keeps verifying finished rows until every row is done; their tokens are
        discarded), so its pointer is pulled back to keep the writes in bounds."""
        c, L = self.cache, self.max_len
        self._bound = int(c.lengths.max())
        if self._bound + width > L:
            c.lengths.clamp_(max=L - width)
            self._bound = L - width

    def rollback(self, start: int, keep: torch.Tensor, max_keep: int, path: torch.Tensor | None = None) -> None:
        """Row b keeps the first ``keep[b]`` columns appended since ``mark()`` returned ``start``;
        with ``path`` (B, >= max_keep), the columns of its first ``keep[b]`` nodes, gathered into place."""
        if self._mark_lengths is None or start != self._mark_bound:
            raise RuntimeError("rollback(start, ...) must follow the mark() that returned start")
        c = self.cache
        if path is not None:      # tree: move the accepted path's entries to the front of the block
            c.rollback(self._mark_lengths)
            # one row keeps its whole path (max_keep = keep): the unmasked move
            c.keep_path(path[:, :max_keep], None if path.shape[0] == 1 else keep.to(c.lengths.device))
        else:
            lengths = self._mark_lengths + keep.to(self._mark_lengths.device)
            c.rollback(lengths.clamp_(max=self.max_len))
        self._bound = min(start + max_keep, self.max_len)


def open_cache(model: Any, *, engine: str | None, batch_size: int, max_len: int, max_step: int = 16,
               role: str = "model") -> DecodeCache:
    """The decode cache for ``model`` in one decode of ``batch_size`` rows and up to ``max_len``
    tokens, steps up to ``max_step`` wide. ``engine``: "auto" (None: ``DEFAULT_ENGINE``; the
    compiled engine where supported, else transformers' cache silently), "engine" (compiled),
    "engine-eager" or "hf" (``HFCache``: transformers' DynamicCache, any causal LM). A model the
    engine cannot run gets ``HFCache`` with a one-line notice."""
    engine = check_engine(engine)
    if engine == "hf":
        return HFCache(model, role=role)
    reason = unsupported_reason(model)
    if reason is not None:
        if engine != "auto":
            _notice_fallback(f"{role}: {reason}")
        return HFCache(model, role=role)
    compile = engine != "engine-eager"
    return Engine.open(model, batch_size=batch_size, max_len=max_len + (_step_bucket(max_step) if compile else max_step),
                       compile=compile, role=role)


def check_engine(engine: str | None) -> str:
    """``engine`` checked against ``ENGINES`` (None: ``DEFAULT_ENGINE``)."""
    engine = DEFAULT_ENGINE if engine is None else engine
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    return engine


_NOTICED: set[str] = set()


def _notice_fallback(reason: str) -> None:
    if reason not in _NOTICED:
        _NOTICED.add(reason)
        warnings.warn(f"accelerando engine: falling back to transformers' dynamic cache ({reason})", stacklevel=3)


def _notice_compile(what: str) -> None:
    """A one-line progress notice on stderr while a step compiles (the first call per shape)."""
    print(f"accelerando engine: {what}", file=sys.stderr, flush=True)


def _as_id_list(eos: int | list[int] | torch.Tensor | None) -> list[int] | None:
    if eos is None:
        return None
    if isinstance(eos, torch.Tensor):
        return [int(x) for x in eos.flatten().tolist()]
    return [int(eos)] if isinstance(eos, int) else [int(x) for x in eos]


@torch.no_grad()
def generate(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
             max_new_tokens: int, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, compile: bool = True, check_every: int = 8,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, stats: dict | None = None) -> torch.Tensor:
    """Plain decoding on the engine. Greedy (``temperature=0``, the default): the same tokens as
    ``model.generate(do_sample=False)``; otherwise samples from the processed distribution
    (temperature, top-k, top-p as in transformers, ``accelerando.llm.sampling``) with ``generator``.

    ``input_ids`` (B, P) left-padded with ``attention_mask``; returns (B, P + n) with n <=
    ``max_new_tokens`` (stops early, like transformers, once every row has emitted an EOS; finished
    rows are filled with ``pad_token_id``). Unsupported architectures fall back to
    ``model.generate`` with a one-line notice. ``stats`` (a dict) receives counters.
    """
    from accelerando.llm.sampling import SamplingConfig, pick
    if max_new_tokens <= 0:
        raise ValueError("max_new_tokens must be positive")
    attention_mask = check_attention_mask(input_ids, attention_mask)
    sampling = SamplingConfig(temperature, top_k, top_p)
    gen_cfg = getattr(model, "generation_config", None)
    if eos_token_id is None:   # like transformers: the model's generation config decides
        eos_token_id = getattr(gen_cfg, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = getattr(gen_cfg, "pad_token_id", None)
    eos = _as_id_list(eos_token_id) or None   # [] disables EOS stopping
    reason = unsupported_reason(model)
    if reason is not None:
        _notice_fallback(reason)
        kw = {} if sampling.greedy else dict(temperature=temperature, top_k=top_k, top_p=top_p)
        return model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                              do_sample=not sampling.greedy, eos_token_id=eos, pad_token_id=pad_token_id, **kw)
    if eos is not None and pad_token_id is None:
        pad_token_id = eos[0]
    B, P = input_ids.shape
    eng = Engine.open(model, batch_size=B, max_len=P + max_new_tokens, compile=compile, role="target")
    calls0 = eng.stats.forward_calls
    eos_t = torch.tensor(eos, device=input_ids.device) if eos is not None else None

    tok = pick(eng.prefill(input_ids, attention_mask).logits[:, -1], sampling, generator)         # (B,)
    out = torch.empty(B, max_new_tokens, dtype=input_ids.dtype, device=input_ids.device)
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    all_done_at = torch.full((max_new_tokens,), False, device=input_ids.device)
    n = 0
    for n in range(max_new_tokens):
        if eos_t is not None:
            tok = torch.where(unfinished, tok, torch.full_like(tok, pad_token_id))
            unfinished &= ~torch.isin(tok, eos_t)
            all_done_at[n] = ~unfinished.any()
        out[:, n] = tok
        if n + 1 == max_new_tokens:
            break
        # one host sync every `check_every` tokens instead of per token; trimmed exactly below
        if eos_t is not None and (n + 1) % check_every == 0 and bool(all_done_at[n]):
            break
        tok = pick(eng.step(tok[:, None], last_only=True).logits[:, -1], sampling, generator)
    n_out = n + 1
    if eos_t is not None and bool(all_done_at[:n_out].any()):
        n_out = int(all_done_at[:n_out].nonzero()[0]) + 1
    if stats is not None:
        stats.update(target_calls=eng.stats.forward_calls - calls0, compile_s=dict(eng.stats.compile_s),
                     graphs=eng.stats.graphs, new_tokens=n_out)
    return torch.cat([input_ids, out[:, :n_out]], dim=1)
