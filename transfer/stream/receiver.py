"""StreamReceiver: the stream payload path on the decode side (a `PayloadReceiver`,
payload/receive.py; protocol: wire/framing.py).

Owned by a ZmqKvReceiver and called from its polling thread, under its lock. It owns a
listening socket on the ZMQ endpoint's host (TCP port 0) or next to its ipc path (Unix socket
`<path>.data`, removed on close) and the data connections accepted there. A connection counts
only once it presented a token that a ZMQ peer sent in a STREAM message (answered with LISTEN)
within `token_timeout_s`; otherwise it is closed and counted (`desk.refused`, "unauthenticated").
This is the data connection's authentication: the token is 16 random bytes, single-use, valid
for `2 * token_timeout_s`, and reaches the sender only over the pair's ZMQ connection, which is
CURVE-authenticated and encrypted in a secured deployment; so only a peer that holds the
deployment's secret can have a connection paired. The payload bytes that follow are neither
encrypted nor MACed (speed: they go straight from and into cache blocks); an on-path attacker
on the network between the two workers can read or alter them (--checksum detects accidents,
not attacks). Paired connections are read without
blocking: `service` reads as much as is available (at most `pump_bytes` per connection and
round) and returns to the receiver's loop, so several peers interleave and every deadline
keeps working.

Per transfer: `begin(transfer)` once the stream header is accepted (a StreamJob: stream/job.py,
which plans each buffer's iovec as reading reaches it: stream/plan.py), and `end(transfer, ok)`
when the transfer leaves the in-flight table. Connections whose peer has a transfer in flight
are read every round, readable or not (saves a poll). A prefix that arrives before its header
waits for it (at most the idle timeout). Errors inside a transfer (EOF mid-payload, bad byte
count, checksum) go through `desk.run_step`, which fails the transfer with a typed error and
an ERROR reply; errors outside one (garbage prefix, unknown transfer) are `desk.report`ed.
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
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from transfer.convert.cache import PagedKvCache
from transfer.payload.receive import InboundTransfer, PayloadReceiver
from transfer.stream.job import StreamJob
from transfer.stream.plan import PartAddresses
from transfer.wire import framing as proto
from transfer.wire.errors import (
    MalformedFrame,
    PeerLost,
    TransferError,
    TransportUnavailable,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamReceiverOptions:
    is_enabled: bool = True  # accept stream payloads (data connections); False: ZMQ frames only
    token_timeout_s: float = 5.0  # an accepted connection must present its token by then
    max_connections: int = 256  # data connections, paired or not
    rcvbuf: int = 0  # SO_RCVBUF of data connections (0: kernel autotuning)
    pump_bytes: int = 16 << 20  # read from one connection per poll round (bounds lock hold time)

    def __post_init__(self) -> None:
        if self.token_timeout_s <= 0 or self.max_connections < 1 or self.rcvbuf < 0 \
                or self.pump_bytes < 1:
            raise ValueError("StreamReceiverOptions: timeouts and sizes must be positive")


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    fd: int
    deadline: float  # for its token (unpaired) or for the header of a waiting prefix
    peer: bytes | None = None
    issued: float = 0.0  # when its token was handed out (STREAM message handled)
    head: bytearray = field(default_factory=lambda: bytearray(proto.STREAM_PREFIX.size))
    got: int = 0
    waiting: tuple[int, int] | None = None  # (transfer id, payload bytes): prefix, no header yet
    job: StreamJob | None = None
    staging: torch.Tensor | None = None
    is_open: bool = True


class StreamReceiver(PayloadReceiver):
    transport = "stream"
    kinds = (proto.STREAM_HELLO,)

    def __init__(self, endpoint: str, options: StreamReceiverOptions, cache: PagedKvCache):
        """Listens next to `endpoint`; TransportUnavailable if it cannot."""
        self.options = options
        self._listener, self.address, self._path = _listen(endpoint)
        self._addresses = PartAddresses(cache) if cache.device.type == "cpu" else None
        self._conns: dict[int, _Conn] = {}
        self._by_peer: dict[bytes, _Conn] = {}
        # token -> (peer, expiry, issued)
        self._tokens: dict[bytes, tuple[bytes, float, float]] = {}
        self._refused: dict[bytes, float] = {}  # peer -> when a header of it was last refused
        # peer -> why its connection closed (no new one yet)
        self._lost: dict[bytes, TransferError] = {}
        self._jobs: dict[tuple[bytes, int], StreamJob] = {}

    # ---- PayloadReceiver -------------------------------------------------------------------------
    def fds(self) -> tuple[int, ...]:
        """File descriptors to poll for reading (a prefix waiting for its header is left out)."""
        conns = (fd for fd, c in self._conns.items() if c.waiting is None)
        return (self._listener.fileno(), *conns)

    def on_message(self, peer: bytes, kind: bytes, rest: list[Any]) -> None:
        """STREAM: a token for the data connection `peer` opens next; answered with LISTEN."""
        token = proto.stream_hello_token([f.buffer for f in rest])
        for t in [t for t, (p, _, _) in self._tokens.items() if p == peer]:
            del self._tokens[t]
        while len(self._tokens) >= self.options.max_connections:
            del self._tokens[next(iter(self._tokens))]
        now = time.monotonic()
        self._tokens[token] = (peer, now + 2 * self.options.token_timeout_s, now)
        self._lost.pop(peer, None)  # a new connection is on its way
        self.desk.reply(peer, [proto.STREAM_LISTEN, proto.pack(self.address)])

    def begin(self, transfer: InboundTransfer) -> None:
        """A stream transfer's header was accepted: plan where its bytes go."""
        key, peer = transfer.key, transfer.peer

        def plan() -> None:
            self._jobs[key] = StreamJob(transfer, self._addresses)

        self.desk.run_step(transfer, plan)
        conn = self._by_peer.get(peer)
        lost = self._lost.get(peer)
        if key not in self._jobs:  # planning failed: the transfer failed with it
            self.refuse(peer)
        elif conn is None and lost is not None:  # its connection is gone already: nothing comes
            self.desk.run_step(transfer, lambda: _raise(_fresh(lost)))
        elif conn is not None and conn.waiting and conn.waiting[0] == key[1]:
            self._attach(conn, self._jobs[key], conn.waiting[1])

    def end(self, transfer: InboundTransfer, ok: bool) -> None:
        """The transfer left the receiver's in-flight table (written, or failed)."""
        job = self._jobs.pop(transfer.key, None)
        if job is None:
            return
        conn = job.conn if job.conn is not None else self._by_peer.get(transfer.peer)
        if conn is not None and conn.job is job:
            conn.job = None
        if not ok and conn is not None:  # its payload may still be on the wire
            self._close(conn, None, fail_pending=True)

    def refuse(self, peer: bytes) -> None:
        """A header from `peer` was refused: its payload (if any) must not be read. Connections
        set up before now (even those not paired yet) are closed at their next prefix."""
        self._refused.pop(peer, None)
        self._refused[peer] = time.monotonic()
        while len(self._refused) > self.options.max_connections:
            del self._refused[next(iter(self._refused))]
        conn = self._by_peer.get(peer)
        if conn is not None:
            err = PeerLost("the data connection was closed: a header was refused")
            self._close(conn, err, fail_pending=True)

    def progress(self, transfer: InboundTransfer) -> str:
        job = self._jobs.get(transfer.key)
        return "no data connection yet" if job is None else job.progress

    def service(self, ready: Collection[int], now: float) -> None:
        if self._listener.fileno() in ready:
            self._accept(now)
        busy = {peer for peer, _ in self._jobs}  # read these before poll says so (saves a round)
        for conn in list(self._conns.values()):
            if conn.fd in ready or (conn.peer in busy and conn.waiting is None):
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

    # ---- connections ---------------------------------------------------------------------------
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
                self.desk.refused("kv_data", "too_many_connections")
                continue
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.options.rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.options.rcvbuf)
            deadline = now + self.options.token_timeout_s
            self._conns[sock.fileno()] = _Conn(sock, sock.fileno(), deadline)

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
                self.desk.run_step(job.transfer,
                                   lambda job=job, budget=budget: job.pump(conn.fd, budget))
                if job.last_read:
                    job.transfer.idle_deadline = time.monotonic() + self.desk.idle_timeout_s
                budget -= job.last_read
                if job.blocked or budget <= 0 or not job.last_read:
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
            if conn.peer is None:  # closed before it presented a token
                self.desk.refused("kv_data", "unauthenticated")
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
            self.desk.refused("kv_data", "unauthenticated")
            return
        old = self._by_peer.get(peer)
        if old is not None:
            err = PeerLost("the sender opened a new data connection")
            self._close(old, err, fail_pending=False)
        conn.peer, conn.issued = peer, issued
        self._by_peer[peer] = conn
        self._lost.pop(peer, None)

    def _on_prefix(self, conn: _Conn) -> None:
        assert conn.peer is not None
        try:
            tid, nbytes = proto.parse_stream_prefix(conn.head)
        except MalformedFrame as e:
            self.desk.report(conn.peer, e, None)
            self._close(conn, e, fail_pending=True)
            return
        job = self._jobs.get((conn.peer, tid))
        if job is None and self._refused.get(conn.peer, -1.0) >= conn.issued:
            self._close(conn, None, fail_pending=False)  # the payload of a refused header
        elif job is None:  # its header is not handled yet
            conn.waiting, conn.deadline = (tid, nbytes), time.monotonic() + self.desk.idle_timeout_s
        else:
            self._attach(conn, job, nbytes)

    def _attach(self, conn: _Conn, job: StreamJob, nbytes: int) -> None:
        conn.waiting = None
        if job.conn is not None:
            err = MalformedFrame(f"a second payload for transfer {job.transfer.header.transfer_id}")
            self.desk.report(conn.peer or b"", err, job.transfer.header.transfer_id)
            self._close(conn, err, fail_pending=False)
            return
        conn.job, job.conn = job, conn

        def start() -> None:
            if nbytes != job.payload_bytes:
                raise MalformedFrame(f"stream payload of {nbytes} bytes; the header says "
                                     f"{job.payload_bytes}")

        self.desk.run_step(job.transfer, start)

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
            self.desk.run_step(job.transfer, lambda f=failure: _raise(_fresh(f)))

    def _expire(self, now: float) -> None:
        for conn in list(self._conns.values()):
            if conn.peer is None and now > conn.deadline:
                self._close(conn, None, fail_pending=False)
                self.desk.refused("kv_data", "unauthenticated")
            elif conn.waiting is not None and conn.is_open:
                job = self._jobs.get((conn.peer, conn.waiting[0]))  # type: ignore[arg-type]
                if job is not None:
                    self._attach(conn, job, conn.waiting[1])
                elif now > conn.deadline:
                    err = MalformedFrame(f"stream payload for unknown transfer {conn.waiting[0]}")
                    self.desk.report(conn.peer or b"", err, conn.waiting[0])
                    self._close(conn, err, fail_pending=True)
        for token in [t for t, (_, expiry, _) in self._tokens.items() if now > expiry]:
            del self._tokens[token]


def _raise(err: TransferError) -> None:
    raise err


def _fresh(err: TransferError) -> TransferError:
    """A new error of the same class and message (one per failed transfer)."""
    out = TransferError.__new__(type(err))
    TransferError.__init__(out, err.message)
    return out


def _listen(endpoint: str) -> tuple[socket.socket, dict[str, Any], str | None]:
    """A listening socket next to a bound ZMQ endpoint, the LISTEN reply body, the Unix path."""
    scheme, _, rest = endpoint.partition("://")
    try:
        if scheme == "tcp":
            host = rest.rpartition(":")[0].strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
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
            raise TransportUnavailable(f"stream payloads need a tcp:// or ipc:// endpoint, "
                                       f"not {endpoint}")
        sock.listen(64)
        sock.setblocking(False)
    except OSError as e:
        raise TransportUnavailable(f"cannot listen for stream payloads next to {endpoint}: "
                                   f"{e}") from None
    return sock, body, path
