"""The lower-level receive API: decode a message into fresh token-major tensors in my spec.

`decode_to_tensors(header, buffers, my_spec)` validates compatibility, converts (dtype, scales,
TP head slice) and returns a `CanonicalKv`: per layer `[C, T, H, D]` in `my_spec`'s storage
dtype (C = 2 for K/V, 1 for an MLA latent; H = the heads both sides have; D = storage dim),
with scales when `my_spec` has them. Its allocation is checked against
`ReceiverLimits.max_decoded_bytes` before it happens. The caller owns the returned tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.kv_spec import KvSpec, ScaleGranularity
from transfer.convert.plan import ConversionPlan, ConvertOptions
from transfer.convert.quant import dequantize
from transfer.convert.writer import KvWriter, WriteReport
from transfer.wire import layouts
from transfer.wire.errors import IncompatibleKv, LimitExceeded
from transfer.wire.header import ReceiverLimits, TransferHeader


@dataclass
class CanonicalKv:
    spec: KvSpec  # dtype and scale semantics of the tensors (block size and layout unused)
    token_start: int
    token_end: int
    layer_start: int
    head_start: int  # model heads held: [head_start, head_start + H)
    data: list[torch.Tensor]  # per layer from layer_start: [C, T, H, D] stored
    scales: list[torch.Tensor] | None  # per layer: [C, T, H, G] | [C, H, G] | [C, G]

    def dequantized(self, index: int) -> torch.Tensor:
        """float32 `[C, T, H, head_dim]` of layer `layer_start + index`."""
        out = []
        for comp, stored in enumerate(self.data[index]):
            s = None
            if self.scales is not None:
                s = self.scales[index][comp]
                s = s if s.dim() == 3 else (s.unsqueeze(0) if s.dim() == 2 else s.view(1, 1, -1))
            out.append(dequantize(stored, self.spec.dtype, s))
        return torch.stack(out)


class CanonicalSink:
    """Collects a transfer into token-major tensors. `fixed_scales` (per layer `[C, G]` or
    `[C, H, G]` for this spec's heads) are required when `spec` has per-tensor/per-head scales."""

    def __init__(self, spec: KvSpec, *, fixed_scales: Sequence[torch.Tensor] | None = None,
                 limits: ReceiverLimits = ReceiverLimits(), device: str | torch.device = "cpu"):
        self.spec, self.limits, self.device = spec, limits, torch.device(device)
        self.given_scales = list(fixed_scales) if fixed_scales is not None else None
        self.result: CanonicalKv | None = None

    def prepare(self, header: TransferHeader, plan: ConversionPlan) -> None:
        spec = self.spec
        c, t = layouts.num_components(spec), header.num_tokens
        hw = plan.write_heads[1] - plan.write_heads[0]
        layers = header.layer_end - header.layer_start
        shape = (c, t, hw, layouts.storage_dim(spec))
        dtype = layouts.storage_dtype(spec.dtype)
        paged = spec.scale_granularity is ScaleGranularity.PER_TOKEN_HEAD
        g = layouts.scale_groups(spec)
        nbytes = layers * (math.prod(shape) * dtype.itemsize + (c * t * hw * g * 4 if paged else 0))
        if nbytes > self.limits.max_decoded_bytes:
            raise LimitExceeded("decoded bytes", nbytes, self.limits.max_decoded_bytes)
        if plan.has_fixed_dst_scales and self.given_scales is None:
            raise IncompatibleKv("destination spec has fixed scales; pass fixed_scales",
                                 header.spec, spec)
        data = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layers)]
        scales: list[torch.Tensor] | None = None
        if paged:
            scales = [torch.ones((c, t, hw, g), device=self.device) for _ in range(layers)]
        elif self.given_scales is not None:
            lo = plan.dst_head_offset
            scales = [s[:, lo:lo + hw] if s.dim() == 3 else s
                      for s in self.given_scales[header.layer_start:header.layer_end]]
        self.result = CanonicalKv(spec, header.token_start, header.token_end, header.layer_start,
                                  plan.write_heads[0], data, scales)

    def fixed_scales(self, layer: int, component: int, plan: ConversionPlan) -> torch.Tensor | None:
        if not plan.has_fixed_dst_scales or self.result is None or self.result.scales is None:
            return None
        s = self.result.scales[layer - self.result.layer_start][component]
        return s.unsqueeze(0) if s.dim() == 2 else s.view(1, 1, -1)

    def write_tokens(self, layer: int, component: int, start: int, end: int, values: torch.Tensor,
                     head_offset: int, token_scales: torch.Tensor | None) -> None:
        r = self.result
        assert r is not None
        i, a, b = layer - r.layer_start, start - r.token_start, end - r.token_start
        r.data[i][component, a:b] = values.to(self.device)
        if token_scales is not None and r.scales is not None:
            r.scales[i][component, a:b] = token_scales.to(self.device)


def decode_to_tensors(
    header: TransferHeader, buffers: Sequence[Any], spec: KvSpec, *,
    checksums: Sequence[int | None] | None = None,
    fixed_scales: Sequence[torch.Tensor] | None = None,
    limits: ReceiverLimits = ReceiverLimits(), options: ConvertOptions = ConvertOptions(),
) -> tuple[CanonicalKv, WriteReport]:
    """Decode a complete message (validated header + all its buffers) into `spec`."""
    sink = CanonicalSink(spec, fixed_scales=fixed_scales, limits=limits)
    writer = KvWriter(header, sink, options)
    for i, buf in enumerate(buffers):
        writer.accept(i, buf, None if checksums is None else checksums[i])
    report = writer.finish()
    assert sink.result is not None
    return sink.result, report
