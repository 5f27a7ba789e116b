"""Framing of the ZMQ data plane (DEALER on the prefill side → ROUTER on the decode side).

One socket pair carries one message family; every frame list starts with a one-byte kind.
Sender → receiver:
  HEADER  [b"H", header]                       header = transfer/wire/header.py msgpack
  DATA    [b"D", meta, buf_0, ..., buf_k]      meta = msgpack [transfer_id, chunk_index,
                                                                checksums|nil]
  ABORT   [b"A", msgpack [transfer_id, reason]]
  NCCL    [b"N", msgpack [unique_id_bytes, ...]]  (communicator set-up; see nccl/transport.py)
  SIZES   [b"Z", msgpack [transfer_id, [buffer bytes, ...]]]  (NCCL, eager: ahead of HEADER,
                                               so the receiver posts its receives at once; the
                                               receiver then ends the transfer with a status
                                               word on the NCCL link, see nccl/transport.py)
  STREAM  [b"S", msgpack [token]]              token = 16 random bytes: asks for a data connection
Receiver → sender:
  ACK     [b"K", msgpack WriteReport dict]     one per transfer that was written completely
  ERROR   [b"E", msgpack {"tid": int|nil, **TransferError.to_wire()}]  (nil: header unreadable)
  READY   [b"R", msgpack [transfer_id]]        (NCCL only: receive buffers are posted)
  LISTEN  [b"L", msgpack {"port": int} | {"path": str}]  where the data connection goes

Payload paths (the header's `transport` field says which one a transfer uses):
- "zmq" (frames): HEADER then `len(header.chunks)` DATA messages, in order, on one connection;
  ZMQ delivers each message atomically, so the receiver validates the header before the first
  payload message is looked at and writes chunk i while chunk i+1 is still on the wire.
  Payload frames are sent with `copy=False` and received with `copy=False`.
- "stream": HEADER on ZMQ; the payload on a plain stream socket per (sender, receiver) pair —
  TCP on the ZMQ endpoint's host when it is tcp://, a Unix socket next to the ipc path when it
  is ipc://. Set-up (first transfer, or after any failure): STREAM → LISTEN; the sender
  connects and writes the 16-byte token first; the receiver pairs the connection with the ZMQ
  peer that sent that token (unknown token or silence → closed). Per transfer, on the data
  connection: PREFIX (`STREAM_PREFIX`: magic b"PDKV", version u16, flags u16, transfer_id u64,
  payload bytes u64; little endian) then the buffers' bytes in order, then, when the header
  names a checksum, a trailer of one u64 xxh3_64 per buffer. ACK / ERROR come back on ZMQ. Any
  failure of a stream transfer closes the data connection on both sides; the next transfer
  sets up a new one. Bytes move with writev/readv straight from/to cache blocks (iov.py).
- "nccl": see nccl/transport.py.
Never pickle.
"""

from __future__ import annotations

import hashlib
import struct
from types import MappingProxyType
from typing import Any

import msgpack

from transfer.wire.errors import LimitExceeded, MalformedFrame, TransferError
from transfer.wire.header import ReceiverLimits, TransferHeader

HEADER = b"H"
DATA = b"D"
ABORT = b"A"
NCCL_HELLO = b"N"
ACK = b"K"
ERROR = b"E"
READY = b"R"
SIZES = b"Z"
STREAM_HELLO = b"S"
STREAM_LISTEN = b"L"

STREAM_MAGIC = b"PDKV"
STREAM_VERSION = 1
STREAM_PREFIX = struct.Struct("<4sHHQQ")  # magic, version, flags, transfer_id, payload bytes
STREAM_TOKEN_BYTES = 16

_SMALL = MappingProxyType({"max_str_len": 1 << 16, "max_bin_len": 1 << 10, "max_array_len": 1 << 16,
                           "max_map_len": 64, "max_ext_len": 0})


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_small(raw: Any, what: str) -> Any:
    """Decode a small control frame; anything malformed raises MalformedFrame."""
    if len(raw) > 1 << 20:
        raise MalformedFrame(f"{what} frame of {len(raw)} bytes")
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=True, **_SMALL)
    except Exception as e:
        raise MalformedFrame(f"unreadable {what} frame: {type(e).__name__}") from None


def data_meta(raw: Any, max_checksums: int) -> tuple[int, int, list[int] | None]:
    meta = unpack_small(raw, "data meta")
    if not isinstance(meta, list) or len(meta) != 3:
        raise MalformedFrame("data meta must be [transfer_id, chunk_index, checksums]")
    tid, index, sums = meta
    if not isinstance(tid, int) or not isinstance(index, int) or isinstance(tid, bool) \
            or tid < 0 or index < 0:
        raise MalformedFrame("data meta ids must be non-negative ints")
    if sums is not None and (
            not isinstance(sums, list) or len(sums) > max_checksums
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in sums)):
        raise MalformedFrame("data checksums must be a list of ints")
    return tid, index, sums


def parse_sizes(raw: Any, limits: ReceiverLimits) -> tuple[int, tuple[int, ...]]:
    """The body of SIZES: (transfer_id, buffer sizes), each size positive and every count and
    size within `limits` (the receiver allocates this much before the header is decoded)."""
    body = unpack_small(raw, "nccl sizes")
    if not (isinstance(body, list) and len(body) == 2 and type(body[0]) is int and body[0] >= 0
            and isinstance(body[1], list) and all(type(v) is int and v > 0 for v in body[1])):
        raise MalformedFrame("NCCL SIZES must be [transfer_id, [positive buffer bytes, ...]]")
    sizes = tuple(body[1])
    if not sizes:
        raise MalformedFrame("NCCL SIZES names no buffer")
    if len(sizes) > limits.max_buffers:
        raise LimitExceeded("buffers", len(sizes), limits.max_buffers)
    if max(sizes) > limits.max_buffer_bytes:
        raise LimitExceeded("buffer bytes", max(sizes), limits.max_buffer_bytes)
    if sum(sizes) > limits.max_message_bytes:
        raise LimitExceeded("message bytes", sum(sizes), limits.max_message_bytes)
    return body[0], sizes


def header_frames(header: TransferHeader) -> list[bytes]:
    return [HEADER, header.encode()]


def error_frames(err: TransferError, transfer_id: int | None) -> list[bytes]:
    body = err.to_wire()
    body["tid"] = transfer_id
    return [ERROR, pack(body)]


def parse_reply(frames: list[Any]) -> tuple[bytes, int | None, Any]:
    """(kind, transfer_id, body) of a receiver → sender message; MalformedFrame if unreadable."""
    if len(frames) != 2:
        raise MalformedFrame(f"reply with {len(frames)} frames")
    kind = bytes(frames[0])
    body = unpack_small(frames[1], "reply")
    if kind == READY:
        tid = body[0] if isinstance(body, list) and body else None
    elif kind == STREAM_LISTEN:
        tid = None
        if not isinstance(body, dict):
            raise MalformedFrame("listen reply must be a map")
    elif isinstance(body, dict):
        tid = body.get("tid") if kind == ERROR else body.get("transfer_id")
    else:
        raise MalformedFrame("reply body must be a map")
    if kind not in (ACK, ERROR, READY, STREAM_LISTEN) \
            or (tid is not None and not isinstance(tid, int)):
        raise MalformedFrame(f"unknown reply kind {kind!r}")
    return kind, tid, body


def stream_prefix(transfer_id: int, payload_bytes: int) -> bytes:
    return STREAM_PREFIX.pack(STREAM_MAGIC, STREAM_VERSION, 0, transfer_id, payload_bytes)


def parse_stream_prefix(raw: bytes | bytearray | memoryview) -> tuple[int, int]:
    """(transfer_id, payload bytes) of a data-connection prefix; MalformedFrame if it is not one."""
    magic, version, flags, tid, nbytes = STREAM_PREFIX.unpack(raw)
    if magic != STREAM_MAGIC or version != STREAM_VERSION or flags != 0:
        raise MalformedFrame(f"bad stream prefix (magic {magic!r}, version {version}, "
                             f"flags {flags})")
    return tid, nbytes


_SUN_PATH_MAX = 107  # bytes of a Unix socket path (sun_path holds 108 with the NUL)


def stream_ipc_path(ipc_path: str) -> str:
    """Where the data connections of a receiver bound to `ipc://<ipc_path>` go: `<path>.data`
    beside it, or, when that would not fit a Unix socket address (ZMQ accepts paths up to the
    limit; ours is 5 bytes longer), a name in Linux's abstract namespace derived from the path
    (`@pdserve-<sha256 prefix>.data`): both ends compute it, no file is left behind."""
    path = ipc_path + ".data"
    if len(path.encode()) <= _SUN_PATH_MAX:
        return path
    return "@pdserve-" + hashlib.sha256(ipc_path.encode()).hexdigest()[:32] + ".data"


def unix_address(path: str) -> str:
    """A socket address for `path`; ZMQ's abstract-namespace spelling `@name` → `\\0name`."""
    return "\0" + path[1:] if path.startswith("@") else path


def stream_hello_token(rest: list[Any]) -> bytes:
    """The token of a STREAM message's body frames (buffers); MalformedFrame if unreadable."""
    body = unpack_small(rest[0], "stream hello") if len(rest) == 1 else None
    if not isinstance(body, list) or len(body) != 1 or not isinstance(body[0], bytes) \
            or len(body[0]) != STREAM_TOKEN_BYTES:
        raise MalformedFrame(f"stream hello must be [token of {STREAM_TOKEN_BYTES} bytes]")
    return body[0]
