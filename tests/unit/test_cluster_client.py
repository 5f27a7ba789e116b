"""The proxy's request state machine (`ClusterClient`) against fake workers, with no model.

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
from protocol.errors import ErrorCode
from proxy.cluster import ClusterClient, ClusterConfig, Stage
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
                 role: str) -> None:
        self.worker_id, self.role = worker_id, role
        self.family = dmsg.DECODE_CTRL if role == "decode" else pmsg.PREFILL_CTRL
        self.ctrl = ctx.socket(zmq.PULL)
        self.ctrl.setsockopt(zmq.LINGER, 0)
        self.ctrl.bind("tcp://127.0.0.1:0")
        self.ctrl_address = self.ctrl.getsockopt_string(zmq.LAST_ENDPOINT)
        self.kv_address = f"tcp://127.0.0.1:9/{worker_id}-kv"  # never dialled by the proxy
        self.events = ctx.socket(zmq.PUSH)
        self.events.setsockopt(zmq.LINGER, 0)
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
        self.fakes: list[FakeWorker] = []

    async def worker(self, role: str, worker_id: str, heartbeats: bool = True) -> FakeWorker:
        w = FakeWorker(self.ctx, self.client.events_address, worker_id, role)
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
        self.ctx.destroy(linger=0)


def run_cluster(body: Callable[[Cluster], Awaitable[None]], **config: Any) -> None:
    async def main() -> None:
        client = ClusterClient(ClusterConfig(**config), ProxyMetrics())
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


# ---- the happy path -----------------------------------------------------------------------------
def test_reserve_then_prefill_to_the_reservation_then_stream() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0")
        params = sampling(max_tokens=3, seed=7)
        stream = c.generate("r1", params)
        reserve = await d.expect(dmsg.Reserve)
        assert (reserve.request_id, reserve.prompt_ids, reserve.remote_prefill) == \
            ("r1", PROMPT, True)
        assert reserve.params == params
        assert reserve.queue_timeout_s == c.client.config.queue_timeout_s
        await d.say(reserved("r1", "d0", [5, 2, 9]))
        prefill = await p.expect(pmsg.Prefill)
        assert (prefill.request_id, prefill.prompt_ids, prefill.params) == ("r1", PROMPT, params)
        assert (prefill.decode_id, prefill.kv_address, prefill.block_ids) == \
            ("d0", d.kv_address, [5, 2, 9])
        assert prefill.kv_spec == d.hello.kv_spec
        assert c.client.inflight["r1"].stage is Stage.PREFILLING
        await p.say(prefill_done("r1", "p0", num_cached_tokens=16))
        await d.say(tokens("r1", "d0", [11]))
        await d.say(tokens("r1", "d0", [12, 13], FinishReason.LENGTH))
        out = await asyncio.wait_for(stream, WAIT_S)
        assert [t.token_ids for t in out] == [[11], [12, 13]]
        assert [t.finish_reason for t in out] == [None, FinishReason.LENGTH]
        assert not c.client.inflight
        assert not c.client.workers["d0"].requests and not c.client.workers["p0"].requests
        await d.assert_quiet()  # a finished request is not aborted
        await p.assert_quiet()
    run_cluster(body)


@pytest.mark.parametrize("colocated", [True, False])
def test_local_prefill_when_colocated_or_without_prefill_workers(colocated: bool) -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0") if colocated else None
        stream = c.generate("r1")
        reserve = await d.expect(dmsg.Reserve)
        assert reserve.remote_prefill is False
        await d.say(tokens("r1", "d0", [11, 12], FinishReason.STOP))
        assert [t.token_ids for t in await asyncio.wait_for(stream, WAIT_S)] == [[11, 12]]
        if p is not None:
            await p.assert_quiet()
    run_cluster(body, colocated=colocated)


def test_no_live_decode_worker_is_overloaded() -> None:
    async def body(c: Cluster) -> None:
        await c.worker("prefill", "p0")
        err = await api_error(c.generate("r1"))
        assert (err.status, err.code) == (503, "overloaded") and "Retry-After" in err.headers
    run_cluster(body)


# ---- prefill failures ---------------------------------------------------------------------------
def test_retryable_prefill_failure_moves_to_the_other_worker_then_to_local_prefill() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p0, p1 = await c.worker("prefill", "p0"), await c.worker("prefill", "p1")
        stream = c.generate("r1")
        first, msg = await reserve_and_prefill(d, [p0, p1], "r1", [3, 4, 5])
        second = p1 if first is p0 else p0
        await first.say(failed("r1", first.worker_id, ErrorCode.KV_TRANSFER))
        retry = await second.expect(pmsg.Prefill)
        assert (retry.block_ids, retry.kv_address) == (msg.block_ids, msg.kv_address)
        await second.say(failed("r1", second.worker_id, ErrorCode.KV_TRANSFER))
        local = await d.expect(dmsg.PrefillLocally)
        assert local.request_id == "r1"
        await d.say(tokens("r1", "d0", [7], FinishReason.STOP))
        assert [t.token_ids for t in await asyncio.wait_for(stream, WAIT_S)] == [[7]]
        await first.assert_quiet()
        await second.assert_quiet()
    run_cluster(body)


def test_silent_prefill_worker_loses_its_prefill_to_the_next_one() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p0, p1 = await c.worker("prefill", "p0"), await c.worker("prefill", "p1")
        stream = c.generate("r1")
        first, _ = await reserve_and_prefill(d, [p0, p1], "r1", [3, 4, 5])
        first.stop_heartbeats()
        second = p1 if first is p0 else p0
        retry = await second.expect(pmsg.Prefill)
        assert retry.block_ids == [3, 4, 5]
        await second.say(prefill_done("r1", second.worker_id))
        await d.say(tokens("r1", "d0", [7], FinishReason.STOP))
        assert [t.token_ids for t in await asyncio.wait_for(stream, WAIT_S)] == [[7]]
    run_cluster(body, heartbeat_timeout_s=1.0)


@pytest.mark.parametrize(("role", "code"), [("prefill", ErrorCode.INVALID_REQUEST),
                                            ("decode", ErrorCode.KV_TIMEOUT)])
def test_non_retryable_failure_is_an_api_error_and_both_workers_abort(
        role: str, code: ErrorCode) -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0")
        stream = c.generate("r1")
        await reserve_and_prefill(d, [p], "r1", [1])
        await (p if role == "prefill" else d).say(failed("r1", f"{role[0]}0", code))
        err = await api_error(stream)
        assert (err.status, err.code) == (500, "internal_error")
        assert code.value in err.message and "r1" in err.message
        assert (await d.expect(dmsg.Abort)).request_id == "r1"
        assert (await p.expect(pmsg.Abort)).request_id == "r1"
        assert not c.client.inflight
    run_cluster(body)


def test_stale_failure_of_a_replaced_or_finished_prefill_is_ignored() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p0, p1 = await c.worker("prefill", "p0"), await c.worker("prefill", "p1")
        stream = c.generate("r1")
        first, _ = await reserve_and_prefill(d, [p0, p1], "r1", [3])
        second = p1 if first is p0 else p0
        await first.say(failed("r1", first.worker_id, ErrorCode.KV_TRANSFER))
        await second.expect(pmsg.Prefill)
        await first.say(failed("r1", first.worker_id, ErrorCode.KV_REFUSED))  # late, the old one's
        await asyncio.sleep(0.2)
        assert not stream.done() and c.client.inflight["r1"].prefill_id == second.worker_id
        await second.say(prefill_done("r1", second.worker_id))
        await d.say(tokens("r1", "d0", [7]))
        await eventually(lambda: c.client.inflight["r1"].stage is Stage.DECODING)
        await second.say(failed("r1", second.worker_id))  # the KV already arrived
        await asyncio.sleep(0.2)
        assert not stream.done()
        await d.say(tokens("r1", "d0", [8], FinishReason.LENGTH))
        assert [t.token_ids for t in await asyncio.wait_for(stream, WAIT_S)] == [[7], [8]]
    run_cluster(body)


# ---- rejections ---------------------------------------------------------------------------------
def test_rejected_503_is_overloaded_with_retry_after() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        stream = c.generate("r1")
        await d.expect(dmsg.Reserve)
        await d.say(rejected("r1", "d0", 503, retry_after_s=2.5))
        err = await api_error(stream)
        assert (err.status, err.code, err.headers["Retry-After"]) == (503, "overloaded", "3")
        assert "fake rejection" in err.message
    run_cluster(body)


def test_rejected_400_is_an_invalid_request() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        stream = c.generate("r1")
        await d.expect(dmsg.Reserve)
        await d.say(rejected("r1", "d0", 400))
        err = await api_error(stream)
        assert (err.status, err.type) == (400, "invalid_request_error")
    run_cluster(body)


# ---- worker death, client gone, timeouts --------------------------------------------------------
def test_silent_decode_worker_fails_its_request_and_aborts_the_prefill() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0")
        stream = c.generate("r1")
        await reserve_and_prefill(d, [p], "r1", [1, 2])
        d.stop_heartbeats()
        err = await api_error(stream)
        assert (err.status, err.code) == (503, "worker_lost") and "d0" in err.message
        assert (await p.expect(pmsg.Abort)).request_id == "r1"
        assert not c.client.alive("decode")
        late = await api_error(c.generate("r2"))  # no decode worker left to route to
        assert (late.status, late.code) == (503, "overloaded")
    run_cluster(body, heartbeat_timeout_s=1.0)


def test_restarted_decode_worker_fails_the_requests_it_held() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        stream = c.generate("r1")
        await d.expect(dmsg.Reserve)
        await d.say(d.hello)  # the same worker id says Hello again: a new process
        err = await api_error(stream)
        assert (err.status, err.code) == (503, "worker_lost") and "restarted" in err.message
    run_cluster(body)


@pytest.mark.parametrize("stage", [Stage.PREFILLING, Stage.DECODING])
def test_client_leaving_early_aborts_the_request_on_both_workers(stage: Stage) -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0")
        gen = c.client.generate("r1", PROMPT, sampling())
        first = asyncio.ensure_future(gen.__anext__())
        await reserve_and_prefill(d, [p], "r1", [1, 2])
        if stage is Stage.DECODING:
            await d.say(tokens("r1", "d0", [7]))
            assert (await asyncio.wait_for(first, WAIT_S)).token_ids == [7]
        else:
            first.cancel()  # the client disconnects while the prompt is being prefilled
            with pytest.raises(asyncio.CancelledError):
                await first
        await gen.aclose()
        abort_d, abort_p = await d.expect(dmsg.Abort), await p.expect(pmsg.Abort)
        assert abort_d.request_id == abort_p.request_id == "r1"
        assert not c.client.inflight and not c.client.workers["d0"].requests
    run_cluster(body)


def test_no_token_within_the_stream_timeout_is_a_504_and_aborts_both() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0")
        stream = c.generate("r1")
        await reserve_and_prefill(d, [p], "r1", [1, 2])
        await d.say(tokens("r1", "d0", [7]))
        err = await api_error(stream)
        assert (err.status, err.code) == (504, "timeout") and "decoding" in err.message
        await d.expect(dmsg.Abort)
        await p.expect(pmsg.Abort)
    run_cluster(body, stream_timeout_s=0.3)


@pytest.mark.xfail(strict=True, raises=(asyncio.TimeoutError, TimeoutError), reason=(
    "ClusterClient._next picks the timeout of the stage the request is in when it starts "
    "waiting: the first wait starts in RESERVING (queue_timeout_s + 5 s) and goes on through "
    "the whole prefill, so prefill_timeout_s never applies (a default prefill gets 35 s, not "
    "120 s)"))
def test_prefill_that_outlasts_the_prefill_timeout_is_a_504() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0")
        stream = c.generate("r1")
        await reserve_and_prefill(d, [p], "r1", [1, 2])
        err = await api_error(stream, timeout_s=2.0)
        assert (err.status, err.code) == (504, "timeout") and "prefilling" in err.message
    run_cluster(body, prefill_timeout_s=0.3, queue_timeout_s=1.0)


def test_abort_all_reaches_every_worker() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0")
        await c.client.abort_all("proxy restarted")
        assert (await d.expect(dmsg.AbortAll)).reason == "proxy restarted"
        assert (await p.expect(pmsg.AbortAll)).reason == "proxy restarted"
    run_cluster(body)
