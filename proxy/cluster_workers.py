"""The proxy's book of workers (a part of `ClusterClient`, proxy/cluster.py): who is
registered, their latest heartbeat, and the topology `/status` shows.

A Hello is judged before it replaces anything (proxy/admission.py): a re-announcement from the
same process refreshes its entry, a conflicting one for a live worker is refused and counted,
anything else (a new worker, or a restart of a dead one) registers it with a CURVE-authenticated
control socket. Heartbeats refresh the router's view, feed the placer's cost models and carry
the worker's running totals of refused messages into `pdserve:rejected_messages_total`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import time
from dataclasses import replace

import zmq
import zmq.asyncio

from protocol import worker_events as ev
from protocol.auth import ClusterAuth
from proxy.admission import HelloVerdict, judge_hello
from proxy.cluster_state import ClusterConfig, Worker
from proxy.metrics import ProxyMetrics
from proxy.placer import Placer
from proxy.router import PrefixAware, WorkerState

log = logging.getLogger("proxy.cluster")

EVENT_FRAME_BYTES = 64 << 10  # the largest worker event (a Heartbeat of 256 steps: ~15 KiB)


class WorkerBook(abc.ABC):
    """Registration, heartbeats and views; `ClusterClient` supplies the state below and
    implements `_refused` / `_fail_worker_requests`."""

    config: ClusterConfig
    metrics: ProxyMetrics
    ctx: zmq.asyncio.Context
    auth: ClusterAuth
    workers: dict[str, Worker]
    placer: Placer
    prefill_policy: PrefixAware
    _registered: asyncio.Event

    @abc.abstractmethod
    def _refused(self, reason: str, fmt: str, *args: object) -> None:
        """Count and log (rate-limited) an event refused for `reason`."""

    @abc.abstractmethod
    def _fail_worker_requests(self, w: Worker, what: str) -> None:
        """A worker died or restarted (`what`): retry or fail the requests it held."""

    async def wait_for_workers(self, num_prefill: int, num_decode: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            have = self.alive("prefill"), self.alive("decode")
            if len(have[0]) >= num_prefill and len(have[1]) >= num_decode:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers did not register in {timeout_s:.0f} s: "
                                   f"{len(have[0])}/{num_prefill} prefill, "
                                   f"{len(have[1])}/{num_decode} decode")
            self._registered.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._registered.wait(), 0.5)

    def alive(self, role: str) -> list[Worker]:
        return [w for w in self.workers.values() if w.hello.role == role and w.is_alive]

    def register(self, hello: ev.Hello) -> None:
        """A worker's Hello: from its event, or from its Ray actor (a restarted proxy registers
        the running workers); on the event loop's thread. Judged first (proxy/admission.py):
        a re-announcement refreshes, a conflicting Hello for a live worker is refused."""
        verdict = judge_hello(self.workers.get(hello.worker_id), hello)
        if verdict is HelloVerdict.REFRESH:
            self.workers[hello.worker_id].last_seen = time.monotonic()
            return
        if verdict is HelloVerdict.REFUSE:
            self._refused("hello_conflict", "refused a Hello for live worker %s from another "
                          "process (pid %d at %s)", hello.worker_id, hello.pid, hello.host)
            return
        old = self.workers.pop(hello.worker_id, None)
        if old is not None:
            old.socket.close(linger=0)
            self._fail_worker_requests(old, "restarted")
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 10000)
        sock.setsockopt(zmq.MAXMSGSIZE, EVENT_FRAME_BYTES)  # it receives nothing
        self.auth.client(sock)
        sock.connect(hello.ctrl_address)
        state = WorkerState(hello.worker_id, hello.role,  # type: ignore[arg-type]
                            hello.ctrl_address)
        block_size = hello.kv_spec.block_size
        if hello.role == "prefill" and block_size != self.prefill_policy.block_size:
            self.prefill_policy = PrefixAware(block_size=block_size)
        self.workers[hello.worker_id] = Worker(hello, sock, state, time.monotonic())
        log.info("%s worker %s up on %s (pid %d): %s", hello.role, hello.worker_id, hello.host,
                 hello.pid, hello.plan)
        self.metrics.set_worker(hello.worker_id, hello.role, is_alive=True)
        self.placer.on_hello(hello)
        self._registered.set()

    def _on_heartbeat(self, hb: ev.Heartbeat) -> None:
        w = self.workers.get(hb.worker_id)
        if w is None:
            return
        self.placer.on_heartbeat(hb)
        usage = hb.num_used_blocks / hb.num_blocks if hb.num_blocks else 0.0
        w.state = replace(w.state, is_alive=True, num_running=hb.num_running,
                          num_waiting=hb.num_waiting, kv_usage=min(max(usage, 0.0), 1.0),
                          num_free_blocks=hb.num_free_blocks, num_total_blocks=hb.num_blocks)
        self.metrics.set_worker(hb.worker_id, hb.role, is_alive=True, kv_usage=usage,
                                num_used_blocks=hb.num_used_blocks)
        self.metrics.on_preemptions(hb.num_preemptions - w.num_preemptions_seen)
        w.num_preemptions_seen = max(hb.num_preemptions, w.num_preemptions_seen)
        for r in hb.rejected:  # running totals: count what is new since the last heartbeat
            key = (r.plane.value, r.reason)
            self.metrics.on_rejected(hb.worker_id, key[0], key[1],
                                     r.count - w.rejected_seen.get(key, 0))
            w.rejected_seen[key] = max(r.count, w.rejected_seen.get(key, 0))

    # ---- views --------------------------------------------------------------------------------
    def topology(self) -> list[dict]:
        return [{"worker_id": w.hello.worker_id, "role": w.hello.role, "host": w.hello.host,
                 "pid": w.hello.pid, "rank_pids": w.hello.rank_pids, "alive": w.is_alive,
                 "ctrl_address": w.hello.ctrl_address,
                 "kv_address": w.hello.kv_address,
                 "kv_rank_addresses": w.hello.kv_rank_addresses, "kv_plan": w.hello.plan,
                 "num_running": w.state.num_running, "num_waiting": w.state.num_waiting,
                 "kv_usage": round(w.state.kv_usage, 4),
                 "used_blocks": w.state.num_total_blocks - w.state.num_free_blocks
                 if w.state.num_total_blocks else 0, **self.placer.describe(w.hello.worker_id)}
                for w in sorted(self.workers.values(), key=lambda w: w.hello.worker_id)]
