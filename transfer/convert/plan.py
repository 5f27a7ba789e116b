"""Conversion planning: can a source cache become a destination cache, and how.

Owns the rules that decide compatibility (`check_compatible` raises `IncompatibleKv` naming
both specs) and the per-token value path of a `ConversionPlan`: head slice for TP
(`[T, Hp, D]` carried → `[T, Hw, D]` written, Hw = heads both sides have), then either the
stored bits as they are (`is_raw`: same dtype and scale scheme) or dequantize → quantize.
Layout permutes and re-blocking are not value operations: they fall out of writing tokens
through layout views (writer.py / cache.py), so any layout and any block size pair works.

What is convertible: any two specs of the same model — same kind (kv vs MLA latent), layer
count, head_dim and model head count, and a matching model fingerprint (or an unknown one) —
with overlapping head ranges. A latent (MLA) cache can never become K/V or the reverse
(that needs the model's up-projection weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_spec import KvDtype, KvSpec, ScaleGranularity
from transfer.convert.quant import (
    ConversionStats,
    OverflowPolicy,
    dequantize,
    is_lossless_cast,
    quantize,
)
from transfer.wire.errors import IncompatibleKv


@dataclass(frozen=True)
class ConvertOptions:
    """Receiver-side conversion choices."""

    overflow: OverflowPolicy = OverflowPolicy.ERROR


def check_compatible(src: KvSpec, dst: KvSpec,
                     heads: tuple[int, int] | None = None) -> tuple[int, int]:
    """Raise IncompatibleKv unless `src` (carrying model heads `heads`, default all of its own)
    can be written into `dst`; return the model heads `[lo, hi)` that will be written."""
    def fail(reason: str) -> IncompatibleKv:
        return IncompatibleKv(reason, src, dst)

    if not src.fingerprint_compatible(dst):
        raise fail("caches belong to different models (fingerprints differ)")
    if src.kind is not dst.kind:
        raise fail(f"a {src.kind.value} cache cannot become a {dst.kind.value} cache")
    if src.num_layers != dst.num_layers:
        raise fail(f"layer counts differ ({src.num_layers} vs {dst.num_layers})")
    if src.head_dim != dst.head_dim:
        raise fail(f"head_dim differs ({src.head_dim} vs {dst.head_dim})")
    if src.model_kv_heads != dst.model_kv_heads:
        raise fail(f"model KV head counts differ ({src.model_kv_heads} vs {dst.model_kv_heads})")
    lo, hi = heads if heads is not None else src.head_range
    d_lo, d_hi = dst.head_range
    w_lo, w_hi = max(lo, d_lo), min(hi, d_hi)
    if w_lo >= w_hi:
        raise fail(f"message carries heads [{lo}, {hi}) but this cache holds [{d_lo}, {d_hi}): "
                   "sent to the wrong TP rank")
    return w_lo, w_hi


@dataclass(frozen=True)
class ConversionPlan:
    src: KvSpec
    dst: KvSpec
    carried_heads: tuple[int, int]  # model heads in the payload
    write_heads: tuple[int, int]  # model heads written (carried ∩ destination)

    @classmethod
    def build(cls, src: KvSpec, dst: KvSpec,
              carried_heads: tuple[int, int] | None = None) -> ConversionPlan:
        carried = carried_heads if carried_heads is not None else src.head_range
        return cls(src, dst, carried, check_compatible(src, dst, carried))

    # ---- derived decisions ----------------------------------------------------------------------
    @property
    def is_raw(self) -> bool:
        """Stored bits can be copied unchanged (fixed scales must also be equal: see writer)."""
        s, d = self.src, self.dst
        return (s.dtype is d.dtype and s.scale_granularity is d.scale_granularity
                and (s.dtype is not KvDtype.INT4 or s.int4_group_size == d.int4_group_size))

    @property
    def is_block_copy(self) -> bool:
        """Whole blocks can be copied: raw, same layout and block size, identical head sets."""
        return (self.is_raw and self.src.layout is self.dst.layout
                and self.src.block_size == self.dst.block_size
                and self.carried_heads == self.write_heads == self.dst.head_range)

    @property
    def is_lossless(self) -> bool:
        return self.is_raw or is_lossless_cast(self.src, self.dst)

    @property
    def src_head_slice(self) -> slice:
        lo = self.carried_heads[0]
        return slice(self.write_heads[0] - lo, self.write_heads[1] - lo)

    @property
    def dst_head_offset(self) -> int:
        return self.write_heads[0] - self.dst.head_range[0]

    @property
    def has_fixed_dst_scales(self) -> bool:
        fixed = (ScaleGranularity.PER_TENSOR, ScaleGranularity.PER_HEAD)
        return self.dst.scale_granularity in fixed

    # ---- values ---------------------------------------------------------------------------------
    def convert(
        self, values: torch.Tensor, src_scales: torch.Tensor | None,
        dst_fixed_scales: torch.Tensor | None, options: ConvertOptions, *, is_raw: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, ConversionStats]:
        """`values` `[T, Hp, Dsrc]` stored (+ `src_scales` broadcastable to `[T, Hp, G]`) →
        (`[T, Hw, Ddst]` stored, per-token-head scales `[T, Hw, G]` or None, stats).
        `dst_fixed_scales` broadcastable to `[T, Hw, G]` (per-tensor / per-head destinations).
        `is_raw`: the caller established that stored bits are valid as-is (incl. equal scales)."""
        heads = self.src_head_slice
        values = values[:, heads]
        if src_scales is not None and src_scales.shape[1] > 1:  # per-head or per-token-head
            src_scales = src_scales[:, heads]
        if is_raw:
            per_token = self.src.scale_granularity is ScaleGranularity.PER_TOKEN_HEAD
            carried = src_scales if per_token else None
            return values, carried, ConversionStats(num_values=values.numel(), is_lossless=True)
        x = dequantize(values, self.src.dtype, src_scales)
        q, token_scales, stats = quantize(x, self.dst, dst_fixed_scales, options.overflow)
        stats.is_lossless = self.is_lossless and stats.num_clamped == 0
        return q, token_scales, stats
