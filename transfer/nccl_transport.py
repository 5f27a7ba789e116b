"""NCCL payloads for the KV data plane: header over ZMQ, bytes over a 2-rank communicator.

One `NcclLink` (a 2-rank communicator, its own CUDA stream, a watchdog) per (prefill, decode)
pair. The prefill side (rank 0) creates the unique id and sends it over the pair's ZMQ
connection (NCCL_HELLO, which also says eager/blocking); both sides create the communicator on
a helper thread (blocking kind, the default) and connect it with one warm-up transfer, or
initialise non-blocking and poll; either way every wait has a deadline.

A transfer (see zmq_protocol.py), eager (default): the sender sends SIZES over ZMQ (the byte
count of every payload buffer), gathers buffer 0 (one Triton kernel per buffer, block_copy.py,
on its second stream) and enqueues its ncclSend, sends the HEADER (transport "nccl"), then
gathers and enqueues the rest, each send after its own gather, without waiting: NCCL holds the
sends on the GPU until the receiver posts → the receiver, on SIZES (checked against its limits),
allocates the receive buffers and posts one ncclRecv per buffer at once (`post_sizes`); on the
HEADER it checks that the sizes match (else the link is dropped: the pair would be out of
step), looks up the reservation, builds the writer and writes each buffer into its cache (one
scatter kernel per buffer) as soon as it has arrived; once every write is queued it sends a
16-byte status word on the link behind them (OK) and the ack over ZMQ; the sender returns when
it has both (its wait is on the GPU: no ZMQ hop after the last write). Nothing received is
interpreted or written before the header is validated. A receiver that refuses the header (no
reservation, incompatible spec, undecodable) still takes the payload into the posted buffers
and drops it, sends the REFUSED status word, and answers ERROR: the sender's sends settle, the link stays in step, and the
sender raises the receiver's typed error. If nothing was posted at all (SIZES refused), the
sends stay stuck: after a grace period the sender aborts the communicator and builds a new one
on its next transfer. A receiver that finds the pair out of step (sizes differ from the
header, receives still posted for a transfer that never came) drops its link and marks its
error `link_dropped`, so the sender drops its own and says hello again. A sender created with
`eager=False` sends no SIZES, waits for READY from the receiver (posted on the header) before
its first send, and gets no status word.

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
from transfer.errors import (
    MalformedFrame,
    MalformedHeader,
    TransferError,
    TransferTimeout,
    TransportUnavailable,
)
from transfer.header import ReceiverLimits, TensorEntry, TransferHeader
from transfer.nccl_lib import NCCL_IN_PROGRESS, NCCL_SUCCESS, NcclLibrary
from transfer.pack import PackedKv, StagingPool

_POLL_S = 0.0002  # sleep between polls once the spin phase is over
_REFUSAL_GRACE_S = 2.0  # a refused eager transfer: how long its sends may take to settle
_SPIN_S = 0.05  # first spin (yielding the GIL): a transfer of a few ms must not wait for a timer
_WATCH_S = 0.25  # the watchdog looks at its deadline at least this often
_STATUS_OK, _STATUS_REFUSED = 1, 2  # the receiver's per-transfer status word (eager links)
_WARMUP_BYTES = 32 << 20  # link set-up: one transfer this large connects every channel a payload uses


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
    """A thread that aborts a link whose armed deadline passes (a stuck call cannot hang us).
    Arming is a plain store (no wake-up on the hot path): the thread looks at the deadline at
    least every `_WATCH_S`, which is far below any deadline."""

    def __init__(self, on_fire: Callable[[], None]):
        self._on_fire = on_fire
        self._cond = threading.Condition()
        self._deadline: float | None = None
        self._closed = False
        self.fired = False
        self._thread = threading.Thread(target=self._run, name="nccl-watchdog", daemon=True)
        self._thread.start()

    def arm(self, deadline: float) -> None:
        self._deadline = deadline

    def disarm(self) -> None:
        self._deadline = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                deadline = self._deadline
                if deadline is None:
                    self._cond.wait(_WATCH_S)
                    continue
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._cond.wait(min(remaining, _WATCH_S))
                    continue
                if self._deadline != deadline:  # disarmed or re-armed meanwhile
                    continue
                self._deadline = None
                self.fired = True
                self._on_fire()


class NcclLink:
    """A 2-rank communicator (this side is `rank`, the peer `1 - rank`) on `device`.

    Blocking (default): the communicator is created, and its connection to the peer set up by
    one warm-up transfer, on a helper thread (`wait_ready` waits for it with a deadline, and
    aborts on timeout); after that an ncclSend/ncclRecv only enqueues (about 10 us, against
    70-200 us for a non-blocking communicator, whose every call goes through NCCL's async
    thread), and every wait for the GPU is polled with a deadline and the watchdog.
    `blocking=False`: a non-blocking communicator, every call polled."""

    def __init__(self, lib: NcclLibrary, uid: bytes, rank: int, device: torch.device, *, blocking: bool = True):
        self.lib, self.rank, self.peer, self.device = lib, rank, 1 - rank, device
        self._lock = threading.Lock()  # held around non-blocking NCCL calls; abort takes it
        self._dead = False
        self.nonblocking = not blocking and lib.has_config
        self.comm = 0
        self._init_error: TransferError | None = None
        self._init_thread: threading.Thread | None = None
        with torch.cuda.device(device):
            self.stream = torch.cuda.Stream(device=device)  # NCCL operations
            self.aux = torch.cuda.Stream(device=device)  # gathers (sender) / writes (receiver)
            # eager links end every transfer with a status word from the receiver (16 bytes)
            self.status_ok = torch.full((2,), _STATUS_OK, dtype=torch.int64, device=device)
            self.status_refused = torch.full((2,), _STATUS_REFUSED, dtype=torch.int64, device=device)
            self.status_in = torch.zeros(2, dtype=torch.int64, device=device)
            self._ready = False
            if self.nonblocking:
                self.comm = lib.comm_init_rank(2, uid, rank, nonblocking=True)[0]
            else:
                self._init_thread = threading.Thread(target=self._init_blocking, args=(uid,),
                                                     name="nccl-init", daemon=True)
                self._init_thread.start()
        self.enqueue_seconds = 0.0  # CPU time in enqueue() (reset per transfer by the plugins)
        self.eager = False  # receiver side: the sender enqueues before READY (set from its hello)
        self.watchdog = Watchdog(self.abort)

    def _init_blocking(self, uid: bytes) -> None:
        """Helper thread: create the communicator, then one warm-up transfer (rank 0 to rank 1)
        so that the peer connection exists before any real call (a first call would otherwise
        block on the peer). Returns early if the link is aborted meanwhile."""
        try:
            with torch.cuda.device(self.device):
                comm, _ = self.lib.comm_init_rank(2, uid, self.rank, nonblocking=False)
                with self._lock:
                    self.comm = comm
                    if self._dead:  # closed or timed out while we were joining
                        self.lib.abort(comm)
                        return
                buf = torch.empty(_WARMUP_BYTES, dtype=torch.uint8, device=self.device)
                op = self.lib.send if self.rank == 0 else self.lib.recv
                op(buf.data_ptr(), _WARMUP_BYTES, self.peer, comm, self.stream.cuda_stream)
                buf.record_stream(self.stream)
                status = self.status_ok if self.rank == 1 else self.status_in  # and the status word's way back
                back = self.lib.send if self.rank == 1 else self.lib.recv
                back(status.data_ptr(), status.numel() * status.element_size(), self.peer, comm, self.stream.cuda_stream)
                done = torch.cuda.Event()
                done.record(self.stream)
                while not done.query():
                    if self._dead:
                        return
                    time.sleep(0.0005)
        except TransferError as e:
            self._init_error = e
        except RuntimeError as e:  # CUDA error after an abort
            self._init_error = TransferError(f"NCCL link set-up failed: {e}"[:300])

    def abort(self) -> None:
        # a call stuck inside NCCL holds the lock: that call is what must be aborted
        held = self._lock.acquire(timeout=1.0)
        try:
            if not self._dead:
                self._dead = True
                if self.comm:
                    self.lib.abort(self.comm)
        finally:
            if held:
                self._lock.release()

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
        if self._ready:
            return
        if self._init_thread is not None:
            self._init_thread.join(max(0.0, deadline - time.monotonic()))
            if self._init_thread.is_alive():
                self.abort()
                raise TransferTimeout("NCCL communicator set-up not done before the deadline (is the peer "
                                      "joining?); link aborted")
            if self._init_error is not None:
                self.abort()
                raise self._init_error
            if self._dead:
                raise TransferTimeout("the NCCL communicator was aborted during set-up")
        else:
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
        # Hold the lock so that abort cannot interleave with the call. A blocking communicator
        # is connected (warm-up in set-up), so its calls only enqueue and never wait on the peer.
        self.watchdog.arm(deadline)
        try:
            with self._lock:
                if self._dead:
                    raise TransferTimeout("the NCCL communicator was aborted")
                res = op(*args)
        finally:
            self.watchdog.disarm()
        if res == NCCL_IN_PROGRESS:
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
                 chunk_bytes: int = 128 << 20, eager: bool = True, blocking: bool = True):
        self.device = _require_cuda(device)
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
                if time.monotonic() - refused[0][1] > _REFUSAL_GRACE_S:
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
                    if word != _STATUS_OK and not refused:  # its typed error is on the way over ZMQ
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
                if failed and (dropped or len(sent) < n or (sent and not _settles(sent[-1], deadline))):
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
        self.device = _require_cuda(device)
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
            r_start = _timed_event(link.stream)
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
            link.enqueue(link.status_refused, time.monotonic() + _REFUSAL_GRACE_S, is_send=True)
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
                        w_start = _timed_event(link.aux)
                    with torch.cuda.stream(link.aux):
                        writer.accept(i, buf)
                written = _timed_event(link.aux)
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
