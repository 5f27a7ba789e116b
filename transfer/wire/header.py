"""The versioned transfer header: what a KV message carries, and its strict validation.

A transfer message is this header (msgpack) plus raw payload buffers. The header states
everything: the sender's `KvSpec`, request id, token/layer/head ranges, the byte size of every
buffer, how buffers group into transport chunks, and one `TensorEntry` per tensor (part, layer
and block range, buffer, offset, dtype, shape, byte length). Nothing about geometry is guessed
by the receiver.

`decode_header(raw, limits)` validates ALL of it before a payload byte is looked at: version,
exact key sets, the type of every field, every size against the receiver's `ReceiverLimits`
(so a hostile header cannot make it allocate), `nbytes == prod(shape) * itemsize`, each shape
equal to the one the spec and layout imply, entries inside their buffers, and that the entries
of every part tile layers x blocks exactly once (`bufs`: its length bounded while parsing, each
size and their sum by the limits). Failures raise `MalformedHeader`,
`UnsupportedVersion` or `LimitExceeded`; nothing else escapes.

Blocks are numbered per transfer: block 0 holds token `first_block * S` where
`first_block = token_start // S` (S = the sender's block size).

Version 2 added `rtok`, the destination reservation's token (the proxy's, random; at most
`MAX_TOKEN_LEN` characters, "" for none): endpoint/books.py admits a transfer only with it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import msgpack
import xxhash

from engine.kv_spec import KvSpec, KvSpecError, ScaleGranularity
from transfer.wire import layouts
from transfer.wire.errors import LimitExceeded, MalformedHeader, UnsupportedVersion
from transfer.wire.fields import int_field as _int
from transfer.wire.fields import int_list as _int_list
from transfer.wire.fields import ints as _ints
from transfer.wire.fields import pair as _pair

WIRE_VERSION = 2
MAX_TOKEN_LEN = 64  # characters of `rtok`
CHECKSUM_ALGOS = ("xxh3_64",)
TRANSPORTS = ("zmq", "stream", "nccl")  # ZMQ frames, stream socket (wire/framing.py), NCCL
_TOP_KEYS = frozenset({"v", "rid", "tid", "spec", "tok", "lay", "heads", "bufs", "chunks", "ent",
                       "sum", "tr", "meta", "rtok"})
_SPEC_INTS = ("num_layers", "num_kv_heads", "head_dim", "block_size", "int4_group_size",
              "tp_rank", "tp_size", "kv_head_replicas")
_SPEC_STRS = ("dtype", "layout", "kind", "scale_granularity", "model_fingerprint")
_META_DEPTH, _META_KEY_LEN, _META_STR_LEN = 3, 64, 1024  # nesting (map, list, pair), lengths


@dataclass(frozen=True)
class ReceiverLimits:
    """Bounds a receiver sets for itself; every size in a header is checked against them
    before anything is allocated or read."""

    max_header_bytes: int = 4 << 20
    max_message_bytes: int = 8 << 30  # payload of one transfer
    max_buffer_bytes: int = 2 << 30  # one frame / one NCCL buffer
    max_decoded_bytes: int = 8 << 30  # output of decode_to_tensors
    max_tokens: int = 1 << 20  # token_end (a position) and token count
    max_layers: int = 1024
    max_heads: int = 1024
    max_head_dim: int = 4096
    max_block_size: int = 4096
    max_tp_size: int = 1024
    max_entries: int = 65536  # sum over entries of their num_layers
    max_buffers: int = 16384
    max_request_id_len: int = 256
    max_meta_items: int = 32  # keys of the meta map
    max_meta_values: int = 4096  # values in the meta map, nested ones and containers included

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ReceiverLimits.{f.name} must be a positive int, got {v!r}")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a buffer: `shape` = `[num_layers, num_blocks, *part_block_shape]` for data,
    `[num_layers, *scale_wire_shape]` for scales (num_blocks 0 unless per-token-head)."""

    part: str
    layer_start: int
    num_layers: int
    block_start: int
    num_blocks: int
    buffer: int
    offset: int
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    def to_wire(self) -> list[Any]:
        return [self.part, self.layer_start, self.num_layers, self.block_start, self.num_blocks,
                self.buffer, self.offset, self.dtype, list(self.shape), self.nbytes]


@dataclass(frozen=True)
class TransferHeader:
    request_id: str
    transfer_id: int
    spec: KvSpec  # the sender's cache
    token_start: int
    token_end: int
    layer_start: int
    layer_end: int
    head_start: int  # model heads carried, within spec.head_range
    head_end: int
    buffer_sizes: tuple[int, ...]
    chunks: tuple[int, ...]  # buffers per transport chunk, in order
    entries: tuple[TensorEntry, ...]
    checksum: str | None = None  # algorithm; values travel with the chunks
    transport: str = "zmq"
    # values for the serving layer: plain scalars, or lists / maps of them (see `_meta`)
    meta: Mapping[str, Any] = field(default_factory=dict)
    reservation_token: str = ""  # the destination reservation's token ("" = none)
    version: int = WIRE_VERSION

    @property
    def first_block(self) -> int:
        return self.token_start // self.spec.block_size

    @property
    def num_blocks(self) -> int:
        return -(-self.token_end // self.spec.block_size) - self.first_block

    @property
    def num_tokens(self) -> int:
        return self.token_end - self.token_start

    @property
    def num_heads(self) -> int:
        return self.head_end - self.head_start

    @property
    def payload_bytes(self) -> int:
        return sum(self.buffer_sizes)

    def entries_by_buffer(self) -> list[list[TensorEntry]]:
        """The entries of each buffer, in header order."""
        by: list[list[TensorEntry]] = [[] for _ in self.buffer_sizes]
        for e in self.entries:
            by[e.buffer].append(e)
        return by

    def encode(self) -> bytes:
        return msgpack.packb({
            "v": self.version, "rid": self.request_id, "tid": self.transfer_id,
            "spec": self.spec.to_dict(), "tok": [self.token_start, self.token_end],
            "lay": [self.layer_start, self.layer_end], "heads": [self.head_start, self.head_end],
            "bufs": list(self.buffer_sizes), "chunks": list(self.chunks),
            "ent": [e.to_wire() for e in self.entries], "sum": self.checksum,
            "tr": self.transport, "meta": dict(self.meta), "rtok": self.reservation_token,
        }, use_bin_type=True)


def compute_checksum(algo: str, buf: Any) -> int:
    """Checksum of a buffer-protocol object (no copy)."""
    if algo != "xxh3_64":
        raise MalformedHeader(f"unknown checksum algorithm {algo!r}")
    return xxhash.xxh3_64_intdigest(buf)


# ---- decoding -----------------------------------------------------------------------------------
def _spec(d: Any, limits: ReceiverLimits) -> KvSpec:
    if not isinstance(d, dict):
        raise MalformedHeader("spec must be a map")
    known = set(_SPEC_INTS) | set(_SPEC_STRS) | {"is_kv_stacked"}
    if set(d) - known:
        raise MalformedHeader(f"unknown spec fields {sorted(map(str, set(d) - known))[:8]}")
    for k in _SPEC_INTS:
        if k in d:
            _int(d[k], f"spec.{k}", 0, 1 << 31)
    for k in _SPEC_STRS:
        if k in d and (not isinstance(d[k], str) or len(d[k]) > 128):
            raise MalformedHeader(f"spec.{k} must be a string of at most 128 characters")
    if "is_kv_stacked" in d and not isinstance(d["is_kv_stacked"], bool):
        raise MalformedHeader("spec.is_kv_stacked must be a bool")
    for k, lim in (("num_layers", limits.max_layers), ("num_kv_heads", limits.max_heads),
                   ("head_dim", limits.max_head_dim), ("block_size", limits.max_block_size),
                   ("tp_size", limits.max_tp_size)):
        if d.get(k, 0) > lim:
            raise LimitExceeded(f"spec.{k}", d[k], lim)
    try:
        return KvSpec.from_dict(d)
    except (KvSpecError, ValueError, TypeError) as e:
        raise MalformedHeader(f"invalid spec: {e}") from None


def _entry(v: Any, i: int) -> TensorEntry:
    if not isinstance(v, list) or len(v) != 10:
        raise MalformedHeader(f"entry {i} must be a list of 10 fields")
    part, dtype, shape = v[0], v[7], v[8]
    if not isinstance(part, str) or not isinstance(dtype, str):
        raise MalformedHeader(f"entry {i}: part and dtype must be strings")
    if part not in layouts.ALL_PARTS:
        raise MalformedHeader(f"entry {i}: unknown part {part!r:.40}")
    if dtype not in layouts.WIRE_DTYPES:
        raise MalformedHeader(f"entry {i}: unknown dtype {dtype!r:.40}")
    if not isinstance(shape, list) or len(shape) > 8:
        raise MalformedHeader(f"entry {i}: shape must be a list of at most 8 ints")
    ints = _ints(v[1:7], f"entry {i} field")
    return TensorEntry(part, *ints, dtype=dtype, shape=_ints(shape, f"entry {i} shape"),
                       nbytes=_int(v[9], f"entry {i} nbytes"))


def _meta(v: Any, limits: ReceiverLimits) -> dict[str, Any]:
    """Short string keys; values plain scalars, or lists / short-keyed maps of them at most
    `_META_DEPTH` deep (a typed value as the control plane's codec writes it, e.g. the first
    token's logprob); `max_meta_values` in all. What they mean is the serving layer's to check."""
    if not isinstance(v, dict):
        raise MalformedHeader("meta must be a map")
    if len(v) > limits.max_meta_items:
        raise LimitExceeded("meta items", len(v), limits.max_meta_items)
    stack: list[tuple[Any, str, int]] = [(v, "meta", -1)]
    num_values = -1  # the meta map itself is not counted
    while stack:
        x, where, depth = stack.pop()
        num_values += 1
        if num_values > limits.max_meta_values:
            raise LimitExceeded("meta values", num_values, limits.max_meta_values)
        if isinstance(x, (dict, list)) and depth == _META_DEPTH:
            raise MalformedHeader(f"{where:.60}: nested deeper than {_META_DEPTH} levels")
        if isinstance(x, dict):
            if not all(isinstance(k, str) and len(k) <= _META_KEY_LEN for k in x):
                raise MalformedHeader(f"{where:.60}: keys are strings of {_META_KEY_LEN} at most")
            stack += [(y, f"{where}.{k}", depth + 1) for k, y in x.items()]
        elif isinstance(x, list):
            stack += [(y, f"{where}[{i}]", depth + 1) for i, y in enumerate(x)]
        elif not isinstance(x, (type(None), bool, int, float, str)) \
                or (isinstance(x, str) and len(x) > _META_STR_LEN):
            raise MalformedHeader(f"{where:.60}: {type(x).__name__} is not a meta value")
    return dict(v)


def decode_header(raw: bytes | memoryview, limits: ReceiverLimits) -> TransferHeader:
    """Parse and fully validate a header (see module docstring). Raises only TransferErrors."""
    if len(raw) > limits.max_header_bytes:
        raise LimitExceeded("header bytes", len(raw), limits.max_header_bytes)
    cap = max(limits.max_entries, limits.max_buffers, 64)
    try:
        d = msgpack.unpackb(raw, raw=False, strict_map_key=True, use_list=True,
                            max_str_len=1 << 16, max_bin_len=0, max_array_len=cap,
                            max_map_len=max(64, limits.max_meta_items), max_ext_len=0)
    except Exception as e:  # msgpack raises many types for hostile bytes
        raise MalformedHeader(
            f"header is not valid msgpack: {type(e).__name__}: {e}"[:300]) from None
    if not isinstance(d, dict):
        raise MalformedHeader("header must be a map")
    if d.get("v") != WIRE_VERSION:
        raise UnsupportedVersion(
            f"header version {d.get('v')!r:.20}; this receiver speaks {WIRE_VERSION}")
    if set(d) != _TOP_KEYS:
        raise MalformedHeader(f"header keys differ from v{WIRE_VERSION}: missing "
                              f"{sorted(_TOP_KEYS - set(d))}, "
                              f"unknown {sorted(map(str, set(d) - _TOP_KEYS))[:8]}")
    rid = d["rid"]
    if not isinstance(rid, str) or not 0 < len(rid) <= limits.max_request_id_len:
        raise MalformedHeader(
            f"request id must be a non-empty string of at most {limits.max_request_id_len}")
    if not isinstance(d["ent"], list):
        raise MalformedHeader("ent must be a list")
    if d["sum"] is not None and (not isinstance(d["sum"], str) or d["sum"] not in CHECKSUM_ALGOS):
        raise MalformedHeader(f"unknown checksum algorithm {d['sum']!r:.40}")
    if not isinstance(d["rtok"], str) or len(d["rtok"]) > MAX_TOKEN_LEN:
        raise MalformedHeader(f"rtok (the reservation token) must be a string of at most "
                              f"{MAX_TOKEN_LEN} characters")
    if not isinstance(d["tr"], str) or d["tr"] not in TRANSPORTS:
        raise MalformedHeader(f"unknown transport {d['tr']!r:.40}")
    (t0, t1), (l0, l1), (h0, h1) = (_pair(d["tok"], "tok"), _pair(d["lay"], "lay"),
                                    _pair(d["heads"], "heads"))
    header = TransferHeader(
        request_id=rid, transfer_id=_int(d["tid"], "tid"), spec=_spec(d["spec"], limits),
        token_start=t0, token_end=t1, layer_start=l0, layer_end=l1, head_start=h0, head_end=h1,
        buffer_sizes=_int_list(d["bufs"], "bufs", limits.max_buffers),
        chunks=_int_list(d["chunks"], "chunks", limits.max_buffers, lo=1),
        entries=tuple(_entry(e, i) for i, e in enumerate(d["ent"])),
        checksum=d["sum"], transport=d["tr"], meta=_meta(d["meta"], limits),
        reservation_token=d["rtok"],
    )
    validate_header(header, limits)
    return header


# ---- geometry validation ------------------------------------------------------------------------
def expected_entry_shape(h: TransferHeader, e: TensorEntry) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) the spec implies for an entry's part, layer count and block count."""
    spec = h.spec
    if e.part == layouts.PART_SCALE:
        if not layouts.has_scales(spec):
            raise MalformedHeader("scale entry for a spec without scales")
        n = e.num_blocks if spec.scale_granularity is ScaleGranularity.PER_TOKEN_HEAD else 0
        if e.num_blocks != n:
            raise MalformedHeader(f"{spec.scale_granularity.value} scales cover no blocks")
        shape = (e.num_layers, *layouts.scale_wire_shape(spec, h.num_heads, n))
        return shape, layouts.wire_dtype_name(layouts.SCALE_DTYPE)
    if e.part not in layouts.data_parts(spec):
        raise MalformedHeader(f"part {e.part!r} does not belong to a {spec.layout.value} cache")
    shape = (e.num_layers, e.num_blocks, *layouts.part_block_shape(spec, e.part, h.num_heads))
    return shape, layouts.wire_dtype_name(layouts.storage_dtype(spec.dtype))


def validate_header(h: TransferHeader, limits: ReceiverLimits) -> None:
    spec = h.spec
    if h.token_end > limits.max_tokens:
        raise LimitExceeded("token_end", h.token_end, limits.max_tokens)
    if h.layer_end > spec.num_layers:
        raise MalformedHeader(
            f"layers [{h.layer_start}, {h.layer_end}) beyond the spec's {spec.num_layers}")
    lo, hi = spec.head_range
    if not lo <= h.head_start < h.head_end <= hi:
        raise MalformedHeader(
            f"heads [{h.head_start}, {h.head_end}) outside the sender's [{lo}, {hi})")
    if sum(h.chunks) != len(h.buffer_sizes):
        raise MalformedHeader(
            f"chunks {list(h.chunks)[:8]} do not add up to {len(h.buffer_sizes)} buffers")
    for i, size in enumerate(h.buffer_sizes):
        if size > limits.max_buffer_bytes:
            raise LimitExceeded(f"buffer {i} bytes", size, limits.max_buffer_bytes)
    if h.payload_bytes > limits.max_message_bytes:
        raise LimitExceeded("message bytes", h.payload_bytes, limits.max_message_bytes)
    if sum(e.num_layers for e in h.entries) > limits.max_entries:
        raise LimitExceeded("entry layers", sum(e.num_layers for e in h.entries),
                            limits.max_entries)
    coverage: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)
    num_blocks = h.num_blocks
    for i, e in enumerate(h.entries):
        shape, dtype = expected_entry_shape(h, e)
        if e.shape != shape or e.dtype != dtype:
            raise MalformedHeader(f"entry {i} ({e.part}): {e.dtype} {list(e.shape)} but the spec "
                                  f"implies {dtype} {list(shape)}")
        itemsize = layouts.WIRE_DTYPES[dtype].itemsize
        if e.nbytes != math.prod(shape) * itemsize:
            raise MalformedHeader(f"entry {i}: nbytes {e.nbytes} != prod(shape) x {itemsize}")
        if e.buffer >= len(h.buffer_sizes) or e.offset % itemsize or \
                e.offset + e.nbytes > h.buffer_sizes[e.buffer]:
            raise MalformedHeader(
                f"entry {i} lies outside its buffer {e.buffer} (or is misaligned)")
        if e.part == layouts.PART_SCALE and e.buffer != 0:
            raise MalformedHeader("scales travel in buffer 0")
        if e.num_layers == 0 or not h.layer_start <= e.layer_start <= h.layer_end - e.num_layers:
            raise MalformedHeader(f"entry {i}: layers outside [{h.layer_start}, {h.layer_end})")
        if e.block_start + e.num_blocks > num_blocks:
            raise MalformedHeader(f"entry {i}: blocks beyond the transfer's {num_blocks}")
        for layer in range(e.layer_start, e.layer_start + e.num_layers):
            coverage[(e.part, layer)].append((e.block_start, e.num_blocks))
    _check_tiling(h, coverage, num_blocks)


def _check_tiling(h: TransferHeader, coverage: dict[tuple[str, int], list[tuple[int, int]]],
                  num_blocks: int) -> None:
    parts = layouts.wire_parts(h.spec)
    if len(coverage) != len(parts) * (h.layer_end - h.layer_start):
        raise MalformedHeader("entries do not cover every (part, layer) of the transfer exactly")
    for part in parts:
        paged = part != layouts.PART_SCALE or layouts.is_paged_scales(h.spec)
        for layer in range(h.layer_start, h.layer_end):
            spans = sorted(coverage.get((part, layer), ()))
            if not paged:
                if len(spans) != 1:
                    raise MalformedHeader(f"layer {layer}: {len(spans)} scale entries, want 1")
                continue
            at = 0
            for start, n in spans:
                if start != at or n == 0:
                    raise MalformedHeader(
                        f"{part} blocks of layer {layer} overlap or leave a gap at {at}")
                at += n
            if at != num_blocks:
                raise MalformedHeader(f"{part} of layer {layer} covers {at} of {num_blocks} blocks")
