"""ZmqKvSender: the prefill worker's end of the KV data plane (a ZMQ DEALER per decode peer).

Ownership contract (the prefill side):
- `send(...)` blocks until the receiver acks (returns `SendResult`) or fails with a typed
  TransferError: the receiver's own error rebuilt with `is_remote=True` (IncompatibleKv,
  LimitExceeded, UnexpectedTransfer, ...), `TransferTimeout` (no ack within `timeout_s`, or the
  peer not reachable / not reading), or `PeerLost` (the connection dropped mid-transfer).
- The source blocks named by `block_table` must stay allocated and unmodified until `send`
  returns or raises. After an ack every byte has been delivered. After an error or timeout the
  connection is reset (queued frames are dropped), the receiver discards anything late, and
  the caller may free or re-cache its blocks.
- One transfer at a time per sender (not thread-safe); per-peer ordering follows from one
  connection per peer. Use one sender per decode peer, from one thread.

The payload path is chosen once, here (`config.payload`, or `nccl=`), and every transfer goes
through its `PayloadSender` interface (payload/send.py) with the pair's ZMQ connection handed
to it as a `PeerChannel` (channel.py):
- "stream" (default for tcp:// and ipc:// endpoints; stream/sender.py): writev on a plain data
  connection straight from the source blocks of a CPU cache. If the receiver takes no stream
  payloads (TransportUnavailable), the sender falls back to frames for good.
- "frames" (frames/sender.py): ZMQ multipart DATA messages, zero-copy.
- "nccl" (nccl/sender.py, `nccl=NcclSenderPlugin(device)`): GPU to GPU over NCCL.
A cache on a GPU is gathered on the GPU and copied to host per buffer on the first two.
With `config.wire_dtype` int8 / fp8_e4m3 every path sends a quantized copy of the blocks
(convert/wire_dtype.py) whose header names the wire spec; the receiver dequantizes it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from transfer.convert.cache import PagedKvCache
from transfer.convert.pack import PackOptions
from transfer.convert.wire_dtype import WIRE_DTYPES, to_wire, wire_spec
from transfer.endpoint.channel import DealerChannel
from transfer.endpoint.security import SocketSecurity
from transfer.frames.sender import FramesSender
from transfer.payload.send import PayloadSender
from transfer.stream.sender import StreamSender, stream_capable
from transfer.wire import framing as proto
from transfer.wire.errors import (
    MalformedFrame,
    PeerLost,
    TransferError,
    TransferTimeout,
    TransportUnavailable,
)

log = logging.getLogger(__name__)
PAYLOADS = ("stream", "frames")


@dataclass(frozen=True)
class ZmqSenderConfig:
    timeout_s: float = 60.0  # whole transfer, ack included
    checksum: bool = False  # xxh3_64 per buffer, verified by the receiver
    pack: PackOptions = field(default_factory=PackOptions)
    sndhwm: int = 64
    heartbeat_ivl_ms: int = 1000
    heartbeat_timeout_ms: int = 10000
    staging_bytes: int = 1 << 30  # reusable gather buffers kept between transfers
    # ring of chunk-sized gather buffers, each reused once sent (0: one per buffer)
    staging_slots: int = 8
    payload: str = "stream"  # "stream": writev on a data connection; "frames": ZMQ DATA messages
    stream_chunk_bytes: int = 8 << 20  # stream path: buffer size (checksum / conversion unit)
    stream_sndbuf: int = 0  # stream path: SO_SNDBUF of the data connection (0: kernel autotuning)
    wire_dtype: str = "auto"  # quantize KV for the wire (convert/wire_dtype.py); auto: as stored

    def __post_init__(self) -> None:
        if self.payload not in PAYLOADS:
            raise ValueError(f"ZmqSenderConfig.payload must be one of {PAYLOADS}, "
                             f"got {self.payload!r}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"ZmqSenderConfig.wire_dtype must be one of {WIRE_DTYPES}, "
                             f"got {self.wire_dtype!r}")
        if self.timeout_s <= 0 or self.stream_chunk_bytes < 1 or self.stream_sndbuf < 0:
            raise ValueError("ZmqSenderConfig: timeout_s and stream_chunk_bytes must be positive")


@dataclass(frozen=True)
class SendResult:
    request_id: str
    transfer_id: int
    num_bytes: int  # payload bytes sent
    seconds: float
    report: dict[str, Any]  # the receiver's WriteReport
    # where `seconds` went: connecting and packing (quantizing) / sending the payload (of
    # which `fill_s` filling buffers: gathers, device-to-host copies) / waiting for the ack
    pack_s: float = 0.0
    payload_s: float = 0.0
    fill_s: float = 0.0
    ack_s: float = 0.0


class ZmqKvSender:
    def __init__(self, endpoint: str, config: ZmqSenderConfig = ZmqSenderConfig(), *,
                 context: zmq.Context | None = None, nccl: PayloadSender | None = None,
                 security: SocketSecurity | None = None):
        """`nccl`: an `nccl.NcclSenderPlugin` to move payloads over NCCL (optional);
        `security`: authenticate to the receiver (endpoint/security.py)."""
        self.endpoint, self.config = endpoint, config
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._next_tid = int.from_bytes(os.urandom(6), "big") << 16
        self._path: PayloadSender = nccl if nccl is not None else self._choose_path()
        self._channel = DealerChannel(endpoint, self._ctx, sndhwm=config.sndhwm,
                                      heartbeat_ivl_ms=config.heartbeat_ivl_ms,
                                      heartbeat_timeout_ms=config.heartbeat_timeout_ms,
                                      security=security)

    def _choose_path(self) -> PayloadSender:
        c = self.config
        if c.payload == "stream" and stream_capable(self.endpoint):
            return StreamSender(self.endpoint, c.pack, checksum=c.checksum,
                                chunk_bytes=c.stream_chunk_bytes, sndbuf=c.stream_sndbuf,
                                staging_bytes=c.staging_bytes, staging_slots=c.staging_slots)
        return self._frames()

    def _frames(self) -> FramesSender:
        c = self.config
        return FramesSender(c.pack, checksum=c.checksum, staging_bytes=c.staging_bytes,
                            staging_slots=c.staging_slots)

    @property
    def payload(self) -> str:
        """The payload path in use: "nccl", "stream" or "frames"."""
        return self._path.name

    def close(self) -> None:
        self._channel.close()
        self._path.close()
        if self._own_context:
            self._ctx.term()

    # ---- public API -----------------------------------------------------------------------------
    def send(self, cache: PagedKvCache, block_table: Sequence[int], token_start: int,
             token_end: int, *, request_id: str, layer_range: tuple[int, int] | None = None,
             head_range: tuple[int, int] | None = None, meta: Mapping[str, Any] | None = None,
             timeout_s: float | None = None, reservation_token: str = "") -> SendResult:
        """Send tokens `[token_start, token_end)` of `request_id` (see the module contract);
        `reservation_token`: the destination reservation's (the receiver checks it)."""
        t0 = time.monotonic()
        deadline = t0 + (timeout_s if timeout_s is not None else self.config.timeout_s)
        self._next_tid += 1
        tid = self._next_tid
        self._channel.drain_events()
        began = ok = False
        try:
            self._connect_path(tid, deadline)
            wire = wire_spec(cache.spec, self.config.wire_dtype)
            if wire is not None:  # the quantized copy lives until this call returns
                cache, block_table = to_wire(cache, block_table, token_start, token_end, wire,
                                             layer_range)
            packed = self._path.pack(cache, block_table, token_start, token_end, transfer_id=tid,
                                     request_id=request_id, layer_range=layer_range,
                                     head_range=head_range, meta=meta,
                                     reservation_token=reservation_token)
            began, t_packed = True, time.monotonic()
            body = self._path.send(self._channel, packed, deadline)
            t_sent = time.monotonic()
            if body is None:
                body = self._channel.wait_reply(tid, deadline, want=proto.ACK)
            ok = True
        except (TransferTimeout, PeerLost, MalformedFrame):
            self._reset()
            raise
        except TransferError as e:
            if e.link_dropped:  # the receiver closed its end of the path (NCCL)
                self._path.reset()
            raise
        finally:
            if began:
                self._path.finish(ok)
        num_bytes, t_end = packed.header.payload_bytes, time.monotonic()
        return SendResult(request_id, tid, num_bytes, t_end - t0, body, pack_s=t_packed - t0,
                          payload_s=t_sent - t_packed, fill_s=self._path.fill_s,
                          ack_s=t_end - t_sent)

    def _connect_path(self, tid: int, deadline: float) -> None:
        try:
            self._path.connect(self._channel, tid, deadline)
        except TransportUnavailable as e:
            if not (e.is_remote and self._path.falls_back_to_frames):
                raise
            log.warning("KV receiver %s takes no %s payloads (%s); sending ZMQ frames from now on",
                        self.endpoint, self._path.name, e.message)
            self._path.close()
            self._path = self._frames()

    def _reset(self) -> None:
        """Drop the connection and everything queued on it, and what the path set up with the
        receiver; the next transfer sets both up again."""
        self._channel.reconnect()
        self._path.reset()
