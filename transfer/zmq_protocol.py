"""Framing of the ZMQ data plane (DEALER on the prefill side → ROUTER on the decode side).

One socket pair carries one message family; every frame list starts with a one-byte kind.
Sender → receiver:
  HEADER  [b"H", header]                       header = transfer/header.py msgpack
  DATA    [b"D", meta, buf_0, ..., buf_k]      meta = msgpack [transfer_id, chunk_index, checksums|nil]
  ABORT   [b"A", msgpack [transfer_id, reason]]
  NCCL    [b"N", msgpack [unique_id_bytes, ...]]  (communicator set-up; see nccl_transport.py)
Receiver → sender:
  ACK     [b"K", msgpack WriteReport dict]     one per transfer that was written completely
  ERROR   [b"E", msgpack {"tid": int|nil, **TransferError.to_wire()}]  (nil: header unreadable)
  READY   [b"R", msgpack [transfer_id]]        (NCCL only: receive buffers are posted)

A transfer is HEADER then `len(header.chunks)` DATA messages, in order, on one connection;
ZMQ delivers each message atomically, so the receiver validates the header before the first
payload message is looked at and writes chunk i while chunk i+1 is still on the wire.
Payload frames are sent with `copy=False` (memoryviews of tensors) and received with
`copy=False` (zero-copy views of ZMQ's buffers). Never pickle.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import msgpack

from transfer.errors import MalformedFrame, TransferError

HEADER = b"H"
DATA = b"D"
ABORT = b"A"
NCCL_HELLO = b"N"
ACK = b"K"
ERROR = b"E"
READY = b"R"

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
    if not isinstance(tid, int) or not isinstance(index, int) or isinstance(tid, bool) or tid < 0 or index < 0:
        raise MalformedFrame("data meta ids must be non-negative ints")
    if sums is not None and (not isinstance(sums, list) or len(sums) > max_checksums
                             or not all(isinstance(x, int) and not isinstance(x, bool) for x in sums)):
        raise MalformedFrame("data checksums must be a list of ints")
    return tid, index, sums


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
    elif isinstance(body, dict):
        tid = body.get("tid") if kind == ERROR else body.get("transfer_id")
    else:
        raise MalformedFrame("reply body must be a map")
    if kind not in (ACK, ERROR, READY) or (tid is not None and not isinstance(tid, int)):
        raise MalformedFrame(f"unknown reply kind {kind!r}")
    return kind, tid, body
