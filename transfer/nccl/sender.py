"""The prefill end of an NCCL link: `NcclSenderPlugin`, a `PayloadSender` (payload/send.py;
protocol: nccl/transport.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from transfer.convert import block_copy
from transfer.convert.cache import PagedKvCache
from transfer.convert.pack import PackedKv, PackOptions, StagingPool, pack_kv
from transfer.nccl.lib import NcclLibrary
from transfer.nccl.link import (
    REFUSAL_GRACE_S,
    STATUS_OK,
    NcclLink,
    record_event,
    require_cuda,
    settles,
)
from transfer.payload.send import PayloadSender, PeerChannel
from transfer.payload.trace import NO_TRACE, Tracer
from transfer.wire import framing as proto
from transfer.wire.errors import MalformedFrame, TransferError
from transfer.wire.header import TensorEntry


class NcclSenderPlugin(PayloadSender):
    """Prefill side: owns the link to one decode peer (rank 0). Gathers run on a second stream
    (one kernel per buffer, block_copy.py), each send waits only for its own gather.

    `eager` (default): sends are enqueued right after the header; NCCL holds them on the GPU
    until the receiver posts its receives, so no READY round trip sits before the wire. A
    receiver that refuses a decodable header still takes the payload; its error is raised once
    the sends have settled. Sends still stuck after a grace period (nothing was posted) abort
    the link, rebuilt on the next transfer. `eager=False`: wait for READY first.
    `tracer`: timing marks for benchmarks (payload/trace.py; none by default)."""

    name = "nccl"

    def __init__(self, device: torch.device | str | int, *, library_path: str | None = None,
                 chunk_bytes: int = 128 << 20, eager: bool = True, blocking: bool = True,
                 tracer: Tracer = NO_TRACE):
        self.device = require_cuda(device)
        self.lib = NcclLibrary(library_path)
        self.chunk_bytes = chunk_bytes  # few large buffers: one NCCL op each
        self.eager = eager
        self.blocking = blocking  # communicator kind (see NcclLink); the receiver follows the hello
        self.tracer = tracer
        self.link: NcclLink | None = None
        self.pool = StagingPool()  # keyed: every buffer of a transfer alive at once

    def connect(self, channel: PeerChannel, transfer_id: int, deadline: float) -> None:
        if self.link is not None:
            return
        uid = self.lib.unique_id()
        hello = [uid, self.device.index, self.lib.version, self.eager, self.blocking]
        channel.send_frames([proto.NCCL_HELLO, proto.pack(hello)], deadline)
        self.link = NcclLink(self.lib, uid, 0, self.device, blocking=self.blocking,
                             tracer=self.tracer)
        self.link.wait_ready(deadline)

    def pack(self, cache: PagedKvCache, block_table: Sequence[int], token_start: int,
             token_end: int, **fields: Any) -> PackedKv:
        # few large buffers (one NCCL op each), the last ones smaller (a short final write)
        options = PackOptions(allow_views=False, chunk_bytes=self.chunk_bytes, taper=True)
        packed = pack_kv(cache, block_table, token_start, token_end, options=options,
                         transport="nccl", pool=self.pool, **fields)
        self.tracer.mark("packed")
        return packed

    def send(self, channel: PeerChannel, packed: PackedKv, deadline: float) -> Any:
        """Gather buffer i (aux stream), then send it (link stream, after gather i).

        Eager: SIZES first (the receiver posts its receives on it, without waiting for the
        header's decoding), then gather 0 and send 0, then the HEADER, then the rest; the wire
        starts as soon as the receiver has posted. Else: HEADER, gathers, and the sends once
        READY is in. Returns the receiver's ack body if it arrived while the sends were
        watched, else None."""
        assert self.link is not None
        return _Sending(self, self.link, channel, packed, deadline).run()

    def gather(self, packed: PackedKv, index: int, entries: list[TensorEntry],
               ids: torch.Tensor | None) -> torch.Tensor:
        """Buffer `index` on the current (aux) stream: one kernel when it applies."""
        if ids is not None and packed.cache is not None:
            out = self.pool.get(index, packed.buffers[index].nbytes, self.device)
            if block_copy.gather_entries(packed.cache, ids, entries, out):
                return out
        return packed.buffer(index)

    def reset(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None


class _Sending:
    """One transfer on the sender's link: its buffers, the events of their gathers and sends,
    and what the receiver said meanwhile (eager: a refusal is held until the sends settle)."""

    def __init__(self, plugin: NcclSenderPlugin, link: NcclLink, channel: PeerChannel,
                 packed: PackedKv, deadline: float):
        self.plugin, self.link, self.channel = plugin, link, channel
        self.packed, self.deadline = packed, deadline
        self.tid = packed.header.transfer_id
        self.tracer = plugin.tracer
        self.buffers: list[torch.Tensor] = []
        self.gathered: list[torch.cuda.Event] = []
        self.sent: list[torch.cuda.Event] = []
        self.ready = plugin.eager  # eager: no READY to wait for
        self.refused: list[tuple[TransferError, float]] = []  # (error, when it came)
        self.acked: list[Any] = []
        self.interrupt: Callable[[], None] | None = self.check_replies if plugin.eager else None

    def send_header(self) -> None:
        self.channel.send_frames(proto.header_frames(self.packed.header), self.deadline)

    def run(self) -> Any:
        tr, link, device = self.tracer, self.link, self.plugin.device
        tr.mark("payload")
        if self.plugin.eager:
            sizes = list(self.packed.header.buffer_sizes)
            self.channel.send_frames([proto.SIZES, proto.pack([self.tid, sizes])], self.deadline)
        else:
            self.send_header()
        tr.mark("sizes_or_header_sent")
        failed = dropped = False
        with torch.cuda.device(device):
            link.aux.wait_stream(torch.cuda.current_stream(device))  # cache writes first
            tr.gpu_mark("gather_start", link.aux)
            ids = None
            packed = self.packed
            if packed.block_ids is not None and packed.cache is not None \
                    and packed.cache.device == device:
                with torch.cuda.stream(link.aux):
                    ids = packed.block_ids.pin_memory().to(device, non_blocking=True)
            try:
                self.gather_and_send(ids)
                self.settle()
            except BaseException as exc:  # SIZES is out: the receiver has posted for it
                failed = True
                dropped = isinstance(exc, TransferError) and exc.link_dropped
                raise
            finally:
                # sends still waiting on the GPU (only an abort ends them), or the receiver's
                # end gone
                n, sent = len(packed.buffers), self.sent
                if failed and (dropped or len(sent) < n
                               or (sent and not settles(sent[-1], self.deadline))):
                    self.plugin.reset()
        tr.mark("sends_done")
        return self.acked[0] if self.acked else None

    def gather_and_send(self, ids: torch.Tensor | None) -> None:
        """Gather every buffer, each send queued behind its gather (eager, or once READY is
        in); the HEADER goes out right after the first send is queued."""
        tr, link, header = self.tracer, self.link, self.packed.header
        header_sent = not self.plugin.eager
        by_buffer = header.entries_by_buffer()
        for i in range(len(self.packed.buffers)):
            with tr.span("gather_calls"), torch.cuda.stream(link.aux):
                self.buffers.append(self.plugin.gather(self.packed, i, by_buffer[i], ids))
                self.gathered.append(record_event(link.aux))
            if not self.ready and self.channel.poll_reply(self.tid, want=proto.READY) is not None:
                self.ready = True
                tr.mark("ready")
            if self.ready:  # send everything gathered so far
                self.enqueue_sends()
            if i == 0:
                tr.mark("first_gather_queued")
            if not header_sent:  # the first send is queued: now the receiver may decode
                self.send_header()
                header_sent = True
                tr.mark("header_sent")
        tr.gpu_mark("gather_end", link.aux)
        if not header_sent:
            self.send_header()
        tr.mark("gathers_queued")
        if not self.ready:
            self.channel.wait_reply(self.tid, self.deadline, want=proto.READY)
            tr.mark("ready")
        self.enqueue_sends()
        tr.gpu_mark("send_end", link.stream)

    def enqueue_sends(self) -> None:
        link = self.link
        while len(self.sent) < len(self.buffers):
            j = len(self.sent)
            if j == 0:
                link.stream.wait_event(self.gathered[0])
                self.tracer.gpu_mark("send_start", link.stream)
            self.sent.append(link.enqueue(self.buffers[j], self.deadline, is_send=True,
                                          after=self.gathered[j], interrupt=self.interrupt))

    def settle(self) -> None:
        """Wait until the sends are done: eager, for the receiver's status word behind its
        writes; else for the last send. A refusal seen meanwhile is the result."""
        link, deadline = self.link, self.deadline
        status = None
        if self.plugin.eager:
            status = link.enqueue(link.status_in, deadline, is_send=False)
        self.tracer.mark("all_queued")
        if status is not None:  # the receiver's status word: its writes are done (or refused)
            link.wait(status, deadline, "the receiver's status", self.interrupt)
            with torch.cuda.stream(link.stream):  # done already: a 16-byte copy on an idle stream
                word = int(link.status_in[0].item())
            if word != STATUS_OK and not self.refused:  # its typed error is on the way over ZMQ
                self.channel.wait_reply(self.tid, deadline, want=proto.ACK)
                raise MalformedFrame(f"the receiver refused transfer {self.tid} on the NCCL "
                                     f"link (status {word}) but acked it over ZMQ")
        elif self.sent:
            link.wait(self.sent[-1], deadline, "send", self.interrupt)
        if self.refused:  # the sends settled: the link stays, the error is the result
            raise self.refused[0][0]

    def check_replies(self) -> None:
        """A refusing receiver still takes the payload (it pre-posts its receives), so its
        error is held until the sends settle; it ends the wait only after a grace period (a
        receiver that could not even decode the header posts nothing). An ack that arrives
        meanwhile is kept for the caller."""
        if self.refused:
            if time.monotonic() - self.refused[0][1] > REFUSAL_GRACE_S:
                raise self.refused[0][0]
            return
        if self.acked:
            return
        try:
            body = self.channel.poll_reply(self.tid, want=proto.ACK)
        except TransferError as e:
            if e.link_dropped:  # the receiver's end is gone: nothing will settle
                raise
            self.refused.append((e, time.monotonic()))
            return
        if body is not None:
            self.acked.append(body)
