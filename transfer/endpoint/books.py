"""TransferBooks: the KV receiver's reservations and transfers in flight, and how each ends.

The receiver (receiver.py) routes messages; the books decide outcomes. A reservation
(`Expectation`, records.py) waits for its transfers; a transfer (`InboundTransfer`) is
admitted once its header names a live reservation within the limits and its writer could be
built; it ends exactly once: finished (ACK, then `on_complete` when the reservation has all
its transfers) or failed (ERROR reply, then `on_release` for the reservation, whose other
transfers are cancelled). The books are the `ReceiverDesk` (payload/receive.py) the payload
paths run their steps through.

Everything here runs under the receiver's lock. Replies and callbacks are only queued: the
receiver sends replies (`take_outbox`) and runs callbacks (`take_callbacks`) outside the lock,
replies first (the sender waits for them); `flush` sends at once for a path that is about to
block the receiver's thread.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Callable, Mapping

from transfer.convert.cache import PagedKvCache
from transfer.convert.writer import KvWriter, PagedSink, WriteReport
from transfer.endpoint.parts import check_routes, count_part
from transfer.endpoint.records import Expectation, ZmqReceiverConfig
from transfer.payload.receive import InboundTransfer, PayloadReceiver
from transfer.wire import framing as proto
from transfer.wire.errors import (
    IncompatibleKv,
    InvalidRequest,
    LimitExceeded,
    MalformedFrame,
    PeerLost,
    ReservationMismatch,
    TransferCancelled,
    TransferError,
    TransferTimeout,
    TransportUnavailable,
    UnexpectedTransfer,
)
from transfer.wire.header import TransferHeader

log = logging.getLogger(__name__)

CompleteFn = Callable[[str, list[WriteReport]], None]
ReleaseFn = Callable[[str, TransferError], None]
SendFn = Callable[[list[list[bytes]]], None]  # sends [peer, *frames] messages on the socket
RefusedFn = Callable[[str, str], None]  # (plane, reason): a refused message or connection


class TransferBooks:
    def __init__(self, cache: PagedKvCache, config: ZmqReceiverConfig, *,
                 paths: Mapping[str, PayloadReceiver], on_complete: CompleteFn,
                 on_release: ReleaseFn, send: SendFn, on_refused: RefusedFn | None = None):
        """`paths`: the receiver's payload paths by transport (filled by the receiver);
        `on_refused(plane, reason)`: counts what was refused (e.g. a worker's Rejections)."""
        self.cache, self.config, self._paths = cache, config, paths
        self._on_refused = on_refused
        self.limits, self.idle_timeout_s = config.limits, config.idle_timeout_s
        self._on_complete, self._on_release, self._send = on_complete, on_release, send
        self.expected: dict[str, Expectation] = {}
        self.inflight: dict[tuple[bytes, int], InboundTransfer] = {}
        self._outbox: list[list[bytes]] = []
        self._callbacks: list[Callable[[], None]] = []
        self.num_completed = 0
        self.num_failed = 0

    # ---- reservations ----------------------------------------------------------------------------
    def expect(self, request_id: str, block_table: list[int], num_transfers: int,
               deadline: float | None, token: str = "") -> None:
        if request_id in self.expected:
            raise InvalidRequest(f"request {request_id} is already expected")
        self.expected[request_id] = Expectation(request_id, block_table, num_transfers, deadline,
                                                token)

    def refused(self, plane: str, reason: str) -> None:
        """Count a refused message or connection (called under the lock; must be quick)."""
        if self._on_refused is not None:
            self._on_refused(plane, reason)

    def cancel(self, request_id: str) -> bool:
        exp = self.expected.pop(request_id, None)
        if exp is None:
            return False
        err = TransferCancelled("the receiver cancelled the request", request_id=request_id)
        self._drop_inflight(exp, err)
        return True

    def release_all(self, err: TransferError) -> None:
        for exp in list(self.expected.values()):
            self.fail_request(exp, err)

    # ---- admission -------------------------------------------------------------------------------
    def admit(self, peer: bytes, header: TransferHeader) -> InboundTransfer | None:
        """Book a transfer for a decoded header. Raises a typed error when it is refused; if
        its writer cannot be built (e.g. IncompatibleKv) the reservation is released, the
        sender gets the error, and None is returned."""
        tid, rid = header.transfer_id, header.request_id
        if (peer, tid) in self.inflight:
            raise MalformedFrame(f"transfer {tid} is already in flight from this peer")
        exp = self.expected.get(rid)
        if exp is None:
            raise UnexpectedTransfer("no reservation for this request (expect() was not called, "
                                     "or it already completed, failed or was cancelled)",
                                     request_id=rid)
        if exp.token and not hmac.compare_digest(exp.token.encode(),
                                                 header.reservation_token.encode()):
            raise ReservationMismatch("the header's reservation token (rtok) is not this "
                                      "reservation's: the sender was not sent here for it",
                                      request_id=rid)
        if len(self.inflight) >= self.config.max_inflight:
            raise LimitExceeded("transfers in flight", len(self.inflight) + 1,
                                self.config.max_inflight)
        if header.transport not in self._paths:
            raise TransportUnavailable(f"this receiver takes no {header.transport} payloads",
                                       request_id=rid)
        try:
            count_part(exp, header)  # a streamed part (parts.py) sets how many transfers to wait
            sink = PagedSink(self.cache, exp.block_table)
            writer = KvWriter(header, sink, self.config.convert)
        except TransferError as e:
            e.request_id = e.request_id or rid
            self.reply(peer, proto.error_frames(e, tid))
            self.fail_request(exp, e)
            return None
        now = time.monotonic()
        transfer = InboundTransfer(peer, header, writer, now + self.config.transfer_timeout_s,
                                   now + self.config.idle_timeout_s)
        self.inflight[transfer.key] = transfer
        exp.inflight.add(transfer.key)
        return transfer

    # ---- ReceiverDesk ----------------------------------------------------------------------------
    def find(self, peer: bytes, transfer_id: int) -> InboundTransfer | None:
        return self.inflight.get((peer, transfer_id))

    def run_step(self, transfer: InboundTransfer, step: Callable[[], None]) -> None:
        try:
            step()
            if transfer.writer.next_buffer == len(transfer.header.buffer_sizes):
                self.finish_transfer(transfer)
        except TransferError as e:
            e.request_id = e.request_id or transfer.header.request_id
            self.fail_transfer(transfer, e, reply=True)
        except Exception as e:
            log.exception("KV receiver: internal error writing transfer %s",
                          transfer.header.transfer_id)
            err = TransferError(f"internal receiver error: {e!r}"[:500],
                                request_id=transfer.header.request_id)
            self.fail_transfer(transfer, err, reply=True)

    def ack_early(self, transfer: InboundTransfer) -> None:
        transfer.early_report = transfer.writer.finish()
        self.reply(transfer.peer, [proto.ACK, proto.pack(transfer.early_report.to_wire())])
        self.flush()

    def reply(self, peer: bytes, frames: list[bytes]) -> None:
        self._outbox.append([peer, *frames])

    def flush(self) -> None:
        self._send(self.take_outbox())

    def report(self, peer: bytes, err: TransferError, transfer_id: int | None) -> None:
        self.num_failed += 1
        self.reply(peer, proto.error_frames(err, transfer_id))

    # ---- outcomes --------------------------------------------------------------------------------
    def finish_transfer(self, transfer: InboundTransfer) -> None:
        report = transfer.early_report or transfer.writer.finish()
        self._pop_inflight(transfer.key, ok=True)
        if transfer.early_report is None:
            self.reply(transfer.peer, [proto.ACK, proto.pack(report.to_wire())])
        exp = self.expected.get(transfer.header.request_id)
        if exp is None:
            return
        exp.inflight.discard(transfer.key)
        exp.reports.append(report)
        if len(exp.reports) == exp.num_transfers:
            try:
                check_routes(exp, transfer.header.spec, self.cache.spec)
            except IncompatibleKv as e:
                self.fail_request(exp, e)
                return
            del self.expected[exp.request_id]
            self.num_completed += 1
            reports = list(exp.reports)
            self._callbacks.append(lambda: self._on_complete(exp.request_id, reports))

    def fail_transfer(self, transfer: InboundTransfer, err: TransferError, *,
                      reply: bool) -> None:
        self._pop_inflight(transfer.key, ok=False)
        if reply:
            self.reply(transfer.peer, proto.error_frames(err, transfer.header.transfer_id))
        exp = self.expected.get(transfer.header.request_id)
        if exp is not None:
            exp.inflight.discard(transfer.key)
            self.fail_request(exp, err)

    def fail_request(self, exp: Expectation, err: TransferError) -> None:
        self.num_failed += 1
        self.expected.pop(exp.request_id, None)
        why = f"another transfer of this request failed: {err.message}"[:500]
        self._drop_inflight(exp, TransferCancelled(why, request_id=exp.request_id))
        err.request_id = err.request_id or exp.request_id
        self._callbacks.append(lambda: self._on_release(exp.request_id, err))

    def _pop_inflight(self, key: tuple[bytes, int], *, ok: bool) -> InboundTransfer | None:
        transfer = self.inflight.pop(key, None)
        if transfer is not None:
            path = self._paths.get(transfer.header.transport)
            if path is not None:
                path.end(transfer, ok)  # a failed stream transfer closes its data connection
        return transfer

    def _drop_inflight(self, exp: Expectation, err: TransferError) -> None:
        for key in list(exp.inflight):
            transfer = self._pop_inflight(key, ok=False)
            if transfer is not None:
                self.reply(transfer.peer, proto.error_frames(err, transfer.header.transfer_id))
        exp.inflight.clear()

    def check_deadlines(self, now: float) -> None:
        config = self.config
        for transfer in list(self.inflight.values()):
            rid = transfer.header.request_id
            if now > transfer.deadline:
                err: TransferError = TransferTimeout(
                    f"transfer not complete within {config.transfer_timeout_s}s", request_id=rid)
                self.fail_transfer(transfer, err, reply=True)
            elif now > transfer.idle_deadline:
                progress = self._paths[transfer.header.transport].progress(transfer)
                err = PeerLost(f"sender silent for {config.idle_timeout_s}s mid-transfer "
                               f"({progress})", request_id=rid)
                self.fail_transfer(transfer, err, reply=True)
        for exp in list(self.expected.values()):
            if exp.deadline is not None and now > exp.deadline:
                self.fail_request(exp, TransferTimeout("no complete KV transfer before the "
                                                       "reservation's timeout",
                                                       request_id=exp.request_id))

    # ---- handed to the receiver, outside the lock -------------------------------------------
    def take_outbox(self) -> list[list[bytes]]:
        out, self._outbox = self._outbox, []
        return out

    def take_callbacks(self) -> list[Callable[[], None]]:
        todo, self._callbacks = self._callbacks, []
        return todo
