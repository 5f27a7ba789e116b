"""The proxy's request state machine (`ClusterClient`) against fake workers, with no model:
worker death, a client leaving early, stage timeouts and abort-all. The fake workers and the
message factories are in cluster_fakes.py.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest
from cluster_fakes import (
    PROMPT,
    WAIT_S,
    Cluster,
    api_error,
    eventually,
    make_heartbeat,
    reserve_and_prefill,
    run_cluster,
    sampling,
    tokens,
)

from protocol import decode_ctrl as dmsg
from protocol import prefill_ctrl as pmsg
from proxy.cluster import Stage


def used_blocks(c: Cluster, worker_id: str) -> int:
    return next(w["used_blocks"] for w in c.client.topology() if w["worker_id"] == worker_id)


# ---- worker death, client gone, timeouts --------------------------------------------------------
def test_silent_decode_worker_fails_its_request_and_aborts_the_prefill() -> None:
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0")
        stream = c.generate("r1")
        await reserve_and_prefill(d, [p], "r1", [1, 2])
        d.stop_heartbeats()
        await d.say(replace(make_heartbeat("d0", "decode"), num_used_blocks=10,
                            num_free_blocks=54))  # its last report: 10 blocks in use
        await eventually(lambda: used_blocks(c, "d0") == 10)
        err = await api_error(stream)
        assert (err.status, err.code) == (503, "worker_lost") and "d0" in err.message
        assert (await p.expect(pmsg.Abort)).request_id == "r1"
        assert not c.client.alive("decode")
        assert used_blocks(c, "d0") == 0  # a dead process holds no blocks
        assert 'pdserve:kv_cache_used_blocks{worker="d0"} 0.0' in \
            c.client.metrics.render()[0].decode()
        late = await api_error(c.generate("r2"))  # no decode worker left to route to
        assert (late.status, late.code) == (503, "overloaded")
    run_cluster(body, heartbeat_timeout_s=1.0)


def test_restarted_decode_worker_replaces_its_dead_predecessor_only() -> None:
    """A Hello from another process under a live worker's id is refused (the live one keeps
    its requests); once the worker is dead (its requests failed), the new process registers."""
    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        stream = c.generate("r1")
        await d.expect(dmsg.Reserve)
        restarted = replace(d.hello, pid=d.hello.pid + 1)
        await d.say(restarted)  # the old process still beats: refused
        await asyncio.sleep(0.3)
        assert c.client.workers["d0"].hello.pid == d.hello.pid and not stream.done()
        d.stop_heartbeats()
        err = await api_error(stream)
        assert (err.status, err.code) == (503, "worker_lost") and "died" in err.message
        await d.say(restarted)
        await eventually(lambda: c.client.workers["d0"].hello.pid == restarted.pid)
    run_cluster(body, heartbeat_timeout_s=1.0)


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
