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

import time
import types
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from accelerando.llm.static_cache import StaticKVCache

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
_UNSUPPORTED_ROPE = ("dynamic", "longrope")
LEN_BUCKET = 64   # cache lengths are rounded up to this, so nearby requests share compiled steps


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


def _linear_t(x: torch.Tensor, w_t: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` with the weight stored transposed (in, out)."""
    y = x @ w_t
    return y if b is None else y + b


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
    """The HF model's weights behind a forward that reads/writes a ``StaticKVCache``.

    ``forward(input_ids, token_mask, k, v, valid, lengths, tree_mask)`` writes the T new tokens at
    slots ``lengths + t`` (in place: k, v, valid) and returns logits (B, T, V); it does not move
    ``lengths`` (the caller advances or rolls back). Position ids are the count of valid slots
    before each token (transformers' ``attention_mask.cumsum(-1) - 1``); with a ``tree_mask``
    (node x ancestor-or-self, (T, T) or (B, T, T), nodes in topological order) a node's position is
    the block's first position + its depth, and it attends to the prefix and its ancestors only.
    ``head`` = (fn, args): return ``(fn(h, logits, input_ids, *args), logits)`` with h the
    final-norm hidden states (B, T, hidden) -- a ``StepHook`` computed inside the compiled step
    (e.g. Medusa's heads).
    """

    def __init__(self, model: Any, max_len: int, fuse: bool | None = None):
        super().__init__()
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"the lean engine cannot run this model: {reason}")
        base, cfg = model.model, model.config
        self.embed, self.layers, self.norm, self.lm_head = base.embed_tokens, base.layers, base.norm, model.lm_head
        attn = base.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.windows = _layer_windows(model)
        p = next(model.parameters())
        # RoPE tables for every slot: the rotary module's own (scaled) cos / sin, computed once.
        with torch.no_grad():
            pos = torch.arange(max_len, device=p.device)[None, :]
            cos, sin = base.rotary_emb(torch.zeros(1, dtype=p.dtype, device=p.device), pos)
        self.register_buffer("cos", cos[0], persistent=False)   # (L, D)
        self.register_buffer("sin", sin[0], persistent=False)
        self.max_len = max_len
        mlp_ok = all(hasattr(l.mlp, n) for l in self.layers for n in ("gate_proj", "up_proj", "down_proj", "act_fn"))
        self.fused = mlp_ok and ((p.device.type == "cpu") if fuse is None else bool(fuse))
        self._fused_key: tuple = ()
        if self.fused:
            self.refresh_fused()

    def _fused_sources(self) -> list[torch.Tensor]:
        out = [self.lm_head.weight]
        for layer in self.layers:
            a, m = layer.self_attn, layer.mlp
            for mod in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                out += [mod.weight] + ([mod.bias] if mod.bias is not None else [])
        return out

    def refresh_fused(self) -> None:
        """(Re)build the fused, transposed projection weights if the model's weights changed.

        On CPU a skinny matmul ``x @ W.t()`` through an nn.Linear's (out, in) weight is ~1.5-2.5x
        slower than ``x @ Wt`` with a contiguous (in, out) operand, and every call has a fixed cost;
        so q/k/v are one (H, (Hq + 2 Hkv) D) matrix and gate/up one (H, 2 I), each stored transposed
        (a second copy of the weights: the price of the faster step). Checked by storage and
        ``_version`` (an optimizer step, ``load_state_dict`` or ``.to()`` changes it), cheaply.
        """
        src = self._fused_sources()
        key = tuple((t.data_ptr(), t._version) for t in src)
        if key == self._fused_key:
            return
        with torch.no_grad():
            self.register_buffer("lm_head_t", transposed(self.lm_head.weight), persistent=False)
            for i, layer in enumerate(self.layers):
                a, m = layer.self_attn, layer.mlp
                qkv = (a.q_proj, a.k_proj, a.v_proj)
                self.register_buffer(f"wqkv{i}", torch.cat([l.weight for l in qkv]).t().contiguous(), persistent=False)
                b = None if qkv[0].bias is None else torch.cat([l.bias for l in qkv]).contiguous()
                self.register_buffer(f"bqkv{i}", b, persistent=False)
                self.register_buffer(f"wo{i}", a.o_proj.weight.t().contiguous(), persistent=False)
                self.register_buffer(f"wgu{i}", torch.cat([m.gate_proj.weight, m.up_proj.weight]).t().contiguous(),
                                     persistent=False)
                b = None if m.gate_proj.bias is None else torch.cat([m.gate_proj.bias, m.up_proj.bias]).contiguous()
                self.register_buffer(f"bgu{i}", b, persistent=False)
                self.register_buffer(f"wd{i}", m.down_proj.weight.t().contiguous(), persistent=False)
        self._fused_key = key

    def forward(self, input_ids: torch.Tensor, token_mask: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor],
                valid: torch.Tensor, lengths: torch.Tensor, tree_mask: torch.Tensor | None = None,
                last_only: bool = False, return_hidden: bool = False, head: tuple | None = None):
        B, T = input_ids.shape
        L, D = k[0].shape[2], self.head_dim
        slots = lengths[:, None] + torch.arange(T, device=input_ids.device)[None, :]      # (B, T)
        valid.scatter_(1, slots, token_mask)
        pos = (valid.cumsum(1) - 1).gather(1, slots).clamp(min=0)                          # (B, T)
        if tree_mask is not None:   # a node's position is the block start + its depth in the tree
            pos = pos[:, :1] + (tree_mask.expand(B, T, T).sum(-1) - 1)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)                  # (B, 1, T, D)

        j = torch.arange(L, device=input_ids.device)
        allowed = valid[:, None, :] & (j[None, None, :] <= slots[:, :, None])              # (B, T, L)
        if tree_mask is not None:   # draft block: node sees its ancestors only (B, T, T) or (T, T)
            block = tree_mask.expand(B, T, T) & token_mask[:, None, :]
            allowed = allowed.scatter(2, slots[:, None, :].expand(B, T, T), block)
        diag = j[None, None, :] == slots[:, :, None]
        masks = {}
        for w in set(self.windows):
            m = allowed if w is None else allowed & (j[None, None, :] > slots[:, :, None] - w)
            # a padding query sees itself, so no row is fully masked (which would give NaN)
            masks[w] = (m | diag)[:, None]                                                  # (B, 1, T, L)

        rows = torch.arange(B, device=input_ids.device)[:, None].expand(B, T)
        h = self.embed(input_ids)
        rep = self.n_heads // self.n_kv_heads
        nq, nkv = self.n_heads * D, self.n_kv_heads * D
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            if self.fused:      # one matmul for q, k, v (weights pre-transposed, see refresh_fused)
                qkv = _linear_t(x, getattr(self, f"wqkv{i}"), getattr(self, f"bqkv{i}"))      # (B, T, nq + 2 nkv)
                q, kn, vn = qkv.split([nq, nkv, nkv], dim=-1)
                q = q.reshape(B, T, -1, D).transpose(1, 2)                                    # (B, H, T, D)
                kn, vn = kn.reshape(B, T, -1, D), vn.reshape(B, T, -1, D)                    # (B, T, Hkv, D)
            else:
                q = attn.q_proj(x).view(B, T, -1, D).transpose(1, 2)                       # (B, H, T, D)
                kn = attn.k_proj(x).view(B, T, -1, D)                                      # (B, T, Hkv, D)
                vn = attn.v_proj(x).view(B, T, -1, D)
            q = q * cos + _rotate_half(q) * sin
            kn = kn * cos.transpose(1, 2) + _rotate_half(kn) * sin.transpose(1, 2)
            # index_put on the buffers themselves: inductor mutates them in place, no copy
            k[i][rows, :, slots] = kn                                                      # (B, T) <- (B, T, Hkv, D)
            v[i][rows, :, slots] = vn
            o = _attention(q, k[i], v[i], masks[self.windows[i]], attn.scaling, rep)        # (B, H, T, D)
            o = o.transpose(1, 2).reshape(B, T, -1)
            if self.fused:
                h = h + _linear_t(o, getattr(self, f"wo{i}"), attn.o_proj.bias)
                gu = _linear_t(layer.post_attention_layernorm(h), getattr(self, f"wgu{i}"), getattr(self, f"bgu{i}"))
                g, u = gu.chunk(2, dim=-1)                                                    # (B, T, I) each
                h = h + _linear_t(layer.mlp.act_fn(g) * u, getattr(self, f"wd{i}"), layer.mlp.down_proj.bias)
            else:
                h = h + attn.o_proj(o)
                h = h + layer.mlp(layer.post_attention_layernorm(h))
        h = self.norm(h)
        if last_only:
            h = h[:, -1:]
        logits = h @ self.lm_head_t if self.fused else self.lm_head(h)
        if head is not None:        # a drafter's function of this step's outputs, in the same graph
            return head[0](h, logits, input_ids, *head[1]), logits
        return (h, logits) if return_hidden else logits


def _own_code(decoder: LeanDecoder):
    """``decoder.forward`` with a code object of its own.

    Dynamo keeps compiled graphs per code object; with the module guards skipped (below), two
    decoders of the same layer count could otherwise share a graph. A private copy of the code
    gives every engine its own graphs, checked only by the cheap input guards.
    """
    fn = LeanDecoder.forward
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    return types.MethodType(own, decoder)


VERDICT_COLUMNS = 3      # (node, next token, non-finite flag) at the end of a verdict hook's output


@dataclass(frozen=True, eq=False)
class StepHook:
    """What a drafter needs from a verification step, as a pure function
    ``fn(h (B, T, hidden), logits (B, T, V), input_ids (B, T), *args) -> (B, T, X)`` (``fn`` a
    module-level function, ``args`` tensors, ints or None; T may include padding columns past the
    caller's tokens). Passed as ``hidden=`` to ``EngineSpecCache.forward``, which computes it
    inside the compiled step and returns it in place of the hidden states -- no separate eager
    call, no (B, T, hidden) output. Caches that cannot (``HFCache``, the engine's eager prefill)
    return the raw hidden states instead, so a consumer must accept both (Medusa tells them apart
    by dtype: its hook returns token ids). ``verdict=True``: the output's last ``VERDICT_COLUMNS``
    columns are greedy verification's verdict of this step (accepted node, next token, 1 if any
    node's logits are not finite), which the loop then takes instead of verifying again."""
    fn: Callable[..., torch.Tensor]
    args: tuple = ()
    verdict: bool = False

    def __call__(self, h: torch.Tensor, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        return self.fn(h, logits, input_ids, *self.args)

    def key(self) -> tuple:
        """What a compiled step specialises on: the function, tensor shapes and the ints (built once)."""
        k = self.__dict__.get("_key")
        if k is None:
            k = (self.fn,) + tuple((tuple(a.shape), a.dtype) if torch.is_tensor(a) else a for a in self.args)
            object.__setattr__(self, "_key", k)
        return k


@dataclass
class EngineStats:
    compile_s: dict[str, float] = field(default_factory=dict)   # first call per compiled shape
    forward_calls: int = 0
    forward_s: float = 0.0        # host wall time inside forwards (on CUDA: launch time, not synced)


class Engine:
    """One model on one static cache: ``prefill`` then ``step`` (and ``cache.rollback``).

    ``compile=True`` compiles the fixed-shape steps with ``torch.compile`` (one graph per
    (batch, tokens-per-step, max_len) -- max_len is bucketed to ``LEN_BUCKET``); on CUDA with
    ``mode="reduce-overhead"`` (CUDA graphs), on CPU with inductor's C++ wrapper (``cpp_wrapper``,
    default on for CPU). Prefill (variable prompt length) runs eagerly.
    """

    def __init__(self, model: Any, *, batch_size: int, max_len: int, compile: bool = True,
                 cpp_wrapper: bool | None = None):
        if batch_size <= 0 or max_len <= 0:
            raise ValueError("batch_size and max_len must be positive")
        self.model = model
        max_len = -(-max_len // LEN_BUCKET) * LEN_BUCKET
        self.decoder = LeanDecoder(model, max_len)
        p = next(model.parameters())
        cfg = model.config
        self.cache = StaticKVCache.allocate(
            n_layers=cfg.num_hidden_layers, batch=batch_size, n_kv_heads=cfg.num_key_value_heads,
            max_len=max_len, head_dim=self.decoder.head_dim, dtype=p.dtype, device=p.device)
        self.device = p.device
        self.compiled = compile
        # CPU: the compiled step's wrapper (the code calling ~50 kernels per step) in C++ instead of
        # Python: 25-40% off a step of the zoo target (~15 s more compile time per new graph, once:
        # inductor's on-disk cache keeps it)
        self.cpp_wrapper = p.device.type == "cpu" if cpp_wrapper is None else bool(cpp_wrapper)
        self.stats = EngineStats()
        self._step_fn = self._compile() if compile else self.decoder.forward
        self._hook_fns: dict[tuple, Any] = {}     # one compiled step per hidden hook (its own code object)
        self._seen: set[tuple] = set()
        self._ones: dict[torch.Size, torch.Tensor] = {}

    def _compile(self):
        if self.device.type == "cuda":   # CUDA graphs: one replay per step instead of many launches
            return torch.compile(self.decoder.forward, fullgraph=True, dynamic=False, mode="reduce-overhead")
        # Guarding every parameter of the module costs ~0.2 ms per call on CPU; the weights are
        # graph inputs (read at run time), only their identity goes unchecked.
        return torch.compile(_own_code(self.decoder), fullgraph=True, dynamic=False,
                             options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                      "cpp_wrapper": self.cpp_wrapper})

    def _fn_for(self, hook: "StepHook | None"):
        """The step function: with a hook, a compiled step of its own per hook key, so hooks of
        several trees never push the plain steps past dynamo's per-code recompile limit."""
        if hook is None or not self.compiled:
            return self._step_fn
        key = hook.key()
        fn = self._hook_fns.get(key)
        if fn is None:
            fn = self._hook_fns[key] = self._compile()
        return fn

    @property
    def batch_size(self) -> int:
        return self.cache.batch_size

    def _all_valid(self, shape: torch.Size) -> torch.Tensor:
        ones = self._ones.get(shape)
        if ones is None:
            ones = self._ones[shape] = torch.ones(shape, dtype=torch.bool, device=self.device)
        return ones

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def reset(self) -> None:
        self.cache.reset()

    def _run(self, fn, input_ids, token_mask, tree_mask, last_only, return_hidden=False, head=None):
        c = self.cache
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn(input_ids, token_mask, c.k, c.v, c.valid, c.lengths, tree_mask, last_only, return_hidden, head)
        self.stats.forward_s += time.perf_counter() - t0
        self.stats.forward_calls += 1
        return out

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *, last_only: bool = True, return_hidden: bool = False):
        """Write a (left-padded) prompt from slot 0 of every row; returns logits (B, 1 or P, V)
        (with ``return_hidden``: (final-norm hidden states, logits))."""
        self.reset()
        B, P = input_ids.shape
        if B != self.batch_size:
            raise ValueError(f"engine was built for batch {self.batch_size}, got {B}")
        if P > self.max_len:
            raise ValueError(f"prompt of {P} tokens does not fit a cache of {self.max_len}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if self.decoder.fused:      # the model's weights may have changed since the last request
            self.decoder.refresh_fused()
        out = self._run(self.decoder.forward, input_ids, mask, None, last_only, return_hidden)
        self.cache.advance(P)
        return out

    def step(self, input_ids: torch.Tensor, *, token_mask: torch.Tensor | None = None,
             tree_mask: torch.Tensor | None = None, last_only: bool = False, return_hidden: bool = False,
             hook: "StepHook | None" = None):
        """Append T tokens per row at ``cache.lengths`` and advance by T; returns logits (B, T, V)
        (with ``return_hidden``: (final-norm hidden states (B, T, hidden), logits); with ``hook``:
        (hook(hidden states), logits), the hook computed inside the compiled step).

        The caller must keep ``lengths + T <= max_len`` (slots past the end are not checked here,
        to avoid a host sync per step). Reject tokens afterwards with ``cache.rollback``.
        """
        if token_mask is None:
            token_mask = self._all_valid(input_ids.shape)
        key = (tuple(input_ids.shape), tree_mask is not None, last_only, return_hidden,
               None if hook is None else hook.key())
        first = self.compiled and key not in self._seen
        t0 = time.perf_counter()
        head = None if hook is None else (hook.fn, hook.args)
        out = self._run(self._fn_for(hook), input_ids, token_mask, tree_mask, last_only, return_hidden, head)
        if first:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self._seen.add(key)
            self.stats.compile_s[f"B{key[0][0]}xT{key[0][1]}xL{self.max_len}"] = time.perf_counter() - t0
        if self.compiled and self.device.type == "cuda":   # CUDA-graph outputs are overwritten by the next replay
            out = tuple(o.clone() for o in out) if (return_hidden or hook is not None) else out.clone()
        self.cache.advance(input_ids.shape[1])
        return out


# Engines are reused per (model, batch, max_len, compile) so the compile cost is paid once.
_ENGINES: "weakref.WeakKeyDictionary[Any, dict[tuple, Engine]]" = weakref.WeakKeyDictionary()


def engine_for(model: Any, *, batch_size: int, max_len: int, compile: bool = True, tag: str = "") -> Engine:
    """A (cached) ``Engine`` for ``model`` with room for ``max_len`` slots per row.

    ``tag`` separates engines that must not share a cache (e.g. one model used as target and draft).
    """
    bucket = -(-max_len // LEN_BUCKET) * LEN_BUCKET
    key = (batch_size, bucket, compile, str(next(model.parameters()).device), next(model.parameters()).dtype, tag)
    per_model = _ENGINES.setdefault(model, {})
    if key not in per_model:
        per_model[key] = Engine(model, batch_size=batch_size, max_len=bucket, compile=compile)
    return per_model[key]


STEP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)   # compiled step widths; wider calls are padded up


class EngineSpecCache:
    """The speculative loop's cache interface (``accelerando.llm.cache.SpecCache``) on the engine.

    Same contract as ``HFCache``: ``forward(ids, valid)`` appends T columns (the first call is the
    prefill) and returns logits (B, T, V); ``mark()`` / ``rollback(start, keep, max_keep)`` keep
    ``keep[b]`` of the columns appended since the mark. Here rollback moves each row's write
    pointer (no copy, no hole left behind), so rows that accepted different numbers of drafts
    simply have different lengths. Compiled steps are padded up to the next of ``STEP_BUCKETS``
    (padding tokens are masked and the pointer advances over the real ones only), so a variable
    draft length reuses a few graphs. ``max_len``: prompt + new tokens + the widest step.
    """

    def __init__(self, model: Any, *, batch_size: int, max_len: int, compile: bool = True,
                 role: str = "model", max_step: int = 16):
        self.role = role
        slack = _bucket(max_step) if compile else max_step
        self.engine = engine_for(model, batch_size=batch_size, max_len=max_len + slack, compile=compile, tag=role)
        self.engine.reset()
        self.calls = 0
        self._started = False
        self._bound = 0                      # host upper bound of every row's pointer (no device sync)
        self._mark_bound = -1
        self._mark_lengths: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) valid tokens per row."""
        c = self.engine.cache
        live = torch.arange(c.max_len, device=c.valid.device)[None, :] < c.lengths[:, None]
        return (c.valid & live).sum(1)

    def mark(self) -> int:
        self._mark_lengths = self.engine.cache.lengths.clone()
        self._mark_bound = self._bound
        return self._bound

    def forward(self, ids: torch.Tensor, valid: torch.Tensor | None = None, *, tree: Any = None,
                hidden: "bool | StepHook" = False) -> Any:
        """Append ``ids`` (B, T); with ``tree`` (a ``TokenTree`` of T nodes) the block is one tree
        step (node i sees the prefix and its ancestors). ``hidden``: return (hidden, logits); a
        ``StepHook``: return (hook output, logits), computed inside a compiled step (the prefill,
        eager, returns the raw hidden states)."""
        eng = self.engine
        self.calls += 1
        B, T = ids.shape
        mask = None if valid is None else valid.bool()
        hook = hidden if isinstance(hidden, StepHook) else None
        if not self._started:     # eager prefill: raw hidden states even when a hook is asked for
            self._started, self._bound = True, T
            return eng.prefill(ids, mask, last_only=False, return_hidden=bool(hidden))
        width = _bucket(T) if eng.compiled else T
        if self._bound + width > eng.max_len:
            self._make_room(width)
        self._bound += T
        tree_mask = None if tree is None else self._tree_mask(tree, width)
        want = dict(return_hidden=bool(hidden) and hook is None, hook=hook)
        if width == T:
            return eng.step(ids, token_mask=mask, tree_mask=tree_mask, **want)
        pad = width - T                      # pad to a compiled width; the padding is masked, then forgotten
        if mask is None:
            mask = eng._all_valid(ids.shape)
        out = eng.step(torch.cat([ids, ids.new_zeros(B, pad)], 1),
                       token_mask=torch.cat([mask, mask.new_zeros(B, pad)], 1), tree_mask=tree_mask, **want)
        eng.cache.lengths -= pad
        return tuple(o[:, :T] for o in out) if hidden else out[:, :T]

    def _tree_mask(self, tree: Any, width: int) -> torch.Tensor:
        """(width, width) node x ancestor-or-self; padding nodes see themselves only."""
        return tree.padded_mask(width, self.engine.device)      # built once per tree and width

    def _make_room(self, width: int) -> None:
        """The host bound (a sum of per-step maxima over rows) ran past the buffer: read the real
        pointers (a rare host sync). A row still past the end has already emitted its token budget
        (the loop keeps verifying finished rows until every row is done; their tokens are
        discarded), so its pointer is pulled back to keep the writes in bounds."""
        c, L = self.engine.cache, self.engine.max_len
        self._bound = int(c.lengths.max())
        if self._bound + width > L:
            c.lengths.clamp_(max=L - width)
            self._bound = L - width

    def rollback(self, start: int, keep: torch.Tensor, max_keep: int, path: torch.Tensor | None = None) -> None:
        """Row b keeps the first ``keep[b]`` columns appended since ``mark()`` returned ``start``;
        with ``path`` (B, >= max_keep), the columns of its first ``keep[b]`` nodes, gathered into place."""
        if self._mark_lengths is None or start != self._mark_bound:
            raise RuntimeError("rollback(start, ...) must follow the mark() that returned start")
        c = self.engine.cache
        if path is not None:      # tree: move the accepted path's entries to the front of the block
            c.rollback(self._mark_lengths)
            # one row keeps its whole path (max_keep = keep): the unmasked move
            c.keep_path(path[:, :max_keep], None if path.shape[0] == 1 else keep.to(c.lengths.device))
        else:
            lengths = self._mark_lengths + keep.to(self._mark_lengths.device)
            c.rollback(lengths.clamp_(max=self.engine.max_len))
        self._bound = min(start + max_keep, self.engine.max_len)


ENGINE_CHOICES = ("hf", "static", "static-eager", "auto")


def spec_cache_factory(engine: str | None, *, batch_size: int, max_len: int, max_step: int = 16):
    """``make(model, role) -> SpecCache`` for the speculative loop.

    ``engine``: ``"hf"`` / None (transformers' DynamicCache, ``HFCache``), ``"static"`` (the lean
    engine, compiled steps), ``"static-eager"``, or ``"auto"`` (compiled engine where supported,
    else ``HFCache`` silently). A model the engine cannot run gets ``HFCache`` with a one-line
    notice, so a drafter of another architecture still works.
    """
    from accelerando.llm.cache import HFCache
    if engine in (None, "hf"):
        return HFCache
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, got {engine!r}")

    def make(model: Any, role: str = "model"):
        reason = unsupported_reason(model)
        if reason is not None:
            if engine != "auto":
                _notice_fallback(f"{role}: {reason}")
            return HFCache(model, role=role)
        return EngineSpecCache(model, batch_size=batch_size, max_len=max_len, compile=engine != "static-eager",
                               role=role, max_step=max_step)
    return make


def _bucket(t: int) -> int:
    return next((b for b in STEP_BUCKETS if b >= t), t)


_NOTICED: set[str] = set()


def _notice_fallback(reason: str) -> None:
    if reason not in _NOTICED:
        _NOTICED.add(reason)
        warnings.warn(f"accelerando engine: falling back to transformers' dynamic cache ({reason})", stacklevel=3)


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
    eng = engine_for(model, batch_size=B, max_len=P + max_new_tokens, compile=compile)
    calls0 = eng.stats.forward_calls
    eos_t = torch.tensor(eos, device=input_ids.device) if eos is not None else None

    tok = pick(eng.prefill(input_ids, attention_mask)[:, -1], sampling, generator)         # (B,)
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
        tok = pick(eng.step(tok[:, None], last_only=True)[:, -1], sampling, generator)
    n_out = n + 1
    if eos_t is not None and bool(all_done_at[:n_out].any()):
        n_out = int(all_done_at[:n_out].nonzero()[0]) + 1
    if stats is not None:
        stats.update(target_calls=eng.stats.forward_calls - calls0, compile_s=dict(eng.stats.compile_s),
                     new_tokens=n_out)
    return torch.cat([input_ids, out[:, :n_out]], dim=1)
