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

Payload paths (`config.payload`; the protocol is in wire/framing.py):
- "stream" (default for tcp:// and ipc:// endpoints): the header goes on ZMQ, the payload on a
  plain stream socket to the receiver (stream/sender.py), written with writev straight from
  the source blocks of a CPU cache — the only copies are the kernel's. The data connection is
  set up on the first transfer and after any failure. If the receiver takes no stream
  payloads (TransportUnavailable), the sender falls back to frames for good.
- "frames": ZMQ multipart DATA messages: memoryviews of cache tensors (views) or of freshly
  gathered buffers (see pack.py), sent with `copy=False`; chunk i+1 is gathered while ZMQ's
  I/O thread sends chunk i.
A cache on a GPU is gathered on the GPU and copied to host per buffer on either path.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from transfer.convert.cache import PagedKvCache
from transfer.convert.pack import PackedKv, PackOptions, StagingPool, pack_kv
from transfer.stream.sender import StreamLink, stream_capable
from transfer.wire import framing as proto
from transfer.wire.errors import (
    MalformedFrame,
    PeerLost,
    TransferError,
    TransferTimeout,
    TransportUnavailable,
)
from transfer.wire.header import compute_checksum

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
    staging_slots: int = 8  # ring of chunk-sized gather buffers reused once sent (0: one per buffer)
    payload: str = "stream"  # "stream": writev on a data connection; "frames": ZMQ DATA messages
    stream_chunk_bytes: int = 8 << 20  # stream path: buffer size (checksum / receiver conversion unit)
    stream_sndbuf: int = 0  # stream path: SO_SNDBUF of the data connection (0: kernel autotuning)

    def __post_init__(self) -> None:
        if self.payload not in PAYLOADS:
            raise ValueError(f"ZmqSenderConfig.payload must be one of {PAYLOADS}, got {self.payload!r}")
        if self.timeout_s <= 0 or self.stream_chunk_bytes < 1 or self.stream_sndbuf < 0:
            raise ValueError("ZmqSenderConfig: timeout_s and stream_chunk_bytes must be positive")


@dataclass(frozen=True)
class SendResult:
    request_id: str
    transfer_id: int
    num_bytes: int  # payload bytes sent
    seconds: float
    report: dict[str, Any]  # the receiver's WriteReport


def _host_view(buf: torch.Tensor) -> Any:
    """A zero-copy buffer-protocol view of a 1-D uint8 tensor (host copy for GPU tensors)."""
    if buf.device.type != "cpu":
        buf = buf.cpu()
    return buf.numpy()


class ZmqKvSender:
    def __init__(self, endpoint: str, config: ZmqSenderConfig = ZmqSenderConfig(), *,
                 context: zmq.Context | None = None, nccl: Any = None):
        """`nccl`: an `nccl.NcclSenderPlugin` to move payloads over NCCL (optional)."""
        self.endpoint, self.config = endpoint, config
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._nccl = nccl
        self._next_tid = int.from_bytes(os.urandom(6), "big") << 16
        self._pool = StagingPool(config.staging_bytes, ring_slots=config.staging_slots)
        self._sock: zmq.Socket | None = None
        self._monitor: zmq.Socket | None = None
        self._stream = StreamLink(endpoint, config.stream_sndbuf) \
            if config.payload == "stream" and nccl is None and stream_capable(endpoint) else None
        self._connect()

    # ---- connection ---------------------------------------------------------------------------
    def _connect(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        for opt, val in ((zmq.LINGER, 0), (zmq.SNDHWM, self.config.sndhwm), (zmq.IMMEDIATE, 1),
                         (zmq.HEARTBEAT_IVL, self.config.heartbeat_ivl_ms),
                         (zmq.HEARTBEAT_TIMEOUT, self.config.heartbeat_timeout_ms)):
            sock.setsockopt(opt, val)
        # Every payload frame zero-copy (no small-frame copies): a chunk's tracker (its last
        # part) then covers all of its frames, which ZMQ releases in order.
        sock.copy_threshold = 0
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.endpoint)
        self._sock = sock

    def _reset(self) -> None:
        """Drop the connection and everything queued on it; the next transfer reconnects.
        Staging memory is replaced too: frames dropped by the old socket may still be read."""
        self._pool = StagingPool(self.config.staging_bytes, ring_slots=self.config.staging_slots)
        self._close_sockets()
        if self._nccl is not None:
            self._nccl.reset()
        self._connect()

    @property
    def payload(self) -> str:
        """The payload path in use: "nccl", "stream" or "frames"."""
        return "nccl" if self._nccl is not None else "stream" if self._stream is not None else "frames"

    def _close_sockets(self) -> None:
        if self._stream is not None:
            self._stream.drop()
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close(linger=0)
        if self._monitor is not None:
            self._monitor.close(linger=0)
        self._sock = self._monitor = None

    def close(self) -> None:
        self._close_sockets()
        if self._nccl is not None:
            self._nccl.close()
        if self._own_context:
            self._ctx.term()

    # ---- public API -----------------------------------------------------------------------------
    def send(self, cache: PagedKvCache, block_table: Sequence[int], token_start: int, token_end: int, *,
             request_id: str, layer_range: tuple[int, int] | None = None,
             head_range: tuple[int, int] | None = None, meta: Mapping[str, Any] | None = None,
             timeout_s: float | None = None) -> SendResult:
        """Send tokens `[token_start, token_end)` of `request_id` (see the module contract)."""
        t0 = time.monotonic()
        deadline = t0 + (timeout_s if timeout_s is not None else self.config.timeout_s)
        self._next_tid += 1
        tid = self._next_tid
        self._drain_monitor()
        ok = sent = False
        try:
            if self._stream is not None:
                self._ensure_stream(tid, deadline)
            packed = self._pack(cache, block_table, token_start, token_end, tid, request_id=request_id,
                                layer_range=layer_range, head_range=head_range, meta=meta)
            if self._nccl is not None:
                self._nccl.ensure_link(self, deadline)
            sent = True

            def send_header() -> None:
                self._send_frames([proto.HEADER, packed.header.encode()], deadline)

            early_ack = None  # the NCCL plugin watches replies while its sends run
            if self._nccl is not None:  # it sends the header when its payload plan says
                early_ack = self._nccl.send_payload(self, packed, deadline, send_header)
            elif self._stream is not None:
                send_header()
                self._stream.send_payload(self, packed, deadline)
            else:
                send_header()
                self._send_chunks(packed, deadline)
            body = early_ack if early_ack is not None else self._wait_reply(tid, deadline, want=proto.ACK)
            ok = True
        except (TransferTimeout, PeerLost, MalformedFrame):
            self._reset()
            raise
        except TransferError as e:
            if e.link_dropped and self._nccl is not None:  # the receiver closed its NCCL end
                self._nccl.reset()
            raise
        finally:
            self._pool.release_all()
            if sent and not ok and self._stream is not None:
                self._stream.drop()  # the receiver closes its end of a failed stream transfer too
        return SendResult(request_id, tid, packed.header.payload_bytes, time.monotonic() - t0, body)

    def _pack(self, cache: PagedKvCache, block_table: Sequence[int], token_start: int, token_end: int,
              tid: int, **kw: Any) -> PackedKv:
        options = self.config.pack
        if self._nccl is not None:
            options = replace(options, allow_views=False, chunk_bytes=self._nccl.chunk_bytes, taper=True)
        elif self._stream is not None:  # in-place segments replace views; big buffers, small header
            options = replace(options, allow_views=False, chunk_bytes=self.config.stream_chunk_bytes)
        elif cache.device.type != "cpu":
            options = replace(options, allow_views=False)
        checksum = "xxh3_64" if self.config.checksum and self._nccl is None else None
        return pack_kv(cache, block_table, token_start, token_end, transfer_id=tid, checksum=checksum,
                       transport={"frames": "zmq"}.get(self.payload, self.payload), options=options,
                       pool=self._pool if self._nccl is None else self._nccl.pool, **kw)

    def _ensure_stream(self, tid: int, deadline: float) -> None:
        assert self._stream is not None
        try:
            self._stream.ensure(self, tid, deadline)
        except TransportUnavailable as e:
            if not e.is_remote:
                raise
            log.warning("KV receiver %s takes no stream payloads (%s); sending ZMQ frames from now on",
                        self.endpoint, e.message)
            self._stream = None

    # ---- internals (also used by the NCCL plugin) ---------------------------------------------------
    def _send_chunks(self, packed: PackedKv, deadline: float) -> None:
        tid = packed.header.transfer_id
        index = 0
        for chunk_index, chunk in enumerate(packed.iter_chunks()):
            self._check_replies(tid)
            views = [_host_view(b) for b in chunk]
            sums = [compute_checksum("xxh3_64", v) for v in views] if packed.header.checksum else None
            ring = self._pool.ring_slots > 0
            tracker = self._send_frames([proto.DATA, proto.pack([tid, chunk_index, sums]), *views], deadline,
                                        copy=False, track=ring)
            for _ in chunk:  # a ring slot is refilled only once ZMQ has let go of it
                if ring:
                    self._pool.hold(index, lambda t=tracker: self._wait_tracker(t, deadline))
                index += 1

    def _wait_tracker(self, tracker: zmq.MessageTracker | None, deadline: float) -> None:
        if tracker is None:
            return
        try:
            tracker.wait(max(0.0, deadline - time.monotonic()))
        except zmq.NotDone:
            raise TransferTimeout(f"peer {self.endpoint} stopped reading mid-transfer") from None

    def _send_frames(self, frames: list[Any], deadline: float, copy: bool = True,
                     track: bool = False) -> zmq.MessageTracker | None:
        assert self._sock is not None
        self._sock.setsockopt(zmq.SNDTIMEO, max(1, int((deadline - time.monotonic()) * 1000)))
        try:
            return self._sock.send_multipart(frames, copy=copy, track=track)
        except zmq.Again:
            raise TransferTimeout(f"peer {self.endpoint} not reachable or not reading "
                                  f"(send blocked until the deadline)") from None

    def _drain_monitor(self) -> None:
        assert self._monitor is not None
        while self._monitor.poll(0):
            recv_monitor_message(self._monitor)

    def _check_replies(self, tid: int) -> None:
        """Non-blocking: raise the receiver's error if it already refused this transfer."""
        self._poll_reply(tid, 0.0, want=None)

    def _wait_reply(self, tid: int, deadline: float, want: bytes) -> Any:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransferTimeout(f"no {'ack' if want == proto.ACK else 'reply'} from {self.endpoint} "
                                      "before the deadline (the peer may be gone)")
            body = self._poll_reply(tid, remaining, want)
            if body is not None:
                return body

    def _poll_reply(self, tid: int, timeout_s: float, want: bytes | None) -> Any:
        """Wait up to `timeout_s` for one event; return the body of a `want` reply for `tid`."""
        assert self._sock is not None and self._monitor is not None
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        ready = dict(poller.poll(int(timeout_s * 1000)))
        if self._monitor in ready:
            event = recv_monitor_message(self._monitor)
            if event["event"] == zmq.EVENT_DISCONNECTED:
                raise PeerLost(f"connection to {self.endpoint} dropped mid-transfer")
        if self._sock not in ready:
            return None
        kind, rtid, body = proto.parse_reply(self._sock.recv_multipart())
        if rtid is not None and rtid != tid:
            return None  # a late reply to an earlier transfer
        if kind == proto.ERROR:
            raise TransferError.from_wire(body)
        return body if kind == want else None
