"""In-process use of the codec: write a whole message into a paged cache, convert one cache
into another, and read a cache back as float32 tokens.

These run exactly the code the transports run (pack → header bytes → decode_header →
KvWriter), so what is true here is true on the wire. Ownership is as in the transports: the
caller owns both caches and their block tables; nothing here allocates or frees blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from transfer.convert.cache import PagedKvCache
from transfer.convert.pack import PackOptions, pack_kv
from transfer.convert.plan import ConvertOptions
from transfer.convert.quant import dequantize
from transfer.convert.writer import KvWriter, PagedSink, WriteReport
from transfer.wire import layouts
from transfer.wire.header import ReceiverLimits, TransferHeader, compute_checksum, decode_header


def write_kv(
    header: TransferHeader, buffers: Sequence[Any], cache: PagedKvCache,
    block_table: Sequence[int], *,
    checksums: Sequence[int | None] | None = None, options: ConvertOptions = ConvertOptions(),
) -> WriteReport:
    """Receive a complete message (validated header + all buffers) into `cache` at
    `block_table` (the sequence's destination block ids from token 0, reserved by the caller)."""
    writer = KvWriter(header, PagedSink(cache, list(block_table)), options)
    for i, buf in enumerate(buffers):
        writer.accept(i, buf, None if checksums is None else checksums[i])
    return writer.finish()


def convert_kv(
    src: PagedKvCache, src_table: Sequence[int], dst: PagedKvCache, dst_table: Sequence[int],
    token_start: int, token_end: int, *, head_range: tuple[int, int] | None = None,
    layer_range: tuple[int, int] | None = None, checksum: str | None = None,
    options: ConvertOptions = ConvertOptions(), pack_options: PackOptions = PackOptions(),
    limits: ReceiverLimits = ReceiverLimits(),
) -> WriteReport:
    """Copy tokens `[token_start, token_end)` from `src` into `dst`, converting as needed."""
    packed = pack_kv(src, src_table, token_start, token_end, request_id="local", checksum=checksum,
                     head_range=head_range, layer_range=layer_range, options=pack_options)
    header = decode_header(packed.header.encode(), limits)
    buffers = packed.all_buffers()
    sums = None
    if checksum is not None:
        sums = [compute_checksum(checksum, b.cpu().numpy()) for b in buffers]
    return write_kv(header, buffers, dst, dst_table, checksums=sums, options=options)


def read_tokens_float(cache: PagedKvCache, block_table: Sequence[int], token_start: int,
                      token_end: int) -> list[torch.Tensor]:
    """Per layer float32 `[C, T, H, head_dim]` of tokens `[token_start, token_end)`
    (dequantized)."""
    ids = cache.check_block_table(block_table, token_end)
    out = []
    for layer in range(cache.spec.num_layers):
        comps = []
        for comp in range(layouts.num_components(cache.spec)):
            stored = cache.read_tokens(layer, comp, ids, token_start, token_end)
            scales = cache.read_token_scales(layer, comp, ids, token_start, token_end)
            comps.append(dequantize(stored, cache.spec.dtype, scales))
        out.append(torch.stack(comps))
    return out
