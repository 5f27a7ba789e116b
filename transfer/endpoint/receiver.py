"""ZmqKvReceiver: the decode worker's end of the KV data plane (a ZMQ ROUTER that binds).

Ownership contract (the serving layer's side of it):
1. The decode worker reserves destination blocks, then calls `expect(request_id, block_table)`
   *before* any prefill work starts. From then on the receiver may write into those blocks;
   the caller must neither free nor reuse them.
2. Exactly one of these ends the reservation:
   - `on_complete(request_id, reports)`: all `num_transfers` transfers were written and acked;
     the blocks hold the KV and are the caller's again;
   - `on_release(request_id, error)`: a typed TransferError (incompatible/malformed message,
     limits, checksum, sender silent for `idle_timeout_s` = PeerLost, `transfer_timeout_s` or the
     expectation's own timeout = TransferTimeout, sender abort, receiver closing). The blocks
     hold garbage; the caller frees them. The receiver never writes into them again;
   - `cancel(request_id)` returning True: the caller took the blocks back; no callback follows.
   The receiver itself never allocates or frees blocks.
3. Callbacks run on the receiver's thread (the one calling `poll`, or the one `start()`
   spawns), outside its lock; they must be quick (hand off to a queue) and may call
   `expect`/`cancel`.

How it reads: `poll` takes each ZMQ message to `_handle`, which routes it: a HEADER is decoded
and validated, admitted by the books (books.py: reservation, limits, writer) and handed to the
payload path its `transport` names; an ABORT fails its transfer; any other kind goes to the
path that owns it. The payload paths (frames/ always, stream/ unless disabled, nccl/ with
`nccl=`) implement `PayloadReceiver` (payload/receive.py) and keep their own state; the books
decide every outcome (ack or ERROR, `on_complete` / `on_release`). A caller with its own poller
must wake on all of `pollables()` (the ROUTER socket and the stream path's data connections,
which change as senders come and go: re-read it after each `poll`).

With a `security` (security.py) the ROUTER is a CURVE server: only the deployment's peers get a
frame through. Every refused header is counted through `on_refused(plane, reason)`: a request id
with no reservation ("unknown_reservation"), a reservation token that differs
("bad_token"), malformed ("malformed") or over the limits ("limit"); the stream path counts data
connections closed without a valid token ("unauthenticated").

Every header is validated against `limits` before a payload byte is looked at; frames larger
than `limits.max_buffer_bytes` are refused by ZMQ itself (MAXMSGSIZE disconnects the peer).
Malformed or hostile input — on ZMQ or on a data connection — produces a typed ERROR reply
(and closes that data connection) and never stops the receiver.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import zmq

from transfer.convert.cache import PagedKvCache
from transfer.endpoint.books import CompleteFn, RefusedFn, ReleaseFn, TransferBooks
from transfer.endpoint.records import ZmqReceiverConfig
from transfer.endpoint.security import SocketSecurity
from transfer.frames.receiver import FramesReceiver
from transfer.payload.receive import PayloadReceiver
from transfer.stream.receiver import StreamReceiver
from transfer.wire import framing as proto
from transfer.wire.errors import (
    InvalidRequest,
    LimitExceeded,
    MalformedFrame,
    MalformedHeader,
    ReservationMismatch,
    TooManyPeers,
    TransferCancelled,
    TransferError,
    TransportUnavailable,
    UnexpectedTransfer,
)
from transfer.wire.header import decode_header

log = logging.getLogger(__name__)

__all__ = ["CompleteFn", "ReleaseFn", "ZmqKvReceiver", "ZmqReceiverConfig"]


class ZmqKvReceiver:
    def __init__(self, cache: PagedKvCache, config: ZmqReceiverConfig = ZmqReceiverConfig(), *,
                 on_complete: CompleteFn, on_release: ReleaseFn,
                 context: zmq.Context | None = None, nccl: PayloadReceiver | None = None,
                 security: SocketSecurity | None = None, on_refused: RefusedFn | None = None):
        """`nccl`: an `nccl.NcclReceiverPlugin` to accept NCCL payloads (optional); `security`:
        authenticate peers (security.py); `on_refused(plane, reason)`: count refusals."""
        self.cache, self.config = cache, config
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._bind(security)
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._lock = threading.Lock()
        self._paths: dict[str, PayloadReceiver] = {}  # by the header `transport` they take
        self._books = TransferBooks(cache, config, paths=self._paths, on_complete=on_complete,
                                    on_release=on_release, send=self._send_all,
                                    on_refused=on_refused)
        for path in (FramesReceiver(), self._open_stream(), nccl):
            if path is not None:
                path.attach(self._books)
                self._paths[path.transport] = path
        self._by_kind = {kind: p for p in self._paths.values() for kind in p.kinds}
        self._poller: tuple[tuple[int, ...], zmq.Poller] | None = None  # for (descriptors)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def _bind(self, security: SocketSecurity | None) -> zmq.Socket:
        sock = self._ctx.socket(zmq.ROUTER)
        if security is not None:
            security.server(sock, "kv")
        config, lim = self.config, self.config.limits
        for opt, val in ((zmq.LINGER, 0), (zmq.RCVHWM, config.rcvhwm), (zmq.SNDHWM, 1024),
                         (zmq.MAXMSGSIZE, max(lim.max_buffer_bytes, lim.max_header_bytes)),
                         (zmq.HEARTBEAT_IVL, config.heartbeat_ivl_ms),
                         (zmq.HEARTBEAT_TIMEOUT, config.heartbeat_timeout_ms)):
            sock.setsockopt(opt, val)
        try:
            sock.bind(config.endpoint)
        except zmq.ZMQError as e:
            sock.close(linger=0)
            if self._own_context:
                self._ctx.term()
            raise TransportUnavailable(f"cannot bind the KV receiver to {config.endpoint}: {e}; "
                                       "choose a free port (port 0 picks one) or another ipc:// "
                                       "path") from None
        return sock

    def _open_stream(self) -> StreamReceiver | None:
        if not self.config.stream.is_enabled or not self.endpoint.startswith(("tcp://", "ipc://")):
            return None
        try:
            return StreamReceiver(self.endpoint, self.config.stream, self.cache)
        except TransportUnavailable as e:
            log.warning("KV receiver %s: %s; senders fall back to ZMQ frames", self.endpoint,
                        e.message)
            return None

    # ---- serving-layer API ----------------------------------------------------------------------
    @property
    def socket(self) -> zmq.Socket:
        """The ROUTER socket, for the caller's own poller (then call `poll(0)` when readable)."""
        return self._sock

    @property
    def num_completed(self) -> int:
        return self._books.num_completed

    @property
    def num_failed(self) -> int:
        return self._books.num_failed

    @property
    def _expected(self) -> Collection[str]:
        """Reservations pending (tests look at this)."""
        return self._books.expected

    @property
    def _inflight(self) -> Collection[tuple[bytes, int]]:
        """Transfers in flight (tests look at this)."""
        return self._books.inflight

    def pollables(self) -> list[zmq.Socket | int]:
        """Everything a caller's poller must wake on (POLLIN): the ROUTER socket and the data
        connections' descriptors. Changes after `poll`; closed descriptors drop out."""
        with self._lock:
            return [self._sock, *self._fds()]

    def expect(self, request_id: str, block_table: Sequence[int], *, num_transfers: int = 1,
               timeout_s: float | None = None, token: str = "") -> None:
        """Declare a reservation (see the module contract). `num_transfers` > 1 when several
        senders (prefill TP ranks) or several layer groups fill it. `token`: the reservation
        token every header for it must carry (`rtok`; "" accepts any)."""
        ids = list(block_table)
        if any(not 0 <= b < self.cache.num_blocks for b in ids) or num_transfers < 1:
            raise InvalidRequest(f"block ids must lie in [0, {self.cache.num_blocks}) and "
                                 "num_transfers >= 1")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            self._books.expect(request_id, ids, num_transfers, deadline, token)

    def cancel(self, request_id: str) -> bool:
        """Withdraw a reservation. True: it was pending; no write is in progress or will happen,
        no callback will follow, and the caller owns the blocks again."""
        with self._lock:
            return self._books.cancel(request_id)

    def poll(self, timeout_s: float = 0.0, max_messages: int = 256) -> int:
        """Handle what arrives within `timeout_s` (at most `max_messages` ZMQ messages; a payload
        chunk costs about one memcpy of its size; each data connection gives at most
        `stream.pump_bytes`); check deadlines; run callbacks. Returns messages handled."""
        self._flush_outbox()
        handled = 0
        ready = self._wait(timeout_s)
        if self._sock in ready:
            while handled < max_messages:
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                with self._lock:
                    self._handle(frames)
                handled += 1
                self._flush_outbox()  # acks before callbacks: the sender is waiting for them
                self._run_callbacks()
        with self._lock:
            for path in self._paths.values():
                path.service(ready, time.monotonic())
        with self._lock:
            self._books.check_deadlines(time.monotonic())
        self._flush_outbox()
        self._run_callbacks()
        return handled

    def start(self) -> None:
        """Serve on a background thread until `close()` (its CUDA device is the cache's). A bug
        in one round is logged and the thread goes on: reservations still end by their
        deadlines."""
        def loop() -> None:
            if self.cache.device.type == "cuda":
                torch.cuda.set_device(self.cache.device)
            while not self._stop.is_set():
                try:
                    self.poll(0.02)
                except Exception:
                    log.exception("KV receiver: a poll round failed")
                    time.sleep(0.02)

        self._thread = threading.Thread(target=loop, name="kv-receiver", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving; every pending reservation is released (on_release, TransferCancelled)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self._lock:
            self._books.release_all(TransferCancelled("the KV receiver is shutting down"))
        self._run_callbacks()
        self._sock.close(linger=0)
        for path in self._paths.values():
            path.close()
        if self._own_context:
            self._ctx.term()

    # ---- routing (under the lock) -----------------------------------------------------------
    def _handle(self, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes
        kind = frames[1].bytes if len(frames) > 1 else b""
        rest = frames[2:]
        try:
            if kind == proto.HEADER:
                self._on_header(peer, rest)
            elif kind == proto.ABORT:
                self._on_abort(peer, rest)
            else:
                self._path_for(kind).on_message(peer, kind, rest)
        except TransferError as e:
            reason = _refusal_reason(e)
            if reason is not None:
                self._books.refused("nccl" if kind == proto.NCCL_HELLO else "kv", reason)
            self._books.report(peer, e, None)
        except Exception as e:  # a bug must not stop the receiver; report it to the peer
            log.exception("KV receiver: internal error handling a message")
            err = TransferError(f"internal receiver error: {e!r}"[:500])
            self._books.reply(peer, proto.error_frames(err, None))

    def _on_header(self, peer: bytes, rest: list[zmq.Frame]) -> None:
        """Decode and validate; let the path prepare (an eager one takes the payload from now
        on); admit; hand the transfer to its path."""
        try:
            if len(rest) != 1:
                raise MalformedFrame(f"header message with {len(rest)} frames")
            header = decode_header(rest[0].buffer, self.config.limits)
            path = self._paths.get(header.transport)
            if path is not None:
                path.prepare(peer, header)
            transfer = self._books.admit(peer, header)
        except TransferError:
            self._refuse(peer)
            raise
        if transfer is None:  # its writer could not be built: the reservation is released
            self._refuse(peer)
        else:
            self._paths[header.transport].begin(transfer)

    def _refuse(self, peer: bytes) -> None:
        """A header from `peer` was refused: a payload may follow (a stream connection, NCCL
        receives posted early); it must not be written."""
        for path in self._paths.values():
            path.refuse(peer)

    def _on_abort(self, peer: bytes, rest: list[zmq.Frame]) -> None:
        body = proto.unpack_small(rest[0].buffer, "abort") if len(rest) == 1 else None
        tid = body[0] if isinstance(body, list) and body else None
        transfer = self._books.find(peer, tid) if isinstance(tid, int) else None
        if transfer is not None:
            err = TransferCancelled("the sender aborted the transfer")
            self._books.fail_transfer(transfer, err, reply=False)

    def _path_for(self, kind: bytes) -> PayloadReceiver:
        path = self._by_kind.get(kind)
        if path is not None:
            return path
        if kind == proto.STREAM_HELLO:  # the sender falls back to frames on this error
            raise TransportUnavailable("this receiver takes no stream payloads (send ZMQ frames)")
        raise MalformedFrame(f"unknown message kind {kind[:8]!r}")

    # ---- polling and sending (outside the lock) ---------------------------------------------
    def _fds(self) -> tuple[int, ...]:
        """The payload paths' descriptors (caller holds the lock)."""
        return tuple(fd for path in self._paths.values() for fd in path.fds())

    def _wait(self, timeout_s: float) -> Collection[Any]:
        """What is readable within `timeout_s`: the ROUTER socket and/or the paths' descriptors
        (a snapshot: one closed since shows up as ready and is ignored by its path)."""
        with self._lock:
            fds = self._fds()
        if not fds:
            return (self._sock,) if self._sock.poll(int(timeout_s * 1000), zmq.POLLIN) else ()
        if self._poller is None or self._poller[0] != fds:
            poller = zmq.Poller()
            for item in (self._sock, *fds):
                poller.register(item, zmq.POLLIN)
            self._poller = (fds, poller)
        return {item for item, _ in self._poller[1].poll(int(timeout_s * 1000))}

    def _flush_outbox(self) -> None:
        with self._lock:
            out = self._books.take_outbox()
        self._send_all(out)

    def _send_all(self, out: list[list[bytes]]) -> None:
        for frames in out:
            # peer gone or its queue full: the reply is dropped and the sender times out
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart(frames, zmq.NOBLOCK)

    def _run_callbacks(self) -> None:
        with self._lock:
            todo: list[Callable[[], None]] = self._books.take_callbacks()
        for cb in todo:
            try:
                cb()
            except Exception:
                log.exception("KV receiver: a completion/release callback raised")


def _refusal_reason(err: TransferError) -> str | None:
    """How a refused message is counted (None: not a refusal of the peer, e.g. incompatible
    caches, which the serving layer reports as a request failure)."""
    for cls, reason in ((ReservationMismatch, "bad_token"), (TooManyPeers, "too_many_links"),
                        (UnexpectedTransfer, "unknown_reservation"),
                        (LimitExceeded, "limit"), (MalformedHeader, "malformed"),
                        (MalformedFrame, "malformed")):
        if isinstance(err, cls):
            return reason
    return None
