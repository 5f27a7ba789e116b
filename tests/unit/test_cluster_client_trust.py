"""What the proxy's `ClusterClient` accepts from its event socket (proxy/admission.py), against
fake workers with no model: a Hello never replaces a live worker, events about a request from a
worker that does not serve it are refused, a reservation nobody asked for is aborted at once, and
a request a worker dropped reaches its client as an error at once. Every refusal is counted in
`pdserve:rejected_messages_total{component="proxy",plane="events"}`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
from cluster_fakes import (
    WAIT_S,
    Cluster,
    api_error,
    eventually,
    failed,
    make_heartbeat,
    reserve_and_prefill,
    reserved,
    run_cluster,
    tokens,
)

from engine.outputs import FinishReason
from protocol import decode_ctrl as dmsg
from protocol import worker_events as ev
from protocol.errors import ErrorCode


def refused(c: Cluster, reason: str) -> float:
    return c.client.metrics.rejected_messages.labels("proxy", "events", reason)._value.get()


def test_reserved_for_a_request_the_proxy_does_not_hold_is_aborted_at_once() -> None:
    """A forged Reserve made the worker reserve blocks: the proxy has it free them now."""
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        await d.say(reserved("forged", "d0", [1, 2, 3]))
        abort = await d.expect(dmsg.Abort)
        assert abort.request_id == "forged"
        await d.say(reserved("forged", "d0", [1, 2, 3]))  # the same id again: one Abort is enough
        await d.assert_quiet()
        assert refused(c, "unknown_request") == 2 - 1  # the repeat is not counted again
    run_cluster(body)


def test_events_from_a_worker_that_does_not_serve_the_request_are_refused() -> None:
    async def body(c: Cluster) -> None:
        d0 = await c.worker("decode", "d0")
        d1 = await c.worker("decode", "d1")
        stream = c.generate("r1")
        await eventually(lambda: "r1" in c.client.inflight)
        d, other = (d0, d1) if c.client.inflight["r1"].decode_id == "d0" else (d1, d0)
        await d.expect(dmsg.Reserve)
        await other.say(tokens("r1", other.worker_id, [666], FinishReason.STOP))  # injection
        await other.say(failed("r1", other.worker_id))
        await eventually(lambda: refused(c, "wrong_worker") == 2)
        assert not stream.done()
        await d.say(tokens("r1", d.worker_id, [7], FinishReason.LENGTH))  # via local prefill
        out = await asyncio.wait_for(stream, WAIT_S)
        assert [t.token_ids for t in out] == [[7]]
    run_cluster(body, placement="local")


@pytest.mark.parametrize(("code", "status", "api_code"), [
    (ErrorCode.ABORTED, 503, "aborted"),
    (ErrorCode.INVALID_REQUEST, 400, None),
])
def test_a_request_a_worker_dropped_fails_for_its_client_at_once(
        code: ErrorCode, status: int, api_code: str | None) -> None:
    """AbortAll on a worker: it reports each dropped request, and the client's error comes in
    well under a second (not at the 35-60 s stage timeouts)."""
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0")
        stream = c.generate("r1")
        await reserve_and_prefill(d, [p], "r1", [1, 2])
        t0 = time.monotonic()
        await d.say(failed("r1", "d0", code))
        err = await api_error(stream)
        assert time.monotonic() - t0 < 1.0
        assert (err.status, err.code) == (status, api_code)
    run_cluster(body)


def test_a_repeated_hello_refreshes_and_a_conflicting_one_is_refused() -> None:
    """Workers repeat their Hello: the same process again changes nothing (its requests go
    on); another process under a live worker's id (an invalid role is refused by the codec
    before that) is refused and counted."""
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0")
        stream = c.generate("r1")
        await reserve_and_prefill(d, [p], "r1", [1, 2])
        await d.say(d.hello)
        await d.say(replace(p.hello, worker_id="d0"))  # another role, pid, address
        await eventually(lambda: refused(c, "hello_conflict") == 1)
        assert c.client.workers["d0"].hello == d.hello and not stream.done()
        await d.say(tokens("r1", "d0", [5], FinishReason.LENGTH))
        assert [t.token_ids for t in await asyncio.wait_for(stream, WAIT_S)] == [[5]]
        frame = ev.WORKER_EVENTS.encode(d.hello).replace(b"decode", b"evil!!")
        await d.events.send(frame)
        await eventually(lambda: refused(c, "malformed") == 1)
        assert c.client.workers["d0"].hello == d.hello
    run_cluster(body)


def test_heartbeats_of_another_process_do_not_keep_a_dead_worker_alive() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0", heartbeats=False)
        stranger = replace(make_heartbeat("d0", "decode"), pid=d.hello.pid + 1)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            await d.say(stranger)
            await asyncio.sleep(0.1)
        assert not c.client.workers["d0"].is_alive
    run_cluster(body, heartbeat_timeout_s=1.0)


def test_the_deadline_is_re_armed_at_every_stage_change() -> None:
    """Each stage gets its own timeout from when it began: a request slower in total than any
    one stage's timeout, but within each, is served."""
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0")
        stream = c.generate("r1")
        await reserve_and_prefill(d, [p], "r1", [1, 2])
        await asyncio.sleep(1.0)  # prefilling: half the prefill timeout
        await d.say(tokens("r1", "d0", [1]))
        for _ in range(2):
            await asyncio.sleep(1.0)  # decoding: half the stream timeout between tokens
            await d.say(tokens("r1", "d0", [2]))
        await d.say(tokens("r1", "d0", [3], FinishReason.LENGTH))
        out = await asyncio.wait_for(stream, WAIT_S)
        assert [t.token_ids for t in out] == [[1], [2], [2], [3]]
    run_cluster(body, prefill_timeout_s=2.0, stream_timeout_s=2.0)
