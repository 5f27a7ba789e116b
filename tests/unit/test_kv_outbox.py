"""The prefill worker's KvOutbox: one lane (queue + thread + sender) per decode worker, so a
hung decode worker delays only its own transfers; per-peer order; counters; idle lanes
close; close."""

from __future__ import annotations

import os
import time

import pytest
import torch
import zmq

from bench.kv_fill import ReceiverHarness, fill_random
from engine.config import ConfigError
from engine.kv_spec import KvDtype, KvSpec
from prefill.kv_outbox import KvOutbox, TransferOutcome
from protocol.errors import ErrorCode
from transfer.convert.cache import PagedKvCache
from transfer.endpoint.records import ZmqReceiverConfig
from transfer.wire.errors import ChecksumMismatch, PeerLost, TransferError, TransferTimeout
from worker.config import KvTransportConfig

SPEC = KvSpec(2, 2, 64, 16, dtype=KvDtype.BFLOAT16)
TIMEOUT_S = 4.0


def _results(outbox: KvOutbox, want: int,
             timeout_s: float) -> dict[str, tuple[TransferOutcome, float]]:
    """Results by request id, each with the time it came back."""
    got: dict[str, tuple[TransferOutcome, float]] = {}
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        for r in outbox.poll_results():
            got[r.request_id] = (r, time.monotonic())
        time.sleep(0.01)
    return got


def test_a_hung_decode_worker_delays_only_its_own_transfers() -> None:
    src = PagedKvCache.allocate(SPEC, 16)
    fill_random(src, torch.Generator().manual_seed(0))
    config = KvTransportConfig(transfer_timeout_s=TIMEOUT_S)
    ctx = zmq.Context()
    hung = ctx.socket(zmq.ROUTER)  # a decode worker that accepts the connection and never reads
    port = hung.bind_to_random_port("tcp://127.0.0.1")
    healthy = ReceiverHarness(PagedKvCache.allocate(SPEC, 16),
                              ZmqReceiverConfig(endpoint="tcp://127.0.0.1:0"))
    outbox = KvOutbox(ctx, src, config)
    try:
        for i in range(3):
            healthy.rx.expect(f"ok-{i}", [1 + i, 4 + i])
        t0 = time.monotonic()
        outbox.send("stuck", f"tcp://127.0.0.1:{port}", [7, 8], 32, SPEC, {"first_token": 1})
        for i in range(3):  # queued behind the hung transfer in time, on another lane
            outbox.send(f"ok-{i}", healthy.rx.endpoint, [7, 8], 32, SPEC, {"first_token": 1})
        got = _results(outbox, 4, TIMEOUT_S + 10)
        assert set(got) == {"stuck", "ok-0", "ok-1", "ok-2"}
        for i in range(3):
            result, at = got[f"ok-{i}"]
            assert result.error is None and result.num_bytes > 0
            assert at - t0 < TIMEOUT_S / 2, "a transfer to a healthy peer waited for the hung one"
            assert isinstance(healthy.wait(f"ok-{i}"), list)
        order = sorted(range(3), key=lambda i: got[f"ok-{i}"][1])
        assert order == [0, 1, 2]  # one peer's transfers go in order
        stuck, at = got["stuck"]
        assert stuck.error is not None and stuck.error.startswith("TransferTimeout")
        assert stuck.code is ErrorCode.KV_TRANSFER and stuck.retryable  # TransferTimeout.retryable
        assert at - t0 >= TIMEOUT_S * 0.9
    finally:
        outbox.close()
        healthy.close()
        hung.close(linger=0)
        ctx.destroy(linger=0)


def test_idle_lanes_close_and_come_back() -> None:
    src = PagedKvCache.allocate(SPEC, 16)
    config = KvTransportConfig(transfer_timeout_s=TIMEOUT_S)
    ctx = zmq.Context()
    healthy = ReceiverHarness(PagedKvCache.allocate(SPEC, 16),
                              ZmqReceiverConfig(endpoint="tcp://127.0.0.1:0"))
    outbox = KvOutbox(ctx, src, config, lane_idle_s=0.3)
    try:
        for round_ in range(2):
            rid = f"r{round_}"
            healthy.rx.expect(rid, [1, 2])
            outbox.send(rid, healthy.rx.endpoint, [7, 8], 32, SPEC, {"first_token": 1})
            assert outbox.num_lanes == 1
            got = _results(outbox, 1, 10)
            assert got[rid][0].error is None
            deadline = time.monotonic() + 5
            while outbox.num_lanes and time.monotonic() < deadline:
                time.sleep(0.05)
            # idle: its sender and thread are gone; the next send reopens
            assert outbox.num_lanes == 0
        for t in outbox._threads:
            t.join(5)
        assert not [t for t in outbox._threads if t.is_alive()]
    finally:
        outbox.close()
        healthy.close()
        ctx.destroy(linger=0)


def _all_subclasses(cls: type[TransferError]) -> set[type[TransferError]]:
    return {c for sub in cls.__subclasses__() for c in (sub, *_all_subclasses(sub))}


def test_a_failed_transfer_is_coded_from_its_error_class() -> None:
    """One source of truth for what is retryable: the transfer error class's `retryable`
    decides the outcome's ErrorCode (and so whether the proxy retries the prefill)."""
    for cls in _all_subclasses(TransferError):
        error = TransferError.from_wire({"code": cls.code, "message": "m"})
        outcome = TransferOutcome.failed("r", error)
        assert outcome.retryable is cls.retryable, cls.__name__
        assert outcome.code is (ErrorCode.KV_TRANSFER if cls.retryable else ErrorCode.KV_REFUSED)
    assert {c for c in _all_subclasses(TransferError) if c.retryable} == {
        TransferTimeout, PeerLost, ChecksumMismatch}
    unexpected = TransferOutcome.failed("r", RuntimeError("bug"))
    assert unexpected.code is ErrorCode.INTERNAL and not unexpected.retryable
    src = PagedKvCache.allocate(SPEC.with_(model_fingerprint="model-a"), 4)
    ctx = zmq.Context()
    outbox = KvOutbox(ctx, src, KvTransportConfig(transfer_timeout_s=TIMEOUT_S))
    try:  # refused before anything is sent: another prefill worker would meet it too
        outbox.send("other-model", "tcp://127.0.0.1:9", [0, 1], 32,
                    SPEC.with_(model_fingerprint="model-b"), {"first_token": 1})
        result, _ = _results(outbox, 1, 10)["other-model"]
        assert result.error is not None and result.error.startswith("IncompatibleKv")
        assert result.code is ErrorCode.KV_REFUSED and not result.retryable
    finally:
        outbox.close()
        ctx.destroy(linger=0)


def test_a_failed_transfer_retires_its_lane_at_once() -> None:
    """A forged Prefill's `kv_address` (nobody there): the transfer fails within its timeout,
    and the lane's thread and socket go with it, not after the 300 s idle time."""
    src = PagedKvCache.allocate(SPEC, 16)
    fill_random(src, torch.Generator().manual_seed(0))
    ctx = zmq.Context()
    outbox = KvOutbox(ctx, src, KvTransportConfig(transfer_timeout_s=0.3))
    with zmq.Context() as probe:  # a port bound, then released: nothing listens there
        s = probe.socket(zmq.PULL)
        address = f"tcp://127.0.0.1:{s.bind_to_random_port('tcp://127.0.0.1')}"
        s.close(linger=0)
    try:
        for i in range(4):
            outbox.send(f"forged-{i}", address, [1, 2], 32, SPEC, {"first_token": 1})
        got = _results(outbox, 4, 10.0)
        assert all(r.error is not None for r, _ in got.values()) and len(got) == 4
        deadline = time.monotonic() + 5.0
        while outbox.num_lanes and time.monotonic() < deadline:
            time.sleep(0.02)
        assert outbox.num_lanes == 0
        assert not [t for t in outbox._threads if t.is_alive()]
    finally:
        outbox.close()
        ctx.term()


def test_lanes_run_on_the_kv_sender_cpus_and_the_worker_keeps_its_own() -> None:
    """`--kv-sender-cpus`: the lane thread's own affinity (Linux), not the process's."""
    mine = os.sched_getaffinity(0)
    core = min(mine)
    src = PagedKvCache.allocate(SPEC, 16)
    fill_random(src, torch.Generator().manual_seed(0))
    config = KvTransportConfig(transfer_timeout_s=TIMEOUT_S, kv_sender_cpus=str(core))
    ctx = zmq.Context()
    rx = ReceiverHarness(PagedKvCache.allocate(SPEC, 16),
                         ZmqReceiverConfig(endpoint="tcp://127.0.0.1:0"))
    outbox = KvOutbox(ctx, src, config)
    try:
        rx.rx.expect("r", [1, 4])
        outbox.send("r", rx.rx.endpoint, [7, 8], 32, SPEC, {"first_token": 1})
        got = _results(outbox, 1, TIMEOUT_S + 5)
        assert got["r"][0].error is None
        lanes = [t for t in outbox._threads if t.is_alive()]
        assert lanes and all(t.native_id is not None for t in lanes)
        for t in lanes:
            assert os.sched_getaffinity(t.native_id) == {core}
        assert os.sched_getaffinity(0) == mine  # the worker's own threads are untouched
    finally:
        outbox.close()
        rx.close()
        ctx.destroy(linger=0)


def test_kv_sender_cpus_are_checked_at_start_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match="--kv-sender-cpus"):
        KvTransportConfig(kv_sender_cpus="one")


def test_a_stream_logs_where_its_lane_time_went(caplog: pytest.LogCaptureFixture) -> None:
    """At DEBUG, a streamed request's end logs its parts, bytes and the lane's time by phase
    (how a layer-wise stream's cost beyond its bytes is found on a GPU run); a part's
    SendResult splits its seconds into pack, payload and ack."""
    from bench.crossnode import stream_phases
    from transfer.endpoint.parts import part_meta
    from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig

    src = PagedKvCache.allocate(SPEC, 16)
    fill_random(src, torch.Generator().manual_seed(0))
    rx = ReceiverHarness(PagedKvCache.allocate(SPEC, 16),
                         ZmqReceiverConfig(endpoint="tcp://127.0.0.1:0"))
    ctx = zmq.Context()
    outbox = KvOutbox(ctx, src, KvTransportConfig(transfer_timeout_s=TIMEOUT_S))
    caplog.set_level("DEBUG", logger="prefill.kv_outbox")
    try:
        rx.rx.expect("s", [1, 4])
        for i, layers in enumerate([(0, 1), (1, 2)]):
            outbox.send_part("s", rx.rx.endpoint, [7, 8], 0, 32, layers, SPEC,
                             {**part_meta(i, i == 1), **({"first_token": 3} if i else {})},
                             (i, i == 1))
        (outcome, _), = _results(outbox, 1, TIMEOUT_S + 5).values()
        assert outcome.error is None and isinstance(rx.wait("s"), list)
        line, = [r.getMessage() for r in caplog.records if r.getMessage().startswith("KV stream")]
        assert line.startswith(f"KV stream s: 2 parts, {outcome.num_bytes / 2**20:.1f} MiB")
        parsed = stream_phases(line)  # what bench/crossnode.py reads from a server's log
        assert parsed["streams"] == 1 and parsed["parts"] == 2
        assert parsed["lane_ms"] >= parsed["payload_ms"] + parsed["ack_ms"] > 0
        rx.rx.expect("w", [2, 5])
        tx = ZmqKvSender(rx.rx.endpoint, ZmqSenderConfig(timeout_s=TIMEOUT_S), context=ctx)
        r = tx.send(src, [7, 8], 0, 32, request_id="w", meta={"first_token": 1})
        tx.close()
        assert min(r.pack_s, r.payload_s, r.ack_s) > 0
        assert r.pack_s + r.payload_s + r.ack_s == pytest.approx(r.seconds, abs=1e-3)
    finally:
        outbox.close()
        rx.close()
        ctx.destroy(linger=0)
