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
    budget: float | None = None      # bitmod: mixed 3/4-bit groups, <= this many stored bits per weight (bits=None)
    scale_bits: int = 16             # bitmod: 16 (fp16 group scales) or 8 (8-bit codes under an fp16 row scale)
    sensitivity: str = "fisher"      # bitmod budget with calibration text: "fisher" (per weight) or "moments" (per input)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quantisation method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.budget is not None:
            if self.method != "bitmod":
                raise ValueError(f"budget is a bitmod knob (mixed 3/4-bit groups), not one of {self.method}")
            if self.bits is not None:
                raise ValueError(f"give bits or budget, not both (bits={self.bits}, budget={self.budget})")
            if not 3.0 < float(self.budget) <= 6.0:
                raise ValueError(f"bitmod budget must be in (3, 6] bits per weight, got {self.budget}")
        elif self.bits is None:
            self.bits = 8 if self.method == "int8" else 4
        if self.sensitivity not in ("fisher", "moments"):
            raise ValueError(f"sensitivity must be 'fisher' or 'moments', got {self.sensitivity!r}")
        if self.scale_bits not in (4, 5, 6, 7, 8, 16):
            raise ValueError(f"scale_bits must be 16 (fp16) or 4..8 (codes under a row scale), got {self.scale_bits}")
        if self.scale_bits != 16 and self.method != "bitmod":
            raise ValueError(f"scale_bits is a bitmod knob; {self.method} stores its own scales")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        if self.method == "bitmod" and self.budget is None and self.bits not in (3, 4):
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


def bitmod_grids(bits: int | None) -> torch.Tensor:
    """The datatype table indexed by the stored datatype id: ``bitmod_datatypes(bits)`` for 3 or
    4; None (the mixed 3/4-bit format): (8, 16), ids 0-3 the 3-bit datatypes (padded with their
    last value: their codes are < 8), ids 4-7 the 4-bit ones."""
    if bits is not None:
        return bitmod_datatypes(bits)
    g3 = bitmod_datatypes(3)
    return torch.cat([torch.cat([g3, g3[:, -1:].expand(4, 8)], 1), bitmod_datatypes(4)])


def _reach(grids: torch.Tensor) -> torch.Tensor:
    """max |value| of each datatype: a scale s covers weights up to s * reach."""
    return grids.abs().amax(-1)


class ScaleStore:
    """How a group scale is stored. ``scale_bits`` 16: fp16. 8: an 8-bit code u per group under an
    fp16 scale per output row R (the double quantisation of QLoRA / llama.cpp's k-quants): the
    group's reach s * max|grid| = u * R / (2**scale_bits - 1) (any width 4..8), so 3- and 4-bit datatypes get the same relative
    precision. ``quantize(s, reach)`` is the scale the dequantiser will see; errors are judged with it."""

    def __init__(self, scale_bits: int, wg: torch.Tensor, grids: torch.Tensor):
        self.bits, self.top = scale_bits, 2 ** scale_bits - 1
        if scale_bits == 16:
            self.row = None
            return
        hi, lo = wg.amax(-1).clamp(min=0), wg.amin(-1).clamp(max=0)                 # (N, G)
        # the largest reach any candidate needs (CLIP_RATIOS <= 1), rounded up into fp16
        fit = torch.stack([torch.maximum(hi / g.max(), lo / g.min()) * g.abs().max() for g in grids])
        r = fit.amax(0).amax(-1).clamp(min=1e-6)                                    # (N,)
        self.row = (r * (1 + 2 ** -9)).half()

    def quantize(self, s: torch.Tensor, reach: torch.Tensor | float) -> torch.Tensor:
        if self.row is None:
            return s.clamp(min=1e-8).half().float()
        return self.code(s, reach).float() * self.row.float()[:, None] / (self.top * reach)

    def code(self, s: torch.Tensor, reach: torch.Tensor | float) -> torch.Tensor:
        """The 8-bit codes u (N, G) of scales s (8-bit store only)."""
        return (s * reach / self.row.float()[:, None] * self.top).round().clamp(1, self.top).to(torch.uint8)


def _bitmod_search(wg: torch.Tensor, grids: torch.Tensor, store: ScaleStore, scale_search: bool, id0: int = 0,
                   h: torch.Tensor | None = None):
    """Per group (N, G) of weights wg (N, G, gs): the (datatype, scale) of least squared error over
    ``grids`` (each column's error weighted by ``h`` (G, gs), its input's mean square, when given);
    returns (error, codes (N, G, gs) uint8, datatype ids + id0, scales as stored)."""
    hi, lo = wg.amax(-1).clamp(min=0), wg.amin(-1).clamp(max=0)            # (N, G)
    best_err = torch.full_like(hi, float("inf"))
    codes = torch.zeros(wg.shape, dtype=torch.uint8, device=wg.device)
    dtype_id = torch.zeros(hi.shape, dtype=torch.uint8, device=wg.device)
    scales = torch.zeros_like(hi)
    for d, grid in enumerate(grids):
        fit = torch.maximum(hi / grid.max(), lo / grid.min())
        for r in CLIP_RATIOS if scale_search else (1.0,):
            s = store.quantize(fit * r, grid.abs().max())
            c = _nearest(wg / s[..., None], grid)
            err = (grid[c] * s[..., None] - wg) ** 2
            err = (err if h is None else err * h).sum(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            codes = torch.where(better[..., None], c.to(torch.uint8), codes)
            dtype_id = torch.where(better, torch.full_like(dtype_id, d + id0), dtype_id)
            scales = torch.where(better, s, scales)
    return best_err, codes, dtype_id, scales


def bitmod_quantize(w: torch.Tensor, group_size: int, bits: int = 4, *, scale_search: bool = True,
                    scale_bits: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BitMoD per-group datatype choice: codes (N, K) uint8 (index into the group's grid),
    datatype ids (N, G) uint8, scales (N, G) (fp16; float32 holding the 8-bit-coded values when
    ``scale_bits`` is 8); each group takes the (datatype, scale) pair of least squared error. A
    datatype's range-fitting scale maps the group's largest weight onto the grid's largest value
    and its smallest onto the grid's smallest (whichever needs the larger scale: an
    extra-asymmetry grid reaches further on one side); ``scale_search`` also tries that scale
    shrunk by ``CLIP_RATIOS`` (clipping the extremes), else only the range-fitting one."""
    grids = bitmod_datatypes(bits).to(w.device, torch.float32)            # (4, 2**bits)
    wg = _groups(w.float(), group_size)                                    # (N, G, gs)
    _, codes, ids, scales = _bitmod_search(wg, grids, ScaleStore(scale_bits, wg, grids), scale_search)
    return codes.reshape(w.shape), ids, scales.half() if scale_bits == 16 else scales


@dataclass
class BitMoDCandidates:
    """One linear's best 3-bit and 4-bit group encodings (scales on one shared ``ScaleStore``)."""

    err3: torch.Tensor
    err4: torch.Tensor
    enc3: tuple
    enc4: tuple
    store: ScaleStore
    shape: tuple[int, int]

    def mix(self, four: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (N, K), ids (N, G) into ``bitmod_grids(None)``, scales) with the groups where
        ``four`` (N, G) is True on their 4-bit encoding."""
        pick = lambda a, b: torch.where(four[..., None] if a.dim() == 3 else four, b, a)   # noqa: E731
        codes, ids, scales = (pick(a, b) for a, b in zip(self.enc3, self.enc4))
        return codes.reshape(self.shape), ids, scales


def bitmod_candidates(w: torch.Tensor, group_size: int, *, scale_search: bool = True, scale_bits: int = 16,
                      importance: torch.Tensor | None = None) -> BitMoDCandidates:
    """Both encodings of every group of ``w``; errors weighted by ``importance`` (K,), the mean
    square of each input feature on calibration text (the diagonal of the layer's Hessian
    ``E[x x^T]``, as GPTQ / AWQ weigh weight error), so they are output-error estimates."""
    wg = _groups(w.float(), group_size)
    h = None if importance is None else importance.float().reshape(-1, w.shape[1] // group_size, group_size)
    grids = bitmod_grids(None).to(w.device)
    store = ScaleStore(scale_bits, wg, grids)
    e3, *enc3 = _bitmod_search(wg, bitmod_datatypes(3).to(w.device, torch.float32), store, scale_search, 0, h)
    e4, *enc4 = _bitmod_search(wg, bitmod_datatypes(4).to(w.device, torch.float32), store, scale_search, 4, h)
    return BitMoDCandidates(e3, e4, tuple(enc3), tuple(enc4), store, tuple(w.shape))


def bitmod_format_bits(n_out: int, n_groups_per_row: int, group_size: int, n_four: int, *, mixed: bool,
                       bits: int = 4, scale_bits: int = 16) -> int:
    """Bits one linear's BitMoD format stores: every code at its group's width, a datatype id per
    group (2 bits: 4 datatypes; 3 bits mixed: 8), a scale per group (16 or 8 bits) and, with 8-bit
    scales, an fp16 scale per output row."""
    groups = n_out * n_groups_per_row
    if mixed:
        code_bits = (groups - n_four) * group_size * 3 + n_four * group_size * 4
    else:
        code_bits = groups * group_size * bits
    return code_bits + groups * ((3 if mixed else 2) + scale_bits) + (n_out * 16 if scale_bits != 16 else 0)


def bitmod_allocate(cands: list[BitMoDCandidates], group_size: int, budget: float, scale_bits: int) -> list[torch.Tensor]:
    """Mixed-precision BitMoD under a bit budget: every group starts on its best 3-bit encoding;
    groups move to 4 bits in order of squared-error reduction (each move costs the same
    ``group_size`` bits), across all linears, while the stored bits -- codes, 3-bit datatype ids,
    scales, row scales -- stay <= ``budget`` x weights. Returns, per linear, the (N, G) 4-bit mask."""
    n_w = sum(c.shape[0] * c.shape[1] for c in cands)
    base = sum(bitmod_format_bits(c.shape[0], c.shape[1] // group_size, group_size, 0, mixed=True,
                                  scale_bits=scale_bits) for c in cands)
    n_up = int((budget * n_w - base) // group_size)
    if n_up < 0:
        raise ValueError(f"bitmod budget {budget} is below this format's minimum of {base / n_w:.3f} bits per "
                         f"weight (every group at 3 bits, group_size {group_size}, scale_bits {scale_bits})")
    gains = torch.cat([(c.err3 - c.err4).flatten() for c in cands])
    four = torch.zeros_like(gains, dtype=torch.bool)
    four[torch.argsort(gains, descending=True, stable=True)[:min(n_up, len(gains))]] = True
    out, i = [], 0
    for c in cands:
        n = c.err3.numel()
        out.append(four[i:i + n].view_as(c.err3))
        i += n
    return out


def bitmod_dequantize(codes: torch.Tensor, dtype_id: torch.Tensor, scales: torch.Tensor, bits: int | None,
                      group_size: int) -> torch.Tensor:
    """Weights from codes (N, K), datatype ids (N, G) and scales (N, G); ``bits`` None: mixed ids."""
    grids = bitmod_grids(bits).to(codes.device, torch.float32)
    n, k = codes.shape
    cg = codes.reshape(n, k // group_size, group_size).long()
    vals = grids[dtype_id.long()[..., None].expand_as(cg), cg]            # (N, G, gs)
    return (vals * scales.float()[..., None]).reshape(n, k)


def fake_quantize(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """The dequantised weight of ``w`` under ``cfg`` (same shape, fp32); not for a bitmod budget,
    which is allocated over the whole model (``quantize_model``)."""
    w32 = w.detach().float()
    if cfg.method == "int8":
        q, s = int8_quantize(w32)
        return q.float() * s[:, None]
    if cfg.method == "int4":
        return int4_dequantize(*int4_quantize(w32, cfg.group_size), cfg.group_size)
    if cfg.method == "int4-sym":
        return int4_sym_fake(w32, cfg.group_size)
    if cfg.budget is not None:
        raise ValueError("a bitmod budget is allocated over a whole model: use quantize_model")
    return bitmod_dequantize(*bitmod_quantize(w32, cfg.group_size, cfg.bits, scale_search=cfg.scale_search,
                                              scale_bits=cfg.scale_bits), cfg.bits, cfg.group_size)


def pack_fields(values: torch.Tensor, widths: torch.Tensor | int) -> torch.Tensor:
    """Unsigned ints ``values`` of ``widths`` bits each (<= 8; one width or one per value)
    concatenated most-significant bit first into a byte stream (uint8, ceil(sum / 8) bytes)."""
    v = values.reshape(-1).to(torch.int32)
    w = torch.as_tensor(widths, dtype=torch.int32).expand(v.shape) if not torch.is_tensor(widths) or widths.dim() == 0 \
        else widths.reshape(-1).to(torch.int32)
    sh = torch.arange(7, -1, -1, dtype=torch.int32)
    bits = ((v[:, None] >> sh) & 1)[sh[None, :] < w[:, None]]             # the low w bits, msb first
    bits = torch.nn.functional.pad(bits, (0, (-bits.numel()) % 8)).view(-1, 8)
    return (bits << sh).sum(1).to(torch.uint8)


def unpack_fields(buf: torch.Tensor, widths: torch.Tensor | int, n: int) -> torch.Tensor:
    """The inverse of ``pack_fields`` for ``n`` values: int64 (n,)."""
    w = torch.as_tensor(widths, dtype=torch.int32).expand(n) if not torch.is_tensor(widths) or widths.dim() == 0 \
        else widths.reshape(-1).to(torch.int32)
    sh = torch.arange(7, -1, -1, dtype=torch.int32)
    bits = ((buf.to(torch.int32)[:, None] >> sh) & 1).flatten()
    keep = sh[None, :] < w[:, None]                                         # (n, 8)
    out = torch.zeros(n, 8, dtype=torch.int64)
    out[keep] = bits[: int(keep.sum())].long()
    return (out << sh.long()).sum(1)


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
    """BitMoD's format as stored bits: the codes as one bit stream (each at its group's width, 3 or
    4 bits), the datatype ids as another (2 bits; 3 when mixed), the group scales (fp16, or 8-bit
    codes + an fp16 scale per output row); forward unpacks, dequantises, then ``F.linear`` (a CPU
    has no bit-serial datapath: storage is real, the arithmetic is fp32)."""

    def __init__(self, linear: nn.Linear, group_size: int, bits: int | None, scale_search: bool = True,
                 scale_bits: int = 16, encoded: tuple | None = None, store: "ScaleStore | None" = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group_size, self.bits, self.scale_bits = group_size, bits, scale_bits
        w = linear.weight.detach().float()
        if encoded is None:         # fixed width: encode here
            wg = _groups(w, group_size)
            grids = bitmod_datatypes(bits).to(torch.float32)
            store = ScaleStore(scale_bits, wg, grids)
            _, codes, ids, scales = _bitmod_search(wg, grids, store, scale_search)
            codes = codes.reshape(w.shape)
        else:
            codes, ids, scales = encoded
        self._ids_shape = tuple(ids.shape)
        widths = self._code_widths(ids)
        self.register_buffer("codes", pack_fields(codes, widths))
        self.register_buffer("ids", pack_fields(ids, 2 if bits else 3))
        if scale_bits == 16:
            self.register_buffer("scales", scales.half())
            self.register_buffer("row_scale", None)
        else:
            reach = _reach(bitmod_grids(bits))[ids.long()]                  # (N, G)
            self.register_buffer("scales", pack_fields(store.code(scales.float(), reach), scale_bits))
            self.register_buffer("row_scale", store.row)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def _code_widths(self, ids: torch.Tensor) -> torch.Tensor | int:
        if self.bits:
            return self.bits
        return (3 + (ids >= 4).to(torch.int32)).repeat_interleave(self.group_size, dim=1)   # (N, K)

    def unpacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (N, K), datatype ids (N, G), scales (N, G) float) from the stored bits."""
        n_ids = self._ids_shape[0] * self._ids_shape[1]
        ids = unpack_fields(self.ids, 2 if self.bits else 3, n_ids).view(self._ids_shape)
        codes = unpack_fields(self.codes, self._code_widths(ids), self.out_features * self.in_features)
        codes = codes.view(self.out_features, self.in_features)
        if self.row_scale is None:
            scales = self.scales.float()
        else:
            reach = _reach(bitmod_grids(self.bits))[ids]
            u = unpack_fields(self.scales, self.scale_bits, n_ids).view(self._ids_shape)
            scales = u.float() * self.row_scale.float()[:, None] / ((2 ** self.scale_bits - 1) * reach)
        return codes, ids, scales

    def dequantized(self) -> torch.Tensor:
        return bitmod_dequantize(*self.unpacked(), self.bits, self.group_size)

    def stored_bits(self) -> int:
        """Bits of the format: every code at its width, the datatype ids, the scales (and row
        scales); ``buffer_bits`` is what the buffers hold (each bit stream padded to whole bytes)."""
        _, ids, _ = self.unpacked()
        n_four = int((ids >= 4).sum()) if not self.bits else 0
        return bitmod_format_bits(self.out_features, self.in_features // self.group_size, self.group_size, n_four,
                                  mixed=not self.bits, bits=self.bits or 4, scale_bits=self.scale_bits)

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
def quantize_model(model: Any, cfg: QuantConfig, *, calibration: torch.Tensor | None = None) -> Any:
    """Quantise ``model``'s decoder linears in place under ``cfg``; returns the model. Checks every
    linear's shape before changing any (a group size that does not divide a dimension raises).
    ``calibration`` (B, T) token ids, bitmod ``budget`` only: weigh each group's error by its
    inputs' mean squares on them (``input_moments``), else plain weight error."""
    targets = list(decoder_linears(model))
    if cfg.method != "int8":
        for _, name, lin in targets:
            if lin.in_features % cfg.group_size:
                raise ValueError(f"group_size {cfg.group_size} does not divide the input dimension "
                                 f"{lin.in_features} of {name}")
    if calibration is not None and cfg.budget is None:
        raise ValueError("calibration is used by a bitmod budget only (error-weighted allocation)")
    if cfg.budget is not None:
        lins = [lin for _, _, lin in targets]
        moments = None if calibration is None else (fisher_weights(model, lins, calibration) if cfg.sensitivity == "fisher"
                                                    else input_moments(model, lins, calibration))
        _quantize_bitmod_budget(targets, cfg, moments)
    else:
        for parent, name, lin in targets:
            if not cfg.packed:
                lin.weight.copy_(fake_quantize(lin.weight, cfg).to(lin.weight.dtype))
                lin._accelerando_bits = _simulated_bits(lin, cfg)
                continue
            if cfg.method == "int8":
                new: nn.Module = Int8Linear(lin)
            elif cfg.method == "int4":
                new = Int4Linear(lin, cfg.group_size)
            else:
                new = BitMoDLinear(lin, cfg.group_size, cfg.bits, cfg.scale_search, cfg.scale_bits)
            setattr(parent, name, new)
    model._accelerando_quant = cfg
    return model


@torch.no_grad()
def input_moments(model: Any, linears: list[nn.Module], token_ids: torch.Tensor, chunk: int = 8) -> list[torch.Tensor]:
    """Mean square of every input feature of each of ``linears`` over ``token_ids`` (B, T): (K,) each."""
    sums = [torch.zeros(lin.in_features) for lin in linears]
    count = [0]

    def hook(i):
        def fn(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[i].add_((x * x).sum(0).cpu())
        return fn
    handles = [lin.register_forward_pre_hook(hook(i)) for i, lin in enumerate(linears)]
    try:
        for i in range(0, len(token_ids), chunk):
            model(token_ids[i:i + chunk])
            count[0] += token_ids[i:i + chunk].numel()
    finally:
        for hd in handles:
            hd.remove()
    return [s / max(1, count[0]) for s in sums]


def fisher_weights(model: Any, linears: list[nn.Module], token_ids: torch.Tensor) -> list[torch.Tensor]:
    """Per-weight sensitivity of the LM loss on ``token_ids`` (B, T): the diagonal empirical Fisher
    sum over sequences of (dL/dW)^2 (SqueezeLLM's weighting, Kim et al. 2024), (N, K) per linear."""
    sens = [torch.zeros_like(lin.weight, dtype=torch.float32) for lin in linears]
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    for lin in linears:
        lin.weight.requires_grad_(True)
    try:
        with torch.enable_grad():
            for row in token_ids:
                x = row[None]
                logits = model(x).logits[:, :-1].float()
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
                grads = torch.autograd.grad(loss, [lin.weight for lin in linears])
                for s_, g in zip(sens, grads):
                    s_.add_(g.float() ** 2)
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return sens


def _quantize_bitmod_budget(targets: list, cfg: QuantConfig, moments: list[torch.Tensor] | None = None) -> None:
    """Mixed 3/4-bit BitMoD: both encodings of every group, then ``bitmod_allocate`` over the model."""
    cands = [bitmod_candidates(lin.weight.detach().float(), cfg.group_size, scale_search=cfg.scale_search,
                               scale_bits=cfg.scale_bits, importance=None if moments is None else moments[i])
             for i, (_, _, lin) in enumerate(targets)]
    fours = bitmod_allocate(cands, cfg.group_size, float(cfg.budget), cfg.scale_bits)
    for (parent, name, lin), c, four in zip(targets, cands, fours):
        enc = c.mix(four)
        if cfg.packed:
            setattr(parent, name, BitMoDLinear(lin, cfg.group_size, None, cfg.scale_search, cfg.scale_bits,
                                               encoded=enc, store=c.store))
            continue
        lin.weight.copy_(bitmod_dequantize(*enc, None, cfg.group_size).to(lin.weight.dtype))
        lin._accelerando_bits = bitmod_format_bits(lin.out_features, lin.in_features // cfg.group_size, cfg.group_size,
                                                   int(four.sum()), mixed=True, scale_bits=cfg.scale_bits)


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
            bits += nw * mod.weight.element_size() * 8 if cfg is None else \
                getattr(mod, "_accelerando_bits", None) or _simulated_bits(mod, cfg)
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
    return bitmod_format_bits(n, k // cfg.group_size, cfg.group_size, 0, mixed=False, bits=cfg.bits,
                              scale_bits=cfg.scale_bits)


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
