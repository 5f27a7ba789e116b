"""Receiver side of the codec: validated header + payload buffers → the receiver's own cache.

`KvWriter(header, sink)` checks compatibility first (IncompatibleKv names both specs), then
takes buffers in order as they arrive (`accept`) — verifying size and checksum — and writes
every entry through a sink:
- `PagedSink`: a paged cache (any layout/dtype/block size) at the receiver's block table;
- `CanonicalSink` (canonical.py): fresh token-major tensors in the receiver's spec.

Two paths per entry: *block copy* when stored bits, layout, block size and heads all match
(whole blocks with `index_copy_`; the transfer's partial first/last block token by token), and
*convert* otherwise (token-major view → head slice → dequantize/quantize → written through the
destination's layout view at its own block size). Only tokens in `[token_start, token_end)` are
ever written: a destination block shared with a cached prefix keeps its other slots.

Scatter/gather transports (the stream path) may instead read a buffer straight into the
destination blocks: `can_place(i)` says whether buffer i allows it (CPU paged sink, block copy,
no scales), `whole_blocks(e)` which blocks of an entry may be placed, and `placed(i, partials)`
does the bookkeeping for such a buffer and writes its partial first/last blocks (read by the
caller into scratch memory) token by token — the same result as `accept`.

Ownership: the writer writes only into the sink's blocks; it never allocates or frees blocks.
If it raises midway, the destination blocks hold partial data and the caller must treat the
reservation as failed (free or re-receive it).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from engine.kv_spec import KvSpec, ScaleGranularity
from transfer.convert import block_copy
from transfer.convert.cache import PagedKvCache
from transfer.convert.plan import ConversionPlan, ConvertOptions
from transfer.convert.quant import ConversionStats
from transfer.wire import layouts
from transfer.wire.errors import CacheMismatch, ChecksumMismatch, MalformedFrame
from transfer.wire.header import TensorEntry, TransferHeader, compute_checksum


@dataclass(frozen=True)
class WriteReport:
    """What one transfer wrote (also the body of the ack sent back to the sender)."""

    request_id: str
    transfer_id: int
    token_start: int
    token_end: int
    layer_start: int
    layer_end: int
    head_start: int  # model heads written
    head_end: int
    num_bytes: int
    path: str  # "block_copy" | "convert"
    is_lossless: bool
    num_clamped: int
    max_abs_clamped: float
    meta: dict[str, Any] = field(default_factory=dict)  # the header's meta (serving-layer values)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)


class KvSink(Protocol):
    spec: KvSpec

    def prepare(self, header: TransferHeader, plan: ConversionPlan) -> None: ...

    def fixed_scales(self, layer: int, component: int,
                     plan: ConversionPlan) -> torch.Tensor | None: ...

    def write_tokens(self, layer: int, component: int, start: int, end: int, values: torch.Tensor,
                     head_offset: int, token_scales: torch.Tensor | None) -> None: ...


class PagedSink:
    """Writes into a paged cache at `block_table` (block ids of the sequence from token 0, in
    the destination's block size). The caller reserved those blocks and owns them."""

    def __init__(self, cache: PagedKvCache, block_table: list[int] | torch.Tensor):
        self.cache, self.spec = cache, cache.spec
        self.block_table = block_table
        self.ids = torch.empty(0, dtype=torch.int64)
        self.ids_on_device = self.ids
        self._rows: dict[tuple[int, str], torch.Tensor] = {}  # [B, row] integer views of parts

    def prepare(self, header: TransferHeader, plan: ConversionPlan) -> None:
        table = self.block_table
        if isinstance(table, torch.Tensor):
            table = table.tolist()
        self.ids = self.cache.check_block_table(table, header.token_end)
        dev = self.cache.device  # pinned + async: a GPU receiver never waits here for earlier work
        self.ids_on_device = self.ids
        if dev.type == "cuda":
            self.ids_on_device = self.ids.pin_memory().to(dev, non_blocking=True)
        if plan.has_fixed_dst_scales and self.cache.scales is not None:
            for s in self.cache.scales:
                if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
                    raise CacheMismatch("destination per-tensor/per-head scales must be finite "
                                        "and > 0")

    def fixed_scales(self, layer: int, component: int, plan: ConversionPlan) -> torch.Tensor | None:
        view = self.cache.scale_view(layer, component)
        if view is None or not plan.has_fixed_dst_scales:
            return None
        if view.dim() == 1:  # per tensor [G]
            return view.view(1, 1, -1)
        lo = plan.dst_head_offset  # per head [H, G]
        return view[lo:lo + plan.write_heads[1] - plan.write_heads[0]].unsqueeze(0)

    def write_tokens(self, layer: int, component: int, start: int, end: int, values: torch.Tensor,
                     head_offset: int, token_scales: torch.Tensor | None) -> None:
        self.cache.write_tokens(layer, component, self.ids, start, end, values, head_offset,
                                token_scales)

    def dst_ids(self, abs_block: int, num_blocks: int) -> torch.Tensor:
        """Destination block ids of the sequence's blocks `[abs_block, abs_block + num_blocks)`."""
        return self.ids_on_device[abs_block:abs_block + num_blocks]

    def write_blocks(self, layer: int, part: str, ids: torch.Tensor, blocks: torch.Tensor) -> None:
        """Whole blocks `[n, *part_block_shape]` into destination blocks `ids` (same geometry)."""
        rows = self._rows.get((layer, part))
        if rows is None:
            rows = self._rows[(layer, part)] = layouts.as_rows(self.cache.parts(layer)[part])
        src = layouts.as_rows(blocks.to(rows.device))
        if src.dtype == rows.dtype and src.dim() == 2:
            rows.index_copy_(0, ids, src)
        else:
            target = layouts.as_bits(self.cache.parts(layer)[part])
            target.index_copy_(0, ids, layouts.as_bits(blocks))

    def write_entry_blocks(self, entry: TensorEntry, ids: torch.Tensor,
                           blocks: torch.Tensor) -> bool:
        """All layers of an entry's whole blocks `[nl, n, *block]` in one kernel launch, when the
        cache is on CUDA (block_copy.py); False when not applicable (the caller goes per layer)."""
        return block_copy.scatter_entry(self.cache, ids, entry, blocks)

    def write_buffer_blocks(self, entries: list[TensorEntry], ids: torch.Tensor,
                            buf: torch.Tensor) -> bool:
        """Several entries of one received buffer (whole blocks, same blocks and layers,
        consecutive parts) in one kernel launch on CUDA; False when not applicable."""
        return block_copy.scatter_entries(self.cache, ids, entries, buf)

    def write_scale_blocks(self, layer: int, ids: torch.Tensor, scales: torch.Tensor) -> None:
        """Per-token-head scales `[C, n, S, H, G]` of whole blocks."""
        target = self.cache.scales[layer]  # type: ignore[index]
        target.index_copy_(1, ids, scales.to(target.device))


def wrap_buffer(raw: Any) -> torch.Tensor:
    """A buffer-protocol object (zmq frame, bytes, memoryview) → 1-D uint8 tensor, no copy."""
    if isinstance(raw, torch.Tensor):
        return raw
    mv = memoryview(raw)
    if mv.nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # read-only buffers: we never write through them
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(mv, dtype=torch.uint8)


class KvWriter:
    """Writes one validated transfer into a sink, buffer by buffer, in order."""

    def __init__(self, header: TransferHeader, sink: KvSink,
                 options: ConvertOptions = ConvertOptions()):
        self.header, self.sink, self.options = header, sink, options
        heads = (header.head_start, header.head_end)
        self.plan = ConversionPlan.build(header.spec, sink.spec, heads)
        sink.prepare(header, self.plan)
        self.next_buffer = 0
        self.by_buffer = header.entries_by_buffer()
        # layer -> [C, n, S, Hp, G] | [C, Hp, G] | [C, G]
        self.src_scales: dict[int, torch.Tensor] = {}
        self.is_raw_layer: dict[int, bool] = {}
        self.stats = ConversionStats()
        self.num_bytes = 0
        self.used_block_copy = False
        self.used_convert = False

    # ---- intake -------------------------------------------------------------------------------
    def accept(self, index: int, buffer: Any, checksum: int | None = None, *,
               verify: bool = True) -> None:
        """Take buffer `index` (buffers must come in order 0, 1, ...) and write its entries.
        `verify=False`: the caller checks the checksum itself (the stream path's trailer)."""
        h = self.header
        self._check_order(index)
        buf = wrap_buffer(buffer)
        if buf.numel() * buf.element_size() != h.buffer_sizes[index]:
            raise MalformedFrame(f"buffer {index} has {buf.numel()} bytes, header says "
                                 f"{h.buffer_sizes[index]}")
        if verify and h.checksum is not None and buf.device.type == "cpu":
            got = compute_checksum(h.checksum, buf.numpy())
            if checksum != got:
                raise ChecksumMismatch(f"buffer {index}: checksum {got:#x} != sent {checksum!r}")
        entries = self.by_buffer[index]
        if self._write_buffer_blocks(entries, buf):  # the whole buffer in one launch (CUDA)
            self.num_bytes += h.buffer_sizes[index]
            self.next_buffer += 1
            return
        for e in entries:  # scales first: data entries of this buffer may need them
            if e.part == layouts.PART_SCALE:
                self._take_scales(e, self._tensor(buf, e))
        for e in entries:
            if e.part != layouts.PART_SCALE:
                self._write_data(e, self._tensor(buf, e))
        self.num_bytes += h.buffer_sizes[index]
        self.next_buffer += 1

    def _check_order(self, index: int) -> None:
        if index != self.next_buffer or index >= len(self.header.buffer_sizes):
            raise MalformedFrame(f"buffer {index} arrived, expected {self.next_buffer} of "
                                 f"{len(self.header.buffer_sizes)}")

    # ---- in-place intake (scatter/gather transports) ---------------------------------------------
    def can_place(self, index: int) -> bool:
        """True when buffer `index`'s whole blocks may be read straight into the sink's blocks."""
        sink = self.sink
        return (isinstance(sink, PagedSink) and sink.cache.device.type == "cpu"
                and self.plan.is_block_copy
                and not layouts.has_scales(self.header.spec) and not layouts.has_scales(sink.spec)
                and all(e.part in layouts.data_parts(sink.spec) for e in self.by_buffer[index]))

    def whole_blocks(self, e: TensorEntry) -> tuple[int, int]:
        """Blocks `[lo, hi)` of an entry lying wholly inside the token range (empty: hi <= lo)."""
        h, s = self.header, self.header.spec.block_size
        first_tok = (h.first_block + e.block_start) * s
        lo = 1 if first_tok < h.token_start else 0
        return lo, e.num_blocks - (1 if first_tok + e.num_blocks * s > h.token_end else 0)

    def placed(self, index: int,
               partials: list[tuple[TensorEntry, int, int, torch.Tensor]]) -> None:
        """Buffer `index` was read in place: its entries' whole blocks (`whole_blocks`) are in the
        sink's blocks. `partials`: (entry, layer, b0, blocks `[b1 - b0, *shape]`) for every other
        block range, written here token by token (only tokens inside the range)."""
        self._check_order(index)
        for e in self.by_buffer[index]:
            lo, hi = self.whole_blocks(e)
            if hi > lo:
                self.stats.num_values += e.num_layers * (hi - lo) * math.prod(e.shape[2:])
                self.used_block_copy = True
        for e, layer, b0, blocks in partials:
            self._write_tokens(e, layer, blocks, b0, b0 + blocks.shape[0], is_raw=True)
        self.num_bytes += self.header.buffer_sizes[index]
        self.next_buffer += 1

    def finish(self) -> WriteReport:
        h = self.header
        if self.next_buffer != len(h.buffer_sizes):
            raise MalformedFrame(f"transfer ended after {self.next_buffer} of "
                                 f"{len(h.buffer_sizes)} buffers")
        return WriteReport(
            request_id=h.request_id, transfer_id=h.transfer_id, meta=dict(h.meta),
            token_start=h.token_start, token_end=h.token_end,
            layer_start=h.layer_start, layer_end=h.layer_end,
            head_start=self.plan.write_heads[0], head_end=self.plan.write_heads[1],
            num_bytes=self.num_bytes, path="convert" if self.used_convert else "block_copy",
            is_lossless=self.stats.is_lossless, num_clamped=self.stats.num_clamped,
            max_abs_clamped=self.stats.max_abs_clamped,
        )

    @staticmethod
    def _tensor(buf: torch.Tensor, e: TensorEntry) -> torch.Tensor:
        return buf[e.offset:e.offset + e.nbytes].view(layouts.WIRE_DTYPES[e.dtype]).view(e.shape)

    # ---- scales -------------------------------------------------------------------------------
    def _take_scales(self, e: TensorEntry, t: torch.Tensor) -> None:
        gran = self.header.spec.scale_granularity
        for li in range(e.num_layers):
            layer = e.layer_start + li
            s = t[li]
            if gran is ScaleGranularity.PER_TOKEN_HEAD:  # assemble [C, n_total, S, Hp, G]
                full = self.src_scales.get(layer)
                if full is None:
                    shape = (s.shape[0], self.header.num_blocks, *s.shape[2:])
                    full = torch.empty(shape, dtype=s.dtype, device=s.device)
                    self.src_scales[layer] = full
                full[:, e.block_start:e.block_start + e.num_blocks] = s
            else:
                self.src_scales[layer] = s
            self.is_raw_layer[layer] = self.plan.is_raw and self._fixed_scales_equal(layer)

    def _fixed_scales_equal(self, layer: int) -> bool:
        """Per-tensor/per-head scales: stored bits are reusable only if both sides' scales match."""
        if not self.plan.has_fixed_dst_scales:
            return True
        for comp in range(layouts.num_components(self.sink.spec)):
            dst = self.sink.fixed_scales(layer, comp, self.plan)
            src = self._scales_for(layer, comp, 0, 1)
            if dst is None or src is None:
                return False
            src = src[:, self.plan.src_head_slice] if src.shape[1] > 1 else src
            if src.shape != dst.shape or not torch.equal(src.cpu(), dst.cpu()):
                return False
        return True

    def _scales_for(self, layer: int, comp: int, lo: int, hi: int) -> torch.Tensor | None:
        """Source scales for transfer-relative token rows `[lo, hi)` of the message's blocks,
        broadcastable to `[T, Hp, G]`."""
        s = self.src_scales.get(layer)
        if s is None:
            return None
        gran = self.header.spec.scale_granularity
        if gran is ScaleGranularity.PER_TOKEN_HEAD:
            c = s[comp]  # [n_total, S, Hp, G]
            return c.reshape(-1, *c.shape[2:])[lo:hi]
        if gran is ScaleGranularity.PER_HEAD:
            return s[comp].unsqueeze(0)
        return s[comp].view(1, 1, -1)

    # ---- data ---------------------------------------------------------------------------------
    def _write_buffer_blocks(self, entries: list[TensorEntry], buf: torch.Tensor) -> bool:
        """Every entry of a buffer in one kernel launch: raw block copies of whole blocks into a
        paged CUDA cache, no scales (block_copy.py checks the rest). False: write per entry."""
        h, sink = self.header, self.sink
        if not (entries and self.plan.is_block_copy and isinstance(sink, PagedSink)) \
                or sink.cache.device.type != "cuda" or layouts.has_scales(h.spec):
            return False
        e0 = entries[0]
        layers = range(e0.layer_start, e0.layer_start + e0.num_layers)
        if self.whole_blocks(e0) != (0, e0.num_blocks) or not all(
                self.is_raw_layer.get(layer, self.plan.is_raw) for layer in layers):
            return False
        ids = sink.dst_ids(h.first_block + e0.block_start, e0.num_blocks)
        if not sink.write_buffer_blocks(entries, ids, buf):
            return False
        self.used_block_copy = True
        self.stats.num_values += sum(math.prod(e.shape) for e in entries)
        return True

    def _write_data(self, e: TensorEntry, t: torch.Tensor) -> None:
        h = self.header
        lo_blk, hi_blk = self.whole_blocks(e)  # a partial first/last block goes token by token
        fast = self.plan.is_block_copy and isinstance(self.sink, PagedSink) and hi_blk > lo_blk
        abs0 = h.first_block + e.block_start + lo_blk
        ids = self.sink.dst_ids(abs0, hi_blk - lo_blk) if fast else None
        paged_scales = layouts.is_paged_scales(h.spec)
        all_raw = all(self.is_raw_layer.get(e.layer_start + li, self.plan.is_raw)
                      for li in range(e.num_layers))
        if ids is not None and (lo_blk, hi_blk) == (0, e.num_blocks) and not paged_scales \
                and all_raw and self.sink.write_entry_blocks(e, ids, t):  # all layers: one launch
            self.used_block_copy = True
            self.stats.num_values += t.numel()
            return
        for li in range(e.num_layers):
            layer = e.layer_start + li
            blocks = t[li]  # [n, *part_block_shape]
            is_raw = self.is_raw_layer.get(layer, self.plan.is_raw)
            if ids is None or not is_raw:
                self._write_tokens(e, layer, blocks, 0, e.num_blocks, is_raw)
                continue
            self.sink.write_blocks(layer, e.part, ids, blocks[lo_blk:hi_blk])
            if paged_scales and e.part in (layouts.PART_K, layouts.PART_KV, layouts.PART_LATENT):
                rel = e.block_start + lo_blk
                scales = self.src_scales[layer][:, rel:rel + hi_blk - lo_blk]
                self.sink.write_scale_blocks(layer, ids, scales)
            for b0, b1 in ((0, lo_blk), (hi_blk, e.num_blocks)):
                if b1 > b0:
                    self._write_tokens(e, layer, blocks[b0:b1], b0, b1, is_raw)
            self.used_block_copy = True
        if ids is not None:
            self.stats.num_values += t[:, lo_blk:hi_blk].numel()

    def _write_tokens(self, e: TensorEntry, layer: int, blocks: torch.Tensor, b0: int, b1: int,
                      is_raw: bool) -> None:
        """Convert blocks `[b0, b1)` of an entry (`blocks` holds exactly those) token by token,
        keeping only the token range."""
        h, src = self.header, self.header.spec
        s = src.block_size
        tok0 = (h.first_block + e.block_start + b0) * s
        lo, hi = max(tok0, h.token_start), min(tok0 + (b1 - b0) * s, h.token_end)
        if lo >= hi:
            return
        rel = lo - h.first_block * s  # row in the message's token numbering (for scales)
        for comp, view in layouts.token_views(src, e.part, blocks):
            values = view.reshape((b1 - b0) * s, view.shape[2], -1)[lo - tok0:hi - tok0]
            scales = self._scales_for(layer, comp, rel, rel + hi - lo)
            fixed = self.sink.fixed_scales(layer, comp, self.plan)
            q, token_scales, stats = self.plan.convert(values, scales, fixed, self.options,
                                                       is_raw=is_raw)
            self.sink.write_tokens(layer, comp, lo, hi, q, self.plan.dst_head_offset, token_scales)
            self.stats.add(stats)
        self.used_convert = self.used_convert or not is_raw or not self.plan.is_block_copy
