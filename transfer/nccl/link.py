"""One NCCL link per (prefill, decode) pair: a 2-rank communicator, its CUDA streams, a watchdog.

The transfer protocol that runs over a link is in nccl/transport.py; the two ends are
nccl/sender.py (prefill, rank 0) and nccl/receiver.py (decode, rank 1). Here: the link itself
(blocking communicators set up on a helper thread, warm-up, enqueue/wait with deadlines, abort)
and the small helpers both ends share (CUDA check, events, settle wait).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from transfer.nccl.lib import NCCL_IN_PROGRESS, NCCL_SUCCESS, NcclLibrary
from transfer.payload.trace import NO_TRACE, Tracer
from transfer.wire.errors import TransferError, TransferTimeout, TransportUnavailable

_POLL_S = 0.0002  # sleep between polls once the spin phase is over
REFUSAL_GRACE_S = 2.0  # a refused eager transfer: how long its sends may take to settle
_SPIN_S = 0.05  # first spin (yielding the GIL): a transfer of a few ms must not wait for a timer
_WATCH_S = 0.25  # the watchdog looks at its deadline at least this often
STATUS_OK, STATUS_REFUSED = 1, 2  # the receiver's per-transfer status word (eager links)
_WARMUP_BYTES = 32 << 20  # link set-up: one transfer this large connects every channel used


def require_cuda(device: torch.device | str | int) -> torch.device:
    if not torch.cuda.is_available():
        raise TransportUnavailable("the NCCL transport needs CUDA, and this machine has no usable "
                                   "GPU (torch.cuda.is_available() is False); choose the ZMQ "
                                   "transport")
    dev = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if dev.type != "cuda":
        raise TransportUnavailable(f"the NCCL transport moves GPU memory; got device {dev}")
    return dev


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

    def __init__(self, lib: NcclLibrary, uid: bytes, rank: int, device: torch.device, *,
                 blocking: bool = True, tracer: Tracer = NO_TRACE):
        self.lib, self.rank, self.peer, self.device = lib, rank, 1 - rank, device
        self.tracer = tracer  # CPU time in enqueue() goes to its "nccl_calls" span
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
            self.status_ok = torch.full((2,), STATUS_OK, dtype=torch.int64, device=device)
            self.status_refused = torch.full((2,), STATUS_REFUSED, dtype=torch.int64, device=device)
            self.status_in = torch.zeros(2, dtype=torch.int64, device=device)
            self._ready = False
            if self.nonblocking:
                self.comm = lib.comm_init_rank(2, uid, rank, nonblocking=True)[0]
            else:
                self._init_thread = threading.Thread(target=self._init_blocking, args=(uid,),
                                                     name="nccl-init", daemon=True)
                self._init_thread.start()
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
                # and the status word's way back
                status = self.status_ok if self.rank == 1 else self.status_in
                back = self.lib.send if self.rank == 1 else self.lib.recv
                back(status.data_ptr(), status.numel() * status.element_size(), self.peer, comm,
                     self.stream.cuda_stream)
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
                raise TransferTimeout("the NCCL communicator was aborted (deadline passed or "
                                      "peer lost)")
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
                    raise TransferError(f"NCCL {what}: {self.lib.error_string(state)} "
                                        f"(code {state})")
                if state == NCCL_SUCCESS and done():
                    return
                now = time.monotonic()
                if now > deadline:
                    self.abort()
                    raise TransferTimeout(f"NCCL {what} not done before the deadline; "
                                          "communicator aborted")
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
                raise TransferTimeout("NCCL communicator set-up not done before the deadline "
                                      "(is the peer joining?); link aborted")
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
        with self.tracer.span("nccl_calls"):
            return self._enqueue(buf, deadline, is_send, after, interrupt)

    def _enqueue(self, buf: torch.Tensor, deadline: float, is_send: bool,
                 after: torch.cuda.Event | None,
                 interrupt: Callable[[], None] | None) -> torch.cuda.Event:
        self.wait_ready(deadline)
        if after is not None:
            self.stream.wait_event(after)
        op = self.lib.send if is_send else self.lib.recv
        args = (buf.data_ptr(), buf.numel() * buf.element_size(), self.peer, self.comm,
                self.stream.cuda_stream)
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
        return record_event(self.stream)

    def wait(self, event: torch.cuda.Event, deadline: float, what: str,
             interrupt: Callable[[], None] | None = None) -> None:
        """Poll `event` (and the communicator's health) until done; abort at the deadline."""
        if event.query() and self._state() == NCCL_SUCCESS:
            return
        self._poll_until(event.query, deadline, what, interrupt)


def settles(event: torch.cuda.Event, deadline: float, grace_s: float = REFUSAL_GRACE_S) -> bool:
    """Whether `event` completes within `grace_s` (and the deadline): a refusing receiver that
    pre-posted its receives still takes the payload, so the sends finish and the link stays."""
    until = min(deadline, time.monotonic() + grace_s)
    while not event.query():
        if time.monotonic() > until:
            return False
        time.sleep(0.0005)
    return True


def record_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    """An event (no timing: cheaper to record) that completes with `stream`'s work so far."""
    event = torch.cuda.Event()
    event.record(stream)
    return event
