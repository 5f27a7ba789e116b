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

Payloads come as ZMQ DATA frames or, by default, on stream data connections (wire/framing.py;
stream/receiver.py reads them straight into the reserved blocks). A caller with its own poller
must wake on all of `pollables()` (the ROUTER socket and the data connections' descriptors,
which change as senders come and go: re-read it after each `poll`).

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
from transfer.convert.writer import KvWriter, PagedSink, WriteReport
from transfer.endpoint.records import Expectation, Inflight, ZmqReceiverConfig
from transfer.stream.receiver import StreamInbox
from transfer.wire import framing as proto
from transfer.wire.errors import (
    InvalidRequest,
    LimitExceeded,
    MalformedFrame,
    PeerLost,
    TransferCancelled,
    TransferError,
    TransferTimeout,
    TransportUnavailable,
    UnexpectedTransfer,
)
from transfer.wire.header import decode_header

log = logging.getLogger(__name__)

CompleteFn = Callable[[str, list[WriteReport]], None]
ReleaseFn = Callable[[str, TransferError], None]


class ZmqKvReceiver:
    def __init__(self, cache: PagedKvCache, config: ZmqReceiverConfig = ZmqReceiverConfig(), *,
                 on_complete: CompleteFn, on_release: ReleaseFn, context: zmq.Context | None = None,
                 nccl: Any = None):
        """`nccl`: an `nccl.NcclReceiverPlugin` to accept NCCL payloads (optional)."""
        self.cache, self.config = cache, config
        self._on_complete, self._on_release = on_complete, on_release
        self._own_context = context is None
        self._ctx = context or zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        lim = config.limits
        for opt, val in ((zmq.LINGER, 0), (zmq.RCVHWM, config.rcvhwm), (zmq.SNDHWM, 1024),
                         (zmq.MAXMSGSIZE, max(lim.max_buffer_bytes, lim.max_header_bytes)),
                         (zmq.HEARTBEAT_IVL, config.heartbeat_ivl_ms),
                         (zmq.HEARTBEAT_TIMEOUT, config.heartbeat_timeout_ms)):
            self._sock.setsockopt(opt, val)
        try:
            self._sock.bind(config.endpoint)
        except zmq.ZMQError as e:
            self._sock.close(linger=0)
            if self._own_context:
                self._ctx.term()
            raise TransportUnavailable(f"cannot bind the KV receiver to {config.endpoint}: {e}; choose a "
                                       "free port (port 0 picks one) or another ipc:// path") from None
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._nccl = nccl
        self._stream = self._open_stream()
        self._lock = threading.Lock()
        self._expected: dict[str, Expectation] = {}
        self._inflight: dict[tuple[bytes, int], Inflight] = {}
        self._outbox: list[list[bytes]] = []
        self._callbacks: list[Callable[[], None]] = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.num_completed = 0
        self.num_failed = 0

    def _open_stream(self) -> StreamInbox | None:
        if not self.config.stream.is_enabled or not self.endpoint.startswith(("tcp://", "ipc://")):
            return None
        try:
            return StreamInbox(self.endpoint, self.config.stream, self.cache,
                               idle_timeout_s=self.config.idle_timeout_s, run_step=self._guard,
                               report=self._report)
        except TransportUnavailable as e:
            log.warning("KV receiver %s: %s; senders fall back to ZMQ frames", self.endpoint, e.message)
            return None

    # ---- serving-layer API ----------------------------------------------------------------------
    @property
    def socket(self) -> zmq.Socket:
        """The ROUTER socket, for the caller's own poller (then call `poll(0)` when readable)."""
        return self._sock

    def pollables(self) -> list[zmq.Socket | int]:
        """Everything a caller's poller must wake on (POLLIN): the ROUTER socket and the data
        connections' descriptors. Changes after `poll`; closed descriptors drop out."""
        with self._lock:
            return [self._sock, *(self._stream.fds() if self._stream is not None else ())]

    def expect(self, request_id: str, block_table: Sequence[int], *, num_transfers: int = 1,
               timeout_s: float | None = None) -> None:
        """Declare a reservation (see the module contract). `num_transfers` > 1 when several
        senders (prefill TP ranks) or several layer groups fill it."""
        ids = list(block_table)
        if any(not 0 <= b < self.cache.num_blocks for b in ids) or num_transfers < 1:
            raise InvalidRequest(f"block ids must lie in [0, {self.cache.num_blocks}) and num_transfers >= 1")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            if request_id in self._expected:
                raise InvalidRequest(f"request {request_id} is already expected")
            self._expected[request_id] = Expectation(request_id, ids, num_transfers, deadline)

    def cancel(self, request_id: str) -> bool:
        """Withdraw a reservation. True: it was pending; no write is in progress or will happen,
        no callback will follow, and the caller owns the blocks again."""
        with self._lock:
            exp = self._expected.pop(request_id, None)
            if exp is None:
                return False
            self._drop_inflight(exp, TransferCancelled("the receiver cancelled the request", request_id=request_id))
            return True

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
        if self._stream is not None:
            with self._lock:
                self._stream.service(ready, time.monotonic())
        with self._lock:
            self._check_deadlines(time.monotonic())
        self._flush_outbox()
        self._run_callbacks()
        return handled

    def _wait(self, timeout_s: float) -> Collection[Any]:
        """What is readable within `timeout_s`: the ROUTER socket and/or data descriptors."""
        if self._stream is not None:
            with self._lock:
                fds = self._stream.fds()
            return self._stream.wait(self._sock, fds, timeout_s)
        return (self._sock,) if self._sock.poll(int(timeout_s * 1000), zmq.POLLIN) else ()

    def start(self) -> None:
        """Serve on a background thread until `close()` (its CUDA device is the cache's). A bug
        in one round is logged and the thread goes on: reservations still end by their deadlines."""
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
            for exp in list(self._expected.values()):
                self._fail_request(exp, TransferCancelled("the KV receiver is shutting down"))
        self._run_callbacks()
        self._sock.close(linger=0)
        if self._stream is not None:
            self._stream.close()
        if self._nccl is not None:
            self._nccl.close()
        if self._own_context:
            self._ctx.term()

    # ---- message handling (under the lock) ---------------------------------------------------------
    def _reply(self, peer: bytes, frames: list[bytes]) -> None:
        self._outbox.append([peer, *frames])

    def _report(self, peer: bytes, err: TransferError, transfer_id: int | None) -> None:
        """An error outside any in-flight transfer (e.g. on a data connection)."""
        self.num_failed += 1
        self._reply(peer, proto.error_frames(err, transfer_id))

    def _handle(self, frames: list[zmq.Frame]) -> None:
        peer = frames[0].bytes
        kind = frames[1].bytes if len(frames) > 1 else b""
        rest = frames[2:]
        try:
            if kind == proto.HEADER:
                self._on_header(peer, rest)
            elif kind == proto.DATA:
                self._on_data(peer, rest)
            elif kind == proto.ABORT:
                body = proto.unpack_small(rest[0].buffer, "abort") if len(rest) == 1 else None
                tid = body[0] if isinstance(body, list) and body else None
                inf = self._inflight.get((peer, tid)) if isinstance(tid, int) else None
                if inf is not None:
                    self._fail_transfer(inf, TransferCancelled("the sender aborted the transfer"), reply=False)
            elif kind == proto.SIZES and self._nccl is not None:
                self._nccl.post_sizes(peer, rest, self.config.limits, time.monotonic() + self.config.idle_timeout_s)
            elif kind == proto.NCCL_HELLO and self._nccl is not None:
                self._nccl.accept_hello(peer, rest, self._reply)
            elif kind == proto.STREAM_HELLO:
                if self._stream is None:
                    raise TransportUnavailable("this receiver takes no stream payloads (send ZMQ frames)")
                self._reply(peer, self._stream.hello(peer, [f.buffer for f in rest]))
            else:
                raise MalformedFrame(f"unknown message kind {kind[:8]!r}")
        except TransferError as e:
            self.num_failed += 1
            self._reply(peer, proto.error_frames(e, None))
        except Exception as e:  # a bug must not stop the receiver; report it to the peer
            log.exception("KV receiver: internal error handling a message")
            self._reply(peer, proto.error_frames(TransferError(f"internal receiver error: {e!r}"[:500]), None))

    def _on_header(self, peer: bytes, rest: list[zmq.Frame]) -> None:
        try:
            self._accept_header(peer, rest)
        except TransferError:
            if self._stream is not None:  # a stream payload may follow: it must not be read
                self._stream.drop_peer(peer)
            if self._nccl is not None:  # pre-posted receives take the payload; drop it
                self._nccl.discard(peer)
            raise

    def _accept_header(self, peer: bytes, rest: list[zmq.Frame]) -> None:
        if len(rest) != 1:
            raise MalformedFrame(f"header message with {len(rest)} frames")
        header = decode_header(rest[0].buffer, self.config.limits)
        if header.transport == "nccl" and self._nccl is not None:  # eager senders: the wire starts now
            self._nccl.prepost(peer, header, time.monotonic() + self.config.idle_timeout_s)
        tid, rid = header.transfer_id, header.request_id
        if (peer, tid) in self._inflight:
            raise MalformedFrame(f"transfer {tid} is already in flight from this peer")
        exp = self._expected.get(rid)
        if exp is None:
            raise UnexpectedTransfer("no reservation for this request (expect() was not called, "
                                     "or it already completed, failed or was cancelled)", request_id=rid)
        if len(self._inflight) >= self.config.max_inflight:
            raise LimitExceeded("transfers in flight", len(self._inflight) + 1, self.config.max_inflight)
        if header.transport == "nccl" and self._nccl is None:
            raise TransportUnavailable("this receiver takes ZMQ payloads only", request_id=rid)
        if header.transport == "stream" and self._stream is None:
            raise TransportUnavailable("this receiver takes no stream payloads", request_id=rid)
        try:
            writer = KvWriter(header, PagedSink(self.cache, exp.block_table), self.config.convert)
        except TransferError as e:
            e.request_id = e.request_id or rid
            self._reply(peer, proto.error_frames(e, tid))
            self._fail_request(exp, e)
            if self._stream is not None:
                self._stream.drop_peer(peer)
            if self._nccl is not None:
                self._nccl.discard(peer)
            return
        now = time.monotonic()
        inf = Inflight(peer, header, writer, now + self.config.transfer_timeout_s,
                        now + self.config.idle_timeout_s)
        self._inflight[(peer, tid)] = inf
        exp.inflight.add((peer, tid))
        if header.transport == "stream":
            self._stream.begin(inf)  # type: ignore[union-attr]
        elif header.transport == "nccl":  # blocks this thread until written or failed
            deadline = min(inf.deadline, now + self.config.idle_timeout_s)

            def ack_queued() -> None:  # the NCCL link itself says when the writes are done
                inf.early_report = inf.writer.finish()
                self._reply(peer, [proto.ACK, proto.pack(inf.early_report.to_wire())])
                self._send_outbox_locked()

            self._guard(inf, lambda: self._nccl.receive(peer, inf.header, inf.writer, deadline, self._reply,
                                                        self._send_outbox_locked, ack_queued))

    def _on_data(self, peer: bytes, rest: list[zmq.Frame]) -> None:
        if not rest:
            raise MalformedFrame("data message without meta")
        tid, index, sums = proto.data_meta(rest[0].buffer, self.config.limits.max_buffers)
        inf = self._inflight.get((peer, tid))
        if inf is None:
            return  # stale chunk of a transfer that already ended: dropped
        self._guard(inf, lambda: self._take_chunk(inf, index, rest[1:], sums))

    def _take_chunk(self, inf: Inflight, index: int, frames: list[zmq.Frame], sums: list[int] | None) -> None:
        h = inf.header
        if h.transport != "zmq":
            raise MalformedFrame(f"DATA message for a transfer whose payload travels by {h.transport}")
        if index != inf.next_chunk or index >= len(h.chunks) or len(frames) != h.chunks[index]:
            raise MalformedFrame(f"chunk {index} with {len(frames)} frames; expected chunk "
                                 f"{inf.next_chunk} of {len(h.chunks)}")
        if h.checksum is not None and (sums is None or len(sums) != len(frames)):
            raise MalformedFrame("checksums missing from a checksummed transfer")
        first = inf.writer.next_buffer
        for j, frame in enumerate(frames):
            inf.writer.accept(first + j, frame.buffer, None if sums is None else sums[j])
        inf.next_chunk += 1
        inf.idle_deadline = time.monotonic() + self.config.idle_timeout_s

    def _guard(self, inf: Inflight, step: Callable[[], None]) -> None:
        """Run one step of a transfer; finish it when complete, fail it on any error."""
        try:
            step()
            if inf.writer.next_buffer == len(inf.header.buffer_sizes):
                self._finish_transfer(inf, inf.early_report or inf.writer.finish())
        except TransferError as e:
            e.request_id = e.request_id or inf.header.request_id
            self._fail_transfer(inf, e, reply=True)
        except Exception as e:
            log.exception("KV receiver: internal error writing transfer %s", inf.header.transfer_id)
            err = TransferError(f"internal receiver error: {e!r}"[:500], request_id=inf.header.request_id)
            self._fail_transfer(inf, err, reply=True)

    # ---- outcomes --------------------------------------------------------------------------------
    def _finish_transfer(self, inf: Inflight, report: WriteReport) -> None:
        key = (inf.peer, inf.header.transfer_id)
        self._pop_inflight(key, ok=True)
        if inf.early_report is None:
            self._reply(inf.peer, [proto.ACK, proto.pack(report.to_wire())])
        exp = self._expected.get(inf.header.request_id)
        if exp is None:
            return
        exp.inflight.discard(key)
        exp.reports.append(report)
        if len(exp.reports) == exp.num_transfers:
            del self._expected[exp.request_id]
            self.num_completed += 1
            reports = list(exp.reports)
            self._callbacks.append(lambda: self._on_complete(exp.request_id, reports))

    def _fail_transfer(self, inf: Inflight, err: TransferError, *, reply: bool) -> None:
        key = (inf.peer, inf.header.transfer_id)
        self._pop_inflight(key, ok=False)
        if reply:
            self._reply(inf.peer, proto.error_frames(err, inf.header.transfer_id))
        exp = self._expected.get(inf.header.request_id)
        if exp is not None:
            exp.inflight.discard(key)
            self._fail_request(exp, err)

    def _fail_request(self, exp: Expectation, err: TransferError) -> None:
        self.num_failed += 1
        self._expected.pop(exp.request_id, None)
        self._drop_inflight(exp, TransferCancelled(f"another transfer of this request failed: {err.message}"[:500],
                                                   request_id=exp.request_id))
        err.request_id = err.request_id or exp.request_id
        self._callbacks.append(lambda: self._on_release(exp.request_id, err))

    def _pop_inflight(self, key: tuple[bytes, int], *, ok: bool) -> Inflight | None:
        inf = self._inflight.pop(key, None)
        if inf is not None and inf.header.transport == "stream" and self._stream is not None:
            self._stream.end(inf, ok)  # a failed one closes its data connection
        return inf

    def _drop_inflight(self, exp: Expectation, err: TransferError) -> None:
        for key in list(exp.inflight):
            inf = self._pop_inflight(key, ok=False)
            if inf is not None:
                self._reply(inf.peer, proto.error_frames(err, inf.header.transfer_id))
        exp.inflight.clear()

    def _check_deadlines(self, now: float) -> None:
        for inf in list(self._inflight.values()):
            if now > inf.deadline:
                self._fail_transfer(inf, TransferTimeout(
                    f"transfer not complete within {self.config.transfer_timeout_s}s",
                    request_id=inf.header.request_id), reply=True)
            elif now > inf.idle_deadline:
                self._fail_transfer(inf, PeerLost(
                    f"sender silent for {self.config.idle_timeout_s}s mid-transfer ({self._progress(inf)})",
                    request_id=inf.header.request_id), reply=True)
        for exp in list(self._expected.values()):
            if exp.deadline is not None and now > exp.deadline:
                self._fail_request(exp, TransferTimeout("no complete KV transfer before the reservation's "
                                                        "timeout", request_id=exp.request_id))

    def _progress(self, inf: Inflight) -> str:
        stream = self._stream.progress(inf) if self._stream is not None else None
        return stream or f"chunk {inf.next_chunk} of {len(inf.header.chunks)}"

    def _send_outbox_locked(self) -> None:
        """Send queued replies now (caller holds the lock and is the socket's thread)."""
        out, self._outbox = self._outbox, []
        self._send_all(out)

    # ---- outside the lock ------------------------------------------------------------------------
    def _flush_outbox(self) -> None:
        with self._lock:
            out, self._outbox = self._outbox, []
        self._send_all(out)

    def _send_all(self, out: list[list[bytes]]) -> None:
        for frames in out:
            # peer gone or its queue full: the reply is dropped and the sender times out
            with contextlib.suppress(zmq.ZMQError):
                self._sock.send_multipart(frames, zmq.NOBLOCK)

    def _run_callbacks(self) -> None:
        with self._lock:
            todo, self._callbacks = self._callbacks, []
        for cb in todo:
            try:
                cb()
            except Exception:
                log.exception("KV receiver: a completion/release callback raised")

