"""Compressed KV on the wire: the sender quantizes a sequence's blocks into a smaller wire dtype.

`wire_spec(spec, name)` is the spec a transfer travels in for `--kv-wire-dtype name`: the
cache's own geometry with int8 or fp8 e4m3 values and per-token-head float32 scales (one per
token, head and K/V, computed from that token's amax: nothing to calibrate, nothing clamps).
`"auto"` sends the cache as it is (None), and so does a cache already stored in 8 bits or less
(requantizing it would only lose more).

`to_wire(cache, block_table, token_start, token_end, spec)` converts tokens
`[token_start, token_end)` into a fresh cache of that spec with the codec's own conversion
(pack -> header -> KvWriter, convert/local.py), and returns it with its block table. The
header the transfer then carries names the wire spec (dtype and scale granularity), so the
receiver needs nothing new: it dequantizes into its own cache dtype as it converts any
quantized sender today (plan.py).

Lossy: int8 keeps |error| <= amax/254 per (token, head); fp8 e4m3 about 2^-4 relative.
bench/kv_wire_dtype.py measures what that costs in generated tokens.

Ownership: the returned cache is new memory owned by the caller (the sender keeps it until
its transfer is over); the source blocks are only read, during this call.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import torch

from engine.kv_spec import KvDtype, KvKind, KvLayout, KvSpec, ScaleGranularity
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import convert_kv
from transfer.convert.pack import PackOptions
from transfer.wire.layouts import storage_dtype

WIRE_DTYPES = ("auto", "fp8_e4m3", "int8")
_BY_NAME = MappingProxyType({"fp8_e4m3": KvDtype.FP8_E4M3, "int8": KvDtype.INT8})
_QMAX = MappingProxyType({KvDtype.FP8_E4M3: 448.0, KvDtype.INT8: 127.0})
_MIN_SCALE = 1e-30


def wire_spec(spec: KvSpec, name: str) -> KvSpec | None:
    """The spec transfers of a `spec` cache travel in for wire dtype `name` (see module doc);
    None: send the cache as it is."""
    if name not in WIRE_DTYPES:
        raise ValueError(f"wire dtype must be one of {WIRE_DTYPES}, got {name!r}")
    if name == "auto" or spec.dtype.bits <= 8:
        return None
    layout = KvLayout.MLA if spec.kind is KvKind.LATENT else KvLayout.NHD
    return spec.with_(dtype=_BY_NAME[name], scale_granularity=ScaleGranularity.PER_TOKEN_HEAD,
                      layout=layout, is_kv_stacked=spec.kind is KvKind.KV)


def to_wire(cache: PagedKvCache, block_table: Sequence[int], token_start: int, token_end: int,
            spec: KvSpec, layer_range: tuple[int, int] | None = None,
            ) -> tuple[PagedKvCache, list[int]]:
    """Tokens `[token_start, token_end)` of the sequence at `block_table` quantized into a new
    cache of `spec` on the same device; returns it and the block table (from token 0) that
    holds them there. Blocks before `token_start`'s block are not allocated (their ids repeat
    block 0 and are never read). Only layers `layer_range` (default all) are filled."""
    size = spec.block_size
    first, end = token_start // size, -(-token_end // size)
    wire = PagedKvCache.allocate(spec, end - first, cache.device)
    table = [0] * first + list(range(end - first))
    src = cache.spec
    if src.layout is KvLayout.NHD and src.block_size == size and src.head_range == spec.head_range:
        ids = cache.check_block_table(block_table, token_end)[first:].to(cache.device)
        for layer in range(*(layer_range or (0, src.num_layers))):
            _quantize_blocks(cache.layers[layer], ids, wire, layer)
    else:  # any other layout: the receiver's own conversion path, token by token
        convert_kv(cache, block_table, wire, table, token_start, token_end,
                   layer_range=layer_range,
                   pack_options=PackOptions(allow_views=False, chunk_bytes=64 << 20))
    return wire, table


def _quantize_blocks(tensors: tuple[torch.Tensor, ...], ids: torch.Tensor, wire: PagedKvCache,
                     layer: int) -> None:
    """Whole blocks `ids` of one NHD layer (stacked `[2, B, S, H, D]` or K and V `[B, S, H, D]`)
    into blocks `0..n-1` of `wire` (NHD, per-token-head scales `[C, n, S, H, 1]`). Slots past
    the sequence's last token are quantized too and never read."""
    if len(tensors) == 1 and tensors[0].dim() == 5:
        x = torch.index_select(tensors[0], 1, ids).float()  # [2, n, S, H, D]
    else:
        x = torch.stack([torch.index_select(t, 0, ids).float() for t in tensors])  # [C, n, S, H, D]
    dtype = wire.spec.dtype
    qmax = _QMAX[dtype]
    scales = (x.abs().amax(dim=-1, keepdim=True) / qmax).clamp_min(_MIN_SCALE)  # [C, n, S, H, 1]
    y = x / scales
    if dtype is KvDtype.INT8:
        q = y.round_().clamp_(-qmax, qmax).to(torch.int8)
    else:
        q = y.clamp_(-qmax, qmax).to(storage_dtype(dtype))
    wire.layers[layer][0].view(q.shape).copy_(q)
    assert wire.scales is not None
    wire.scales[layer].view(scales.shape).copy_(scales)


__all__ = ["WIRE_DTYPES", "to_wire", "wire_spec"]
