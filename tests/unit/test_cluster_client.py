"""The proxy's request state machine (`ClusterClient`) against fake workers, with no model:
the happy path, prefill failures and rejections. Worker death, a client leaving and timeouts
are in test_cluster_client_liveness.py; the fake workers and the message factories (the one
place messages are built) in cluster_fakes.py.
"""

from __future__ import annotations

import asyncio

import pytest
from cluster_fakes import (
    PROMPT,
    WAIT_S,
    Cluster,
    api_error,
    eventually,
    failed,
    prefill_done,
    rejected,
    reserve_and_prefill,
    reserved,
    run_cluster,
    sampling,
    tokens,
)

from engine.outputs import FinishReason
from protocol import decode_ctrl as dmsg
from protocol import prefill_ctrl as pmsg
from protocol.errors import ErrorCode
from proxy.cluster import Stage


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


def test_kv_lost_on_its_path_into_the_decode_worker_retries_the_prefill_then_locally() -> None:
    """The decode worker says KV_TRANSFER (a sender killed mid-stream): it kept the blocks, so
    the prefill moves to the other prefill worker (the first is told to abort), then to the
    decode worker itself; the client sees only its tokens."""
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p0, p1 = await c.worker("prefill", "p0"), await c.worker("prefill", "p1")
        stream = c.generate("r1")
        first, msg = await reserve_and_prefill(d, [p0, p1], "r1", [3, 4])
        second = p1 if first is p0 else p0
        await d.say(failed("r1", "d0", ErrorCode.KV_TRANSFER))
        assert (await first.expect(pmsg.Abort)).request_id == "r1"
        retry = await second.expect(pmsg.Prefill)
        assert (retry.block_ids, retry.kv_address) == (msg.block_ids, msg.kv_address)
        await d.say(failed("r1", "d0", ErrorCode.KV_TRANSFER))
        assert (await second.expect(pmsg.Abort)).request_id == "r1"
        assert (await d.expect(dmsg.PrefillLocally)).request_id == "r1"
        await d.say(failed("r1", "d0", ErrorCode.KV_TRANSFER))  # late: prefilling there now
        await asyncio.sleep(0.2)
        assert not stream.done()
        await d.say(tokens("r1", "d0", [7], FinishReason.STOP))
        assert [t.token_ids for t in await asyncio.wait_for(stream, WAIT_S)] == [[7]]
    run_cluster(body)


@pytest.mark.parametrize(("role", "code"), [("prefill", ErrorCode.KV_REFUSED),
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
