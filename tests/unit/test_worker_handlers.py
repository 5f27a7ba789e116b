"""Both workers' message handling, in-process, driven without their `run()` loop.

A `FakeProxy` owns the proxy's ends: a PULL socket bound on 127.0.0.1 port 0 that the workers'
events go to (`WorkerConfig.events_address`), and PUSH sockets to each worker's ctrl address.
`send` encodes a control message with the real codec, and hands what the worker's Inbox
decodes to `worker.on_ctrl`; `wait_event` calls the workers' `do_work` until the wanted event
arrives. The engines are fresh tiny random-weight LLMEngines (`tiny_engine`, 16 blocks of 8
tokens); every test ends with every block free.

Messages are built only by the factories at the top of this file.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from decode.worker import DecodeWorker
from engine.errors import EngineError
from engine.kv_spec import KvSpec
from engine.llm_engine import LLMEngine
from engine.outputs import FinishReason
from engine.sampling_params import SamplingParams
from prefill.worker import PrefillWorker
from protocol import decode_ctrl as dmsg
from protocol import prefill_ctrl as pmsg
from protocol import worker_events as ev
from protocol.errors import ErrorCode
from worker.base import WorkerBase
from worker.config import KvTransportConfig, WorkerConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WAIT_S = 5.0
NUM_BLOCKS = 16  # tiny_engine with 64 KiB of KV; 8 tokens a block
KV_64K = "64KiB"
PROMPT = [(7 * i) % 500 + 10 for i in range(20)]  # 3 blocks


# ---- messages (the one place they are built) ----------------------------------------------------
def sampling(max_tokens: int = 4, **kw: Any) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def kv_spec_of(worker: WorkerBase, **changes: Any) -> KvSpec:
    return worker.engine.plan.spec.with_(**changes)


def reserve(request_id: str, prompt: list[int] = PROMPT, params: SamplingParams | None = None,
            remote_prefill: bool = True, queue_timeout_s: float = 30.0) -> dmsg.Reserve:
    return dmsg.Reserve(request_id, list(prompt), params or sampling(), remote_prefill,
                        queue_timeout_s)


def prefill(request_id: str, decode_id: str, kv_address: str, block_ids: list[int],
            kv_spec: KvSpec, prompt: list[int] = PROMPT,
            params: SamplingParams | None = None) -> pmsg.Prefill:
    return pmsg.Prefill(request_id, list(prompt), params or sampling(), decode_id, kv_address,
                        list(block_ids), kv_spec)


# ---- the fake proxy -----------------------------------------------------------------------------
class FakeProxy:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.events = self.ctx.socket(zmq.PULL)
        self.events.setsockopt(zmq.LINGER, 0)
        self.events.bind("tcp://127.0.0.1:0")
        self.address = self.events.getsockopt_string(zmq.LAST_ENDPOINT)
        self.pending: list[Any] = []  # events received and not yet taken by a test
        self._ctrl: dict[str, zmq.Socket] = {}

    def config(self, worker_id: str, **kw: Any) -> WorkerConfig:
        return WorkerConfig(worker_id=worker_id, events_address=self.address, **kw)

    def send(self, worker: WorkerBase, msg: object) -> None:
        """Over the wire to the worker's ctrl Inbox, then into its handler."""
        sock = self._ctrl.get(worker.worker_id)
        if sock is None:
            sock = self._ctrl[worker.worker_id] = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(worker.ctrl.address)
        sock.send(worker.ctrl.family.encode(msg))
        deadline = time.monotonic() + WAIT_S
        while not (got := worker.ctrl.drain()):
            assert time.monotonic() < deadline, f"{type(msg).__name__} did not reach the worker"
            time.sleep(0.002)
        assert got == [msg]
        worker.on_ctrl(got[0])

    def _receive(self, timeout_ms: int) -> None:
        if self.events.poll(timeout_ms):
            while True:
                try:
                    self.pending.append(ev.WORKER_EVENTS.decode(self.events.recv(zmq.NOBLOCK)))
                except zmq.Again:
                    return

    def wait_event(self, cls: type, request_id: str | None = None,
                   drive: tuple[WorkerBase, ...] = (), timeout_s: float = WAIT_S) -> Any:
        """The first pending `cls` event (of `request_id`), running the workers' `do_work`
        while it has not come."""
        deadline = time.monotonic() + timeout_s
        while True:
            for i, msg in enumerate(self.pending):
                if isinstance(msg, cls) and request_id in (None, msg.request_id):
                    return self.pending.pop(i)
            assert time.monotonic() < deadline, f"no {cls.__name__} in {self.pending}"
            for worker in drive:
                worker.do_work()
            self._receive(5)

    def assert_no_event(self, request_id: str, drive: tuple[WorkerBase, ...] = (),
                        for_s: float = 0.3) -> None:
        deadline = time.monotonic() + for_s
        while time.monotonic() < deadline:
            for worker in drive:
                worker.do_work()
            self._receive(5)
        assert not [m for m in self.pending if getattr(m, "request_id", None) == request_id]

    def stream(self, request_id: str, drive: tuple[WorkerBase, ...]) -> list[ev.Tokens]:
        """Tokens events of a request until the one with a finish reason."""
        out = [self.wait_event(ev.Tokens, request_id, drive)]
        while out[-1].finish_reason is None:
            out.append(self.wait_event(ev.Tokens, request_id, drive))
        return out

    def close(self) -> None:
        for sock in self._ctrl.values():
            sock.close(linger=0)
        self.events.close(linger=0)
        self.ctx.term()


@pytest.fixture
def proxy() -> Iterator[FakeProxy]:
    p = FakeProxy()
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def make_worker(tiny_engine: Callable[..., LLMEngine]) -> Iterator[Callable[..., Any]]:
    """Factory: `make_worker(DecodeWorker, config, **engine_overrides)`; closed at teardown."""
    made: list[WorkerBase] = []

    def build(cls: type, config: WorkerConfig, **engine: Any) -> Any:
        worker = cls(config, tiny_engine(**{"kv_cache_memory": KV_64K, **engine}))
        made.append(worker)
        return worker

    try:
        yield build
    finally:
        for worker in made:
            worker.close()


def assert_all_free(worker: WorkerBase) -> None:
    pool = worker.engine.cache.pool
    assert pool.num_used == 0 and pool.num_free == pool.num_blocks
    worker.engine.check_idle_integrity()


def closed_port_address() -> str:
    """A tcp address on 127.0.0.1 where nothing listens (a port bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def greedy_reference(tiny_engine: Callable[..., LLMEngine], params: SamplingParams) -> list[int]:
    return tiny_engine().generate([PROMPT], params)[0].output_ids


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


def test_abort_of_a_queued_or_running_prefill_sends_nothing_and_frees_blocks(
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
    proxy.assert_no_event("queued", drive=(p,))
    assert not proxy.pending
    assert_all_free(p)


def test_abort_while_the_kv_is_on_the_wire_ends_silently_with_the_transfer(
        proxy: FakeProxy, make_worker: Any) -> None:
    kv = KvTransportConfig(transfer_timeout_s=0.5)
    p = make_worker(PrefillWorker, proxy.config("p0", kv=kv))
    proxy.send(p, prefill("r1", "d0", closed_port_address(), [4, 5, 6], kv_spec_of(p)))
    p.do_work()  # prefilled; its KV now goes to a peer that never answers
    assert "r1" in p.jobs and p.engine.cache.pool.num_used == 3
    proxy.send(p, pmsg.Abort("r1"))
    assert p.jobs["r1"].is_aborted and p.engine.cache.pool.num_used == 3  # a sender reads them
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

