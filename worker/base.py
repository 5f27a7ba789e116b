"""What every worker process shares: its config, sockets, Hello, heartbeats and the poll loop.

Subclasses (decode/worker.py, prefill/worker.py) implement `on_ctrl`, `has_work`, `do_work`,
`heartbeat` and `kv_address`. The loop never blocks longer than `idle_poll_ms` while idle and
not at all while there is work, so heartbeats keep flowing under load.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import socket
import threading
import time

import zmq

from engine.llm_engine import LLMEngine
from protocol import worker_events as ev
from protocol.auth import ClusterAuth
from protocol.channel import Inbox, Outbox
from protocol.codec import MessageFamily
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
        self.auth = ClusterAuth(self.ctx, config.cluster_secret, self._refused)
        self.ctrl = Inbox(self.ctx, ctrl_family, config.host, rejections=self.rejections,
                          plane=Plane.CONTROL, auth=self.auth)
        self.events = Outbox(self.ctx, ev.WORKER_EVENTS, config.events_address, auth=self.auth)
        self.poller = zmq.Poller()
        self.poller.register(self.ctrl.socket, zmq.POLLIN)
        self.stopping = False

    # ---- to implement -------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def kv_address(self) -> str:
        """Where this worker's KV endpoint listens (reported in Hello)."""

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

    # ---- shared -------------------------------------------------------------------------------
    def _refused(self, plane: str, reason: str) -> None:
        """What the auth handler and the KV endpoint refused (counted; in every heartbeat)."""
        self.rejections.add(Plane(plane), reason)

    def hello(self) -> ev.Hello:
        return ev.Hello(self.worker_id, self.role, self.ctrl.address, self.kv_address,
                        self.engine.plan.spec, self.engine.plan.line(), os.getpid(),
                        socket.gethostname(), self.engine.config.model,
                        self.engine.config.max_num_batched_tokens)

    def heartbeat_with_steps(self) -> ev.Heartbeat:
        """`heartbeat()` with the engine's steps since the last one (at most `MAX_STEPS`, the
        newest; the proxy fits its placement cost models to them)."""
        log_ = self.engine.step_log
        steps = [log_.popleft() for _ in range(len(log_))]
        return dataclasses.replace(self.heartbeat(), steps=steps[-MAX_STEPS:],
                                   rejected=self.rejections.snapshot())

    def _heartbeats(self) -> None:
        """Heartbeats come from their own thread and socket: a long model step (a big prefill on
        a CPU) must not make a live worker look dead. They carry the loop's latest counters."""
        outbox = Outbox(self.ctx, ev.WORKER_EVENTS, self.config.events_address, auth=self.auth)
        try:
            while not self.stopping:
                outbox.send(self.heartbeat_with_steps())
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
                    self.on_ctrl(msg)
            if len(ready) > (self.ctrl.socket in ready):
                self.on_kv()
            self.do_work()
            if not busy and not ready:
                self.on_idle()
        beats.join(timeout=2 * self.config.heartbeat_interval_s)
        log.info("%s worker %s stopping", self.role, self.worker_id)

    def close(self) -> None:
        self.ctrl.close()
        self.events.close()
        self.auth.close()
        self.ctx.term()
