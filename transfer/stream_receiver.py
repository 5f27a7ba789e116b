"""StreamInbox: the receiver's end of the stream payload path (protocol: zmq_protocol.py).

Owned by a ZmqKvReceiver and called only from its polling thread, under its lock. It owns a
listening socket on the ZMQ endpoint's host (TCP port 0) or next to its ipc path (Unix socket
`<path>.data`, removed on close) and the data connections accepted there. A connection counts
only once it presented a token that a ZMQ peer sent in a STREAM message (`hello`) within
`token_timeout_s`; otherwise it is closed. Paired connections are read without blocking:
`service` reads as much as is available (at most `pump_bytes` per connection and round) and
returns to the caller's loop, so several peers interleave and every deadline keeps working.

Per transfer: the receiver calls `begin(inf)` once the stream header is validated (the
destination iovec is planned then: stream_plan.py), and `end(inf, ok)` when the transfer
leaves its in-flight table. A prefix that arrives before its header waits for it (at most
`idle_timeout_s`). Errors inside a transfer (EOF mid-payload, bad byte count, checksum) go
through the receiver's `run_step` (its `_guard`), which fails the transfer with a typed error
and an ERROR reply; errors outside one (garbage prefix, unknown transfer) are `report`ed.
Any failure closes the connection that carried (or would carry) the payload; the sender sets
up a new one for its next transfer.

Ownership: bytes are read only into the planned segments: the reservation's blocks, scratch
the plan owns, and each connection's staging memory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from transfer import zmq_protocol as proto
from transfer.cache import PagedKvCache
from transfer.errors import (
    ChecksumMismatch,
    MalformedFrame,
    PeerLost,
    TransferError,
    TransportUnavailable,
)
from transfer.iov import AGAIN, IoVec, hash_segments, segments
from transfer.stream_plan import BufferPlan, PartAddresses, plan_buffer

log = logging.getLogger(__name__)

RunStep = Callable[[Any, Callable[[], None]], None]  # (inflight, step): the receiver's _guard
Report = Callable[[bytes, TransferError, "int | None"], None]  # (peer, error, transfer id)


@dataclass(frozen=True)
class StreamReceiverOptions:
    is_enabled: bool = True  # accept stream payloads (data connections); False: ZMQ frames only
    token_timeout_s: float = 5.0  # an accepted connection must present its token by then
    max_connections: int = 256  # data connections, paired or not
    rcvbuf: int = 0  # SO_RCVBUF of data connections (0: kernel autotuning)
    pump_bytes: int = 16 << 20  # read from one connection per poll round (bounds lock hold time)

    def __post_init__(self) -> None:
        if self.token_timeout_s <= 0 or self.max_connections < 1 or self.rcvbuf < 0 or self.pump_bytes < 1:
            raise ValueError("StreamReceiverOptions: timeouts and sizes must be positive")


class _Job:
    """One stream transfer on the receiver: where its bytes go and how far it got. Buffers are
    planned one at a time as reading reaches them (stream_plan.py); a staged buffer is booked
    before the next one is read, so one staging area per connection suffices."""

    def __init__(self, inf: Any, addresses: PartAddresses | None):
        h = inf.header
        self.inf, self.writer, self.addresses = inf, inf.writer, addresses
        self.sizes = h.buffer_sizes
        self.payload_bytes = h.payload_bytes
        self.trailer = np.zeros(len(h.buffer_sizes), dtype="<u8") if h.checksum is not None else None
        self.conn: _Conn | None = None
        self.index = 0  # buffer being read (len(sizes): the trailer)
        self.done_bytes = 0  # of completed buffers
        self.cur: IoVec | None = None
        self.plan: BufferPlan | None = None
        self.held: BufferPlan | None = None  # the last buffer, booked once the trailer is in
        self.hashes: list[int] = []
        self.last_read, self.blocked = 0, False

    def staging(self, size: int) -> torch.Tensor:
        """The connection's staging memory, grown to `size` bytes (kept for its next transfers)."""
        conn = self.conn
        assert conn is not None
        if conn.staging is None or conn.staging.numel() < size:
            conn.staging = torch.empty(max(size, 1), dtype=torch.uint8)
        return conn.staging

    @property
    def progress(self) -> str:
        done = self.done_bytes + (self.cur.done if self.cur is not None and self.index < len(self.sizes) else 0)
        return f"{done} of {self.payload_bytes} payload bytes"

    def pump(self, fd: int, budget: int) -> None:
        """Read what is available (up to about `budget` bytes); book every complete buffer."""
        self.last_read, self.blocked = 0, False
        while self.last_read < budget:
            if self.cur is None and not self._next():
                return  # everything is in
            assert self.cur is not None
            n = self.cur.recv(fd)
            if n == AGAIN:
                self.blocked = True
                return
            if n == 0:
                raise PeerLost(f"data connection closed mid-payload ({self.progress})")
            self.last_read += n
            if self.cur.is_done:
                self._complete()

    def _next(self) -> bool:
        n = len(self.sizes)
        if self.index < n:
            self.plan = plan_buffer(self.writer, self.index, self.addresses, self.staging)
            self.cur = IoVec(self.plan.segs)
        elif self.index == n and self.trailer is not None:
            self.cur = IoVec(segments(np.array([self.trailer.ctypes.data], dtype=np.uint64), self.trailer.nbytes))
        else:
            return False
        if self.cur.is_done:  # an empty buffer
            self._complete()
            return self._next() if self.index <= n else False
        return True

    def _complete(self) -> None:
        n, i, plan = len(self.sizes), self.index, self.plan
        self.cur, self.plan = None, None
        self.index += 1
        if i == n:  # the trailer
            self._verify()
            assert self.held is not None
            self._book(n - 1, self.held)
            return
        assert plan is not None
        self.done_bytes += self.sizes[i]
        if self.trailer is not None:
            self.hashes.append(hash_segments(plan.segs))
            if i == n - 1:
                self.held = plan
                return
        self._book(i, plan)

    def _book(self, i: int, plan: BufferPlan) -> None:
        if plan.is_staged:
            self.writer.accept(i, self.staging(self.sizes[i])[:self.sizes[i]], verify=False)
        else:
            self.writer.placed(i, plan.partials)

    def _verify(self) -> None:
        assert self.trailer is not None
        for i, (got, sent) in enumerate(zip(self.hashes, self.trailer.tolist(), strict=True)):
            if got != sent:
                raise ChecksumMismatch(f"buffer {i}: checksum {got:#x} != sent {sent:#x}")


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    fd: int
    deadline: float  # for its token (unpaired) or for the header of a waiting prefix
    peer: bytes | None = None
    issued: float = 0.0  # when its token was handed out (STREAM message handled)
    head: bytearray = field(default_factory=lambda: bytearray(proto.STREAM_PREFIX.size))
    got: int = 0
    waiting: tuple[int, int] | None = None  # (transfer id, payload bytes) of a prefix without header
    job: _Job | None = None
    staging: torch.Tensor | None = None
    is_open: bool = True


class StreamInbox:
    def __init__(self, endpoint: str, options: StreamReceiverOptions, cache: PagedKvCache, *,
                 idle_timeout_s: float, run_step: RunStep, report: Report):
        self.options, self._idle_s = options, idle_timeout_s
        self._run_step, self._report = run_step, report
        self._listener, self.address, self._path = _listen(endpoint)
        self._addresses = PartAddresses(cache) if cache.device.type == "cpu" else None
        self._conns: dict[int, _Conn] = {}
        self._by_peer: dict[bytes, _Conn] = {}
        self._tokens: dict[bytes, tuple[bytes, float, float]] = {}  # token -> (peer, expiry, issued)
        self._refused: dict[bytes, float] = {}  # peer -> when a header of it was last refused
        self._lost: dict[bytes, TransferError] = {}  # peer -> why its connection closed (no new one yet)
        self._jobs: dict[tuple[bytes, int], _Job] = {}

    # ---- called by the receiver -------------------------------------------------------------------
    def fds(self) -> tuple[int, ...]:
        """File descriptors to poll for reading (a prefix waiting for its header is left out)."""
        return (self._listener.fileno(), *(fd for fd, c in self._conns.items() if c.waiting is None))

    def hello(self, peer: bytes, rest: list[Any]) -> list[bytes]:
        token = proto.stream_hello_token(rest)
        for t in [t for t, (p, _, _) in self._tokens.items() if p == peer]:
            del self._tokens[t]
        while len(self._tokens) >= self.options.max_connections:
            del self._tokens[next(iter(self._tokens))]
        now = time.monotonic()
        self._tokens[token] = (peer, now + 2 * self.options.token_timeout_s, now)
        self._lost.pop(peer, None)  # a new connection is on its way
        return [proto.STREAM_LISTEN, proto.pack(self.address)]

    def begin(self, inf: Any) -> None:
        """A stream transfer's header was accepted: plan where its bytes go."""
        key = (inf.peer, inf.header.transfer_id)

        def plan() -> None:
            self._jobs[key] = _Job(inf, self._addresses)

        self._run_step(inf, plan)
        conn = self._by_peer.get(inf.peer)
        lost = self._lost.get(inf.peer)
        if key not in self._jobs:  # planning failed: the transfer failed with it
            self.drop_peer(inf.peer)
        elif conn is None and lost is not None:  # its connection is gone already: nothing will come
            self._run_step(inf, lambda: _raise(type(lost)(lost.message)))
        elif conn is not None and conn.waiting and conn.waiting[0] == key[1]:
            self._attach(conn, self._jobs[key], conn.waiting[1])

    def end(self, inf: Any, ok: bool) -> None:
        """The transfer left the receiver's in-flight table (written, or failed)."""
        job = self._jobs.pop((inf.peer, inf.header.transfer_id), None)
        if job is None:
            return
        conn = job.conn if job.conn is not None else self._by_peer.get(inf.peer)
        if conn is not None and conn.job is job:
            conn.job = None
        if not ok and conn is not None:  # its payload may still be on the wire
            self._close(conn, None, fail_pending=True)

    def drop_peer(self, peer: bytes) -> None:
        """A header from `peer` was refused: its payload (if any) must not be read. Connections
        set up before now (even those not paired yet) are closed at their next prefix."""
        self._refused.pop(peer, None)
        self._refused[peer] = time.monotonic()
        while len(self._refused) > self.options.max_connections:
            del self._refused[next(iter(self._refused))]
        conn = self._by_peer.get(peer)
        if conn is not None:
            self._close(conn, PeerLost("the data connection was closed: a header was refused"), fail_pending=True)

    def progress(self, inf: Any) -> str | None:
        job = self._jobs.get((inf.peer, inf.header.transfer_id))
        return None if job is None else job.progress

    def service(self, ready: Collection[int], now: float) -> None:
        if self._listener.fileno() in ready:
            self._accept(now)
        for fd in ready:
            conn = self._conns.get(fd)
            if conn is not None:
                self._pump(conn)
        self._expire(now)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            conn.is_open = False
            conn.sock.close()
        self._conns.clear()
        self._by_peer.clear()
        self._jobs.clear()
        self._listener.close()
        if self._path is not None and not self._path.startswith("\0"):
            with contextlib.suppress(OSError):
                os.unlink(self._path)

    # ---- connections --------------------------------------------------------------------------------
    def _accept(self, now: float) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of descriptors, ...: the sender times out and retries
                log.warning("KV receiver: cannot accept a data connection: %s", e)
                return
            if len(self._conns) >= self.options.max_connections:
                sock.close()
                continue
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.options.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.options.rcvbuf)
            self._conns[sock.fileno()] = _Conn(sock, sock.fileno(), now + self.options.token_timeout_s)

    def _pump(self, conn: _Conn) -> None:
        budget = self.options.pump_bytes
        while conn.is_open:
            if conn.peer is None:
                if not self._read_head(conn, proto.STREAM_TOKEN_BYTES):
                    return
                self._pair(conn)
            elif conn.job is None:
                if conn.waiting is not None or not self._read_head(conn, proto.STREAM_PREFIX.size):
                    return
                self._on_prefix(conn)
            else:
                job = conn.job
                self._run_step(job.inf, lambda job=job, budget=budget: job.pump(conn.fd, budget))
                job.inf.idle_deadline = time.monotonic() + self._idle_s
                budget -= job.last_read
                if job.blocked or budget <= 0:
                    return

    def _read_head(self, conn: _Conn, size: int) -> bool:
        """Read up to `size` bytes of a token or prefix; True once all of them are in."""
        try:
            n = conn.sock.recv_into(memoryview(conn.head)[conn.got:size])
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            self._close(conn, PeerLost(f"data connection failed: {e}"), fail_pending=True)
            return False
        if n == 0:
            self._close(conn, PeerLost("data connection closed by the sender"), fail_pending=True)
            return False
        conn.got += n
        if conn.got < size:
            return False
        conn.got = 0
        return True

    def _pair(self, conn: _Conn) -> None:
        token = bytes(conn.head[:proto.STREAM_TOKEN_BYTES])
        peer, expiry, issued = self._tokens.pop(token, (None, 0.0, 0.0))
        if peer is None or time.monotonic() > expiry:
            self._close(conn, None, fail_pending=False)  # not ours: say nothing
            return
        old = self._by_peer.get(peer)
        if old is not None:
            self._close(old, PeerLost("the sender opened a new data connection"), fail_pending=False)
        conn.peer, conn.issued = peer, issued
        self._by_peer[peer] = conn
        self._lost.pop(peer, None)

    def _on_prefix(self, conn: _Conn) -> None:
        assert conn.peer is not None
        try:
            tid, nbytes = proto.parse_stream_prefix(conn.head)
        except MalformedFrame as e:
            self._report(conn.peer, e, None)
            self._close(conn, e, fail_pending=True)
            return
        job = self._jobs.get((conn.peer, tid))
        if job is None and self._refused.get(conn.peer, -1.0) >= conn.issued:
            self._close(conn, None, fail_pending=False)  # the payload of a refused header
        elif job is None:  # its header is not handled yet
            conn.waiting, conn.deadline = (tid, nbytes), time.monotonic() + self._idle_s
        else:
            self._attach(conn, job, nbytes)

    def _attach(self, conn: _Conn, job: _Job, nbytes: int) -> None:
        conn.waiting = None
        if job.conn is not None:
            err = MalformedFrame(f"a second payload for transfer {job.inf.header.transfer_id}")
            self._report(conn.peer or b"", err, job.inf.header.transfer_id)
            self._close(conn, err, fail_pending=False)
            return
        conn.job, job.conn = job, conn

        def start() -> None:
            if nbytes != job.payload_bytes:
                raise MalformedFrame(f"stream payload of {nbytes} bytes; the header says {job.payload_bytes}")

        self._run_step(job.inf, start)

    def _close(self, conn: _Conn, err: TransferError | None, *, fail_pending: bool) -> None:
        """Close a data connection; fail the transfer reading from it and, when it was its peer's
        current connection and `fail_pending`, the peer's transfers still waiting for one."""
        if not conn.is_open:
            return
        conn.is_open = False
        self._conns.pop(conn.fd, None)
        was_current = conn.peer is not None and self._by_peer.get(conn.peer) is conn
        failure = err if err is not None else PeerLost("the data connection was closed")
        if was_current:
            del self._by_peer[conn.peer]  # type: ignore[arg-type]
            self._lost[conn.peer] = failure  # type: ignore[index]
            while len(self._lost) > self.options.max_connections:
                del self._lost[next(iter(self._lost))]
        conn.sock.close()
        doomed = [conn.job] if conn.job is not None else []
        if fail_pending and was_current:
            doomed += [j for (p, _), j in self._jobs.items() if p == conn.peer and j.conn is None]
        conn.job = None
        for job in doomed:
            self._run_step(job.inf, lambda f=failure: _raise(type(f)(f.message)))

    def _expire(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.peer is None and now > conn.deadline:
                self._close(conn, None, fail_pending=False)
            elif conn.waiting is not None and conn.is_open:
                job = self._jobs.get((conn.peer, conn.waiting[0]))  # type: ignore[arg-type]
                if job is not None:
                    self._attach(conn, job, conn.waiting[1])
                elif now > conn.deadline:
                    err = MalformedFrame(f"stream payload for unknown transfer {conn.waiting[0]}")
                    self._report(conn.peer or b"", err, conn.waiting[0])
                    self._close(conn, err, fail_pending=True)
        for token in [t for t, (_, expiry, _) in self._tokens.items() if now > expiry]:
            del self._tokens[token]


def _raise(err: TransferError) -> None:
    raise err


def _listen(endpoint: str) -> tuple[socket.socket, dict[str, Any], str | None]:
    """A listening socket next to a bound ZMQ endpoint, the LISTEN reply body, the Unix path."""
    scheme, _, rest = endpoint.partition("://")
    try:
        if scheme == "tcp":
            host = rest.rpartition(":")[0].strip("[]")
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            body: dict[str, Any] = {"port": sock.getsockname()[1]}
            path = None
        elif scheme == "ipc":
            body = {"path": proto.stream_ipc_path(rest)}
            path = proto.unix_address(body["path"])
            if not path.startswith("\0") and os.path.exists(path):
                os.unlink(path)  # a stale socket file (ZMQ does the same for its ipc path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
        else:
            raise TransportUnavailable(f"stream payloads need a tcp:// or ipc:// endpoint, not {endpoint}")
        sock.listen(64)
        sock.setblocking(False)
    except OSError as e:
        raise TransportUnavailable(f"cannot listen for stream payloads next to {endpoint}: {e}") from None
    return sock, body, path
