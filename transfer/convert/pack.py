"""Sender side of the codec: a request's scattered cache blocks → header + few payload buffers.

`pack_kv` plans without copying anything: it computes the header (every entry's shape, buffer
and offset) from the spec and block ids. Buffers are produced lazily, chunk by chunk
(`PackedKv.iter_chunks`), so a transport can send chunk i while chunk i+1 is gathered.

Two ways to fill a buffer (chosen per transfer):
- *views*: when the block ids form long physical runs (>= `min_view_bytes` per run and part)
  and all of the sender's heads go out, each run of each layer's part is sent as a zero-copy
  view of the cache — no gather at all;
- *gather*: otherwise blocks are gathered (`index_select`) into one buffer per layer group of
  about `chunk_bytes`, one entry per part covering all layers of the group.
Scales, when the spec has them, always travel gathered in buffer 0.

Scatter/gather transports (the stream path, endpoint/sender.py) skip the gather entirely: for a
cache on CPU, `PackedKv.segments(i)` describes buffer i as memory segments `(address, length)`
of the source blocks in wire order (alignment padding from a zero buffer), to be written with
writev; None when the buffer must be filled (scales, GPU caches, non-contiguous blocks).

Ownership: views and segments alias the cache. The caller must not write or free the source
blocks until the transport says the transfer is over (ack, error or timeout; see the
transports).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from transfer.convert.cache import PagedKvCache
from transfer.convert.iov import segments as make_segments
from transfer.wire import layouts
from transfer.wire.errors import InvalidRequest
from transfer.wire.header import TensorEntry, TransferHeader

_ALIGN = 16


@dataclass(frozen=True)
class PackOptions:
    chunk_bytes: int = 2 << 20  # target size of a gathered buffer and of a transport chunk
    min_view_bytes: int = 256 << 10  # send runs at least this large as zero-copy views
    allow_views: bool = True  # transports that need few large buffers (NCCL) turn this off
    taper: bool = False  # end with smaller buffers (a pipelined receiver's last write is short)


class StagingPool:
    """Reusable gather buffers (fresh allocations cost page faults: gathering into new memory
    runs at a quarter of memcpy speed on CPU).

    Two modes. Keyed (`ring_slots=0`): buffer i of a message reuses the memory of buffer i of the
    previous message, so every buffer of one message is alive at once (NCCL, local use). Ring
    (`ring_slots=R`): buffer i uses slot i % R, small enough to stay in cache; before a slot is
    refilled, the wait registered with `hold(i, wait)` (e.g. a ZMQ MessageTracker) must return.

    Ownership: the pool belongs to one sender, which packs its next message only once the
    previous one is over (acked, failed or reset). Memory beyond `max_bytes` is not kept.
    `pin_memory`: host buffers are pinned (device-to-host copies into them run at the bus's
    speed; needs CUDA)."""

    def __init__(self, max_bytes: int = 1 << 30, ring_slots: int = 0, pin_memory: bool = False):
        self.max_bytes, self.ring_slots, self.pin_memory = max_bytes, ring_slots, pin_memory
        self._slots: dict[int, torch.Tensor] = {}
        self._holds: dict[int, Callable[[], None]] = {}

    def slot(self, index: int) -> int:
        return index % self.ring_slots if self.ring_slots else index

    def hold(self, index: int, wait: Callable[[], None]) -> None:
        """Buffer `index` is in use until `wait()` returns (it may raise on timeout)."""
        self._holds[self.slot(index)] = wait

    def release_all(self) -> None:
        self._holds.clear()

    def get(self, index: int, nbytes: int, device: torch.device) -> torch.Tensor:
        slot = self.slot(index)
        wait = self._holds.pop(slot, None)
        if wait is not None:
            wait()
        buf = self._slots.get(slot)
        if buf is None or buf.numel() < nbytes or buf.device != device:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=device,
                              pin_memory=self.pin_memory and device.type == "cpu")
            kept = sum(b.numel() for i, b in self._slots.items() if i != slot)
            if kept + nbytes <= self.max_bytes:
                self._slots[slot] = buf
        return buf[:nbytes]


@dataclass
class _Buffer:
    nbytes: int
    fill: Callable[[], torch.Tensor]  # returns a 1-D contiguous uint8 tensor of nbytes
    segments: Callable[[], np.ndarray] | None = None  # [k, 2] (address, length) in wire order


@dataclass
class PackedKv:
    """A planned message. `header` is final; buffers are materialized on demand."""

    header: TransferHeader
    buffers: list[_Buffer]
    cache: PagedKvCache | None = None  # the source, for transports that copy blocks themselves
    block_ids: torch.Tensor | None = None  # the transfer's source block ids (int64, on CPU)

    def buffer(self, index: int) -> torch.Tensor:
        return self.buffers[index].fill()

    def segments(self, index: int) -> np.ndarray | None:
        """Buffer `index` as `[k, 2]` uint64 (address, length) segments of the source cache (and
        of a zero pad) whose bytes, in order, are the buffer; None when it must be `buffer()`ed."""
        make = self.buffers[index].segments
        return None if make is None else make()

    def iter_chunks(self) -> Iterator[list[torch.Tensor]]:
        """Buffers grouped as `header.chunks` says, gathered just in time."""
        at = 0
        for count in self.header.chunks:
            yield [self.buffer(i) for i in range(at, at + count)]
            at += count

    def all_buffers(self) -> list[torch.Tensor]:
        return [self.buffer(i) for i in range(len(self.buffers))]


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(transfer block index, physical start, length) of consecutive physical ids."""
    runs: list[tuple[int, int, int]] = []
    for i, b in enumerate(ids):
        if runs and runs[-1][1] + runs[-1][2] == b:
            start, phys, n = runs[-1]
            runs[-1] = (start, phys, n + 1)
        else:
            runs.append((i, b, 1))
    return runs


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _block_segments(tensors: list[torch.Tensor], ids: np.ndarray) -> np.ndarray | None:
    """Segments of blocks `ids` of each `[B, ...]` tensor in turn (tensor-major), or None when
    the tensors are not on CPU or a block is not one contiguous piece of memory."""
    t = tensors[0]
    if t.device.type != "cpu" or not t[0].is_contiguous():
        return None
    block_bytes = t[0].numel() * t.element_size()
    bases = np.array([x.data_ptr() for x in tensors], dtype=np.uint64)
    offsets = ids * np.uint64(t.stride(0) * t.element_size())
    return make_segments((bases[:, None] + offsets[None, :]).reshape(-1), block_bytes)


class _Planner:
    """Accumulates entries and buffers for one message."""

    def __init__(self, cache: PagedKvCache, ids: torch.Tensor, heads: tuple[int, int],
                 pool: StagingPool | None):
        self.cache, self.spec, self.ids, self.pool = cache, cache.spec, ids, pool
        self.n = int(ids.numel())
        self.num_heads = heads[1] - heads[0]
        lo, hi = self.spec.head_range
        self.head_off = heads[0] - lo
        self.is_narrowed = heads != (lo, hi)
        self.entries: list[TensorEntry] = []
        self.buffers: list[_Buffer] = []
        self.zeros: torch.Tensor | None = None  # alignment padding of segments (made on use)

    def narrowed(self, t: torch.Tensor, axis: int | None) -> torch.Tensor:
        if axis is None or not self.is_narrowed:
            return t
        return t.narrow(axis, self.head_off, self.num_heads)

    def data_block_shape(self, part: str) -> tuple[int, ...]:
        return layouts.part_block_shape(self.spec, part, self.num_heads)

    def add_gathered(self, specs: list[tuple[str, int, int, int, int, tuple[int, ...], torch.dtype,
                                              Callable[[int, torch.Tensor], None]]],
                     segments: list[Callable[[], np.ndarray | None]] | None = None) -> None:
        """One buffer holding several entries: (part, layer0, nl, block0, nb, shape, dtype, source)
        where source(layer) is the tensor to gather from (already index-ready on dim 0).
        `segments`: per entry, its bytes as memory segments (None: that entry cannot)."""
        index, offset, planned, pads = len(self.buffers), 0, [], []
        for part, layer0, nl, block0, nb, shape, dtype, source in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            self.entries.append(TensorEntry(part, layer0, nl, block0, nb, index, offset,
                                            layouts.wire_dtype_name(dtype), shape, nbytes))
            planned.append((offset, nbytes, shape, dtype, layer0, nl, source))
            pads.append(-nbytes % _ALIGN)
            offset += nbytes + pads[-1]

        def fill(planned: list = planned, size: int = offset, index: int = index) -> torch.Tensor:
            device = self.cache.device
            buf = self.pool.get(index, size, device) if self.pool is not None else \
                torch.empty(size, dtype=torch.uint8, device=device)
            for off, nbytes, shape, dtype, layer0, nl, source in planned:
                out = buf[off:off + nbytes].view(dtype).view(shape)
                for li in range(nl):
                    source(layer0 + li, out[li])
            return buf

        segs = None if segments is None else lambda: self._joined(segments, pads)
        self.buffers.append(_Buffer(offset, fill, segs))

    def _joined(self, segments: list[Callable[[], np.ndarray | None]],
                pads: list[int]) -> np.ndarray | None:
        out = []
        for make, pad in zip(segments, pads, strict=True):
            seg = make()
            if seg is None:
                return None
            out.append(seg)
            if pad:
                if self.zeros is None:
                    self.zeros = torch.zeros(_ALIGN, dtype=torch.uint8)
                out.append(make_segments(np.array([self.zeros.data_ptr()], dtype=np.uint64), pad))
        return np.concatenate(out)

    def add_view(self, part: str, layer: int, block0: int, phys: int, nb: int) -> None:
        shape = (1, nb, *self.data_block_shape(part))
        dtype = layouts.storage_dtype(self.spec.dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        self.entries.append(TensorEntry(part, layer, 1, block0, nb, len(self.buffers), 0,
                                        layouts.wire_dtype_name(dtype), shape, nbytes))
        cache = self.cache

        def run() -> torch.Tensor:  # the blocks themselves: [nb, *block]
            return cache.parts(layer)[part][phys:phys + nb]

        def segs() -> np.ndarray | None:
            return _block_segments([run().reshape(1, -1)], np.zeros(1, dtype=np.uint64))

        self.buffers.append(_Buffer(nbytes, lambda: _flat(run()), segs))


def _plan_scales(p: _Planner, layers: range) -> None:
    spec = p.spec
    paged = layouts.is_paged_scales(spec)
    nb = p.n if paged else 0
    shape = (len(layers), *layouts.scale_wire_shape(spec, p.num_heads, nb))
    ids = p.ids.to(p.cache.device)

    def source(layer: int, out: torch.Tensor) -> None:
        s = p.cache.scales[layer]  # type: ignore[index]
        if paged:  # [C, B, S, H, G]
            torch.index_select(p.narrowed(s, 3), 1, ids, out=out)
        else:  # [C, G] or [C, H, G]
            out.copy_(p.narrowed(s, 1) if s.dim() == 3 else s)

    p.add_gathered([(layouts.PART_SCALE, layers.start, len(layers), 0, nb, shape,
                     layouts.SCALE_DTYPE, source)])


def layer_groups(total: int, full: int, taper: bool) -> list[int]:
    """Layers per buffer, in order: groups of `full`; with `taper` the last two are about
    3/4 and 1/4 of a group, so that a receiver writing each buffer as it lands (NCCL) is left
    with a short last write, e.g. 32 layers by 8 -> [8, 8, 8, 6, 2]."""
    if not taper or full < 2:
        return [min(full, total - g0) for g0 in range(0, total, full)]
    quarter = max(1, full // 4)
    caps = [quarter, full - quarter]
    out: list[int] = []
    left = total
    while left > 0:
        take = min(caps[len(out)] if len(out) < len(caps) else full, left)
        out.append(take)
        left -= take
    return out[::-1]


def _plan_gathered(p: _Planner, layers: range, chunk_bytes: int, taper: bool = False) -> None:
    """Gathered buffers of about `chunk_bytes`: several whole layers per buffer when a layer is
    small (tapered at the end, see `layer_groups`), else one block range of one layer per buffer."""
    spec, dtype = p.spec, layouts.storage_dtype(p.spec.dtype)
    parts = layouts.data_parts(spec)
    block_bytes = sum(math.prod(p.data_block_shape(part)) * dtype.itemsize for part in parts)
    blocks_per_buf = max(1, chunk_bytes // block_bytes)
    @functools.cache
    def device_ids() -> torch.Tensor:  # the ids on the cache's device, copied on first fill
        return p.ids.to(p.cache.device)

    rows: dict[tuple[int, str], torch.Tensor] = {}  # source parts as [B, row] integer views
    layer_parts: dict[int, dict[str, torch.Tensor]] = {}  # cache.parts(layer), built once per layer

    def part_view(layer: int, part: str) -> torch.Tensor:
        if layer not in layer_parts:
            layer_parts[layer] = p.cache.parts(layer)
        return p.narrowed(layer_parts[layer][part], layouts.head_axis(spec, part))

    def source_rows(layer: int, part: str) -> torch.Tensor:
        key = (layer, part)
        if key not in rows:
            src = part_view(layer, part)
            rows[key] = layouts.as_rows(src) if src.is_contiguous() else layouts.as_bits(src)
        return rows[key]

    ids_np = p.ids.numpy().astype(np.uint64)

    def segments(part: str, layer0: int, nl: int, b0: int, nb: int) -> np.ndarray | None:
        views = [part_view(layer, part) for layer in range(layer0, layer0 + nl)]
        return _block_segments(views, ids_np[b0:b0 + nb])

    def add(layer0: int, nl: int, b0: int, nb: int) -> None:
        specs, segs = [], []
        for part in parts:
            def source(layer: int, out: torch.Tensor, part: str = part) -> None:
                src = source_rows(layer, part)
                if src.dim() == 2:
                    dst = out.view(out.shape[0], -1).view(src.dtype)
                else:
                    dst = layouts.as_bits(out)
                torch.index_select(src, 0, device_ids()[b0:b0 + nb], out=dst)

            shape = (nl, nb, *p.data_block_shape(part))
            specs.append((part, layer0, nl, b0, nb, shape, dtype, source))
            segs.append(functools.partial(segments, part, layer0, nl, b0, nb))
        p.add_gathered(specs, segs)

    if blocks_per_buf >= p.n:
        g0 = layers.start
        for size in layer_groups(len(layers), max(1, blocks_per_buf // p.n), taper):
            add(g0, size, 0, p.n)
            g0 += size
    else:
        for layer in layers:
            for b0 in range(0, p.n, blocks_per_buf):
                add(layer, 1, b0, min(blocks_per_buf, p.n - b0))


def _chunks(sizes: list[int], chunk_bytes: int) -> tuple[int, ...]:
    chunks: list[int] = []
    acc = 0
    for size in sizes:
        if chunks and acc + size <= chunk_bytes:
            chunks[-1] += 1
            acc += size
        else:
            chunks.append(1)
            acc = size
    return tuple(chunks)


def pack_kv(
    cache: PagedKvCache, block_table: Sequence[int], token_start: int, token_end: int, *,
    request_id: str, transfer_id: int = 0, layer_range: tuple[int, int] | None = None,
    head_range: tuple[int, int] | None = None, checksum: str | None = None, transport: str = "zmq",
    meta: Mapping[str, Any] | None = None, options: PackOptions = PackOptions(),
    pool: StagingPool | None = None, reservation_token: str = "",
) -> PackedKv:
    """Plan a message carrying tokens `[token_start, token_end)` of a sequence whose blocks are
    `block_table` (block ids from token 0, in the sender's block size), layers `layer_range`
    (default all) and model heads `head_range` (default all this cache holds). With `pool`,
    gathered buffers reuse its memory (see StagingPool for when that is safe)."""
    spec = cache.spec
    if not 0 <= token_start < token_end:
        raise InvalidRequest(f"empty or negative token range [{token_start}, {token_end})")
    l0, l1 = layer_range if layer_range is not None else (0, spec.num_layers)
    if not 0 <= l0 < l1 <= spec.num_layers:
        raise InvalidRequest(f"layer range [{l0}, {l1}) outside [0, {spec.num_layers})")
    heads = head_range if head_range is not None else spec.head_range
    lo, hi = spec.head_range
    if not lo <= heads[0] < heads[1] <= hi:
        raise InvalidRequest(f"head range {heads} outside the cache's [{lo}, {hi})")
    all_ids = cache.check_block_table(block_table, token_end)
    ids = all_ids[token_start // spec.block_size:]
    p = _Planner(cache, ids, heads, pool)
    layers = range(l0, l1)
    if layouts.has_scales(spec):
        _plan_scales(p, layers)
    runs = _runs(ids.tolist()) if options.allow_views and not p.is_narrowed else []
    dtype = layouts.storage_dtype(spec.dtype)
    min_part_block = min(math.prod(p.data_block_shape(part)) for part in layouts.data_parts(spec))
    run_bytes = p.n / max(1, len(runs)) * min_part_block * dtype.itemsize
    if runs and run_bytes >= options.min_view_bytes:
        for layer in layers:
            for part in layouts.data_parts(spec):
                for block0, phys, nb in runs:
                    p.add_view(part, layer, block0, phys, nb)
    else:
        _plan_gathered(p, layers, options.chunk_bytes, options.taper)
    sizes = [b.nbytes for b in p.buffers]
    header = TransferHeader(
        request_id=request_id, transfer_id=transfer_id, spec=spec, token_start=token_start,
        token_end=token_end, layer_start=l0, layer_end=l1, head_start=heads[0], head_end=heads[1],
        buffer_sizes=tuple(sizes), chunks=_chunks(sizes, options.chunk_bytes),
        entries=tuple(p.entries), checksum=checksum, transport=transport, meta=dict(meta or {}),
        reservation_token=reservation_token,
    )
    return PackedKv(header, p.buffers, cache, ids)  # the receiver validates it (decode_header)
