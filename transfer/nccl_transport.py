"""NCCL payloads for the KV data plane: header over ZMQ, bytes over a 2-rank communicator.

One `NcclLink` (a 2-rank communicator, its own CUDA stream, a watchdog) per (prefill, decode)
pair. The prefill side (rank 0) creates the unique id and sends it over the pair's ZMQ
connection (NCCL_HELLO); both sides initialise non-blocking and poll with a deadline.

A transfer (see zmq_protocol.py): HEADER over ZMQ (transport "nccl") → the sender gathers the
scattered blocks into few large buffers (`chunk_bytes` each; one Triton kernel per buffer,
block_copy.py, on its second stream) and enqueues one ncclSend per buffer, each after its own
gather, without waiting: NCCL holds the sends on the GPU until the receiver posts its receives
→ the receiver decodes the header (sizes within its limits), allocates the receive buffers and
posts one ncclRecv per buffer at once (`prepost`), before it even looks up the reservation;
then it builds the writer and writes each buffer into its cache (one scatter kernel per entry)
as soon as it has arrived → ack over ZMQ. A receiver that refuses a decoded header (no
reservation, incompatible spec) still takes the payload into the posted buffers and drops it,
then answers ERROR: the sender's sends settle, the link stays in step, and the sender raises
the receiver's typed error. Only when the header could not be decoded (nothing posted) do the
sends stay stuck: after a grace period the sender aborts the communicator and builds a new one
on its next transfer. A sender created with `eager=False` waits for READY from the receiver
before its first send (the receiver learns which from the NCCL_HELLO).

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
from dataclasses import dataclass
from typing import Any

import torch

from transfer import block_copy
from transfer import zmq_protocol as proto
from transfer.errors import MalformedFrame, TransferError, TransferTimeout, TransportUnavailable
from transfer.header import TensorEntry, TransferHeader
from transfer.nccl_lib import NCCL_IN_PROGRESS, NCCL_SUCCESS, NcclLibrary
from transfer.pack import PackedKv, StagingPool

_POLL_S = 0.0002  # sleep between polls once the spin phase is over
_REFUSAL_GRACE_S = 2.0  # a refused eager transfer: how long its sends may take to settle
_SPIN_S = 0.05  # first spin (yielding the GIL): a transfer of a few ms must not wait for a timer


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
        self.enqueue_seconds = 0.0  # CPU time in enqueue() (reset per transfer by the plugins)
        self.eager = False  # receiver side: the sender enqueues before READY (set from its hello)
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

    def _poll_until(self, done: Callable[[], bool], deadline: float, what: str,
                    interrupt: Callable[[], None] | None = None) -> None:
        """Poll `done()` and the communicator's async state until done, error or deadline;
        `interrupt()` (e.g. a check for the peer's error reply) may raise to stop waiting.
        Spins for `_SPIN_S` (yielding the GIL), then sleeps `_POLL_S` between polls."""
        armed = False
        spin_until = time.monotonic() + _SPIN_S
        try:
            while True:
                if interrupt is not None:
                    interrupt()
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
                time.sleep(0 if now < spin_until else _POLL_S)
        finally:
            if armed:
                self.watchdog.disarm()

    def wait_ready(self, deadline: float) -> None:
        if not self._ready:
            self._poll_until(lambda: True, deadline, "communicator set-up (is the peer joining?)")
            self._ready = True

    def enqueue(self, buf: torch.Tensor, deadline: float, *, is_send: bool,
                after: torch.cuda.Event | None = None,
                interrupt: Callable[[], None] | None = None) -> torch.cuda.Event:
        """One ncclSend/ncclRecv of `buf` on the link's stream (after `after`, if given); returns
        an event that completes with it. A non-blocking communicator may return before the
        work is on the stream (NCCL_IN_PROGRESS), so the event is recorded only once NCCL says
        it is enqueued."""
        t0 = time.perf_counter()
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
                self._poll_until(lambda: True, deadline, "enqueue", interrupt)
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
            self._poll_until(lambda: True, deadline, "enqueue", interrupt)
        event = torch.cuda.Event(enable_timing=True)
        event.record(self.stream)
        self.enqueue_seconds += time.perf_counter() - t0
        return event

    def wait(self, event: torch.cuda.Event, deadline: float, what: str,
             interrupt: Callable[[], None] | None = None) -> None:
        """Poll `event` (and the communicator's health) until done; abort at the deadline."""
        if event.query() and self._state() == NCCL_SUCCESS:
            return
        self._poll_until(event.query, deadline, what, interrupt)


def _settles(event: torch.cuda.Event, deadline: float, grace_s: float = _REFUSAL_GRACE_S) -> bool:
    """Whether `event` completes within `grace_s` (and the deadline): a refusing receiver that
    pre-posted its receives still takes the payload, so the sends finish and the link stays."""
    until = min(deadline, time.monotonic() + grace_s)
    while not event.query():
        if time.monotonic() > until:
            return False
        time.sleep(0.0005)
    return True


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
    """Prefill side: owns the link to one decode peer (rank 0). Gathers run on a second stream
    (one kernel per buffer, block_copy.py), each send waits only for its own gather.

    `eager` (default): sends are enqueued right after the header; NCCL holds them on the GPU
    until the receiver posts its receives, so no READY round trip sits before the wire. A
    receiver that refuses a decodable header still takes the payload; its error is raised once
    the sends have settled. Sends still stuck after a grace period (nothing was posted) abort
    the link, rebuilt on the next transfer. `eager=False`: wait for READY first."""

    def __init__(self, device: torch.device | str | int, *, library_path: str | None = None,
                 chunk_bytes: int = 128 << 20, eager: bool = True):
        self.device = _require_cuda(device)
        self.lib = NcclLibrary(library_path)
        self.chunk_bytes = chunk_bytes  # few large buffers: one NCCL op each
        self.eager = eager
        self.link: NcclLink | None = None
        self.pool = StagingPool()  # keyed: every buffer of a transfer alive at once

    def ensure_link(self, sender: Any, deadline: float) -> None:
        if self.link is not None:
            return
        uid = self.lib.unique_id()
        sender._send_frames([proto.NCCL_HELLO, proto.pack([uid, self.device.index, self.lib.version, self.eager])],
                            deadline)
        self.link = NcclLink(self.lib, uid, 0, self.device)
        self.link.wait_ready(deadline)

    def _gather(self, packed: PackedKv, index: int, entries: list[TensorEntry], ids: torch.Tensor | None) -> torch.Tensor:
        """Buffer `index` on the current (aux) stream: one kernel when it applies."""
        if ids is not None and packed.cache is not None:
            out = self.pool.get(index, packed.buffers[index].nbytes, self.device)
            if block_copy.gather_entries(packed.cache, ids, entries, out):
                return out
        return packed.buffer(index)

    def send_payload(self, sender: Any, packed: PackedKv, deadline: float) -> Any:
        """Gather buffer i (aux stream), then send it (link stream, after gather i). Eager: all
        enqueued at once; else sends start once READY is in (gathers run meanwhile). Returns
        the receiver's ack body if it arrived while the sends were watched, else None."""
        link = self.link
        assert link is not None
        tid = packed.header.transfer_id
        t_entry = time.perf_counter()
        link.enqueue_seconds = 0.0
        n = len(packed.buffers)
        by_buffer = packed.header.entries_by_buffer()
        buffers: list[torch.Tensor] = []
        gathered: list[torch.cuda.Event] = []
        sent: list[torch.cuda.Event] = []
        ready = self.eager
        t_ready = t_entry if ready else None
        failed = False

        refused: list[tuple[TransferError, float]] = []
        acked: list[Any] = []

        def check_replies() -> None:
            """A refusing receiver still takes the payload (it pre-posts its receives), so its
            error is held until the sends settle; it ends the wait only after a grace period
            (a receiver that could not even decode the header posts nothing). An ack that
            arrives meanwhile is kept for the caller."""
            if refused:
                if time.monotonic() - refused[0][1] > _REFUSAL_GRACE_S:
                    raise refused[0][0]
                return
            if acked:
                return
            try:
                body = sender._poll_reply(tid, 0.0, want=proto.ACK)
            except TransferError as e:
                refused.append((e, time.monotonic()))
                return
            if body is not None:
                acked.append(body)

        interrupt = check_replies if self.eager else None
        cpu_gather = 0.0

        with torch.cuda.device(self.device):
            link.aux.wait_stream(torch.cuda.current_stream(self.device))  # cache writes first
            g_start = _timed_event(link.aux)
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
                        gathered.append(_timed_event(link.aux))
                    cpu_gather += time.perf_counter() - t_g
                    if not ready and sender._poll_reply(tid, 0.0, want=proto.READY) is not None:
                        ready, t_ready = True, time.perf_counter()
                    if ready:  # send everything gathered so far
                        self._enqueue_sends(link, buffers, gathered, sent, n_start, deadline, interrupt)
                t_queued = time.perf_counter()
                if not ready:
                    sender._wait_reply(tid, deadline, want=proto.READY)
                    t_ready = time.perf_counter()
                self._enqueue_sends(link, buffers, gathered, sent, n_start, deadline, interrupt)
                t_enqueued = time.perf_counter()
                if sent:
                    link.wait(sent[-1], deadline, "send", interrupt)
                if refused:  # the sends settled: the link stays, the error is the result
                    raise refused[0][0]
            except TransferError:
                failed = True
                raise
            finally:
                if failed and (len(sent) < n or (sent and not _settles(sent[-1], deadline))):
                    self.reset()  # sends still waiting on the GPU: only an abort ends them
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


@dataclass
class _Posted:
    """Receives posted for one header before its writer exists (see `prepost`)."""

    transfer_id: int
    whole: torch.Tensor
    buffers: list[torch.Tensor]
    arrived: list[torch.cuda.Event]
    r_start: torch.cuda.Event
    t_start: float
    t_posted: float


class NcclReceiverPlugin:
    """Decode side: one link per prefill peer (rank 1), created on its NCCL_HELLO."""

    def __init__(self, device: torch.device | str | int, *, library_path: str | None = None):
        self.device = _require_cuda(device)
        self.lib = NcclLibrary(library_path)
        self.links: dict[bytes, NcclLink] = {}
        self._posted: dict[bytes, _Posted] = {}  # per peer: receives posted for its current header

    def accept_hello(self, peer: bytes, rest: list[Any], reply: Callable[[bytes, list[bytes]], None]) -> None:
        body = proto.unpack_small(rest[0].buffer, "nccl hello") if len(rest) == 1 else None
        if not isinstance(body, list) or not body or not isinstance(body[0], bytes):
            raise MalformedFrame("NCCL hello must be [unique_id, ...]")
        self._posted.pop(peer, None)
        old = self.links.pop(peer, None)
        if old is not None:
            old.close()
        link = NcclLink(self.lib, body[0], 1, self.device)
        link.eager = len(body) > 3 and body[3] is True  # the sender does not wait for READY
        self.links[peer] = link

    def _post(self, link: NcclLink, header: TransferHeader, deadline: float,
              before_posting: Callable[[], None] | None = None) -> _Posted:
        """Allocate the receive buffers (sizes were checked against the limits), then post one
        receive per buffer on the link's stream; `before_posting` runs in between (READY)."""
        t0 = time.perf_counter()
        link.enqueue_seconds = 0.0
        link.wait_ready(deadline)
        with torch.cuda.device(self.device):
            link.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(link.stream):
                whole = torch.empty(sum(header.buffer_sizes), dtype=torch.uint8, device=self.device)
            buffers, at = [], 0
            for size in header.buffer_sizes:
                buffers.append(whole[at:at + size])
                at += size
            if before_posting is not None:
                before_posting()
            # every receive is posted before any write, so the wire never waits for the host
            r_start = _timed_event(link.stream)
            arrived = [link.enqueue(buf, deadline, is_send=False) for buf in buffers]
            whole.record_stream(link.stream)  # a dropped transfer's memory waits for its receives
        return _Posted(header.transfer_id, whole, buffers, arrived, r_start, t0, time.perf_counter())

    def prepost(self, peer: bytes, header: TransferHeader, deadline: float) -> None:
        """Eager peers: allocate the receive buffers and post every receive as soon as the
        header is decoded (its sizes are within the limits), before the reservation and the
        writer are even looked up, so the wire starts at once. If the header is then refused,
        the payload still lands here and is dropped (`discard`), keeping the pair in step."""
        link = self.links.get(peer)
        if link is None or not link.eager:
            return
        self.discard(peer)
        try:
            self._posted[peer] = self._post(link, header, deadline)
        except TransferError:
            self.links.pop(peer, None)
            link.close()
            raise

    def discard(self, peer: bytes) -> None:
        """Forget a pre-posted transfer that will not be written (its receives still complete on
        the link's stream; the allocator reuses the memory only after them)."""
        self._posted.pop(peer, None)

    def receive(self, peer: bytes, header: TransferHeader, writer: Any, deadline: float,
                reply: Callable[[bytes, list[bytes]], None], flush: Callable[[], None]) -> None:
        """Receive all buffers of a validated header and write them (the caller acks)."""
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
                posted = self._post(link, header, deadline, None if link.eager else say_ready)
            whole, buffers, arrived, r_start = posted.whole, posted.buffers, posted.arrived, posted.r_start
            t_entry, t_posted = posted.t_start, posted.t_posted
            t_write = time.perf_counter()
            with torch.cuda.device(self.device):
                link.aux.wait_stream(torch.cuda.current_stream(self.device))  # the writer's id copy
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
                "cpu_recvs_posted_ms": (t_posted - t_entry) * 1e3,
                "cpu_writer_ready_ms": (t_write - t_entry) * 1e3,
                "cpu_writes_queued_ms": (t_queued - t_entry) * 1e3,
                "cpu_written_ms": (t_done - t_entry) * 1e3,
                "cpu_in_recv_calls_ms": link.enqueue_seconds * 1e3,
                "cpu_in_write_calls_ms": (t_queued - t_write) * 1e3,
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
        self._posted.clear()
        for link in self.links.values():
            link.close()
        self.links.clear()
