"""The decode end of an NCCL link: `NcclReceiverPlugin`, a `PayloadReceiver`
(payload/receive.py; protocol: nccl/transport.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from transfer.nccl.lib import NcclLibrary
from transfer.nccl.link import REFUSAL_GRACE_S, NcclLink, record_event, require_cuda
from transfer.payload.receive import InboundTransfer, PayloadReceiver
from transfer.payload.trace import NO_TRACE, Tracer
from transfer.wire import framing as proto
from transfer.wire.errors import (
    MalformedFrame,
    MalformedHeader,
    TooManyPeers,
    TransferError,
    TransportUnavailable,
)
from transfer.wire.header import TransferHeader


@dataclass
class _Posted:
    """Receives posted for one header before its writer exists (see `prepare`)."""

    transfer_id: int
    sizes: tuple[int, ...]
    whole: torch.Tensor
    buffers: list[torch.Tensor]
    arrived: list[torch.cuda.Event]


class NcclReceiverPlugin(PayloadReceiver):
    """Decode side: one link per prefill peer (rank 1), created on its NCCL_HELLO.
    `tracer`: timing marks for benchmarks (payload/trace.py; none by default)."""

    transport = "nccl"
    kinds = (proto.NCCL_HELLO, proto.SIZES)

    def __init__(self, device: torch.device | str | int, *, library_path: str | None = None,
                 tracer: Tracer = NO_TRACE, max_links: int = 64):
        """`max_links`: prefill peers with a link at once; a hello beyond them is refused
        (LimitExceeded, counted "too_many_links") before any communicator is built."""
        self.max_links = max_links
        self.device = require_cuda(device)
        self.lib = NcclLibrary(library_path)
        self.tracer = tracer
        self.links: dict[bytes, NcclLink] = {}
        self._posted: dict[bytes, _Posted] = {}  # per peer: receives posted for its current header

    def on_message(self, peer: bytes, kind: bytes, rest: list[Any]) -> None:
        if kind == proto.NCCL_HELLO:
            self.accept_hello(peer, rest)
        else:
            self.post_sizes(peer, rest)

    def accept_hello(self, peer: bytes, rest: list[Any]) -> None:
        body = proto.unpack_small(rest[0].buffer, "nccl hello") if len(rest) == 1 else None
        if not isinstance(body, list) or not body or not isinstance(body[0], bytes):
            raise MalformedFrame("NCCL hello must be [unique_id, ...]")
        if peer not in self.links and len(self.links) >= self.max_links:
            raise TooManyPeers("NCCL links", len(self.links) + 1, self.max_links)
        self._posted.pop(peer, None)
        old = self.links.pop(peer, None)
        if old is not None:
            old.close()
        blocking = not (len(body) > 4 and body[4] is False)  # older senders: blocking unless said
        link = NcclLink(self.lib, body[0], 1, self.device, blocking=blocking, tracer=self.tracer)
        link.eager = len(body) > 3 and body[3] is True  # the sender does not wait for READY
        self.links[peer] = link

    def _post(self, link: NcclLink, transfer_id: int, sizes: tuple[int, ...], deadline: float,
              before_posting: Callable[[], None] | None = None) -> _Posted:
        """Allocate the receive buffers (sizes were checked against the limits), then post one
        receive per buffer on the link's stream; `before_posting` runs in between (READY)."""
        tr = self.tracer
        tr.mark("post_start")
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
            tr.gpu_mark("recv_start", link.stream)
            arrived = [link.enqueue(buffers[0], deadline, is_send=False)]
            tr.mark("first_posted")
            arrived += [link.enqueue(buf, deadline, is_send=False) for buf in buffers[1:]]
            tr.gpu_mark("recv_end", link.stream)
            whole.record_stream(link.stream)  # a dropped transfer's memory waits for its receives
        tr.mark("all_posted")
        return _Posted(transfer_id, sizes, whole, buffers, arrived)

    def _post_early(self, peer: bytes, link: NcclLink, transfer_id: int,
                    sizes: tuple[int, ...]) -> None:
        stale = self._posted.get(peer)
        if stale is not None:  # posted for a transfer that never came: its sends would feed ours
            raise self._dropped(peer, MalformedFrame(
                f"NCCL transfer {transfer_id} announced while transfer {stale.transfer_id} "
                "still holds posted receives; link dropped (the sender rebuilds it)"))
        deadline = time.monotonic() + self.desk.idle_timeout_s
        try:
            self._posted[peer] = self._post(link, transfer_id, sizes, deadline)
        except TransferError as e:
            raise self._dropped(peer, e) from None

    def post_sizes(self, peer: bytes, rest: list[Any]) -> None:
        """SIZES from an eager sender, ahead of its header: post the receives now, so the wire
        starts while the header is still being decoded. Only the sizes are trusted here, and
        only within the receiver's limits (count, each buffer, the whole message); nothing is
        written anywhere until the header is validated and matches them (`prepare`)."""
        link = self.links.get(peer)
        if link is None or not link.eager:
            raise MalformedFrame("NCCL SIZES from a peer without an eager NCCL link")
        if len(rest) != 1:
            raise MalformedFrame(f"NCCL SIZES with {len(rest)} frames")
        tid, sizes = proto.parse_sizes(rest[0].buffer, self.desk.limits)
        self._post_early(peer, link, tid, sizes)

    def prepare(self, peer: bytes, header: TransferHeader) -> None:
        """Eager peers: make sure receives are posted for this decoded header (sizes within the
        limits) before the reservation and the writer are even looked up. Normally SIZES has
        posted them already, and they must match the header exactly: else the sends and
        receives are out of step and the link is dropped. If the header is then refused, the
        payload still lands here and is dropped (`refuse`), keeping the pair in step."""
        self.tracer.mark("header_decoded")
        link = self.links.get(peer)
        if link is None or not link.eager:
            return
        posted = self._posted.get(peer)
        sizes = tuple(header.buffer_sizes)
        if posted is not None and posted.transfer_id == header.transfer_id:
            if posted.sizes != sizes:
                raise self._dropped(peer, MalformedHeader(
                    f"header buffer sizes {list(sizes)[:8]} differ from the announced "
                    f"{list(posted.sizes)[:8]}; NCCL link dropped", request_id=header.request_id))
            return
        self._post_early(peer, link, header.transfer_id, sizes)

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

    def refuse(self, peer: bytes) -> None:
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

    def begin(self, transfer: InboundTransfer) -> None:
        """Receive and write the whole payload now (this blocks the receiver's thread until
        the writes are done or failed, at most its idle timeout)."""
        deadline = min(transfer.deadline, time.monotonic() + self.desk.idle_timeout_s)
        self.desk.run_step(transfer, lambda: self.receive(transfer, deadline))

    def receive(self, transfer: InboundTransfer, deadline: float) -> None:
        """Receive all buffers of a validated header and write them. Eager links: once every
        write is queued, the status word goes out on the link behind the writes and the ack
        over ZMQ (`desk.ack_early`); the sender returns when it has both. Else the receiver
        acks once this returns."""
        peer, header = transfer.peer, transfer.header
        link = self.links.get(peer)
        if link is None:
            raise TransportUnavailable("NCCL payload from a peer that never sent its NCCL hello",
                                       request_id=header.request_id)
        posted = self._posted.pop(peer, None)

        def say_ready() -> None:
            self.desk.reply(peer, [proto.READY, proto.pack([header.transfer_id])])
            self.desk.flush()

        try:
            if posted is None or posted.transfer_id != header.transfer_id:
                posted = self._post(link, header.transfer_id, tuple(header.buffer_sizes),
                                    deadline, None if link.eager else say_ready)
            self._write(link, posted, transfer, deadline)
        except TransferError as e:
            raise self._dropped(peer, e) from None

    def _write(self, link: NcclLink, posted: _Posted, transfer: InboundTransfer,
               deadline: float) -> None:
        """Write each buffer as soon as it has arrived (aux stream), then wait for the writes."""
        tr = self.tracer
        tr.mark("writer_ready")
        with torch.cuda.device(self.device):
            link.aux.wait_stream(torch.cuda.current_stream(self.device))  # the writer's id copy
            for i, (buf, event) in enumerate(zip(posted.buffers, posted.arrived, strict=True)):
                link.aux.wait_event(event)  # write buffer i while later ones arrive
                if i == 0:
                    tr.gpu_mark("write_start", link.aux)
                with torch.cuda.stream(link.aux):
                    transfer.writer.accept(i, buf)
            written = record_event(link.aux)
            tr.gpu_mark("write_end", link.aux)
            # the receive buffer is reused by the allocator once the writes are done
            posted.whole.record_stream(link.aux)
            if link.eager:
                link.stream.wait_event(written)
                link.enqueue(link.status_ok, deadline, is_send=True)
        if link.eager:
            self.desk.ack_early(transfer)
        tr.mark("writes_queued")
        link.wait(written, deadline, "receive and write")
        tr.mark("written_seen")

    def close(self) -> None:
        self._posted.clear()
        for link in self.links.values():
            link.close()
        self.links.clear()
