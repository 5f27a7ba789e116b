"""The prefill and decode workers' message handling together, in-process, driven without their
`run()` loops: the disaggregated path over the real transfer layer, KV the decode side refuses,
and control messages that must fail alone (duplicates, an engine error in the reservation
queue). Each worker alone is in test_worker_handlers.py; the fake proxy and the message
factories in worker_fakes.py.

The engines are fresh tiny random-weight LLMEngines (`tiny_engine`, 16 blocks of 8 tokens);
every test ends with every block free.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest
from worker_fakes import (
    WAIT_S,
    FakeProxy,
    assert_all_free,
    greedy_reference,
    kv_spec_of,
    prefill,
    reserve,
    sampling,
)

from decode.kv_inbox import KvArrival
from decode.worker import MAX_KV_RETRIES, DecodeWorker
from engine.errors import EngineError
from engine.llm_engine import LLMEngine
from engine.outputs import FinishReason
from prefill.worker import PrefillWorker
from protocol import decode_ctrl as dmsg
from protocol import worker_events as ev
from protocol.errors import ErrorCode

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- both together ------------------------------------------------------------------------------
def test_prefill_worker_fills_the_decode_reservation_and_decode_streams(
        proxy: FakeProxy, make_worker: Any, tiny_engine: Callable[..., LLMEngine]) -> None:
    """The disaggregated path in one process: Reserve -> Reserved -> Prefill -> KV over the
    real transfer layer -> first token adopted -> Tokens, equal to a colocated engine's."""
    d = make_worker(DecodeWorker, proxy.config("d0"))
    p = make_worker(PrefillWorker, proxy.config("p0"))
    params = sampling(max_tokens=5)
    proxy.send(d, reserve("r1", params=params))
    blocks = proxy.wait_event(ev.Reserved, "r1").block_ids
    proxy.send(p, prefill("r1", "d0", d.kv_address, blocks, kv_spec_of(d), params=params))
    out = proxy.stream("r1", drive=(p, d))
    done = proxy.wait_event(ev.PrefillDone, "r1", drive=(p,))
    assert done.kv_bytes > 0 and done.worker_id == "p0"
    assert [t for e in out for t in e.token_ids] == greedy_reference(tiny_engine, params)
    assert out[-1].finish_reason is FinishReason.LENGTH
    assert_all_free(d)
    assert_all_free(p)


def test_kv_for_another_model_fails_before_sending_and_leaves_the_reservation_to_the_proxy(
        proxy: FakeProxy, make_worker: Any) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    p = make_worker(PrefillWorker, proxy.config("p0"))
    proxy.send(d, reserve("r1"))
    blocks = proxy.wait_event(ev.Reserved, "r1").block_ids
    other = kv_spec_of(d, model_fingerprint="another-model")
    proxy.send(p, prefill("r1", "d0", d.kv_address, blocks, other))
    got = proxy.wait_event(ev.RequestFailed, "r1", drive=(p, d))
    assert (got.worker_id, got.code, got.retryable) == ("p0", ErrorCode.KV_REFUSED, False)
    assert "IncompatibleKv" in got.error
    assert_all_free(p)
    assert "r1" in d.reservations  # the proxy's Abort (it saw the failure) frees it
    proxy.send(d, dmsg.Abort("r1"))
    assert_all_free(d)


def test_kv_for_a_reservation_aborted_meanwhile_is_refused_and_freed_on_both_sides(
        proxy: FakeProxy, make_worker: Any) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    p = make_worker(PrefillWorker, proxy.config("p0"))
    proxy.send(d, reserve("r1"))
    blocks = proxy.wait_event(ev.Reserved, "r1").block_ids
    proxy.send(d, dmsg.Abort("r1"))
    aborted = proxy.wait_event(ev.RequestFailed, "r1")  # the decode worker says so at once
    assert (aborted.worker_id, aborted.code) == ("d0", ErrorCode.ABORTED)
    proxy.send(p, prefill("r1", "d0", d.kv_address, blocks, kv_spec_of(d)))
    got = proxy.wait_event(ev.RequestFailed, "r1", drive=(p, d))
    assert (got.worker_id, got.code) == ("p0", ErrorCode.KV_REFUSED)
    assert "UnexpectedTransfer" in got.error
    proxy.assert_no_event("r1", drive=(p, d))
    assert_all_free(p)
    assert_all_free(d)


# ---- duplicated control messages (the proxy never sends them today: ids are uuids and a request
# is never sent twice to one prefill worker; but "a bad request fails alone") ---------------------
def test_duplicate_reserve_is_rejected_alone(proxy: FakeProxy, make_worker: Any) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    proxy.send(d, reserve("r1"))
    blocks = proxy.wait_event(ev.Reserved, "r1").block_ids
    proxy.send(d, reserve("r1"))
    got = proxy.wait_event(ev.Rejected, "r1", drive=(d,))
    assert got.status == 400 and "duplicate" in got.reason and "'r1'" in got.reason
    assert d.reservations["r1"].seq.block_table == blocks and not d.pending
    proxy.send(d, dmsg.Abort("r1"))
    assert_all_free(d)


@pytest.mark.parametrize("first", ["queued", "local"])
def test_duplicate_of_a_queued_or_local_request_is_rejected_alone(
        proxy: FakeProxy, make_worker: Any, first: str) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    long_prompt = list(range(1, 61))  # 8 blocks: two fill the cache
    if first == "queued":
        for rid in ("a", "b", "r1"):
            proxy.send(d, reserve(rid, long_prompt))
        assert list(d.pending) == ["r1"]
    else:
        proxy.send(d, reserve("r1", params=sampling(max_tokens=40), remote_prefill=False))
        assert d.local == {"r1"}
    proxy.send(d, reserve("r1"))  # remote: it would queue beside a local one
    got = proxy.wait_event(ev.Rejected, "r1", drive=(d,))
    assert got.status == 400 and "duplicate" in got.reason
    if first == "queued":
        assert list(d.pending) == ["r1"]
        proxy.send(d, dmsg.Abort("a"))
        assert proxy.wait_event(ev.Reserved, "r1", drive=(d,)).block_ids == \
            d.reservations["r1"].seq.block_table
    else:
        assert d.local == {"r1"} and len(d.engine.scheduler.waiting) + \
            len(d.engine.scheduler.running) == 1
    proxy.send(d, dmsg.AbortAll())
    assert_all_free(d)


def test_an_engine_error_in_the_reservation_queue_fails_that_entry_alone(
        proxy: FakeProxy, make_worker: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    long_prompt = list(range(1, 61))  # 8 blocks: two fill the cache
    for rid in ("a", "b", "bad", "good"):
        proxy.send(d, reserve(rid, long_prompt))
    assert list(d.pending) == ["bad", "good"]
    real_reserve = d.engine.reserve

    def reserve_or_fail(request_id: str, *args: Any) -> Any:
        if request_id == "bad":
            raise EngineError("an engine error of this entry only")
        return real_reserve(request_id, *args)

    monkeypatch.setattr(d.engine, "reserve", reserve_or_fail)
    proxy.send(d, dmsg.Abort("a"))
    d.do_work()
    got = proxy.wait_event(ev.Rejected, "bad")
    assert got.status == 400 and "this entry only" in got.reason
    assert proxy.wait_event(ev.Reserved, "good").block_ids == \
        d.reservations["good"].seq.block_table
    assert not d.pending
    proxy.send(d, dmsg.AbortAll())
    assert_all_free(d)


def test_duplicate_prefill_leaks_nothing(proxy: FakeProxy, make_worker: Any) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    p = make_worker(PrefillWorker, proxy.config("p0"))
    proxy.send(d, reserve("r1"))
    blocks = proxy.wait_event(ev.Reserved, "r1").block_ids
    for _ in range(2):
        proxy.send(p, prefill("r1", "d0", d.kv_address, blocks, kv_spec_of(d)))
    got = proxy.wait_event(ev.RequestFailed, "r1")
    assert (got.worker_id, got.code, got.retryable) == ("p0", ErrorCode.INVALID_REQUEST, False)
    assert "duplicate" in got.error and list(p.jobs) == ["r1"]
    assert len(p.engine.scheduler.waiting) + len(p.engine.scheduler.running) == 1
    proxy.stream("r1", drive=(p, d))
    proxy.wait_event(ev.PrefillDone, "r1", drive=(p,))
    deadline = time.monotonic() + WAIT_S
    while p.jobs and time.monotonic() < deadline:
        p.do_work()
        time.sleep(0.01)
    assert_all_free(p)


def test_kv_lost_on_its_path_keeps_the_reservation_for_a_retry_then_releases_it(
        proxy: FakeProxy, make_worker: Any, tiny_engine: Callable[..., LLMEngine]) -> None:
    """A transfer that fails on its path (here: the receiver's PeerLost for a sender killed
    mid-stream) keeps the blocks, expects the KV again and says KV_TRANSFER (retryable); a
    second sender then fills the same blocks and the tokens equal a colocated engine's. After
    MAX_KV_RETRIES path failures the reservation is released (KV_LOST)."""
    d = make_worker(DecodeWorker, proxy.config("d0"))
    p = make_worker(PrefillWorker, proxy.config("p0"))
    params = sampling(max_tokens=5)
    proxy.send(d, reserve("r1", params=params))
    blocks = proxy.wait_event(ev.Reserved, "r1").block_ids
    lost = KvArrival("r1", error="PeerLost: data connection closed by the sender",
                     retryable=True)
    d.kv.forget("r1")  # what the receiver does as it reports the failure
    d._on_arrival(lost)
    got = proxy.wait_event(ev.RequestFailed, "r1")
    assert (got.code, got.retryable) == (ErrorCode.KV_TRANSFER, True) and "PeerLost" in got.error
    assert d.reservations["r1"].seq.block_table == blocks
    proxy.send(p, prefill("r1", "d0", d.kv_address, blocks, kv_spec_of(d), params=params))
    out = proxy.stream("r1", drive=(p, d))
    assert [t for e in out for t in e.token_ids] == greedy_reference(tiny_engine, params)
    assert_all_free(d)
    assert_all_free(p)

    proxy.send(d, reserve("r2", params=params))
    proxy.wait_event(ev.Reserved, "r2")
    codes = []
    for _ in range(MAX_KV_RETRIES + 1):
        d.kv.forget("r2")
        d._on_arrival(replace(lost, request_id="r2"))
        codes.append(proxy.wait_event(ev.RequestFailed, "r2").code)
    assert codes == [ErrorCode.KV_TRANSFER] * MAX_KV_RETRIES + [ErrorCode.KV_LOST]
    assert "r2" not in d.reservations
    assert_all_free(d)
