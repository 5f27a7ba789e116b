"""StreamSender: the stream payload path on the prefill side (a `PayloadSender`,
payload/send.py; protocol: wire/framing.py).

Owned by one ZmqKvSender and used from its thread. `connect` sets up the data connection (a
STREAM message on the pair's ZMQ connection, the LISTEN reply, connect, write the token) when
there is none; a receiver that takes no stream payloads answers TransportUnavailable, and the
sender falls back to frames for good. `send` sends the HEADER on ZMQ, then writes PREFIX, the
buffers' bytes and, with checksums, the trailer on the data connection. Buffers that
`PackedKv.segments` describes (CPU caches) are written with writev straight from the source
blocks; the others (scales, GPU caches) are filled first and written as one segment each.
Checksums of in-place buffers are computed while the socket is full.

While the socket is full it waits on the data connection and on the ZMQ connection together
(`PeerChannel.wait_writable`), so an ERROR from the receiver ends the transfer at once. If the
receiver closes the data connection (it does so whenever it refuses or fails a transfer) the
sender waits a moment for the ERROR that says why, else raises PeerLost. A failed transfer
drops the data connection (`finish`); the next one sets up a new one.

Ownership: the source blocks must stay untouched until `send` returns or raises (the kernel
copies from them during the writev calls; nothing is read from them afterwards).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import xxhash

from transfer.convert.cache import PagedKvCache
from transfer.convert.iov import AGAIN, IoVec, coalesce, hash_segments, segments
from transfer.convert.pack import PackedKv, PackOptions, StagingPool, pack_kv
from transfer.payload.send import PayloadSender, PeerChannel
from transfer.wire import framing as proto
from transfer.wire.errors import MalformedFrame, PeerLost, TransferTimeout

_ERROR_GRACE_S = 2.0  # after the receiver closed the data connection: wait this long for its ERROR


def stream_capable(endpoint: str) -> bool:
    return endpoint.startswith(("tcp://", "ipc://"))


class StreamSender(PayloadSender):
    name = "stream"
    falls_back_to_frames = True

    def __init__(self, endpoint: str, options: PackOptions = PackOptions(), *,
                 checksum: bool = False, chunk_bytes: int = 8 << 20, sndbuf: int = 0,
                 staging_bytes: int = 1 << 30, staging_slots: int = 8):
        if not stream_capable(endpoint):
            raise ValueError(f"stream payloads need a tcp:// or ipc:// endpoint, not {endpoint}")
        self.endpoint, self.sndbuf = endpoint, sndbuf
        # in-place segments replace views; big buffers, small header
        self.options = replace(options, allow_views=False, chunk_bytes=chunk_bytes)
        self.checksum = checksum
        self._staging = (staging_bytes, staging_slots)
        self.pool = StagingPool(staging_bytes, ring_slots=staging_slots)
        self._sock: socket.socket | None = None
        # host copies of device buffers: buffer i+1 is copied while buffer i is on the wire
        self._host_ring = StagingPool(staging_bytes, ring_slots=2, pin_memory=True)

    @property
    def is_connected(self) -> bool:
        return self._sock is not None

    def drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def finish(self, ok: bool) -> None:
        self.pool.release_all()
        if not ok:
            self.drop()  # the receiver closes its end of a failed stream transfer too

    def reset(self) -> None:
        self.drop()
        self.pool = StagingPool(self._staging[0], ring_slots=self._staging[1])

    def close(self) -> None:
        self.drop()

    # ---- set-up ----------------------------------------------------------------------------------
    def connect(self, channel: PeerChannel, transfer_id: int, deadline: float) -> None:
        """Connect the data connection unless there is one (raises the receiver's error, e.g.
        TransportUnavailable when it takes no stream payloads)."""
        if self._sock is not None:
            return
        token = os.urandom(proto.STREAM_TOKEN_BYTES)
        channel.send_frames([proto.STREAM_HELLO, proto.pack([token])], deadline)
        body = channel.wait_reply(transfer_id, deadline, want=proto.STREAM_LISTEN)
        family, address = self._address(body)
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(address)
            sock.sendall(token)
        except OSError as e:
            sock.close()
            if isinstance(e, TimeoutError):
                raise TransferTimeout(f"data connection to {self.endpoint} not set up before "
                                      "the deadline") from None
            raise PeerLost(f"cannot open the data connection to {self.endpoint} ({address!r}): "
                           f"{e}") from None
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.sndbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sndbuf)
        self._sock = sock

    def _address(self, body: Any) -> tuple[int, Any]:
        scheme, _, rest = self.endpoint.partition("://")
        if scheme == "tcp":
            port = body.get("port")
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise MalformedFrame("listen reply without a valid port")
            host = rest.rpartition(":")[0].strip("[]")
            return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, port)
        path = proto.stream_ipc_path(rest)
        if body.get("path") != path:  # the sender connects only where the convention says
            raise MalformedFrame(f"listen reply names {body.get('path')!r:.200}, "
                                 f"expected {path!r}")
        return socket.AF_UNIX, proto.unix_address(path)

    # ---- payload ---------------------------------------------------------------------------------
    def pack(self, cache: PagedKvCache, block_table: Sequence[int], token_start: int,
             token_end: int, **fields: Any) -> PackedKv:
        return pack_kv(cache, block_table, token_start, token_end, options=self.options,
                       checksum="xxh3_64" if self.checksum else None, transport="stream",
                       pool=self.pool, **fields)

    def send(self, channel: PeerChannel, packed: PackedKv, deadline: float) -> Any:
        assert self._sock is not None
        channel.send_frames(proto.header_frames(packed.header), deadline)
        h = packed.header
        out = _Writer(self._sock.fileno(), channel, h.transfer_id, deadline)
        sums: list[int | None] = [None] * len(h.buffer_sizes)
        lazy: list[tuple[int, np.ndarray]] = []  # in-place buffers to hash while the socket is full
        idle = _hash_jobs(lazy, sums) if h.checksum else None
        self.fill_s = 0.0
        on_device = packed.cache is not None and packed.cache.device.type != "cpu"
        try:
            prefix = proto.stream_prefix(h.transfer_id, h.payload_bytes)
            out.push(np.frombuffer(prefix, dtype=np.uint8))
            for i in range(len(h.buffer_sizes)):
                segs = packed.segments(i)
                if segs is not None:  # the source blocks themselves
                    segs = coalesce(segs)
                    lazy.append((i, segs))
                    out.push_segments(segs, idle)
                    continue
                t0 = time.monotonic()
                if on_device:
                    # gather on the device, then copy into the pinned slot no queued write
                    # reads (a fresh pageable .cpu() was 220 of a 370 ms stream on an H100:
                    # bench/results/crossnode_layerwise_phases_h100_2026-12-06.md)
                    filled = packed.buffer(i)
                    out.flush(idle, keep=self._host_ring.ring_slots - 1)
                    host = self._host_ring.get(i, filled.numel(), torch.device("cpu"))
                    host.copy_(filled)
                else:
                    out.flush(idle)  # filled buffers may share memory (StagingPool)
                    host = packed.buffer(i)
                self.fill_s += time.monotonic() - t0
                if h.checksum:
                    sums[i] = xxhash.xxh3_64_intdigest(host.numpy())
                out.push(host)
            if h.checksum:
                out.flush(idle)
                for i, segs in lazy:
                    sums[i] = hash_segments(segs)
                out.push(np.array(sums, dtype="<u8"))
            out.flush(None)
        except OSError as e:  # the receiver closed the data connection: it says why on ZMQ
            self.drop()
            grace = min(deadline, time.monotonic() + _ERROR_GRACE_S)
            with contextlib.suppress(TransferTimeout):
                channel.wait_reply(h.transfer_id, grace, want=proto.ACK)
            raise PeerLost(f"data connection to {self.endpoint} failed mid-payload: {e}") from None
        return None


def _hash_jobs(lazy: list[tuple[int, np.ndarray]], sums: list[int | None]) -> Iterator[None]:
    """Hash pending in-place buffers one by one (a generator: one step per idle moment)."""
    while True:
        if lazy:
            i, segs = lazy.pop(0)
            sums[i] = hash_segments(segs)
        yield


class _Writer:
    """Queued non-blocking writes with a deadline, watching the ZMQ socket while it waits.
    `push*` writes what the socket takes now and queues the rest; `flush` writes everything."""

    def __init__(self, fd: int, channel: PeerChannel, tid: int, deadline: float):
        self.fd, self.channel, self.tid, self.deadline = fd, channel, tid, deadline
        self._queue: deque[tuple[IoVec, Any]] = deque()  # (segments, memory they point into)

    def push(self, buf: np.ndarray | torch.Tensor) -> None:
        """Queue a contiguous buffer (kept alive until written)."""
        nbytes = buf.nbytes if isinstance(buf, np.ndarray) else buf.numel() * buf.element_size()
        addr = buf.ctypes.data if isinstance(buf, np.ndarray) else buf.data_ptr()
        self._queue.append((IoVec(segments(np.array([addr], dtype=np.uint64), nbytes)), buf))
        self._write(wait=False, idle=None)

    def push_segments(self, segs: np.ndarray, idle: Iterator[None] | None) -> None:
        self._queue.append((IoVec(segs), None))
        self._write(wait=False, idle=idle)

    def flush(self, idle: Iterator[None] | None, keep: int = 0) -> None:
        """Write until at most `keep` buffers are queued (the newest)."""
        self._write(wait=True, idle=idle, keep=keep)

    def _write(self, wait: bool, idle: Iterator[None] | None, keep: int = 0) -> None:
        while len(self._queue) > keep:
            iov = self._queue[0][0]
            if iov.is_done or iov.send(self.fd) != AGAIN:
                if iov.is_done:
                    self._queue.popleft()
                continue
            if not wait:
                return
            if idle is not None:
                next(idle)  # hash a buffer while the socket drains (a no-op once all are done)
                if iov.send(self.fd) != AGAIN:
                    continue
            self._wait()

    def _wait(self) -> None:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TransferTimeout(f"peer {self.channel.endpoint} stopped reading the payload "
                                  "before the deadline")
        # raises the receiver's error, or PeerLost
        self.channel.wait_writable(self.fd, self.tid, min(remaining, 1.0))
