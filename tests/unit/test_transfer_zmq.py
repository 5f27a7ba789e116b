"""ZMQ data plane end to end: tcp:// (port 0) and ipc:// (tmp dir), paged → paged with
conversion, acks and typed error replies, timeouts, peers dying mid-transfer (real processes
killed with SIGKILL), cancel, and a receiver that keeps serving after garbage."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import zmq

from bench.kv_fill import ReceiverHarness, fill_random
from engine.kv_spec import KvDtype, KvLayout, KvSpec
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import read_tokens_float
from transfer.convert.pack import PackOptions, pack_kv
from transfer.endpoint.receiver import ZmqKvReceiver, ZmqReceiverConfig
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
from transfer.wire import framing as proto
from transfer.wire.errors import (
    ChecksumMismatch,
    IncompatibleKv,
    PeerLost,
    TransferError,
    TransferTimeout,
    UnexpectedTransfer,
)
from transfer.wire.header import compute_checksum

ROOT = Path(__file__).resolve().parents[2]
SRC = KvSpec(2, 2, 64, 16, dtype=KvDtype.BFLOAT16)
DST = KvSpec(2, 2, 64, 32, dtype=KvDtype.FLOAT32, layout=KvLayout.HND, is_kv_stacked=False)
SMALL_CHUNKS = ZmqSenderConfig(timeout_s=5.0, pack=PackOptions(chunk_bytes=8192))


def harness(endpoint: str, dst_spec: KvSpec = DST, **cfg: float) -> ReceiverHarness:
    """A started receiver on a fresh 16-block cache whose outcomes land in `ended`."""
    config = ZmqReceiverConfig(endpoint=endpoint, idle_timeout_s=cfg.get("idle", 5.0),
                               transfer_timeout_s=cfg.get("total", 10.0))
    return ReceiverHarness(PagedKvCache.allocate(dst_spec, 16), config)


@pytest.fixture
def src() -> PagedKvCache:
    cache = PagedKvCache.allocate(SRC, 16)
    fill_random(cache, torch.Generator().manual_seed(0))
    return cache


def test_end_to_end_convert_and_block_copy(endpoint: str, src: PagedKvCache) -> None:
    h = harness(endpoint)
    config = ZmqSenderConfig(checksum=True, pack=PackOptions(chunk_bytes=8192))
    tx = ZmqKvSender(h.rx.endpoint, config)
    try:
        h.rx.expect("a", [5, 9, 1])
        res = tx.send(src, [3, 12, 7, 0, 8], 0, 70, request_id="a", meta={"first_token": 11})
        reports = h.wait("a")
        assert isinstance(reports, list) and reports[0].meta == {"first_token": 11}
        assert res.report["path"] == "convert" and res.report["is_lossless"] and res.num_bytes > 0
        want = read_tokens_float(src, [3, 12, 7, 0, 8], 0, 70)
        got = read_tokens_float(h.cache, [5, 9, 1], 0, 70)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    finally:
        tx.close()
        h.close()
    same = harness(endpoint.replace("kv.sock", "kv2.sock"), dst_spec=SRC)
    tx = ZmqKvSender(same.rx.endpoint)
    try:
        same.rx.expect("b", [15, 2, 3, 4, 10])
        assert tx.send(src, [3, 12, 7, 0, 8], 16, 70, request_id="b").report["path"] == "block_copy"
        assert isinstance(same.wait("b"), list)
        want = read_tokens_float(src, [3, 12, 7, 0, 8], 16, 70)
        got = read_tokens_float(same.cache, [15, 2, 3, 4, 10], 16, 70)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    finally:
        tx.close()
        same.close()


def test_ack_goes_out_before_a_slow_completion_callback(src: PagedKvCache) -> None:
    """The sender's ack is sent before the receiver runs its (here blocking) callbacks."""
    import threading

    returned = threading.Event()
    waited: list[bool] = []
    rx = ZmqKvReceiver(PagedKvCache.allocate(DST, 16),
                       ZmqReceiverConfig(endpoint="tcp://127.0.0.1:0"),
                       on_complete=lambda rid, reports: waited.append(returned.wait(10)),
                       on_release=lambda rid, err: None)
    rx.start()
    config = ZmqSenderConfig(timeout_s=3.0, payload="frames", pack=PackOptions(chunk_bytes=8192))
    tx = ZmqKvSender(rx.endpoint, config)
    try:
        rx.expect("slow", [5, 9, 1])
        # TransferTimeout if the ack waited
        tx.send(src, [3, 12, 7, 0, 8], 0, 40, request_id="slow")
        returned.set()
        deadline = time.monotonic() + 10
        while not waited and time.monotonic() < deadline:
            time.sleep(0.01)
        assert waited == [True]
    finally:
        returned.set()
        tx.close()
        rx.close()


def test_typed_error_replies(src: PagedKvCache) -> None:
    h = harness("tcp://127.0.0.1:0", dst_spec=DST.with_(head_dim=128))
    tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(timeout_s=5.0))
    try:
        with pytest.raises(UnexpectedTransfer) as e:
            tx.send(src, [1, 2], 0, 20, request_id="nobody")
        assert e.value.is_remote and e.value.code == 1303
        h.rx.expect("x", [1, 2])
        with pytest.raises(IncompatibleKv, match="head_dim") as e2:
            tx.send(src, [1, 2], 0, 20, request_id="x")
        assert e2.value.is_remote
        assert isinstance(h.wait("x"), IncompatibleKv)  # the reservation was released
    finally:
        tx.close()
        h.close()


def test_timeout_when_nobody_listens(src: PagedKvCache) -> None:
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as s:
        port = s.bind_to_random_port("tcp://127.0.0.1")
    tx = ZmqKvSender(f"tcp://127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(TransferTimeout):
        tx.send(src, [1, 2], 0, 20, request_id="r", timeout_s=0.3)
    assert time.monotonic() - t0 < 3
    tx.close()


def test_timeout_when_receiver_does_not_answer(src: PagedKvCache) -> None:
    cache = PagedKvCache.allocate(DST, 16)
    rx = ZmqKvReceiver(cache, ZmqReceiverConfig(), on_complete=lambda *a: None,
                       on_release=lambda *a: None)
    tx = ZmqKvSender(rx.endpoint)
    try:  # connected, but nobody polls the receiver: the ack never comes
        with pytest.raises(TransferTimeout):
            tx.send(src, [1, 2], 0, 20, request_id="r", timeout_s=0.5)
    finally:
        tx.close()
        rx.close()


SENDER_DIES = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {root!r})
    import torch, zmq
    from engine.kv_spec import KvDtype, KvSpec
    from transfer.wire import framing as proto
    from transfer.convert.cache import PagedKvCache
    from transfer.convert.pack import PackOptions, pack_kv
    cache = PagedKvCache.allocate(KvSpec(2, 2, 64, 16, dtype=KvDtype.BFLOAT16), 16)
    packed = pack_kv(cache, [1, 2, 3], 0, 40, request_id="doomed", transfer_id=9,
                     options=PackOptions(chunk_bytes=4096))
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect({endpoint!r})
    sock.send_multipart([proto.HEADER, packed.header.encode()])
    first = next(packed.iter_chunks())
    sock.send_multipart([proto.DATA, proto.pack([9, 0, None]), *[b.numpy() for b in first]])
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_sender_killed_mid_transfer_releases_reservation(src: PagedKvCache) -> None:
    h = harness("tcp://127.0.0.1:0", dst_spec=SRC, idle=0.5)
    try:
        h.rx.expect("doomed", [4, 5, 6])
        script = SENDER_DIES.format(root=str(ROOT), endpoint=h.rx.endpoint)
        proc = subprocess.run([sys.executable, "-c", script], timeout=60, capture_output=True)
        assert proc.returncode == -9, proc.stderr.decode()[-2000:]
        outcome = h.wait("doomed", timeout=10)
        assert isinstance(outcome, PeerLost) and "chunk 1 of" in str(outcome)
        h.rx.expect("next", [4, 5, 6])  # the receiver keeps serving; the blocks are reusable
        tx = ZmqKvSender(h.rx.endpoint)
        tx.send(src, [1, 2, 3], 0, 40, request_id="next")
        tx.close()
        assert isinstance(h.wait("next"), list)
    finally:
        h.close()


RECEIVER_DIES = textwrap.dedent("""
    import os, signal, sys
    import zmq
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:0")
    print(sock.getsockopt_string(zmq.LAST_ENDPOINT), flush=True)
    sock.recv_multipart()  # the header arrives: die mid-transfer
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_receiver_killed_mid_transfer_is_peer_lost(src: PagedKvCache) -> None:
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER_DIES], stdout=subprocess.PIPE,
                            text=True)
    try:
        endpoint = proc.stdout.readline().strip()  # type: ignore[union-attr]
        tx = ZmqKvSender(endpoint, ZmqSenderConfig(timeout_s=10.0))
        t0 = time.monotonic()
        with pytest.raises((PeerLost, TransferTimeout)) as e:
            tx.send(src, [1, 2, 3], 0, 40, request_id="r")
        assert isinstance(e.value, PeerLost) and time.monotonic() - t0 < 5
        tx.close()
    finally:
        proc.kill()
        proc.wait()


def test_cancel_and_expectation_timeout(src: PagedKvCache) -> None:
    h = harness("tcp://127.0.0.1:0")
    tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(timeout_s=5.0))
    try:
        h.rx.expect("c", [1, 2])
        assert h.rx.cancel("c") and not h.rx.cancel("c")
        with pytest.raises(UnexpectedTransfer):
            tx.send(src, [1, 2], 0, 20, request_id="c")
        h.rx.expect("t", [1, 2], timeout_s=0.2)
        assert isinstance(h.wait("t", timeout=5), TransferTimeout)
        assert "c" not in h.ended  # a cancelled reservation gets no callback
    finally:
        tx.close()
        h.close()


def test_two_senders_fill_one_reservation(src: PagedKvCache) -> None:
    """Prefill TP=2 → decode TP=1 over the wire: two transfers, one completion."""
    h = harness("tcp://127.0.0.1:0", dst_spec=SRC.with_(num_kv_heads=4))
    try:
        h.rx.expect("tp", [0, 1, 2], num_transfers=2)
        for rank in (0, 1):
            tx = ZmqKvSender(h.rx.endpoint)
            part = PagedKvCache.allocate(SRC.with_(tp_rank=rank, tp_size=2), 16)
            fill_random(part, torch.Generator().manual_seed(rank))
            tx.send(part, [5, 6, 7], 0, 40, request_id="tp")
            tx.close()
        reports = h.wait("tp")
        assert isinstance(reports, list)
        assert [(r.head_start, r.head_end) for r in reports] == [(0, 2), (2, 4)]
    finally:
        h.close()


def _raw_dealer(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    return sock


def test_garbage_gets_typed_errors_and_the_receiver_keeps_serving(src: PagedKvCache) -> None:
    h = harness("tcp://127.0.0.1:0", dst_spec=SRC)
    ctx = zmq.Context()
    try:
        raw = _raw_dealer(ctx, h.rx.endpoint)
        for frames in ([b"X"], [proto.HEADER, b"\xc1junk"], [proto.HEADER], [proto.DATA, b"\x00"],
                       [proto.ABORT, b"\x93"], [b""]):
            raw.send_multipart(frames)
            kind, tid, body = proto.parse_reply(raw.recv_multipart())
            assert kind == proto.ERROR and isinstance(body["code"], int) and body["code"] >= 1000
        # a checksummed transfer whose data does not match its checksum
        h.rx.expect("sum", [1, 2, 3])
        packed = pack_kv(src, [1, 2, 3], 0, 40, request_id="sum", transfer_id=5, checksum="xxh3_64")
        raw.send_multipart([proto.HEADER, packed.header.encode()])
        bufs = [b.numpy() for b in next(packed.iter_chunks())]
        sums = [compute_checksum("xxh3_64", b) ^ 1 for b in bufs]
        raw.send_multipart([proto.DATA, proto.pack([5, 0, sums]), *bufs])
        kind, tid, body = proto.parse_reply(raw.recv_multipart())
        assert kind == proto.ERROR and tid == 5 and body["name"] == "ChecksumMismatch"
        assert isinstance(h.wait("sum"), ChecksumMismatch)
        raw.close()
        h.rx.expect("ok", [1, 2, 3])
        tx = ZmqKvSender(h.rx.endpoint)
        tx.send(src, [7, 8, 9], 0, 40, request_id="ok")
        tx.close()
        assert isinstance(h.wait("ok"), list)
    finally:
        ctx.term()
        h.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs a POSIX host")
def test_receiver_close_releases_pending_reservations() -> None:
    h = harness("tcp://127.0.0.1:0")
    h.rx.expect("pending", [1])
    h.close()
    assert isinstance(h.ended["pending"], TransferError)
