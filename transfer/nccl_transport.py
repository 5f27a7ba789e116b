"""NCCL payloads for the KV data plane: header over ZMQ, bytes over a 2-rank communicator.

One `NcclLink` (a 2-rank communicator, its own CUDA stream, a watchdog) per (prefill, decode)
pair. The prefill side (rank 0) creates the unique id and sends it over the pair's ZMQ
connection (NCCL_HELLO); both sides initialise non-blocking and poll with a deadline.

A transfer (see zmq_protocol.py): HEADER over ZMQ (transport "nccl") → the receiver validates
it, allocates the receive buffers (bounded by its limits) and answers READY → both issue one
ncclSend/ncclRecv per packed buffer, in order, on the link's stream → the receiver writes each
buffer into its cache on a second stream as soon as it has arrived, then acks over ZMQ. The
sender gathers the scattered blocks into few large buffers (pack.py, gather mode, `chunk_bytes`
each) on its second stream while READY is on its way; each send waits only for its own gather.

Every wait has a deadline. The watchdog thread aborts the communicator (`ncclCommAbort`) when
a deadline passes while a call is stuck; the transfer then fails with `TransferTimeout`, the
link is dropped and rebuilt on the next transfer. Ownership is as for ZMQ (zmq_sender.py,
zmq_receiver.py): source blocks are read until `send` returns; destination blocks belong to
the receiver's reservation.

Use: `ZmqKvSender(endpoint, nccl=NcclSenderPlugin(device))` and
`ZmqKvReceiver(cache, config, ..., nccl=NcclReceiverPlugin(device))`. Without CUDA or
without libnccl, constructing a plugin raises `TransportUnavailable` with what to do.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from transfer import zmq_protocol as proto
from transfer.errors import MalformedFrame, TransferError, TransferTimeout, TransportUnavailable
from transfer.header import TransferHeader
from transfer.nccl_lib import NCCL_IN_PROGRESS, NCCL_SUCCESS, NcclLibrary
from transfer.pack import PackedKv, StagingPool

_POLL_S = 0.00002


def _require_cuda(device: torch.device | str | int) -> torch.device:
    if not torch.cuda.is_available():
        raise TransportUnavailable("the NCCL transport needs CUDA, and this machine has no usable GPU "
                                   "(torch.cuda.is_available() is False); choose the ZMQ transport")
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise TransportUnavailable(f"the NCCL transport moves GPU memory; got device {dev}")
    return dev


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class Watchdog:
    """A thread that aborts a link whose armed deadline passes (a stuck call cannot hang us)."""

    def __init__(self, on_fire: Callable[[], None]):
        self._on_fire = on_fire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self.fired = False
        self._thread = threading.Thread(target=self._run, name="nccl-watchdog", daemon=True)
        self._thread.start()

    def arm(self, deadline: float) -> None:
        with self._cond:
            self._deadline = deadline
            self._cond.notify()

    def disarm(self) -> None:
        with self._cond:
            self._deadline = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                remaining = self._deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                self._deadline = None
                self.fired = True
                self._on_fire()


class NcclLink:
    """A 2-rank communicator (this side is `rank`, the peer `1 - rank`) on `device`."""

    def __init__(self, lib: NcclLibrary, uid: bytes, rank: int, device: torch.device):
        self.lib, self.rank, self.peer, self.device = lib, rank, 1 - rank, device
        self._lock = threading.Lock()  # held around non-blocking NCCL calls; abort takes it
        self._dead = False
        with torch.cuda.device(device):
            self.stream = torch.cuda.Stream(device=device)  # NCCL operations
            self.aux = torch.cuda.Stream(device=device)  # gathers (sender) / writes (receiver)
            self.comm, res = lib.comm_init_rank(2, uid, rank, nonblocking=True)
        self._ready = res == NCCL_SUCCESS and not lib.has_config
        self.watchdog = Watchdog(self.abort)

    def abort(self) -> None:
        with self._lock:
            if not self._dead:
                self._dead = True
                self.lib.abort(self.comm)

    def close(self) -> None:
        self.watchdog.close()
        self.abort()

    def _state(self) -> int:
        with self._lock:
            if self._dead:
                raise TransferTimeout("the NCCL communicator was aborted (deadline passed or peer lost)")
            return self.lib.async_error(self.comm)

    def _poll_until(self, done: Callable[[], bool], deadline: float, what: str) -> None:
        """Poll `done()` and the communicator's async state until done, error or deadline.
        Short sleeps (`_POLL_S`): a transfer of a few ms must not lose a scheduler tick."""
        armed = False
        try:
            while True:
                state = self._state()
                if state not in (NCCL_SUCCESS, NCCL_IN_PROGRESS):
                    self.abort()
                    raise TransferError(f"NCCL {what}: {self.lib.error_string(state)} (code {state})")
                if state == NCCL_SUCCESS and done():
                    return
                now = time.monotonic()
                if now > deadline:
                    self.abort()
                    raise TransferTimeout(f"NCCL {what} not done before the deadline; communicator aborted")
                if not armed:
                    self.watchdog.arm(deadline)
                    armed = True
                time.sleep(_POLL_S)
        finally:
            if armed:
                self.watchdog.disarm()

    def wait_ready(self, deadline: float) -> None:
        if not self._ready:
            self._poll_until(lambda: True, deadline, "communicator set-up (is the peer joining?)")
            self._ready = True

    def enqueue(self, buf: torch.Tensor, deadline: float, *, is_send: bool,
                after: torch.cuda.Event | None = None) -> torch.cuda.Event:
        """One ncclSend/ncclRecv of `buf` on the link's stream (after `after`, if given); returns
        an event that completes with it. A non-blocking communicator may return before the
        work is on the stream (NCCL_IN_PROGRESS), so the event is recorded only once NCCL says
        it is enqueued."""
        self.wait_ready(deadline)
        if after is not None:
            self.stream.wait_event(after)
        op = self.lib.send if is_send else self.lib.recv
        args = (buf.data_ptr(), buf.numel() * buf.element_size(), self.peer, self.comm, self.stream.cuda_stream)
        if self.lib.has_config:
            # Non-blocking communicator: returns at once. Hold the lock so abort cannot interleave.
            with self._lock:
                if self._dead:
                    raise TransferTimeout("the NCCL communicator was aborted")
                res = op(*args)
            if res == NCCL_IN_PROGRESS:
                self._poll_until(lambda: True, deadline, "enqueue")
        else:
            # A blocking one (NCCL < 2.14) may block until the peer posts its half: then the
            # armed watchdog must be able to abort from its thread, so no lock.
            self.watchdog.arm(deadline)
            try:
                if self._dead:
                    raise TransferTimeout("the NCCL communicator was aborted")
                op(*args)
            finally:
                self.watchdog.disarm()
            self._poll_until(lambda: True, deadline, "enqueue")
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        return event

    def wait(self, event: torch.cuda.Event, deadline: float, what: str) -> None:
        """Poll `event` (and the communicator's health) until done; abort at the deadline."""
        if event.query() and self._state() == NCCL_SUCCESS:
            return
        self._poll_until(event.query, deadline, what)


def _timed_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def _ms(a: torch.cuda.Event | None, b: torch.cuda.Event | None) -> float | None:
    if a is None or b is None:
        return None
    try:
        return a.elapsed_time(b)
    except RuntimeError:  # not recorded or not complete (a failed transfer)
        return None


class NcclSenderPlugin:
    """Prefill side: owns the link to one decode peer (rank 0). Gathers run on a second stream,
    one buffer ahead of the sends, so gathering overlaps the wire."""

    def __init__(self, device: torch.device | str | int, *, library_path: str | None = None,
                 chunk_bytes: int = 64 << 20):
        self.device = _require_cuda(device)
        self.lib = NcclLibrary(library_path)
        self.chunk_bytes = chunk_bytes  # few large buffers: one NCCL op each
        self.link: NcclLink | None = None
        self.pool = StagingPool()  # keyed: every buffer of a transfer alive at once

    def ensure_link(self, sender: Any, deadline: float) -> None:
        if self.link is not None:
            return
        uid = self.lib.unique_id()
        sender._send_frames([proto.NCCL_HELLO, proto.pack([uid, self.device.index, self.lib.version])],
                            deadline)
        self.link = NcclLink(self.lib, uid, 0, self.device)
        self.link.wait_ready(deadline)

    def send_payload(self, sender: Any, packed: PackedKv, deadline: float) -> None:
        """Gathers are queued on the aux stream while READY travels; each send is enqueued as
        soon as READY is in and waits (on the GPU) only for its own gather."""
        link = self.link
        assert link is not None
        tid = packed.header.transfer_id
        t_entry = time.perf_counter()
        n = len(packed.buffers)
        buffers: list[torch.Tensor] = []
        gathered: list[torch.cuda.Event] = []
        sent: list[torch.cuda.Event] = []
        ready = False
        t_ready = None
        with torch.cuda.device(self.device):
            link.aux.wait_stream(torch.cuda.current_stream(self.device))  # cache writes first
            g_start = _timed_event(link.aux)
            n_start = torch.cuda.Event(enable_timing=True)
            for i in range(n):
                with torch.cuda.stream(link.aux):
                    buffers.append(packed.buffer(i))
                    gathered.append(_timed_event(link.aux))
                if not ready and sender._poll_reply(tid, 0.0, want=proto.READY) is not None:
                    ready, t_ready = True, time.perf_counter()
                if ready:  # send everything gathered so far
                    while len(sent) < len(buffers):
                        j = len(sent)
                        if j == 0:
                            link.stream.wait_event(gathered[0])
                            n_start.record(link.stream)
                        sent.append(link.enqueue(buffers[j], deadline, is_send=True, after=gathered[j]))
            t_queued = time.perf_counter()
            if not ready:
                sender._wait_reply(tid, deadline, want=proto.READY)
                t_ready = time.perf_counter()
            while len(sent) < n:
                j = len(sent)
                if j == 0:
                    link.stream.wait_event(gathered[0])
                    n_start.record(link.stream)
                sent.append(link.enqueue(buffers[j], deadline, is_send=True, after=gathered[j]))
            t_enqueued = time.perf_counter()
            if sent:
                link.wait(sent[-1], deadline, "send")
        t_done = time.perf_counter()
        self.last_timings = {
            "cpu_gathers_queued_ms": (t_queued - t_entry) * 1e3,
            "cpu_ready_ms": ((t_ready or t_entry) - t_entry) * 1e3,
            "cpu_sends_enqueued_ms": (t_enqueued - t_entry) * 1e3,
            "cpu_sent_ms": (t_done - t_entry) * 1e3,
            "_events": (g_start, gathered[-1] if gathered else None, n_start, sent[-1] if sent else None),
            "buffers": n,
        }

    def timings(self) -> dict[str, Any]:
        """The last transfer's breakdown (ms): CPU marks from payload start, GPU spans."""
        t = dict(getattr(self, "last_timings", {}))
        ev = t.pop("_events", None)
        if ev is not None:
            g0, g1, n0, n1 = ev
            t["gpu_gather_ms"] = _ms(g0, g1)  # first gather start to last gather end
            t["gpu_nccl_ms"] = _ms(n0, n1)  # first send start to last send end
            t["gpu_gather_to_sent_ms"] = _ms(g0, n1)
        return t

    def reset(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    def close(self) -> None:
        self.reset()


class NcclReceiverPlugin:
    """Decode side: one link per prefill peer (rank 1), created on its NCCL_HELLO."""

    def __init__(self, device: torch.device | str | int, *, library_path: str | None = None):
        self.device = _require_cuda(device)
        self.lib = NcclLibrary(library_path)
        self.links: dict[bytes, NcclLink] = {}

    def accept_hello(self, peer: bytes, rest: list[Any], reply: Callable[[bytes, list[bytes]], None]) -> None:
        body = proto.unpack_small(rest[0].buffer, "nccl hello") if len(rest) == 1 else None
        if not isinstance(body, list) or not body or not isinstance(body[0], bytes):
            raise MalformedFrame("NCCL hello must be [unique_id, ...]")
        old = self.links.pop(peer, None)
        if old is not None:
            old.close()
        self.links[peer] = NcclLink(self.lib, body[0], 1, self.device)

    def receive(self, peer: bytes, header: TransferHeader, writer: Any, deadline: float,
                reply: Callable[[bytes, list[bytes]], None], flush: Callable[[], None]) -> None:
        """Receive all buffers of a validated header and write them (the caller acks)."""
        link = self.links.get(peer)
        if link is None:
            raise TransportUnavailable("NCCL payload from a peer that never sent its NCCL hello",
                                       request_id=header.request_id)
        try:
            t_entry = time.perf_counter()
            link.wait_ready(deadline)
            with torch.cuda.device(self.device):
                link.stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(link.stream):  # sizes were checked against the limits
                    whole = torch.empty(sum(header.buffer_sizes), dtype=torch.uint8, device=self.device)
                buffers, at = [], 0
                for size in header.buffer_sizes:
                    buffers.append(whole[at:at + size])
                    at += size
            reply(peer, [proto.READY, proto.pack([header.transfer_id])])
            flush()
            t_ready = time.perf_counter()
            with torch.cuda.device(self.device):
                # every receive is posted before any write, so the wire never waits for the host
                r_start = _timed_event(link.stream)
                arrived = [link.enqueue(buf, deadline, is_send=False) for buf in buffers]
                t_posted = time.perf_counter()
                w_start = None
                for i, (buf, event) in enumerate(zip(buffers, arrived, strict=True)):
                    link.aux.wait_event(event)  # write buffer i while later ones arrive
                    if w_start is None:
                        w_start = _timed_event(link.aux)
                    with torch.cuda.stream(link.aux):
                        writer.accept(i, buf)
                written = _timed_event(link.aux)
                # the receive buffer is reused by the allocator once the writes are done
                whole.record_stream(link.aux)
            t_queued = time.perf_counter()
            link.wait(written, deadline, "receive and write")
            t_done = time.perf_counter()
            self.last_timings = {
                "cpu_ready_sent_ms": (t_ready - t_entry) * 1e3,
                "cpu_recvs_posted_ms": (t_posted - t_entry) * 1e3,
                "cpu_writes_queued_ms": (t_queued - t_entry) * 1e3,
                "cpu_written_ms": (t_done - t_entry) * 1e3,
                "_events": (r_start, arrived[-1] if arrived else None, w_start, written),
            }
        except TransferError:
            self.links.pop(peer, None)
            link.close()
            raise

    def timings(self) -> dict[str, Any]:
        """The last transfer's breakdown (ms): CPU marks from header validated, GPU spans."""
        t = dict(getattr(self, "last_timings", {}))
        ev = t.pop("_events", None)
        if ev is not None:
            r0, r1, w0, w1 = ev
            t["gpu_recv_ms"] = _ms(r0, r1)  # first receive posted to last received
            t["gpu_first_write_at_ms"] = _ms(r0, w0)  # first buffer in, its write starts
            t["gpu_write_tail_ms"] = _ms(r1, w1)  # last received to last write done
            t["gpu_recv_to_written_ms"] = _ms(r0, w1)
        return t

    def close(self) -> None:
        for link in self.links.values():
            link.close()
        self.links.clear()
