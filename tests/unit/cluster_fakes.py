"""Fakes and helpers for the proxy's `ClusterClient` tests (test_cluster_client.py,
test_cluster_client_liveness.py), with no model.

A fake worker is a PULL socket bound on 127.0.0.1 port 0 (its ctrl address) and a PUSH socket
to the client's event address: it says Hello, heart-beats, reads the control messages the client
sends it with the real codec and answers with worker events. Every test runs under
`asyncio.run` (no pytest-asyncio here) and is bounded: each wait by `WAIT_S`, the whole test by
`TEST_TIMEOUT_S`.

Messages are built only by the factories at the top of this file.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import zmq
import zmq.asyncio

from engine.kv_spec import KvDtype, KvSpec
from engine.outputs import FinishReason
from engine.sampling_params import SamplingParams
from protocol import decode_ctrl as dmsg
from protocol import prefill_ctrl as pmsg
from protocol import worker_events as ev
from protocol.auth import ClusterAuth, generate_secret
from protocol.errors import ErrorCode
from proxy.cluster import ClusterClient, ClusterConfig
from proxy.errors import ApiError
from proxy.metrics import ProxyMetrics

WAIT_S = 3.0
TEST_TIMEOUT_S = 10.0
PROMPT = list(range(100, 140))  # 40 tokens: 2 full blocks of 16


# ---- messages (the one place they are built) ----------------------------------------------------
def make_kv_spec() -> KvSpec:
    return KvSpec(2, 2, 64, 16, dtype=KvDtype.BFLOAT16)


def sampling(**kw: Any) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **kw})


def make_hello(worker_id: str, role: str, ctrl_address: str, kv_address: str) -> ev.Hello:
    return ev.Hello(worker_id, role, ctrl_address, kv_address, make_kv_spec(), "fake plan", 1,
                    "localhost", "fake-model")


def make_heartbeat(worker_id: str, role: str) -> ev.Heartbeat:
    return ev.Heartbeat(worker_id, role, num_running=0, num_waiting=0, num_used_blocks=0,
                        num_free_blocks=64, num_blocks=64)


def reserved(request_id: str, worker_id: str, block_ids: list[int]) -> ev.Reserved:
    return ev.Reserved(request_id, worker_id, block_ids)


def tokens(request_id: str, worker_id: str, token_ids: list[int],
           finish_reason: FinishReason | None = None) -> ev.Tokens:
    return ev.Tokens(request_id, worker_id, token_ids, [], finish_reason, len(PROMPT), 0)


def prefill_done(request_id: str, worker_id: str, num_cached_tokens: int = 0) -> ev.PrefillDone:
    return ev.PrefillDone(request_id, worker_id, num_cached_tokens, kv_bytes=4096, kv_seconds=0.01)


def failed(request_id: str, worker_id: str,
           code: ErrorCode = ErrorCode.KV_REFUSED) -> ev.RequestFailed:
    return ev.RequestFailed(request_id, worker_id, f"fake {code.value} failure", code)


def rejected(request_id: str, worker_id: str, status: int,
             retry_after_s: float = 1.0) -> ev.Rejected:
    return ev.Rejected(request_id, worker_id, f"fake rejection {status}", status, retry_after_s)


# ---- fakes --------------------------------------------------------------------------------------
class FakeWorker:
    """A worker's two sockets; ctrl messages it receives are decoded into `received`."""

    def __init__(self, ctx: zmq.asyncio.Context, events_address: str, worker_id: str,
                 role: str, auth: ClusterAuth) -> None:
        self.worker_id, self.role = worker_id, role
        self.family = dmsg.DECODE_CTRL if role == "decode" else pmsg.PREFILL_CTRL
        self.ctrl = ctx.socket(zmq.PULL)
        self.ctrl.setsockopt(zmq.LINGER, 0)
        auth.server(self.ctrl, "control")
        self.ctrl.bind("tcp://127.0.0.1:0")
        self.ctrl_address = self.ctrl.getsockopt_string(zmq.LAST_ENDPOINT)
        port = int(self.ctrl_address.rsplit(":", 1)[1])
        self.kv_address = f"tcp://127.0.0.2:{port}"  # never dialled by the proxy
        self.events = ctx.socket(zmq.PUSH)
        self.events.setsockopt(zmq.LINGER, 0)
        auth.client(self.events)
        self.events.connect(events_address)
        self.hello = make_hello(worker_id, role, self.ctrl_address, self.kv_address)
        self.received: asyncio.Queue[object] = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._read())]
        self._beats: asyncio.Task | None = None

    async def _read(self) -> None:
        while True:
            self.received.put_nowait(self.family.decode(await self.ctrl.recv()))

    async def say(self, msg: object) -> None:
        await self.events.send(ev.WORKER_EVENTS.encode(msg))

    def start_heartbeats(self, interval_s: float = 0.1) -> None:
        async def beat() -> None:
            while True:
                await self.say(make_heartbeat(self.worker_id, self.role))
                await asyncio.sleep(interval_s)
        self._beats = asyncio.create_task(beat())
        self._tasks.append(self._beats)

    def stop_heartbeats(self) -> None:
        if self._beats is not None:
            self._beats.cancel()

    async def expect(self, cls: type, timeout_s: float = WAIT_S) -> Any:
        msg = await asyncio.wait_for(self.received.get(), timeout_s)
        assert isinstance(msg, cls), f"{self.worker_id} got {msg!r}, expected a {cls.__name__}"
        return msg

    async def assert_quiet(self, for_s: float = 0.2) -> None:
        await asyncio.sleep(for_s)
        assert self.received.empty(), f"{self.worker_id} got {self.received.get_nowait()!r}"

    def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        self.ctrl.close(linger=0)
        self.events.close(linger=0)


async def expect_any(workers: list[FakeWorker], cls: type,
                     timeout_s: float = WAIT_S) -> tuple[FakeWorker, Any]:
    """The first of `workers` to receive a message, which must be a `cls`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for w in workers:
            if not w.received.empty():
                return w, await w.expect(cls)
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {cls.__name__} reached {[w.worker_id for w in workers]}")


async def eventually(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


class Cluster:
    def __init__(self, client: ClusterClient) -> None:
        self.client = client
        self.ctx = zmq.asyncio.Context()
        self.auth = ClusterAuth(self.ctx, client.config.secret)  # the deployment's, as workers
        self.fakes: list[FakeWorker] = []

    async def worker(self, role: str, worker_id: str, heartbeats: bool = True) -> FakeWorker:
        w = FakeWorker(self.ctx, self.client.events_address, worker_id, role, self.auth)
        self.fakes.append(w)
        await w.say(w.hello)
        await eventually(lambda: worker_id in self.client.workers)
        if heartbeats:
            w.start_heartbeats()
        return w

    def generate(self, request_id: str,
                 params: SamplingParams | None = None) -> asyncio.Task[list[ev.Tokens]]:
        """The request's whole stream, consumed in a task (raises the ApiError it ends with)."""
        async def consume() -> list[ev.Tokens]:
            return [t async for t in self.client.generate(request_id, PROMPT,
                                                          params or sampling())]
        return asyncio.create_task(consume())

    async def close(self) -> None:
        for w in self.fakes:
            w.close()
        await self.client.close()
        self.auth.close()
        self.ctx.destroy(linger=0)


def run_cluster(body: Callable[[Cluster], Awaitable[None]], **config: Any) -> None:
    async def main() -> None:
        client = ClusterClient(ClusterConfig(**{"secret": generate_secret(), **config}),
                               ProxyMetrics())
        client.start()
        cluster = Cluster(client)
        try:
            await asyncio.wait_for(body(cluster), TEST_TIMEOUT_S)
        finally:
            await cluster.close()
    asyncio.run(main())


async def api_error(task: asyncio.Task, timeout_s: float = WAIT_S) -> ApiError:
    with pytest.raises(ApiError) as info:
        await asyncio.wait_for(task, timeout_s)
    return info.value


async def reserve_and_prefill(d: FakeWorker, prefills: list[FakeWorker], request_id: str,
                              block_ids: list[int]) -> tuple[FakeWorker, pmsg.Prefill]:
    """Reserve -> Reserved -> Prefill; returns the prefill worker chosen and its message."""
    reserve = await d.expect(dmsg.Reserve)
    assert reserve.request_id == request_id and reserve.remote_prefill
    await d.say(reserved(request_id, d.worker_id, block_ids))
    return await expect_any(prefills, pmsg.Prefill)
