"""Where a stream transfer's payload bytes land on the receiver: one iovec for the whole payload.

`plan_buffer(writer, i, addresses, staging)` runs when reading reaches buffer i (the receiver
has time to spare then: it waits for the sender more than the sender waits for it). Either
- *placed*: the writer allows it (`KvWriter.can_place`: CPU paged cache, block copy, no
  scales) and its entries tile the buffer without overlap: each whole block of each entry is a
  segment pointing at the destination block (`addresses`: part base + block id x block
  stride); partial first/last blocks, alignment padding and small gaps go to per-transfer
  scratch memory; after the bytes are in, `KvWriter.placed` writes the partial blocks token by
  token. The only copy is the kernel's.
- *staged*: one segment of the connection's staging memory, then `KvWriter.accept` converts
  it (other dtype / layout / block size / heads, scales, caches on GPU).

Ownership: segments point into the reservation's blocks (which the receiver may write) and into
scratch tensors the plan keeps alive (`keep`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from transfer.convert.cache import PagedKvCache
from transfer.convert.iov import coalesce, segments
from transfer.convert.writer import KvWriter, PagedSink
from transfer.wire import layouts
from transfer.wire.header import TensorEntry

_MAX_GAP_BYTES = 4096  # more unused bytes than this in a buffer: stage it instead

Partial = tuple[TensorEntry, int, int, torch.Tensor]  # see KvWriter.placed


class PartAddresses:
    """(base address, block stride, block bytes) of each (layer, part) of a CPU cache; None when
    a block is not one contiguous piece of memory. The cache's tensors never move."""

    def __init__(self, cache: PagedKvCache):
        self.cache = cache
        self._known: dict[tuple[int, str], tuple[int, int, int] | None] = {}

    def get(self, layer: int, part: str) -> tuple[int, int, int] | None:
        key = (layer, part)
        if key not in self._known:
            on_cpu = self.cache.device.type == "cpu"
            self._known[key] = self.cache.block_rows(layer, part) if on_cpu else None
        return self._known[key]


@dataclass
class BufferPlan:
    segs: np.ndarray  # [k, 2] (address, length) whose bytes, in order, are the buffer
    is_staged: bool
    partials: list[Partial] = field(default_factory=list)  # for KvWriter.placed
    keep: torch.Tensor | None = None  # scratch memory the segments point into


def plan_buffer(writer: KvWriter, index: int, addresses: PartAddresses | None,
                staging: Callable[[int], torch.Tensor]) -> BufferPlan:
    """Segments for buffer `index`: placed in the destination blocks when possible, else one
    segment of `staging(size)` (memory of at least `size` bytes)."""
    size = writer.header.buffer_sizes[index]
    if addresses is not None and writer.can_place(index):
        placed = _place(writer, index, addresses)
        if placed is not None:
            return BufferPlan(*placed)
    return BufferPlan(segments(np.array([staging(size).data_ptr()], dtype=np.uint64), size), True)


def _place(writer: KvWriter, index: int, addresses: PartAddresses,
           ) -> tuple[np.ndarray, bool, list[Partial], torch.Tensor] | None:
    """Segments of a placed buffer, its partial blocks and their scratch; None: stage it."""
    entries = sorted(writer.by_buffer[index], key=lambda e: e.offset)
    size = writer.header.buffer_sizes[index]
    at, gaps, scratch_bytes = 0, 0, 0
    for e in entries:  # first pass: tiling, gaps, scratch size
        if e.offset < at:
            return None  # overlapping entries: the generic path sorts them out
        gaps += e.offset - at
        lo, hi = _whole(writer, e)
        scratch_bytes += e.num_layers * (e.num_blocks - (hi - lo)) * _block_bytes(e)
        at = e.offset + e.nbytes
    gaps += size - at
    if gaps > _MAX_GAP_BYTES:
        return None
    scratch = torch.empty(scratch_bytes + gaps, dtype=torch.uint8)
    base, cursor = scratch.data_ptr(), 0
    pieces: list[np.ndarray] = []
    parts: list[Partial] = []
    at = 0
    for e in entries:
        if e.offset > at:  # gap / padding: keep the bytes (they are hashed), drop them after
            pieces.append(segments(np.array([base + cursor], dtype=np.uint64), e.offset - at))
            cursor += e.offset - at
        entry = _entry_segments(writer, e, addresses, scratch, base, cursor)
        if entry is None:
            return None
        segs, entry_parts, used = entry
        pieces.append(segs)
        parts += entry_parts
        cursor += used
        at = e.offset + e.nbytes
    if size > at:
        pieces.append(segments(np.array([base + cursor], dtype=np.uint64), size - at))
    segs = np.concatenate(pieces) if pieces else np.zeros((0, 2), dtype=np.uint64)
    return coalesce(segs[segs[:, 1] > 0]), False, parts, scratch


def _whole(writer: KvWriter, e: TensorEntry) -> tuple[int, int]:
    lo, hi = writer.whole_blocks(e)
    return (lo, hi) if hi > lo else (e.num_blocks, e.num_blocks)  # none whole: all partial


def _block_bytes(e: TensorEntry) -> int:
    return e.nbytes // max(1, e.num_layers * e.num_blocks)


def _entry_segments(writer: KvWriter, e: TensorEntry, addresses: PartAddresses,
                    scratch: torch.Tensor, base: int, cursor: int,
                    ) -> tuple[np.ndarray, list[Partial], int] | None:
    """Per layer: [partial head blocks → scratch] [whole blocks → destination] [partial tail →
    scratch]."""
    nl, n, bb = e.num_layers, e.num_blocks, _block_bytes(e)
    lo, hi = _whole(writer, e)
    sink = writer.sink
    assert isinstance(sink, PagedSink)
    dst = []
    for layer in range(e.layer_start, e.layer_start + nl):
        where = addresses.get(layer, e.part)
        if where is None or where[2] != bb or where[1] != (dst[0][1] if dst else where[1]):
            return None
        dst.append(where)
    first = writer.header.first_block + e.block_start
    ids = sink.ids[first + lo:first + hi].numpy().astype(np.uint64)
    bases = np.array([d[0] for d in dst], dtype=np.uint64)
    addr = np.empty((nl, hi - lo + 2), dtype=np.uint64)
    lens = np.full((nl, hi - lo + 2), bb, dtype=np.uint64)
    addr[:, 1:-1] = bases[:, None] + ids[None, :] * np.uint64(dst[0][1])
    per_layer = (n - (hi - lo)) * bb
    head = base + cursor + np.arange(nl, dtype=np.uint64) * np.uint64(per_layer)
    addr[:, 0], lens[:, 0] = head, lo * bb
    addr[:, -1], lens[:, -1] = head + np.uint64(lo * bb), (n - hi) * bb
    dtype = layouts.WIRE_DTYPES[e.dtype]
    parts: list[Partial] = []
    for li in range(nl):
        off = cursor + li * per_layer
        for b0, count in ((0, lo), (hi, n - hi)):
            if count:
                view = scratch[off:off + count * bb].view(dtype).view(count, *e.shape[2:])
                parts.append((e, e.layer_start + li, b0, view))
                off += count * bb
    return segments(addr.reshape(-1), lens.reshape(-1)), parts, nl * per_layer
