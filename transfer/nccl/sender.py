"""The prefill end of an NCCL link: `NcclSenderPlugin` (protocol: nccl/transport.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from transfer.convert import block_copy
from transfer.convert.pack import PackedKv, StagingPool
from transfer.nccl.lib import NcclLibrary
from transfer.nccl.link import (
    REFUSAL_GRACE_S,
    STATUS_OK,
    NcclLink,
    elapsed_ms,
    require_cuda,
    settles,
    timed_event,
)
from transfer.wire import framing as proto
from transfer.wire.errors import MalformedFrame, TransferError
from transfer.wire.header import TensorEntry


class NcclSenderPlugin:
    """Prefill side: owns the link to one decode peer (rank 0). Gathers run on a second stream
    (one kernel per buffer, block_copy.py), each send waits only for its own gather.

    `eager` (default): sends are enqueued right after the header; NCCL holds them on the GPU
    until the receiver posts its receives, so no READY round trip sits before the wire. A
    receiver that refuses a decodable header still takes the payload; its error is raised once
    the sends have settled. Sends still stuck after a grace period (nothing was posted) abort
    the link, rebuilt on the next transfer. `eager=False`: wait for READY first."""

    def __init__(self, device: torch.device | str | int, *, library_path: str | None = None,
                 chunk_bytes: int = 128 << 20, eager: bool = True, blocking: bool = True):
        self.device = require_cuda(device)
        self.lib = NcclLibrary(library_path)
        self.chunk_bytes = chunk_bytes  # few large buffers: one NCCL op each
        self.eager = eager
        self.blocking = blocking  # communicator kind (see NcclLink); the receiver follows the hello
        # the last transfer's absolute time.perf_counter() marks (one clock for every process on a
        # host: bench/transfer.py lines them up with the receiver's into one timeline)
        self.last_marks: dict[str, float] = {}
        self.t_link_checked = 0.0
        self.link: NcclLink | None = None
        self.pool = StagingPool()  # keyed: every buffer of a transfer alive at once

    def ensure_link(self, sender: Any, deadline: float) -> None:
        self.t_link_checked = time.perf_counter()  # right after the sender packed (a timeline mark)
        if self.link is not None:
            return
        uid = self.lib.unique_id()
        hello = [uid, self.device.index, self.lib.version, self.eager, self.blocking]
        sender._send_frames([proto.NCCL_HELLO, proto.pack(hello)], deadline)
        self.link = NcclLink(self.lib, uid, 0, self.device, blocking=self.blocking)
        self.link.wait_ready(deadline)

    def _gather(self, packed: PackedKv, index: int, entries: list[TensorEntry], ids: torch.Tensor | None) -> torch.Tensor:
        """Buffer `index` on the current (aux) stream: one kernel when it applies."""
        if ids is not None and packed.cache is not None:
            out = self.pool.get(index, packed.buffers[index].nbytes, self.device)
            if block_copy.gather_entries(packed.cache, ids, entries, out):
                return out
        return packed.buffer(index)

    def send_payload(self, sender: Any, packed: PackedKv, deadline: float, send_header: Callable[[], None]) -> Any:
        """Gather buffer i (aux stream), then send it (link stream, after gather i).

        Eager: SIZES first (the receiver posts its receives on it, without waiting for the
        header's decoding), then gather 0 and send 0, then the HEADER (`send_header`), then the
        rest; the wire starts as soon as the receiver has posted. Else: HEADER, gathers, and
        the sends once READY is in. Returns the receiver's ack body if it arrived while the
        sends were watched, else None."""
        link = self.link
        assert link is not None
        header = packed.header
        tid = header.transfer_id
        t_entry = time.perf_counter()
        link.enqueue_seconds = 0.0
        n = len(packed.buffers)
        marks = {"packed": self.t_link_checked or t_entry, "payload": t_entry}  # absolute perf_counter marks (same clock in every process)
        if self.eager:
            sender._send_frames([proto.SIZES, proto.pack([tid, list(header.buffer_sizes)])], deadline)
        else:
            send_header()
        marks["sizes_or_header_sent"] = time.perf_counter()
        header_sent = not self.eager
        by_buffer = header.entries_by_buffer()
        buffers: list[torch.Tensor] = []
        gathered: list[torch.cuda.Event] = []
        sent: list[torch.cuda.Event] = []
        ready = self.eager
        t_ready = t_entry if ready else None
        t_queued = t_enqueued = t_entry
        failed = dropped = False

        refused: list[tuple[TransferError, float]] = []
        acked: list[Any] = []

        def check_replies() -> None:
            """A refusing receiver still takes the payload (it pre-posts its receives), so its
            error is held until the sends settle; it ends the wait only after a grace period
            (a receiver that could not even decode the header posts nothing). An ack that
            arrives meanwhile is kept for the caller."""
            if refused:
                if time.monotonic() - refused[0][1] > REFUSAL_GRACE_S:
                    raise refused[0][0]
                return
            if acked:
                return
            try:
                body = sender._poll_reply(tid, 0.0, want=proto.ACK)
            except TransferError as e:
                if e.link_dropped:  # the receiver's end is gone: nothing will settle
                    raise
                refused.append((e, time.monotonic()))
                return
            if body is not None:
                acked.append(body)

        interrupt = check_replies if self.eager else None
        cpu_gather = 0.0

        with torch.cuda.device(self.device):
            link.aux.wait_stream(torch.cuda.current_stream(self.device))  # cache writes first
            g_start = timed_event(link.aux)
            n_start = torch.cuda.Event(enable_timing=True)
            ids = None
            if packed.block_ids is not None and packed.cache is not None and packed.cache.device == self.device:
                with torch.cuda.stream(link.aux):
                    ids = packed.block_ids.pin_memory().to(self.device, non_blocking=True)
            try:
                for i in range(n):
                    t_g = time.perf_counter()
                    with torch.cuda.stream(link.aux):
                        buffers.append(self._gather(packed, i, by_buffer[i], ids))
                        gathered.append(timed_event(link.aux))
                    cpu_gather += time.perf_counter() - t_g
                    if not ready and sender._poll_reply(tid, 0.0, want=proto.READY) is not None:
                        ready, t_ready = True, time.perf_counter()
                    if ready:  # send everything gathered so far
                        self._enqueue_sends(link, buffers, gathered, sent, n_start, deadline, interrupt)
                    if i == 0:
                        marks["first_gather_queued"] = time.perf_counter()
                    if not header_sent:  # the first send is queued: now the receiver may decode
                        send_header()
                        header_sent = True
                        marks["header_sent"] = time.perf_counter()
                if not header_sent:
                    send_header()
                t_queued = time.perf_counter()
                if not ready:
                    sender._wait_reply(tid, deadline, want=proto.READY)
                    t_ready = time.perf_counter()
                self._enqueue_sends(link, buffers, gathered, sent, n_start, deadline, interrupt)
                status = link.enqueue(link.status_in, deadline, is_send=False) if self.eager else None
                t_enqueued = time.perf_counter()
                if status is not None:  # the receiver's status word: its writes are done (or refused)
                    link.wait(status, deadline, "the receiver's status", interrupt)
                    with torch.cuda.stream(link.stream):  # done already: a 16-byte copy on an idle stream
                        word = int(link.status_in[0].item())
                    if word != STATUS_OK and not refused:  # its typed error is on the way over ZMQ
                        sender._wait_reply(tid, deadline, want=proto.ACK)
                        raise MalformedFrame(f"the receiver refused transfer {tid} on the NCCL link "
                                             f"(status {word}) but acked it over ZMQ")
                elif sent:
                    link.wait(sent[-1], deadline, "send", interrupt)
                if refused:  # the sends settled: the link stays, the error is the result
                    raise refused[0][0]
            except BaseException as exc:  # SIZES is out: whatever failed, the receiver has posted for it
                failed = True
                dropped = isinstance(exc, TransferError) and exc.link_dropped
                raise
            finally:
                # sends still waiting on the GPU (only an abort ends them), or the receiver's end gone
                if failed and (dropped or len(sent) < n or (sent and not settles(sent[-1], deadline))):
                    self.reset()
        t_done = time.perf_counter()
        self.last_timings = {
            "cpu_gathers_queued_ms": (t_queued - t_entry) * 1e3,
            "cpu_ready_ms": ((t_ready or t_entry) - t_entry) * 1e3,
            "cpu_sends_enqueued_ms": (t_enqueued - t_entry) * 1e3,
            "cpu_sent_ms": (t_done - t_entry) * 1e3,
            "cpu_in_gather_calls_ms": cpu_gather * 1e3,
            "cpu_in_send_calls_ms": link.enqueue_seconds * 1e3,
            "_events": (g_start, gathered[-1] if gathered else None, n_start, sent[-1] if sent else None),
            "buffers": n,
        }
        self.last_marks = {**marks, "all_queued": t_enqueued, "sends_done": t_done}
        return acked[0] if acked else None

    @staticmethod
    def _enqueue_sends(link: NcclLink, buffers: list[torch.Tensor], gathered: list[torch.cuda.Event],
                       sent: list[torch.cuda.Event], n_start: torch.cuda.Event, deadline: float,
                       interrupt: Callable[[], None] | None) -> None:
        while len(sent) < len(buffers):
            j = len(sent)
            if j == 0:
                link.stream.wait_event(gathered[0])
                n_start.record(link.stream)
            sent.append(link.enqueue(buffers[j], deadline, is_send=True, after=gathered[j], interrupt=interrupt))

    def timings(self) -> dict[str, Any]:
        """The last transfer's breakdown (ms): CPU marks from payload start, GPU spans."""
        t = dict(getattr(self, "last_timings", {}))
        ev = t.pop("_events", None)
        if ev is not None:
            g0, g1, n0, n1 = ev
            t["gpu_gather_ms"] = elapsed_ms(g0, g1)  # first gather start to last gather end
            t["gpu_nccl_ms"] = elapsed_ms(n0, n1)  # first send start to last send end
            t["gpu_gather_to_sent_ms"] = elapsed_ms(g0, n1)
        return t

    def reset(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    def close(self) -> None:
        self.reset()
