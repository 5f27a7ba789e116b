"""The prefill worker's KV endpoint: sends KV + first token to decode workers' reservations.

Sends run on background threads, so the worker keeps prefilling while KV is on the wire: one
lane per decode worker address (created on first use: a queue, a thread and that peer's
`ZmqKvSender`), transfers to one peer in order, one at a time. A slow or hung decode worker
(stopped, not reading) holds up only its own lane until `transfer_timeout_s`, never the
transfers to the others. A lane idle for `lane_idle_s` closes (decode workers come and go); a
lane whose transfer failed closes its sender at once (no socket left reconnecting to a dead or
forged address) and, with nothing else queued, ends its thread: a failure costs a thread only
for the transfer's own timeout.
Contract: from `send()` until its `TransferOutcome` comes back from `poll_results()`, the
sequence's blocks are read by a sender thread — the worker must not free or reuse them; after
the outcome it frees them (success or failure alike). A failed transfer's outcome carries the
`ErrorCode` its transfer error implies (`TransferError.retryable` decides: one source of truth).
A lane thread runs on the cores `kv_sender_cpus` names, if any (Linux thread affinity; the
worker's own otherwise): on CPU, sends beside the forward pass they overlap then do not take
its core.
Lanes are capped (`max_kv_peers`): a send to one more decode address fails at once with
`TooManyPeers` (counted "too_many_lanes"), so no message can make the worker open threads and
connections without bound.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq

from engine.kv_spec import KvSpec
from protocol.errors import ErrorCode
from transfer.convert.cache import PagedKvCache
from transfer.endpoint.books import RefusedFn
from transfer.endpoint.security import SocketSecurity
from transfer.endpoint.sender import SendResult, ZmqKvSender, ZmqSenderConfig
from transfer.wire.errors import IncompatibleKv, TooManyPeers, TransferCancelled, TransferError
from worker.config import KvTransportConfig, parse_cpus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TransferOutcome:
    """How one queued transfer ended: acked (`error` None), or failed with `error` and `code`."""

    request_id: str
    num_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    code: ErrorCode | None = None

    @property
    def retryable(self) -> bool:
        return self.code is not None and self.code.retryable

    @classmethod
    def failed(cls, request_id: str, e: Exception) -> TransferOutcome:
        """A transfer error's code follows its class; any other exception is INTERNAL."""
        code = ErrorCode.of_transfer(e.retryable) if isinstance(e, TransferError) \
            else ErrorCode.INTERNAL
        return cls(request_id, error=f"{type(e).__name__}: {e}", code=code)


@dataclass(frozen=True)
class _Job:
    request_id: str
    address: str
    block_table: list[int]
    num_tokens: int  # token_end
    dest_spec: KvSpec
    meta: dict[str, Any]
    kv_token: str = ""
    token_start: int = 0
    layer_range: tuple[int, int] | None = None
    part: tuple[int, bool] | None = None  # (index, is_last) of a streamed part
    ready: Any = None  # waited on (`.synchronize()`) before reading: a CUDA event
    is_cancel: bool = False  # end_stream's marker
    head_range: tuple[int, int] | None = None  # model KV heads sent (None: all this cache holds)


_PHASES = ("queue_s", "ready_s", "pack_s", "payload_s", "fill_s", "ack_s")


@dataclass
class _Stream:
    """A streamed request's parts sent so far on a lane, and where the lane's time went (logged
    at DEBUG when the stream ends, as is a whole transfer's: what a layer-wise stream costs
    beyond its bytes)."""

    num_bytes: int = 0
    seconds: float = 0.0
    is_failed: bool = False
    num_parts: int = 0
    began: float = field(default_factory=time.monotonic)  # its first part dequeued
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(_PHASES, 0.0))

    def add(self, r: SendResult) -> None:
        self.num_parts += 1
        for name in ("pack_s", "payload_s", "fill_s", "ack_s"):
            self.phases[name] += getattr(r, name)

    def summary(self, rid: str, kind: str = "stream") -> str:
        ms = {k: v * 1e3 for k, v in self.phases.items()}
        return (f"KV {kind} {rid}: {self.num_parts} parts, {self.num_bytes / 2**20:.1f} MiB, "
                f"{(time.monotonic() - self.began) * 1e3:.1f} ms from the first part out: "
                f"waiting for parts {ms['queue_s']:.1f}, for their layers {ms['ready_s']:.1f}, "
                f"pack {ms['pack_s']:.1f}, payload {ms['payload_s']:.1f} (filling buffers "
                f"{ms['fill_s']:.1f}), acks {ms['ack_s']:.1f} ms")


@dataclass
class _Lane:
    """One decode peer: its jobs in order, the thread that sends them, its sender."""

    address: str
    jobs: queue.Queue[_Job | None] = field(default_factory=queue.Queue)
    sender: ZmqKvSender | None = None
    streams: dict[str, _Stream] = field(default_factory=dict)  # by request id
    cuda_stream: Any = None  # CUDA caches: the stream the lane reads streamed parts on


class KvOutbox:
    def __init__(self, ctx: zmq.Context, cache: PagedKvCache, config: KvTransportConfig, *,
                 lane_idle_s: float = 300.0, security: SocketSecurity | None = None,
                 on_refused: RefusedFn | None = None) -> None:
        """`lane_idle_s`: a lane with nothing to send for this long closes its sender and thread
        (decode workers come and go: a restarted one has a new address); `security`: the
        deployment's authentication; `on_refused`: counts refused sends."""
        self.security, self.on_refused = security, on_refused
        self.cache = cache
        self.config = config
        self.ctx = ctx
        self.address = "zmq+dealer"  # this side connects; it binds nothing
        self.lane_idle_s = lane_idle_s
        self._results: queue.Queue[TransferOutcome] = queue.Queue()
        self._lanes: dict[str, _Lane] = {}  # by decode address
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()  # the lanes (a lane retires itself)

    def send(self, request_id: str, address: str, block_table: list[int], num_tokens: int,
             dest_spec: KvSpec, meta: dict[str, Any], kv_token: str = "",
             head_range: tuple[int, int] | None = None) -> None:
        """Queue tokens [0, num_tokens) of a sequence for the reservation at `address` (the
        receiver knows its destination blocks already: it expects them, with `kv_token`);
        `head_range`: only these model KV heads (a TP route, transfer/convert/tp_routes.py).
        Raises TooManyPeers when `address` would be one lane more than `max_kv_peers`."""
        self._queue(_Job(request_id, address, list(block_table), num_tokens, dest_spec, meta,
                         kv_token, head_range=head_range))

    def send_part(self, request_id: str, address: str, block_table: list[int], token_start: int,
                  token_end: int, layer_range: tuple[int, int], dest_spec: KvSpec,
                  meta: dict[str, Any], part: tuple[int, bool], ready: Any = None,
                  kv_token: str = "", head_range: tuple[int, int] | None = None) -> None:
        """Queue part `part = (index, is_last)` of a streamed request: tokens
        `[token_start, token_end)` of layers `layer_range` (`meta` carries the part marker;
        `head_range`: a TP route's heads). Never raises: a refused lane (TooManyPeers) comes
        back as the request's outcome."""
        job = _Job(request_id, address, list(block_table), token_end, dest_spec, meta, kv_token,
                   token_start=token_start, layer_range=layer_range, part=part, ready=ready,
                   head_range=head_range)
        try:
            self._queue(job)
        except TooManyPeers as e:
            self._results.put(TransferOutcome.failed(request_id, e))

    def end_stream(self, request_id: str, address: str) -> None:
        """Cancel a streamed request whose last part will not come (an abort): its outcome
        (failed) follows the parts queued before."""
        with contextlib.suppress(TooManyPeers):  # no lane: no part was queued
            self._queue(_Job(request_id, address, [], 0, self.cache.spec, {}, is_cancel=True))

    def _queue(self, job: _Job) -> None:
        address, request_id = job.address, job.request_id
        with self._lock:  # a lane retiring meanwhile either sees this job or is gone already
            lane = self._lanes.get(address)
            if lane is None and len(self._lanes) >= self.config.max_kv_peers:
                if self.on_refused is not None:
                    self.on_refused("kv", "too_many_lanes")
                raise TooManyPeers("KV send lanes", len(self._lanes) + 1,
                                   self.config.max_kv_peers, request_id=request_id)
            if lane is None:
                lane = self._lanes[address] = _Lane(address)
                thread = threading.Thread(target=self._run, args=(lane,),
                                          name=f"kv-sender-{len(self._threads)}", daemon=True)
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
                thread.start()
            lane.jobs.put(job)

    @property
    def num_lanes(self) -> int:
        with self._lock:
            return len(self._lanes)

    def poll_results(self) -> list[TransferOutcome]:
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def _run(self, lane: _Lane) -> None:
        self._pin_thread()
        while True:
            t0 = time.monotonic()
            try:
                job = lane.jobs.get(timeout=self.lane_idle_s)
                if job is not None and job.part is not None and job.part[0] > 0:
                    stream = lane.streams.get(job.request_id)
                    if stream is not None:  # the lane waited for this part to be queued
                        stream.phases["queue_s"] += time.monotonic() - t0
            except queue.Empty:
                job = None
                if not self._retire(lane):
                    continue
            if job is None:
                if lane.sender is not None:
                    lane.sender.close()
                return
            outcome = self._send_one(lane, job) if job.part is None and not job.is_cancel \
                else self._send_part(lane, job)
            if outcome is None:
                continue
            self._results.put(outcome)
            if outcome.error is not None:
                if lane.sender is not None:
                    lane.sender.close()  # the next job (if any) connects afresh
                    lane.sender = None
                if not lane.streams and self._retire(lane):  # a failed stream keeps its lane
                    return

    def _send_part(self, lane: _Lane, job: _Job) -> TransferOutcome | None:
        """One part of a streamed request; its outcome once the request's stream is over."""
        rid = job.request_id
        stream = lane.streams.setdefault(rid, _Stream())
        if job.is_cancel:
            del lane.streams[rid]
            if stream.is_failed:
                return None
            return TransferOutcome.failed(rid, TransferCancelled("the stream was cancelled"))
        assert job.part is not None
        is_last = job.part[1]
        if stream.is_failed:  # its outcome went out at the failure
            if is_last:
                del lane.streams[rid]
            return None
        if job.ready is None:  # CPU, or the last part (queued once the sampling synced)
            outcome = self._send_one(lane, job, stream)
        else:
            t0 = time.monotonic()
            job.ready.synchronize()  # the part's layers are written: any stream may read them
            stream.phases["ready_s"] += time.monotonic() - t0
            with self._part_stream(lane):
                outcome = self._send_one(lane, job, stream)
        stream.num_bytes += outcome.num_bytes
        stream.seconds += outcome.seconds
        if outcome.error is not None:
            stream.is_failed = not is_last
            if is_last:
                del lane.streams[rid]
            return outcome
        if not is_last:
            return None
        del lane.streams[rid]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s", stream.summary(rid))
        return TransferOutcome(rid, stream.num_bytes, stream.seconds)

    def _pin_thread(self) -> None:
        """Run the calling lane thread on `kv_sender_cpus` (validated at start-up); a core
        this machine lacks is logged and the thread stays where it was."""
        if not self.config.kv_sender_cpus:
            return
        cpus = parse_cpus(self.config.kv_sender_cpus, "--kv-sender-cpus")
        try:
            os.sched_setaffinity(0, cpus)  # Linux: pid 0 is the calling thread
        except (OSError, AttributeError) as e:
            log.warning("KV send lane: cannot run on cores %s (%s); it stays on the worker's",
                        sorted(cpus), e)

    def _part_stream(self, lane: _Lane) -> contextlib.AbstractContextManager[Any]:
        """CUDA: a part's reads (gather, copy to host), once its event is reached, go on the
        lane's own stream. On the default stream they would queue behind every layer the worker
        has enqueued since the event, and the part would leave only once the step is computed.
        A part without an event is read on the default stream (ordered after the steps)."""
        if self.cache.device.type != "cuda":
            return contextlib.nullcontext()
        if lane.cuda_stream is None:
            lane.cuda_stream = torch.cuda.Stream(self.cache.device)
        return torch.cuda.stream(lane.cuda_stream)

    def _retire(self, lane: _Lane) -> bool:
        """Remove `lane` if nothing is queued on it (the next send to its address starts a new
        lane); whether it was removed."""
        with self._lock:
            if not lane.jobs.empty() or self._lanes.get(lane.address) is not lane:
                return False
            del self._lanes[lane.address]
            return True

    def _send_one(self, lane: _Lane, job: _Job, stream: _Stream | None = None) -> TransferOutcome:
        try:
            if not self.cache.spec.fingerprint_compatible(job.dest_spec):
                raise IncompatibleKv("different models", self.cache.spec, job.dest_spec)
            if lane.sender is None:
                lane.sender = ZmqKvSender(job.address, ZmqSenderConfig(
                    timeout_s=self.config.transfer_timeout_s, checksum=self.config.checksum,
                    payload=self.config.kv_payload, wire_dtype=self.config.kv_wire_dtype),
                    context=self.ctx, nccl=self._nccl_plugin(), security=self.security)
            r = lane.sender.send(self.cache, job.block_table, job.token_start, job.num_tokens,
                                 request_id=job.request_id, layer_range=job.layer_range,
                                 head_range=job.head_range, meta=job.meta,
                                 reservation_token=job.kv_token)
            if stream is not None:
                stream.add(r)
            elif log.isEnabledFor(logging.DEBUG):  # a whole transfer: the same line, one part
                whole = _Stream(r.num_bytes, r.seconds, began=time.monotonic() - r.seconds)
                whole.add(r)
                log.debug("%s", whole.summary(job.request_id, "whole"))
            return TransferOutcome(job.request_id, r.num_bytes, r.seconds)
        except TransferError as e:
            return TransferOutcome.failed(job.request_id, e)
        except Exception as e:  # never let the sender thread die
            log.exception("KV send of %s failed", job.request_id)
            return TransferOutcome.failed(job.request_id, e)

    def _nccl_plugin(self) -> Any:
        """One NCCL pair link per decode worker (None with the ZMQ transport)."""
        if self.config.transport != "nccl":
            return None
        from transfer.nccl.transport import NcclSenderPlugin
        return NcclSenderPlugin(self.cache.device)

    def close(self) -> None:
        """Stop every lane after the job it is sending (each closes its own sender)."""
        with self._lock:
            for lane in self._lanes.values():
                lane.jobs.put(None)
            self._lanes.clear()
        for thread in self._threads:
            thread.join(timeout=5)
