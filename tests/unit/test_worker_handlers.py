"""Each worker's message handling alone, in-process, driven without its `run()` loop: the
decode worker's reservations, queue, local prefill and aborts; the prefill worker's failures
and aborts. The prefill and decode workers together, and messages that must fail alone, are in
test_worker_handlers_pd.py; the fake proxy and the message factories in worker_fakes.py.

The engines are fresh tiny random-weight LLMEngines (`tiny_engine`, 16 blocks of 8 tokens);
every test ends with every block free.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from worker_fakes import (
    NUM_BLOCKS,
    PROMPT,
    WAIT_S,
    FakeProxy,
    assert_all_free,
    closed_port_address,
    greedy_reference,
    kv_spec_of,
    prefill,
    reserve,
    sampling,
)

from decode.worker import DecodeWorker
from engine.llm_engine import LLMEngine
from engine.outputs import FinishReason
from prefill.worker import PrefillWorker
from protocol import decode_ctrl as dmsg
from protocol import prefill_ctrl as pmsg
from protocol import worker_events as ev
from protocol.errors import ErrorCode
from worker.config import KvTransportConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---- decode worker ------------------------------------------------------------------------------
def test_reserve_replies_with_the_blocks_it_holds(proxy: FakeProxy, make_worker: Any) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    proxy.send(d, reserve("r1"))
    got = proxy.wait_event(ev.Reserved, "r1")
    seq = d.reservations["r1"].seq
    assert got.worker_id == "d0" and got.block_ids == seq.block_table
    assert len(got.block_ids) == 3 == d.engine.cache.pool.num_used
    hb = d.heartbeat()
    assert (hb.num_used_blocks, hb.num_free_blocks, hb.num_blocks) == (3, NUM_BLOCKS - 3,
                                                                       NUM_BLOCKS)
    proxy.send(d, dmsg.Abort("r1"))
    assert not d.reservations
    assert_all_free(d)


@pytest.mark.parametrize(("prompt", "remote"), [
    ([5] * 64, True),  # = --max-model-len 64: no room for an output token
    ([5] * 64, False),
    ([], True),
])
def test_reserve_of_a_prompt_that_can_never_run_is_rejected_400(
        proxy: FakeProxy, make_worker: Any, prompt: list[int], remote: bool) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    proxy.send(d, reserve("r1", prompt, remote_prefill=remote))
    got = proxy.wait_event(ev.Rejected, "r1")
    assert got.status == 400 and got.reason
    assert not d.pending and not d.reservations and not d.local
    assert_all_free(d)


def test_full_queue_is_rejected_503_and_the_queue_is_served_in_order(
        proxy: FakeProxy, make_worker: Any) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0", max_queue=1))
    long_prompt = list(range(1, 61))  # 8 blocks: two fill the cache
    for rid in ("r1", "r2", "r3"):
        proxy.send(d, reserve(rid, long_prompt))
    proxy.wait_event(ev.Reserved, "r1")
    proxy.wait_event(ev.Reserved, "r2")
    assert list(d.pending) == ["r3"]
    proxy.send(d, reserve("r4", long_prompt))
    full = proxy.wait_event(ev.Rejected, "r4")
    assert (full.status, full.retry_after_s > 0) == (503, True) and "queue is full" in full.reason
    proxy.send(d, dmsg.Abort("r1"))
    got = proxy.wait_event(ev.Reserved, "r3", drive=(d,))  # blocks freed: the queue moves
    assert got.block_ids == d.reservations["r3"].seq.block_table
    for rid in ("r2", "r3"):
        proxy.send(d, dmsg.Abort(rid))
    assert_all_free(d)


def test_queued_reserve_times_out_503(proxy: FakeProxy, make_worker: Any) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    proxy.send(d, reserve("r1", list(range(1, 61))))
    proxy.send(d, reserve("r2", list(range(1, 61))))
    proxy.send(d, reserve("r3", list(range(1, 61)), queue_timeout_s=0.1))
    got = proxy.wait_event(ev.Rejected, "r3", drive=(d,))
    assert got.status == 503 and "timed out" in got.reason and not d.pending
    proxy.send(d, dmsg.AbortAll())
    assert_all_free(d)


def test_reservation_whose_kv_never_arrives_fails_with_timeout(
        proxy: FakeProxy, make_worker: Any) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0", kv_timeout_s=0.2))
    proxy.send(d, reserve("r1"))
    proxy.wait_event(ev.Reserved, "r1")
    got = proxy.wait_event(ev.RequestFailed, "r1", drive=(d,))
    assert (got.code, got.worker_id) == (ErrorCode.KV_TIMEOUT, "d0") and not d.reservations
    assert_all_free(d)


def test_local_prefill_streams_tokens_until_finished(
        proxy: FakeProxy, make_worker: Any, tiny_engine: Callable[..., LLMEngine]) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    params = sampling(max_tokens=5)
    proxy.send(d, reserve("r1", params=params, remote_prefill=False))
    out = proxy.stream("r1", drive=(d,))
    assert [t for e in out for t in e.token_ids] == greedy_reference(tiny_engine, params)
    assert out[-1].finish_reason is FinishReason.LENGTH and out[-1].num_prompt_tokens == len(PROMPT)
    assert not d.local
    assert_all_free(d)


def test_prefill_locally_turns_a_reservation_into_local_generation(
        proxy: FakeProxy, make_worker: Any, tiny_engine: Callable[..., LLMEngine]) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    params = sampling(max_tokens=5)
    proxy.send(d, reserve("r1", params=params))
    proxy.wait_event(ev.Reserved, "r1")
    proxy.send(d, dmsg.PrefillLocally("r1"))
    assert not d.reservations and d.local == {"r1"}
    out = proxy.stream("r1", drive=(d,))
    assert [t for e in out for t in e.token_ids] == greedy_reference(tiny_engine, params)
    assert_all_free(d)


def test_abort_frees_a_running_request_and_abort_all_drops_everything(
        proxy: FakeProxy, make_worker: Any) -> None:
    d = make_worker(DecodeWorker, proxy.config("d0"))
    proxy.send(d, reserve("local", params=sampling(max_tokens=40), remote_prefill=False))
    proxy.wait_event(ev.Tokens, "local", drive=(d,))
    proxy.send(d, dmsg.Abort("local"))
    assert not d.local and not d.engine.has_unfinished
    got = proxy.wait_event(ev.RequestFailed, "local")  # said at once, typed
    assert (got.code, got.retryable) == (ErrorCode.ABORTED, False)
    proxy.assert_no_event("local", drive=(d,))
    assert_all_free(d)
    proxy.send(d, reserve("running", params=sampling(max_tokens=40), remote_prefill=False))
    proxy.wait_event(ev.Tokens, "running", drive=(d,))
    proxy.send(d, reserve("reserved", list(range(1, 61))))
    proxy.wait_event(ev.Reserved, "reserved")
    proxy.send(d, reserve("queued", list(range(1, 61))))
    assert list(d.pending) == ["queued"]
    proxy.send(d, dmsg.AbortAll("proxy restarted"))
    assert not d.pending and not d.reservations and not d.local
    assert not d.engine.has_unfinished
    for rid in ("running", "reserved", "queued"):  # each dropped request is reported at once
        got = proxy.wait_event(ev.RequestFailed, rid)
        assert got.code is ErrorCode.ABORTED and "proxy restarted" in got.error
    proxy.assert_no_event("queued", drive=(d,))
    assert_all_free(d)


# ---- prefill worker -----------------------------------------------------------------------------
def test_prefill_to_a_missing_kv_destination_fails_kv_transfer_and_frees_blocks(
        proxy: FakeProxy, make_worker: Any) -> None:
    kv = KvTransportConfig(transfer_timeout_s=0.5)
    p = make_worker(PrefillWorker, proxy.config("p0", kv=kv))
    proxy.send(p, prefill("r1", "d0", closed_port_address(), [4, 5, 6], kv_spec_of(p)))
    got = proxy.wait_event(ev.RequestFailed, "r1", drive=(p,))
    assert (got.code, got.worker_id, got.retryable) == (ErrorCode.KV_TRANSFER, "p0", True)
    assert not p.jobs
    assert_all_free(p)


def test_abort_of_a_queued_or_running_prefill_reports_it_once_and_frees_blocks(
        proxy: FakeProxy, make_worker: Any) -> None:
    p = make_worker(PrefillWorker, proxy.config("p0"), max_num_batched_tokens=8)
    long_prompt = list(range(1, 41))  # 5 chunks of 8
    proxy.send(p, prefill("running", "d0", closed_port_address(), [1], kv_spec_of(p),
                          long_prompt))
    proxy.send(p, prefill("queued", "d0", closed_port_address(), [1], kv_spec_of(p)))
    p.do_work()  # one 8-token chunk of "running"; "queued" waits
    assert [s.seq_id for s in p.engine.scheduler.running] == ["running"]
    assert [s.seq_id for s in p.engine.scheduler.waiting] == ["queued"]
    proxy.send(p, pmsg.Abort("queued"))
    proxy.send(p, pmsg.Abort("running"))
    assert not p.jobs and not p.engine.scheduler.has_work
    for rid in ("queued", "running"):
        assert proxy.wait_event(ev.RequestFailed, rid).code is ErrorCode.ABORTED
    proxy.assert_no_event("queued", drive=(p,))
    assert not proxy.pending
    assert_all_free(p)


def test_abort_while_the_kv_is_on_the_wire_is_reported_once_then_ends_with_the_transfer(
        proxy: FakeProxy, make_worker: Any) -> None:
    kv = KvTransportConfig(transfer_timeout_s=0.5)
    p = make_worker(PrefillWorker, proxy.config("p0", kv=kv))
    proxy.send(p, prefill("r1", "d0", closed_port_address(), [4, 5, 6], kv_spec_of(p)))
    p.do_work()  # prefilled; its KV now goes to a peer that never answers
    assert "r1" in p.jobs and p.engine.cache.pool.num_used == 3
    proxy.send(p, pmsg.Abort("r1"))
    assert p.jobs["r1"].is_aborted and p.engine.cache.pool.num_used == 3  # a sender reads them
    assert proxy.wait_event(ev.RequestFailed, "r1").code is ErrorCode.ABORTED
    deadline = time.monotonic() + WAIT_S
    while p.jobs and time.monotonic() < deadline:
        p.do_work()
        time.sleep(0.01)
    assert not p.jobs
    proxy.assert_no_event("r1")
    assert_all_free(p)


@pytest.mark.parametrize(("case", "code", "retryable"), [
    ("queue_full", ErrorCode.OVERLOADED, True),
    ("too_long", ErrorCode.INVALID_REQUEST, False),
])
def test_prefill_that_cannot_be_taken_fails_at_once(
        proxy: FakeProxy, make_worker: Any, case: str, code: ErrorCode, retryable: bool) -> None:
    p = make_worker(PrefillWorker, proxy.config("p0", max_queue=1))
    address = closed_port_address()
    if case == "queue_full":
        proxy.send(p, prefill("first", "d0", address, [1], kv_spec_of(p)))
        proxy.send(p, prefill("r1", "d0", address, [1], kv_spec_of(p)))
    else:
        proxy.send(p, prefill("r1", "d0", address, [1], kv_spec_of(p), [5] * 64))
    got = proxy.wait_event(ev.RequestFailed, "r1")
    assert (got.code, got.retryable) == (code, retryable)
    assert "r1" not in p.jobs
    proxy.send(p, pmsg.AbortAll())
    assert not p.jobs
    assert_all_free(p)
