"""Block copies between a paged cache and a payload buffer in one CUDA launch per buffer
(gather on the sender, scatter on the receiver).

A gathered payload buffer (pack.py) holds its entries part-major, each `[num_layers,
num_blocks, *block]`. Copying that with torch costs one `index_select` / `index_copy_` launch
per (layer, part) — 64 launches for Llama-3-8B's 32 layers, which on a GPU leaves the copies
waiting for Python. Here one Triton kernel copies all rows x blocks of a buffer: the cache's
per-(layer, part) base addresses sit in a small int64 table on the device, built once per
cache (`CacheTable`), the buffer side is affine, and one program copies one block. Nothing is
copied from the host per launch, so a launch never waits on earlier work.

Contract: the kernels only read the source blocks and write the destination blocks named by
the caller, on the current CUDA stream; the buffer must stay alive until that stream has run
the copy. A `CacheTable` is valid while the cache's tensors are (they never move). Without
CUDA or Triton, or for geometry the kernel does not cover (head slices, scales, padding
between entries), the functions return False and callers use their torch path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from transfer.convert.cache import PagedKvCache
from transfer.wire import layouts
from transfer.wire.header import TensorEntry

try:  # Triton ships with CUDA builds of torch; CPU-only installs never reach the kernel
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

_WIDTHS = (8, 4, 2, 1)
_INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def is_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


if triton is not None:

    @triton.jit
    def _kv_blocks_kernel(table, buf, ids, num_ids, num_layers, table_row0, num_parts,
                          cache_stride, block_words, TO_CACHE: tl.constexpr, WORD: tl.constexpr,
                          BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        p = pid // num_ids  # row: part-major, then layer
        n = pid % num_ids
        li = p % num_layers
        pi = p // num_layers
        base = tl.load(table + table_row0 + li * num_parts + pi).to(tl.pointer_type(WORD))
        cache_ptr = base + tl.load(ids + n) * cache_stride
        buf_ptr = buf + pid.to(tl.int64) * block_words
        for w0 in range(0, block_words, BLOCK):
            offs = w0 + tl.arange(0, BLOCK)
            mask = offs < block_words
            if TO_CACHE:
                tl.store(cache_ptr + offs, tl.load(buf_ptr + offs, mask=mask), mask=mask)
            else:
                tl.store(buf_ptr + offs, tl.load(cache_ptr + offs, mask=mask), mask=mask)


@dataclass(frozen=True)
class CacheTable:
    """Base address of every (layer, part) of a cache, `table[layer * num_parts + part]`, on
    its device; every part has contiguous blocks of `block_bytes` every `stride` bytes."""

    table: torch.Tensor
    parts: tuple[str, ...]
    block_bytes: int
    stride: int
    width: int  # widest integer word dividing every address, the stride and the block

    @classmethod
    def build(cls, cache: PagedKvCache) -> CacheTable | None:
        parts = layouts.data_parts(cache.spec)
        bases: list[int] = []
        geometry: set[tuple[int, int]] = set()
        for layer in range(cache.spec.num_layers):
            for part in parts:
                rows = cache.block_rows(layer, part)
                if rows is None:
                    return None
                bases.append(rows[0])
                geometry.add(rows[1:])
        if len(geometry) != 1:
            return None
        ((stride, block_bytes),) = geometry
        width = next(w for w in _WIDTHS if all(v % w == 0 for v in (stride, block_bytes, *bases)))
        table = torch.tensor(bases, dtype=torch.int64).to(cache.device)
        return cls(table, parts, block_bytes, stride, width)


def cache_table(cache: PagedKvCache) -> CacheTable | None:
    """The cache's table, built on first use and kept on the cache object."""
    if not is_available(cache.device):
        return None
    if cache.copy_table is None:
        cache.copy_table = CacheTable.build(cache) or False
    return cache.copy_table or None


def _launch(ct: CacheTable, entries: Sequence[TensorEntry], buf: torch.Tensor, ids: torch.Tensor,
            to_cache: bool) -> bool:
    """One launch for `entries` (consecutive parts, same layers and blocks, packed back to back
    at the start of `buf`). False when the geometry does not fit."""
    if not entries or ids.dtype != torch.int64 or not ids.is_contiguous():
        return False
    first = entries[0]
    nl, nb = first.num_layers, first.num_blocks
    if first.part not in ct.parts or nb == 0 or int(ids.numel()) != nb:
        return False
    part0 = ct.parts.index(first.part)
    row_bytes = nl * nb * ct.block_bytes
    for i, e in enumerate(entries):
        if (part0 + i >= len(ct.parts) or e.part != ct.parts[part0 + i] or e.num_layers != nl
                or e.num_blocks != nb or e.layer_start != first.layer_start
                or e.offset != first.offset + i * row_bytes or e.nbytes != row_bytes):
            return False
    width = ct.width
    start = first.offset
    nbytes = len(entries) * row_bytes
    if buf.device != ct.table.device or not buf.is_contiguous() or buf.dtype != torch.uint8 \
            or (buf.data_ptr() + start) % width or buf.numel() < start + nbytes:
        return False
    words = buf[start:start + nbytes].view(_INT[width])
    block_words = ct.block_bytes // width
    block = min(2048, triton.next_power_of_2(max(block_words, 16)))
    grid = (len(entries) * nl * nb,)
    _kv_blocks_kernel[grid](
        ct.table, words, ids, nb, nl, first.layer_start * len(ct.parts) + part0, len(ct.parts),
        ct.stride // width, block_words, TO_CACHE=to_cache,
        WORD={8: tl.int64, 4: tl.int32, 2: tl.int16, 1: tl.int8}[width], BLOCK=block, num_warps=4)
    return True


def gather_entries(cache: PagedKvCache, block_ids: torch.Tensor, entries: Sequence[TensorEntry],
                   buf: torch.Tensor) -> bool:
    """Fill payload buffer `buf` with its `entries` (data parts, whole heads) from `cache` in
    one launch; `block_ids` (int64, on the cache's device) are the transfer's source blocks,
    relative to its first block. False (nothing enqueued) when the kernel does not apply."""
    ct = cache_table(cache)
    if ct is None or not entries:
        return False
    b0, nb = entries[0].block_start, entries[0].num_blocks
    return _launch(ct, entries, buf, block_ids[b0:b0 + nb], to_cache=False)


def scatter_entries(cache: PagedKvCache, dst_ids: torch.Tensor, entries: Sequence[TensorEntry],
                    buf: torch.Tensor) -> bool:
    """The inverse of `gather_entries`: write a received buffer's `entries` (data parts, whole
    blocks, packed back to back at their offsets in `buf`) into destination blocks `dst_ids` of
    every layer in one launch. False (nothing enqueued) when the kernel does not apply."""
    ct = cache_table(cache)
    if ct is None or not entries:
        return False
    return _launch(ct, entries, buf, dst_ids, to_cache=True)


def scatter_entry(cache: PagedKvCache, dst_ids: torch.Tensor, entry: TensorEntry,
                  blocks: torch.Tensor) -> bool:
    """Write an entry's whole blocks `[num_layers, n, *block]` (a contiguous view of the
    received buffer) into destination blocks `dst_ids` (int64, on the cache's device) of every
    layer in one launch. False (nothing enqueued) when the kernel does not apply."""
    if not blocks.is_contiguous():
        return False
    flat = blocks.reshape(-1).view(torch.uint8)
    return scatter_entries(cache, dst_ids, [replace(entry, offset=0)], flat)
