"""The decode end of an NCCL link: `NcclReceiverPlugin` (protocol: nccl/transport.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from transfer.nccl.lib import NcclLibrary
from transfer.nccl.link import REFUSAL_GRACE_S, NcclLink, elapsed_ms, require_cuda, timed_event
from transfer.wire import framing as proto
from transfer.wire.errors import (
    MalformedFrame,
    MalformedHeader,
    TransferError,
    TransportUnavailable,
)
from transfer.wire.header import ReceiverLimits, TransferHeader


@dataclass
class _Posted:
    """Receives posted for one header before its writer exists (see `prepost`)."""

    transfer_id: int
    sizes: tuple[int, ...]
    whole: torch.Tensor
    buffers: list[torch.Tensor]
    arrived: list[torch.cuda.Event]
    r_start: torch.cuda.Event
    t_start: float
    t_posted: float
    t_first_posted: float


class NcclReceiverPlugin:
    """Decode side: one link per prefill peer (rank 1), created on its NCCL_HELLO."""

    def __init__(self, device: torch.device | str | int, *, library_path: str | None = None):
        self.device = require_cuda(device)
        self.lib = NcclLibrary(library_path)
        self.links: dict[bytes, NcclLink] = {}
        self._posted: dict[bytes, _Posted] = {}  # per peer: receives posted for its current header
        self.last_marks: dict[str, float] = {}  # as the sender's (absolute perf_counter marks)
        self.t_header_decoded = 0.0

    def accept_hello(self, peer: bytes, rest: list[Any], reply: Callable[[bytes, list[bytes]], None]) -> None:
        body = proto.unpack_small(rest[0].buffer, "nccl hello") if len(rest) == 1 else None
        if not isinstance(body, list) or not body or not isinstance(body[0], bytes):
            raise MalformedFrame("NCCL hello must be [unique_id, ...]")
        self._posted.pop(peer, None)
        old = self.links.pop(peer, None)
        if old is not None:
            old.close()
        blocking = not (len(body) > 4 and body[4] is False)  # older senders: blocking unless said
        link = NcclLink(self.lib, body[0], 1, self.device, blocking=blocking)
        link.eager = len(body) > 3 and body[3] is True  # the sender does not wait for READY
        self.links[peer] = link

    def _post(self, link: NcclLink, transfer_id: int, sizes: tuple[int, ...], deadline: float,
              before_posting: Callable[[], None] | None = None) -> _Posted:
        """Allocate the receive buffers (sizes were checked against the limits), then post one
        receive per buffer on the link's stream; `before_posting` runs in between (READY)."""
        t0 = time.perf_counter()
        link.enqueue_seconds = 0.0
        link.wait_ready(deadline)
        with torch.cuda.device(self.device):
            link.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(link.stream):
                whole = torch.empty(sum(sizes), dtype=torch.uint8, device=self.device)
            buffers, at = [], 0
            for size in sizes:
                buffers.append(whole[at:at + size])
                at += size
            if before_posting is not None:
                before_posting()
            # every receive is posted before any write, so the wire never waits for the host
            r_start = timed_event(link.stream)
            arrived = [link.enqueue(buffers[0], deadline, is_send=False)]
            t_first = time.perf_counter()
            arrived += [link.enqueue(buf, deadline, is_send=False) for buf in buffers[1:]]
            whole.record_stream(link.stream)  # a dropped transfer's memory waits for its receives
        return _Posted(transfer_id, sizes, whole, buffers, arrived, r_start, t0, time.perf_counter(), t_first)

    def _post_early(self, peer: bytes, link: NcclLink, transfer_id: int, sizes: tuple[int, ...],
                    deadline: float) -> None:
        stale = self._posted.get(peer)
        if stale is not None:  # posted for a transfer that never came: its sends would feed ours
            raise self._dropped(peer, MalformedFrame(
                f"NCCL transfer {transfer_id} announced while transfer {stale.transfer_id} still holds "
                "posted receives; link dropped (the sender rebuilds it)"))
        try:
            self._posted[peer] = self._post(link, transfer_id, sizes, deadline)
        except TransferError as e:
            raise self._dropped(peer, e) from None

    def post_sizes(self, peer: bytes, rest: list[Any], limits: ReceiverLimits, deadline: float) -> None:
        """SIZES from an eager sender, ahead of its header: post the receives now, so the wire
        starts while the header is still being decoded. Only the sizes are trusted here, and
        only within the receiver's limits (count, each buffer, the whole message); nothing is
        written anywhere until the header is validated and matches them (`prepost`)."""
        link = self.links.get(peer)
        if link is None or not link.eager:
            raise MalformedFrame("NCCL SIZES from a peer without an eager NCCL link")
        if len(rest) != 1:
            raise MalformedFrame(f"NCCL SIZES with {len(rest)} frames")
        tid, sizes = proto.parse_sizes(rest[0].buffer, limits)
        self._post_early(peer, link, tid, sizes, deadline)

    def prepost(self, peer: bytes, header: TransferHeader, deadline: float) -> None:
        """Eager peers: make sure receives are posted for this decoded header (sizes within the
        limits) before the reservation and the writer are even looked up. Normally SIZES has
        posted them already, and they must match the header exactly: else the sends and
        receives are out of step and the link is dropped. If the header is then refused, the
        payload still lands here and is dropped (`discard`), keeping the pair in step."""
        self.t_header_decoded = time.perf_counter()
        link = self.links.get(peer)
        if link is None or not link.eager:
            return
        posted = self._posted.get(peer)
        sizes = tuple(header.buffer_sizes)
        if posted is not None and posted.transfer_id == header.transfer_id:
            if posted.sizes != sizes:
                raise self._dropped(peer, MalformedHeader(
                    f"header buffer sizes {list(sizes)[:8]} differ from the announced {list(posted.sizes)[:8]}; "
                    "NCCL link dropped", request_id=header.request_id))
            return
        self._post_early(peer, link, header.transfer_id, sizes, deadline)

    def drop(self, peer: bytes) -> None:
        """Close the link to `peer` (out of step or failed); its next hello builds a new one."""
        self._posted.pop(peer, None)
        link = self.links.pop(peer, None)
        if link is not None:
            link.close()

    def _dropped(self, peer: bytes, err: TransferError) -> TransferError:
        """Drop the link and mark `err` so that the sender (which gets it) builds a new one."""
        self.drop(peer)
        err.link_dropped = True
        return err

    def discard(self, peer: bytes) -> None:
        """Forget a pre-posted transfer that will not be written (its receives still complete on
        the link's stream; the allocator reuses the memory only after them), and tell the sender
        with the REFUSED status word (its typed error goes over ZMQ)."""
        posted = self._posted.pop(peer, None)
        link = self.links.get(peer)
        if posted is None or link is None or not link.eager:
            return
        try:
            link.enqueue(link.status_refused, time.monotonic() + REFUSAL_GRACE_S, is_send=True)
        except TransferError:
            self.drop(peer)  # the sender's wait ends with its grace period and abort

    def receive(self, peer: bytes, header: TransferHeader, writer: Any, deadline: float,
                reply: Callable[[bytes, list[bytes]], None], flush: Callable[[], None],
                queued: Callable[[], None] | None = None) -> None:
        """Receive all buffers of a validated header and write them. Eager links: once every
        write is queued, the status word goes out on the link behind the writes and `queued()`
        acks over ZMQ; the sender returns when it has both. Else the caller acks afterwards."""
        link = self.links.get(peer)
        if link is None:
            raise TransportUnavailable("NCCL payload from a peer that never sent its NCCL hello",
                                       request_id=header.request_id)
        posted = self._posted.pop(peer, None)

        def say_ready() -> None:
            reply(peer, [proto.READY, proto.pack([header.transfer_id])])
            flush()

        try:
            if posted is None or posted.transfer_id != header.transfer_id:
                posted = self._post(link, header.transfer_id, tuple(header.buffer_sizes), deadline,
                                    None if link.eager else say_ready)
            whole, buffers, arrived, r_start = posted.whole, posted.buffers, posted.arrived, posted.r_start
            t_entry, t_posted = posted.t_start, posted.t_posted
            t_write = time.perf_counter()
            marks = {"post_start": t_entry, "first_posted": posted.t_first_posted, "all_posted": t_posted,
                     "header_decoded": self.t_header_decoded or t_entry, "writer_ready": t_write}
            with torch.cuda.device(self.device):
                link.aux.wait_stream(torch.cuda.current_stream(self.device))  # the writer's id copy
                w_start = None
                for i, (buf, event) in enumerate(zip(buffers, arrived, strict=True)):
                    link.aux.wait_event(event)  # write buffer i while later ones arrive
                    if w_start is None:
                        w_start = timed_event(link.aux)
                    with torch.cuda.stream(link.aux):
                        writer.accept(i, buf)
                written = timed_event(link.aux)
                # the receive buffer is reused by the allocator once the writes are done
                whole.record_stream(link.aux)
                if link.eager:
                    link.stream.wait_event(written)
                    link.enqueue(link.status_ok, deadline, is_send=True)
            if link.eager and queued is not None:
                queued()
            t_queued = time.perf_counter()
            link.wait(written, deadline, "receive and write")
            t_done = time.perf_counter()
            self.last_timings = {
                "cpu_recvs_posted_ms": (t_posted - t_entry) * 1e3,
                "cpu_writer_ready_ms": (t_write - t_entry) * 1e3,
                "cpu_writes_queued_ms": (t_queued - t_entry) * 1e3,
                "cpu_written_ms": (t_done - t_entry) * 1e3,
                "cpu_in_recv_calls_ms": link.enqueue_seconds * 1e3,
                "cpu_in_write_calls_ms": (t_queued - t_write) * 1e3,
                "_events": (r_start, arrived[-1] if arrived else None, w_start, written),
            }
            self.last_marks = {**marks, "writes_queued": t_queued, "written_seen": t_done}
        except TransferError as e:
            raise self._dropped(peer, e) from None

    def timings(self) -> dict[str, Any]:
        """The last transfer's breakdown (ms): CPU marks from header validated, GPU spans."""
        t = dict(getattr(self, "last_timings", {}))
        ev = t.pop("_events", None)
        if ev is not None:
            r0, r1, w0, w1 = ev
            t["gpu_recv_ms"] = elapsed_ms(r0, r1)  # first receive posted to last received
            t["gpu_first_write_at_ms"] = elapsed_ms(r0, w0)  # first buffer in, its write starts
            t["gpu_write_tail_ms"] = elapsed_ms(r1, w1)  # last received to last write done
            t["gpu_recv_to_written_ms"] = elapsed_ms(r0, w1)
        return t

    def close(self) -> None:
        self._posted.clear()
        for link in self.links.values():
            link.close()
        self.links.clear()
