"""What every worker process shares: its config, sockets, Hello, heartbeats and the poll loop.

Subclasses (decode/worker.py, prefill/worker.py) implement `on_ctrl`, `has_work`, `do_work`,
`heartbeat`, `kv_address`, `fail_request` and `fail_step`. The loop never blocks longer than
`idle_poll_ms` while idle and not at all while there is work, so heartbeats keep flowing under
load.

Guards (no message and no step takes the process down): every control frame is decoded with
this worker's limits (its `--max-model-len`, its vocabulary: protocol/bounds.py) and frame size
before a handler sees it; a frame that fails to decode but names a request fails that request
with `RequestFailed(INVALID_REQUEST)` naming the field. A handler that raises fails only the
request its message names (`fail_request`, then `RequestFailed(INTERNAL)`); a `do_work` that
raises fails the requests the engine was stepping (`fail_step`). Both are counted in
`rejections` and logged at a bounded rate. Hello is repeated every `hello_interval_s` from the
heartbeat thread, so a proxy that lost this worker registers it again.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import zmq

from engine.llm_engine import LLMEngine
from engine.tp_group import TpError
from engine.tp_service import RankService
from protocol import worker_events as ev
from protocol.auth import ClusterAuth
from protocol.bounds import MAX_MODEL_LEN, VOCAB_SIZE
from protocol.channel import Inbox, Outbox, frame_limit_for
from protocol.codec import MalformedMessage, MessageFamily
from protocol.errors import ErrorCode
from protocol.log_limit import LogLimiter
from protocol.rejections import Plane, Rejections
from transfer.convert.cache import PagedKvCache
from worker.config import WorkerConfig

log = logging.getLogger(__name__)

MAX_STEPS = 256  # step timings per heartbeat


class WorkerBase(abc.ABC):
    role = "worker"

    def __init__(self, config: WorkerConfig, engine: LLMEngine, ctrl_family: MessageFamily) -> None:
        self.config, self.engine = config, engine
        self.worker_id = config.worker_id
        self.kv_cache = PagedKvCache(engine.plan.spec, engine.runner.kv_caches)  # the KV endpoints'
        self.ctx = zmq.Context()
        self.rejections = Rejections()  # what every plane of this worker refused (in heartbeats)
        self.log = LogLimiter(log)
        self.auth = ClusterAuth(self.ctx, config.cluster_secret, self._refused)
        max_model_len = engine.plan.max_model_len
        self.ctrl = Inbox(self.ctx, ctrl_family, config.host, rejections=self.rejections,
                          plane=Plane.CONTROL, max_frame_bytes=frame_limit_for(max_model_len),
                          limits={MAX_MODEL_LEN: max_model_len,
                                  VOCAB_SIZE: engine.model_config.vocab_size},
                          on_malformed=self._on_malformed, auth=self.auth)
        self.events = Outbox(self.ctx, ev.WORKER_EVENTS, config.events_address, auth=self.auth)
        self.poller = zmq.Poller()
        self.poller.register(self.ctrl.socket, zmq.POLLIN)
        self.stopping = False

    # ---- to implement -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def kv_address(self) -> str:
        """Where this worker's KV endpoint listens (reported in Hello)."""

    @property
    def kv_rank_addresses(self) -> list[str]:
        """Tensor parallel: every rank's KV receiver, rank 0 first (reported in Hello; empty
        for a worker that binds none per rank)."""
        return []

    @classmethod
    def rank_service(cls, config: WorkerConfig) -> RankService | None:
        """What each follower tensor-parallel rank runs beside the model (its KV endpoint;
        engine/tp_service.py); None: nothing."""
        return None

    @abc.abstractmethod
    def on_ctrl(self, msg: object) -> None:
        """Handle one control message from the proxy."""

    def on_kv(self) -> None:  # noqa: B027 - optional hook
        """KV socket readable (decode: arrivals; prefill: acks)."""

    @abc.abstractmethod
    def has_work(self) -> bool:
        """True while a step would make progress (the loop then polls without waiting)."""

    @abc.abstractmethod
    def do_work(self) -> None:
        """One round of work: admissions, timeouts, at most one engine step."""

    @abc.abstractmethod
    def heartbeat(self) -> ev.Heartbeat:
        """This worker's load, sent every heartbeat interval."""

    def on_idle(self) -> None:  # noqa: B027 - optional hook
        """Called when there was nothing to do (integrity checks belong here)."""

    @abc.abstractmethod
    def fail_request(self, request_id: str) -> bool:
        """Free whatever this worker holds for `request_id` (a handler of its message raised);
        whether it held anything."""

    @abc.abstractmethod
    def fail_step(self) -> list[str]:
        """`do_work` raised: drop the requests the engine was stepping, freeing their blocks;
        their ids (each gets `RequestFailed(INTERNAL)`)."""

    # ---- guards -------------------------------------------------------------------------------
    def send_failed(self, request_id: str, error: str, code: ErrorCode) -> None:
        self.events.send(ev.RequestFailed(request_id, self.worker_id, error, code))

    def holds(self, request_id: str) -> bool:
        """Whether a request with this id is queued, running or transferring here."""
        return False

    def _on_malformed(self, e: MalformedMessage) -> None:
        """A control frame naming a request did not decode: that request fails, typed (unless
        the id names a request this worker holds: a bad frame does not end another's)."""
        if e.request_id is not None and not self.holds(e.request_id):
            self.send_failed(e.request_id, f"invalid message: {e}", ErrorCode.INVALID_REQUEST)

    def dispatch(self, msg: object) -> None:
        """`on_ctrl(msg)`, guarded: a handler that raises fails only its message's request."""
        try:
            self.on_ctrl(msg)
        except Exception as e:
            self.rejections.add(Plane.CONTROL, "handler_error")
            self.log.error(type(msg).__name__, "handling %s failed (%s: %s); only its request "
                           "fails", type(msg).__name__, type(e).__name__, e)
            rid = getattr(msg, "request_id", None)
            if isinstance(rid, str):
                try:
                    self.fail_request(rid)
                except Exception as cleanup:
                    self.log.error("fail_request", "freeing %s failed too (%s: %s)", rid,
                                   type(cleanup).__name__, cleanup)
                self.send_failed(rid, f"{type(e).__name__}: {e}", ErrorCode.INTERNAL)

    def guarded(self, work: Callable[[], None]) -> None:
        """`work()` (`do_work`, `on_kv`), guarded: a step that raises fails the requests it
        held, not the process."""
        try:
            work()
        except Exception as e:
            self.rejections.add(Plane.CONTROL, "step_error")
            self.log.error("step", "a step failed (%s: %s); failing its requests",
                           type(e).__name__, e)
            log.debug("step failure", exc_info=True)
            try:
                failed = self.fail_step()
            except Exception as cleanup:  # the engine is beyond repair: say so, keep serving
                self.log.error("fail_step", "dropping the step's requests failed too (%s: %s)",
                               type(cleanup).__name__, cleanup)
                failed = []
            for rid in failed:
                self.send_failed(rid, f"engine step failed: {type(e).__name__}: {e}",
                                 ErrorCode.INTERNAL)
            if isinstance(e, TpError):  # a rank is gone: the engine cannot step again, so the
                raise  # worker exits (worker/main.py) and is handled as a dead worker

    # ---- shared -------------------------------------------------------------------------------
    def _refused(self, plane: str, reason: str) -> None:
        """What the auth handler and the KV endpoint refused (counted; in every heartbeat)."""
        self.rejections.add(Plane(plane), reason)

    def hello(self) -> ev.Hello:
        return ev.Hello(self.worker_id, self.role, self.ctrl.address, self.kv_address,
                        self.engine.plan.spec, self.engine.plan.line(), os.getpid(),
                        socket.gethostname(), self.engine.config.model,
                        self.engine.config.max_num_batched_tokens, self.engine.rank_pids,
                        self.kv_rank_addresses)

    def heartbeat_with_steps(self) -> ev.Heartbeat:
        """`heartbeat()` with the engine's steps since the last one (at most `MAX_STEPS`, the
        newest; the proxy fits its placement cost models to them)."""
        log_ = self.engine.step_log
        steps = [log_.popleft() for _ in range(len(log_))]
        return dataclasses.replace(self.heartbeat(), steps=steps[-MAX_STEPS:],
                                   rejected=self.rejections.snapshot()[:MAX_STEPS],
                                   pid=os.getpid())

    def _heartbeats(self) -> None:
        """Heartbeats come from their own thread and socket: a long model step (a big prefill on
        a CPU) must not make a live worker look dead. They carry the loop's latest counters."""
        outbox = Outbox(self.ctx, ev.WORKER_EVENTS, self.config.events_address, auth=self.auth)
        last_hello = time.monotonic()
        try:
            while not self.stopping:
                outbox.send(self.heartbeat_with_steps())
                if time.monotonic() - last_hello >= self.config.hello_interval_s:
                    outbox.send(self.hello())  # a proxy that lost us registers us again
                    last_hello = time.monotonic()
                time.sleep(self.config.heartbeat_interval_s)
        finally:
            outbox.close()

    def run(self) -> None:
        self.events.send(self.hello())
        log.info("%s worker %s: ctrl %s, kv %s", self.role, self.worker_id, self.ctrl.address,
                 self.kv_address)
        beats = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beats.start()
        while not self.stopping:
            busy = self.has_work()
            ready = dict(self.poller.poll(0 if busy else self.config.idle_poll_ms))
            if self.ctrl.socket in ready:
                for msg in self.ctrl.drain():
                    self.dispatch(msg)
            if len(ready) > (self.ctrl.socket in ready):
                self.guarded(self.on_kv)
            self.guarded(self.do_work)
            if not busy and not ready:
                self.guarded(self.engine.check_ranks)  # a dead TP rank stops the worker
                self.on_idle()
        beats.join(timeout=2 * self.config.heartbeat_interval_s)
        log.info("%s worker %s stopping", self.role, self.worker_id)

    def close(self) -> None:
        self.ctrl.close()
        self.events.close()
        self.auth.close()
        self.ctx.term()
        self.engine.close()  # stops its other tensor-parallel ranks, if any
