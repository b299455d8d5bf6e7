"""Weight-only quantisation of a causal LM's decoder linears: int8 per channel, int4 round-to-nearest
with group scales, and BitMoD's per-group mixture of 3/4-bit datatypes.

BitMoD (Chen et al., "BitMoD: Bit-serial Mixture-of-Datatype LLM Acceleration", HPCA 2025): a
signed low-bit float (FP3 = {0, ±1, ±2, ±4}, FP4 = E2M1 x 2 = {0, ±1, ±2, ±3, ±4, ±6, ±8, ±12}) has
a redundant negative zero; BitMoD re-purposes it as one *special value*, either extra resolution
(ER: ±3 for FP3, ±10 for FP4) or extra asymmetry (EA: ±6 / ±16), on the positive or the negative
side -- four datatypes per bit width. Each group of ``group_size`` weights (one output row, a run
of input columns) picks the datatype -- and, with ``scale_search``, the scale -- of least squared
error (the paper picks the datatype per group by quantisation error).
Stored: ``bits`` per weight + a 2-bit datatype id + an fp16 scale per group.

Two execution paths per method, and which one is real:
* ``packed=False`` (simulated): the weights are replaced by their dequantised values (fp32); the
  model's outputs are exactly those of the quantised model, so this is the quality path.
* ``packed=True``: the linears are swapped for modules that *store* the low-bit codes.
  ``int8``: int8 weights + per-row scales, computed with ``torch.ops.aten._weight_int8pack_mm``
  on bf16 activations (a real weight-only kernel on CPU). ``int4``: tinygemm-packed nibbles +
  (scale, zero) per group, ``_weight_int4pack_mm_for_cpu`` (real kernel). ``bitmod``: codes packed
  two per byte + datatype ids + fp16 scales; the forward *dequantises then multiplies* (storage is
  real, arithmetic is not: BitMoD's speed comes from its bit-serial accelerator, which a CPU does
  not have). torchao's ``Int8WeightOnlyConfig`` is the anchor (``torchao_int8``); torchao's int4
  needs CUDA / the mslk package and does not run on this CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

METHODS = ("int8", "int4", "int4-sym", "bitmod")

# BitMoD's datatypes as integer grids (the paper's FP values x 2 for FP4, so they are integers).
_FP3 = [-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0]
_FP4 = [-12.0, -8.0, -6.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]
SPECIAL = {3: {"er+": 3.0, "er-": -3.0, "ea+": 6.0, "ea-": -6.0},
           4: {"er+": 10.0, "er-": -10.0, "ea+": 16.0, "ea-": -16.0}}


def bitmod_datatypes(bits: int) -> torch.Tensor:
    """(4, 2**bits) value grids, one row per datatype (FP + ER+/ER-/EA+/EA-), sorted ascending."""
    if bits not in SPECIAL:
        raise ValueError(f"bitmod bits must be 3 or 4, got {bits}")
    base = _FP3 if bits == 3 else _FP4
    return torch.tensor([sorted(base + [sv]) for sv in SPECIAL[bits].values()])


@dataclass
class QuantConfig:
    """``method``: int8 (per output channel), int4 (asymmetric RTN, scale + zero per group, the
    tinygemm layout), int4-sym (symmetric RTN, -7..7, scale per group), bitmod (``bits`` 3 or 4).
    ``group_size`` (int4 / bitmod) must divide every quantised linear's input dimension.
    ``packed``: store low-bit codes (see the module docstring) instead of simulating."""

    method: str = "int8"
    group_size: int = 64
    bits: int | None = None          # None: 8 for int8, 4 otherwise
    packed: bool = False
    scale_search: bool = True        # bitmod: choose each group's scale by error too (see bitmod_quantize)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quantisation method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.bits is None:
            self.bits = 8 if self.method == "int8" else 4
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if self.method == "bitmod" and self.bits not in (3, 4):
            raise ValueError(f"bitmod bits must be 3 or 4, got {self.bits}")
        if self.method in ("int4", "int4-sym") and self.bits != 4:
            raise ValueError(f"{self.method} stores 4 bits; bits={self.bits} is not supported")
        if self.method == "int8" and self.bits != 8:
            raise ValueError(f"int8 stores 8 bits; bits={self.bits} is not supported")
        if self.packed and self.method == "int4-sym":
            raise ValueError("int4-sym has no packed kernel; use packed=False or method='int4'")
        if self.packed and self.method == "int4" and self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"the packed int4 kernel takes group_size 32, 64, 128 or 256, got {self.group_size}")


def _groups(w: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} does not divide the input dimension {k}")
    return w.reshape(n, k // group_size, group_size)                 # (N, G, gs)


# ------------------------------------------------------------------------------ quantisers
def int8_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w ~ q * s, q in [-127, 127]."""
    s = (w.abs().amax(1) / 127).clamp(min=1e-8)
    return (w / s[:, None]).round().clamp(-127, 127).to(torch.int8), s


def int4_quantize(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit RTN per group: w ~ (q - 8) s + z, q in [0, 15] (tinygemm's convention,
    z the value of code 8). Returns q (N, K) int32, s and z (N, G)."""
    wg = _groups(w, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = ((hi - lo) / 15).clamp(min=1e-8)
    q = ((wg - lo[..., None]) / s[..., None]).round().clamp(0, 15)
    return q.reshape(w.shape).to(torch.int32), s, lo + 8 * s


def int4_dequantize(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, group_size: int) -> torch.Tensor:
    qg = _groups(q.float(), group_size)
    return ((qg - 8) * s[..., None] + z[..., None]).reshape(q.shape)


def int4_sym_fake(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Symmetric 4-bit RTN per group (q in [-7, 7], scale = max|w| / 7), dequantised."""
    wg = _groups(w, group_size)
    s = (wg.abs().amax(-1, keepdim=True) / 7).clamp(min=1e-8)
    return ((wg / s).round().clamp(-7, 7) * s).reshape(w.shape)


def _nearest(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Index of the nearest grid value (grid sorted ascending), ties to the lower value."""
    mids = (grid[1:] + grid[:-1]) / 2
    return torch.bucketize(x, mids, right=False)


CLIP_RATIOS = tuple(1 - 0.025 * i for i in range(13))   # 1.0 .. 0.7: scale candidates (x the range-fitting scale)


def bitmod_quantize(w: torch.Tensor, group_size: int, bits: int = 4, *, scale_search: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BitMoD per-group datatype choice: codes (N, K) uint8 (index into the group's grid),
    datatype ids (N, G) uint8, scales (N, G) fp16; each group takes the (datatype, scale) pair of
    least squared error. A datatype's range-fitting scale maps the group's largest weight onto the
    grid's largest value and its smallest onto the grid's smallest (whichever needs the larger
    scale: an extra-asymmetry grid reaches further on one side); ``scale_search`` also tries that
    scale shrunk by ``CLIP_RATIOS`` (clipping the extremes), else only the range-fitting one."""
    grids = bitmod_datatypes(bits).to(w.device, torch.float32)            # (4, 2**bits)
    wg = _groups(w.float(), group_size)                                    # (N, G, gs)
    hi, lo = wg.amax(-1).clamp(min=0), wg.amin(-1).clamp(max=0)            # (N, G)
    best_err = torch.full_like(hi, float("inf"))
    codes = torch.zeros(wg.shape, dtype=torch.uint8, device=w.device)
    dtype_id = torch.zeros(hi.shape, dtype=torch.uint8, device=w.device)
    scales = torch.zeros_like(hi)
    for d, grid in enumerate(grids):
        fit = torch.maximum(hi / grid.max(), lo / grid.min())
        for r in CLIP_RATIOS if scale_search else (1.0,):
            # fp16 scale, as stored: the error is judged with the scale the dequantiser will see
            s = (fit * r).clamp(min=1e-8).half().float()
            c = _nearest(wg / s[..., None], grid)
            err = ((grid[c] * s[..., None] - wg) ** 2).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            codes = torch.where(better[..., None], c.to(torch.uint8), codes)
            dtype_id = torch.where(better, torch.full_like(dtype_id, d), dtype_id)
            scales = torch.where(better, s, scales)
    return codes.reshape(w.shape), dtype_id, scales.half()


def bitmod_dequantize(codes: torch.Tensor, dtype_id: torch.Tensor, scales: torch.Tensor, bits: int,
                      group_size: int) -> torch.Tensor:
    grids = bitmod_datatypes(bits).to(codes.device, torch.float32)        # (4, 2**bits)
    n, k = codes.shape
    cg = codes.reshape(n, k // group_size, group_size).long()
    vals = grids[dtype_id.long()[..., None].expand_as(cg), cg]            # (N, G, gs)
    return (vals * scales.float()[..., None]).reshape(n, k)


def fake_quantize(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """The dequantised weight of ``w`` under ``cfg`` (same shape, fp32)."""
    w32 = w.detach().float()
    if cfg.method == "int8":
        q, s = int8_quantize(w32)
        return q.float() * s[:, None]
    if cfg.method == "int4":
        return int4_dequantize(*int4_quantize(w32, cfg.group_size), cfg.group_size)
    if cfg.method == "int4-sym":
        return int4_sym_fake(w32, cfg.group_size)
    return bitmod_dequantize(*bitmod_quantize(w32, cfg.group_size, cfg.bits, scale_search=cfg.scale_search),
                             cfg.bits, cfg.group_size)


# ------------------------------------------------------------------------------ packed modules
class _Packed(nn.Module):
    in_features: int
    out_features: int

    def stored_bits(self) -> int:
        """Bits of the buffers this module keeps for its weight (codes + metadata), bias excluded."""
        return sum(b.numel() * b.element_size() * 8 for n, b in self.named_buffers() if n != "bias")

    def _out(self, y: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        y = y.to(dtype).reshape(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int8Linear(_Packed):
    """int8 weights (N, K) + per-row scales; y = (x_bf16 @ q^T) * s by ``_weight_int8pack_mm``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, s = int8_quantize(linear.weight.detach().float())
        self.register_buffer("qweight", q)
        self.register_buffer("scales", s.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        return self._out(torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales), x.shape, x.dtype)


class Int4Linear(_Packed):
    """tinygemm-packed 4-bit weights + (scale, zero) per group; ``_weight_int4pack_mm_for_cpu``."""

    def __init__(self, linear: nn.Linear, group_size: int):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        q, s, z = int4_quantize(linear.weight.detach().float(), group_size)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.register_buffer("scales_zeros", torch.stack([s, z], -1).transpose(0, 1).contiguous().to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_zeros)
        return self._out(y, x.shape, x.dtype)


class BitMoDLinear(_Packed):
    """BitMoD codes packed two per byte (3-bit codes also take a nibble: no 3-bit CPU layout) +
    2-bit datatype ids packed four per byte + fp16 group scales; dequantise, then ``F.linear``."""

    def __init__(self, linear: nn.Linear, group_size: int, bits: int, scale_search: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size, self.bits = group_size, bits
        codes, ids, scales = bitmod_quantize(linear.weight.detach().float(), group_size, bits, scale_search=scale_search)
        codes = torch.nn.functional.pad(codes, (0, codes.shape[1] % 2))              # even width
        self.register_buffer("codes", codes[:, 0::2] | (codes[:, 1::2] << 4))
        flat = torch.nn.functional.pad(ids.flatten(), (0, (-ids.numel()) % 4))
        self.register_buffer("ids", flat[0::4] | (flat[1::4] << 2) | (flat[2::4] << 4) | (flat[3::4] << 6))
        self._ids_shape = tuple(ids.shape)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        lo, hi = self.codes & 15, self.codes >> 4
        codes = torch.stack([lo, hi], -1).flatten(1)[:, :self.in_features]
        ids = torch.stack([(self.ids >> s) & 3 for s in (0, 2, 4, 6)], -1).flatten()
        ids = ids[:self._ids_shape[0] * self._ids_shape[1]].reshape(self._ids_shape)
        return bitmod_dequantize(codes, ids, self.scales, self.bits, self.group_size)

    def stored_bits(self) -> int:
        """The storage BitMoD's format needs: ``bits`` per code, 2 per datatype id, 16 per scale
        (this CPU layout rounds 3-bit codes up to a nibble; ``buffer_bits`` is what it holds)."""
        n_groups = self.scales.numel()
        return self.out_features * self.in_features * self.bits + n_groups * (2 + 16)

    def buffer_bits(self) -> int:
        return super().stored_bits()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantized().to(x.dtype)
        return torch.nn.functional.linear(x, w, self.bias)


# ------------------------------------------------------------------------------ model transform
def decoder_linears(model: Any) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every nn.Linear inside the decoder layers (attention and MLP
    projections); embeddings and the LM head stay in full precision (the zoo ties them)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers: weight quantisation supports "
                         "decoder-only models laid out like Llama / Qwen2 / Mistral")
    for layer in layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    yield parent, name, child


@torch.no_grad()
def quantize_model(model: Any, cfg: QuantConfig) -> Any:
    """Quantise ``model``'s decoder linears in place under ``cfg``; returns the model. Checks every
    linear's shape before changing any (a group size that does not divide a dimension raises)."""
    targets = list(decoder_linears(model))
    if cfg.method != "int8":
        for _, name, lin in targets:
            if lin.in_features % cfg.group_size:
                raise ValueError(f"group_size {cfg.group_size} does not divide the input dimension "
                                 f"{lin.in_features} of {name}")
    for parent, name, lin in targets:
        if not cfg.packed:
            lin.weight.copy_(fake_quantize(lin.weight, cfg).to(lin.weight.dtype))
            continue
        if cfg.method == "int8":
            new: nn.Module = Int8Linear(lin)
        elif cfg.method == "int4":
            new = Int4Linear(lin, cfg.group_size)
        else:
            new = BitMoDLinear(lin, cfg.group_size, cfg.bits, cfg.scale_search)
        setattr(parent, name, new)
    model._accelerando_quant = cfg
    return model


def bits_per_weight(model: Any) -> float:
    """Stored bits per quantised weight, metadata (scales, zeros, datatype ids) included, over the
    decoder linears; a simulated model reports what its packed form would store."""
    cfg = getattr(model, "_accelerando_quant", None)
    bits = n = 0
    for _, _, mod in _all_decoder_weights(model):
        if isinstance(mod, _Packed):
            bits += mod.stored_bits()
            n += mod.in_features * mod.out_features
        else:
            nw = mod.weight.numel()
            n += nw
            bits += nw * mod.weight.element_size() * 8 if cfg is None else _simulated_bits(mod, cfg)
    return bits / max(1, n)


def _simulated_bits(lin: nn.Linear, cfg: QuantConfig) -> int:
    n, k = lin.out_features, lin.in_features
    if cfg.method == "int8":
        return n * k * 8 + n * 16
    g = n * (k // cfg.group_size)
    if cfg.method == "int4":
        return n * k * 4 + g * 32
    if cfg.method == "int4-sym":
        return n * k * 4 + g * 16
    return n * k * cfg.bits + g * (2 + 16)


def _all_decoder_weights(model: Any) -> Iterator[tuple[nn.Module, str, nn.Module]]:
    layers = model.model.layers
    for layer in layers:
        for parent in layer.modules():
            for name, child in parent.named_children():
                if isinstance(child, (nn.Linear, _Packed)):
                    yield parent, name, child


def torchao_int8(model: Any) -> Any:
    """The anchor: torchao's weight-only int8 (``Int8WeightOnlyConfig``) on the same decoder
    linears, in place. Needs ``pip install accelerando[quant]``."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ImportError("torchao is not installed: pip install 'accelerando[quant]'") from exc
    layers = model.model.layers
    quantize_(layers, Int8WeightOnlyConfig(), filter_fn=lambda m, _fqn: isinstance(m, nn.Linear))
    return model
