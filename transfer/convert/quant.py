"""Value conversion between KV dtypes: casts, fp8/int8/int4 (de)quantization with scales.

Owns the numbers only: tensors here are token-major `[T, H, D]` (layout lives in layouts.py).
All conversion goes through float32: `dequantize(src) -> float32 -> quantize(dst)`; the
caller skips both when source and destination store identical bits (see convert.py).

Scales are float32 multipliers: `value = stored * scale`, with `G` groups along head_dim
(int4 only, `G = head_dim / int4_group_size`; otherwise G = 1). Quantizing with per-token-head
granularity computes `scale = amax / qmax` per (token, head, group); per-tensor and per-head
scales belong to the destination cache (calibrated there) and are passed in.

Overflow: finite values the destination cannot hold (beyond max + half an ulp, e.g. a bf16
value above 65520 going to fp16, or past ±448 × scale into fp8 e4m3) are counted. With
`OverflowPolicy.ERROR` (default) that raises `ValueOutOfRange`; with `CLAMP` they are clamped
to ±max and counted in `ConversionStats`. Nothing silently becomes inf.

Stated tolerance per destination dtype (`TOLERANCE`): a converted value `y` of source value
`x` satisfies `|y - x| <= rel * |x| + abs * scale` (scale = 1 for unscaled dtypes), for every
`x` the destination can hold. Lossless conversions (`is_lossless_cast`) are bit-exact.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType

import torch

from engine.kv_spec import KvDtype, KvSpec, ScaleGranularity
from transfer.wire.errors import ValueOutOfRange
from transfer.wire.layouts import scale_groups, storage_dtype


class OverflowPolicy(str, enum.Enum):
    ERROR = "error"
    CLAMP = "clamp"


@dataclass
class ConversionStats:
    """What a conversion did to the values (summed over a transfer)."""

    num_values: int = 0
    num_clamped: int = 0
    max_abs_clamped: float = 0.0
    is_lossless: bool = True

    def add(self, other: ConversionStats) -> None:
        self.num_values += other.num_values
        self.num_clamped += other.num_clamped
        self.max_abs_clamped = max(self.max_abs_clamped, other.max_abs_clamped)
        self.is_lossless = self.is_lossless and other.is_lossless


# Largest finite value and half an ulp above it (values at or below the latter round to max).
_FLOAT_LIMITS = MappingProxyType({
    KvDtype.FLOAT16: (65504.0, 65520.0),
    KvDtype.BFLOAT16: (float(torch.finfo(torch.bfloat16).max), 3.3961775292304e38),
    KvDtype.FP8_E4M3: (448.0, 464.0),
    KvDtype.FP8_E5M2: (57344.0, 61440.0),
})
_INT_QMAX = MappingProxyType({KvDtype.INT8: 127, KvDtype.INT4: 7})
_FP8_QMAX = MappingProxyType({KvDtype.FP8_E4M3: 448.0, KvDtype.FP8_E5M2: 57344.0})
_MIN_SCALE = 1e-30

# (relative, absolute in units of the destination scale) — see module docstring.
TOLERANCE = MappingProxyType({
    KvDtype.FLOAT32: (2.0**-23, 0.0),
    KvDtype.FLOAT16: (2.0**-11, 2.0**-25),
    KvDtype.BFLOAT16: (2.0**-8, 2.0**-134),
    KvDtype.FP8_E4M3: (2.0**-4, 2.0**-10),
    KvDtype.FP8_E5M2: (2.0**-3, 2.0**-17),
    KvDtype.INT8: (0.0, 0.5),
    KvDtype.INT4: (0.0, 0.5),
})

# Unscaled source dtype -> destination dtypes that hold every source value exactly.
_WIDENS = MappingProxyType({
    KvDtype.FLOAT16: frozenset({KvDtype.FLOAT32}),
    KvDtype.BFLOAT16: frozenset({KvDtype.FLOAT32}),
    KvDtype.FP8_E4M3: frozenset({KvDtype.FLOAT16, KvDtype.BFLOAT16, KvDtype.FLOAT32}),
    KvDtype.FP8_E5M2: frozenset({KvDtype.FLOAT16, KvDtype.BFLOAT16, KvDtype.FLOAT32}),
})


def is_float_dtype(dtype: KvDtype) -> bool:
    return dtype not in _INT_QMAX


def is_lossless_cast(src: KvSpec, dst: KvSpec) -> bool:
    """Whether dequantize(src) → quantize(dst) reproduces every source value exactly, given
    identical bits are copied as-is (same dtype, same scale scheme, scales carried or equal)."""
    none = ScaleGranularity.NONE
    if src.dtype is dst.dtype and src.scale_granularity is dst.scale_granularity:
        return src.dtype is not KvDtype.INT4 or src.int4_group_size == dst.int4_group_size
    if src.scale_granularity is none and dst.scale_granularity is none:
        return dst.dtype in _WIDENS.get(src.dtype, frozenset())
    return False


# ---- int4 packing -------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], `[..., D]` → uint8 `[..., D/2]` (element 2i in the low nibble)."""
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    pairs = u.reshape(*u.shape[:-1], u.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_int4(b: torch.Tensor) -> torch.Tensor:
    """uint8 `[..., D/2]` → int8 `[..., D]` in [-8, 7]."""
    lo = (b & 0xF).to(torch.int8)
    hi = (b >> 4).to(torch.int8)
    both = torch.stack((lo, hi), dim=-1).reshape(*b.shape[:-1], b.shape[-1] * 2)
    return torch.where(both >= 8, both - 16, both)


# ---- dequantize ---------------------------------------------------------------------------------
def _apply_scales(x: torch.Tensor, scales: torch.Tensor | None, *, divide: bool) -> torch.Tensor:
    """x `[T, H, D]` times (or over) scales broadcastable to `[T, H, G]`, per group of D."""
    if scales is None:
        return x
    t, h, d = x.shape
    g = scales.shape[-1]
    grouped = x.reshape(t, h, g, d // g)
    s = scales.to(x.device).unsqueeze(-1)
    return (grouped / s if divide else grouped * s).reshape(t, h, d)


def dequantize(stored: torch.Tensor, dtype: KvDtype, scales: torch.Tensor | None) -> torch.Tensor:
    """Stored values `[T, H, Dst]` (+ scales broadcastable to `[T, H, G]`) → float32 `[T, H, D]`."""
    if dtype is KvDtype.INT4:
        stored = unpack_int4(stored)
    return _apply_scales(stored.to(torch.float32), scales, divide=False)


# ---- quantize -----------------------------------------------------------------------------------
def _token_head_scales(x: torch.Tensor, groups: int, qmax: float) -> torch.Tensor:
    t, h, d = x.shape
    amax = x.reshape(t, h, groups, d // groups).abs().amax(dim=-1)
    return (amax / qmax).clamp_min(_MIN_SCALE)  # [T, H, G]


def _check_range(
    y: torch.Tensor, dtype: KvDtype, limit: float, max_value: float, policy: OverflowPolicy,
    stats: ConversionStats,
) -> torch.Tensor:
    over = y.abs() > limit  # NaN compares False: NaN is carried, not counted
    num = int(over.sum())
    if num:
        max_abs = float(y.abs()[over].max())
        if policy is OverflowPolicy.ERROR:
            raise ValueOutOfRange(dtype.value, num, max_abs, max_value)
        stats.num_clamped += num
        stats.max_abs_clamped = max(stats.max_abs_clamped, max_abs)
        y = y.clamp(-max_value, max_value)
    return y


def quantize(
    x: torch.Tensor, dst: KvSpec, fixed_scales: torch.Tensor | None,
    policy: OverflowPolicy = OverflowPolicy.ERROR,
) -> tuple[torch.Tensor, torch.Tensor | None, ConversionStats]:
    """float32 `[T, H, D]` → (stored `[T, H, Dst]`, per-token-head scales `[T, H, G]` or None,
    stats). `fixed_scales` (broadcastable to `[T, H, G]`) are the destination's per-tensor or
    per-head scales; ignored for other granularities."""
    stats = ConversionStats(num_values=x.numel(), is_lossless=False)
    dtype, gran = dst.dtype, dst.scale_granularity
    qmax = _INT_QMAX.get(dtype) or _FP8_QMAX.get(dtype)
    token_scales = None
    if gran is ScaleGranularity.PER_TOKEN_HEAD:
        if qmax is None:  # scaling a plain float dtype: normalise to unit amax
            qmax = 1.0
        token_scales = _token_head_scales(x, scale_groups(dst), float(qmax))
        scales = token_scales
    elif gran is ScaleGranularity.NONE:
        scales = None
    else:
        scales = fixed_scales
    y = _apply_scales(x, scales, divide=True)
    if dtype in _INT_QMAX:
        qmax = _INT_QMAX[dtype]
        q = _check_range(torch.round(y), dtype, qmax + 0.5, qmax, policy, stats)
        q = q.clamp(-_INT_QMAX[dtype], _INT_QMAX[dtype]).to(torch.int8)
        return (pack_int4(q) if dtype is KvDtype.INT4 else q), token_scales, stats
    if dtype in _FLOAT_LIMITS:
        max_value, limit = _FLOAT_LIMITS[dtype]
        y = _check_range(y, dtype, limit, max_value, policy, stats)
    return y.to(storage_dtype(dtype)), token_scales, stats


def tolerance(dtype: KvDtype) -> tuple[float, float]:
    """(relative, absolute-in-scale-units) error bound of converting into `dtype`."""
    return TOLERANCE[dtype]
