"""The stream payload path (header on ZMQ, payload by writev/readv on a data connection):
bit-exact transfers over tcp:// (port 0) and ipc:// (tmp dir), placed and staged buffers,
partial blocks, checksums, hostile data connections (garbage token, bad prefix, wrong byte
count, unknown transfer, EOF, a sender killed mid-payload), cancel mid-payload, fallbacks, and
the frames path still selectable."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq

from bench.kv_fill import ReceiverHarness, fill_random
from engine.kv_spec import KvDtype, KvLayout, KvSpec, ScaleGranularity
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import read_tokens_float
from transfer.convert.pack import PackedKv, PackOptions, pack_kv
from transfer.endpoint.receiver import ZmqKvReceiver, ZmqReceiverConfig
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
from transfer.stream.receiver import StreamReceiver, StreamReceiverOptions
from transfer.wire import framing as proto
from transfer.wire.errors import (
    ChecksumMismatch,
    IncompatibleKv,
    MalformedFrame,
    PeerLost,
    TransferCancelled,
    TransferError,
    UnexpectedTransfer,
)
from transfer.wire.header import compute_checksum

ROOT = Path(__file__).resolve().parents[2]
SRC = KvSpec(2, 2, 64, 16, dtype=KvDtype.BFLOAT16)
CONVERT = KvSpec(2, 2, 64, 32, dtype=KvDtype.FLOAT32, layout=KvLayout.HND, is_kv_stacked=False)
BIG = KvSpec(4, 2, 32, 16, dtype=KvDtype.FLOAT16)  # many blocks: > IOV_MAX segments per buffer


def harness(endpoint: str, spec: KvSpec = SRC, num_blocks: int = 16, idle: float = 5.0,
            **stream: float) -> ReceiverHarness:
    cache = PagedKvCache.allocate(spec, num_blocks)
    fill_random(cache, torch.Generator().manual_seed(99))  # stale contents a transfer must respect
    config = ZmqReceiverConfig(endpoint=endpoint, idle_timeout_s=idle, transfer_timeout_s=20.0,
                               stream=StreamReceiverOptions(**stream))
    return ReceiverHarness(cache, config)


@pytest.fixture
def src() -> PagedKvCache:
    cache = PagedKvCache.allocate(SRC, 16)
    fill_random(cache, torch.Generator().manual_seed(0))
    return cache


def same_tokens(a: PagedKvCache, a_table: list[int], b: PagedKvCache, b_table: list[int],
                t0: int, t1: int) -> bool:
    want, got = read_tokens_float(a, a_table, t0, t1), read_tokens_float(b, b_table, t0, t1)
    return all(torch.equal(x, y) for x, y in zip(want, got, strict=True))


def stream_of(rx: ZmqKvReceiver) -> StreamReceiver:
    """The receiver's stream payload path."""
    path = rx._paths["stream"]
    assert isinstance(path, StreamReceiver)
    return path


def assert_clean(h: ReceiverHarness, timeout: float = 5.0) -> None:
    """No data connection, transfer or reservation left behind on the receiver."""
    deadline = time.monotonic() + timeout
    rx = h.rx
    stream = stream_of(rx)
    while time.monotonic() < deadline:
        if not stream._conns and not rx._inflight and not rx._expected and not stream._jobs:
            return
        time.sleep(0.02)
    raise AssertionError(f"left behind: {len(stream._conns)} connections, "
                         f"{len(rx._inflight)} transfers, {len(rx._expected)} reservations")


def send_ok(h: ReceiverHarness, src: PagedKvCache, rid: str, **cfg: object) -> None:
    h.rx.expect(rid, [1, 2, 3])
    config = ZmqSenderConfig(timeout_s=10.0, **cfg)  # type: ignore[arg-type]
    tx = ZmqKvSender(h.rx.endpoint, config)
    try:
        tx.send(src, [7, 8, 9], 0, 40, request_id=rid)
    finally:
        tx.close()
    assert isinstance(h.wait(rid), list)
    assert same_tokens(src, [7, 8, 9], h.cache, [1, 2, 3], 0, 40)


# ---- valid transfers ----------------------------------------------------------------------------
@pytest.mark.parametrize("checksum", [False, True])
@pytest.mark.parametrize("layout", ["scattered", "contiguous"])
def test_bit_exact_block_copy(endpoint: str, src: PagedKvCache, checksum: bool,
                              layout: str) -> None:
    h = harness(endpoint)
    tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(checksum=checksum, timeout_s=10.0))
    src_table = [3, 12, 7, 0, 8] if layout == "scattered" else [4, 5, 6, 7, 8]
    dst_table = [15, 2, 9, 4, 10] if layout == "scattered" else [10, 11, 12, 13, 14]
    try:
        for i, (t0, t1) in enumerate([(0, 80), (0, 70), (16, 70), (5, 66), (33, 34)]):
            rid = f"{layout}-{i}"
            h.rx.expect(rid, dst_table)
            res = tx.send(src, src_table, t0, t1, request_id=rid, meta={"first_token": i})
            assert tx.payload == "stream" and res.report["path"] == "block_copy"
            reports = h.wait(rid)
            assert isinstance(reports, list) and reports[0].meta == {"first_token": i}
            assert same_tokens(src, src_table, h.cache, dst_table, t0, t1)
        assert len(stream_of(h.rx)._conns) == 1  # one data connection, reused
    finally:
        tx.close()
        h.close()


def test_many_blocks_and_buffers(endpoint: str) -> None:
    """Thousands of scattered blocks: iovecs beyond IOV_MAX, several buffers, partial last block."""
    src = PagedKvCache.allocate(BIG, 600)
    fill_random(src, torch.Generator().manual_seed(3))
    src_table = torch.randperm(600, generator=torch.Generator().manual_seed(4))[:300].tolist()
    dst_table = torch.randperm(600, generator=torch.Generator().manual_seed(5))[:300].tolist()
    h = harness(endpoint, BIG, num_blocks=600)
    try:
        for chunk, checksum in ((8 << 20, False), (100_000, True)):
            config = ZmqSenderConfig(stream_chunk_bytes=chunk, checksum=checksum)
            tx = ZmqKvSender(h.rx.endpoint, config)
            rid = f"big-{chunk}"
            h.rx.expect(rid, dst_table)
            tx.send(src, src_table, 7, 4790, request_id=rid)
            tx.close()
            assert isinstance(h.wait(rid), list)
            assert same_tokens(src, src_table, h.cache, dst_table, 7, 4790)
    finally:
        h.close()


def test_conversion_path_is_staged(endpoint: str, src: PagedKvCache) -> None:
    h = harness(endpoint, CONVERT)
    tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(checksum=True, stream_chunk_bytes=8192))
    try:
        h.rx.expect("conv", [5, 9, 1])
        res = tx.send(src, [3, 12, 7, 0, 8], 3, 70, request_id="conv")
        assert res.report["path"] == "convert" and res.report["is_lossless"]
        assert isinstance(h.wait("conv"), list)
        assert same_tokens(src, [3, 12, 7, 0, 8], h.cache, [5, 9, 1], 3, 70)
    finally:
        tx.close()
        h.close()


def test_prefix_cached_first_block_keeps_its_other_slots(endpoint: str, src: PagedKvCache) -> None:
    h = harness(endpoint)
    tx = ZmqKvSender(h.rx.endpoint)
    dst_table = [6, 1, 14]
    before = read_tokens_float(h.cache, dst_table, 0, 48)
    try:
        h.rx.expect("prefix", dst_table)
        tx.send(src, [2, 9, 11], 5, 37, request_id="prefix")
        assert isinstance(h.wait("prefix"), list)
        after = read_tokens_float(h.cache, dst_table, 0, 48)
        want = read_tokens_float(src, [2, 9, 11], 0, 48)
        for b, a, w in zip(before, after, want, strict=True):
            # outside the range: untouched
            assert torch.equal(a[:, :5], b[:, :5]) and torch.equal(a[:, 37:], b[:, 37:])
            assert torch.equal(a[:, 5:37], w[:, 5:37]) and not torch.equal(a[:, 5:37], b[:, 5:37])
    finally:
        tx.close()
        h.close()


def test_scaled_cache_goes_through_staging(endpoint: str) -> None:
    spec = KvSpec(2, 2, 64, 8, dtype=KvDtype.INT4, layout=KvLayout.PAGED_V1,
                  scale_granularity=ScaleGranularity.PER_TOKEN_HEAD)
    src = PagedKvCache.allocate(spec, 12)
    fill_random(src, torch.Generator().manual_seed(5))
    h = harness(endpoint, spec, num_blocks=12)
    tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(checksum=True))
    try:
        h.rx.expect("scaled", [4, 1, 3, 5, 0, 2])
        tx.send(src, [9, 8, 7, 6, 5, 4], 3, 44, request_id="scaled")
        assert isinstance(h.wait("scaled"), list)
        assert same_tokens(src, [9, 8, 7, 6, 5, 4], h.cache, [4, 1, 3, 5, 0, 2], 3, 44)
    finally:
        tx.close()
        h.close()


def test_senders_interleave_on_one_receiver(src: PagedKvCache) -> None:
    big = PagedKvCache.allocate(BIG, 200)
    fill_random(big, torch.Generator().manual_seed(8))
    h = harness("tcp://127.0.0.1:0", BIG, num_blocks=600, pump_bytes=64 << 10)
    errors: list[BaseException] = []

    def run(k: int) -> None:
        try:
            tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(stream_chunk_bytes=256 << 10))
            for rep in range(3):
                tx.send(big, list(range(k * 60, k * 60 + 60)), 0, 950, request_id=f"s{k}-{rep}")
            tx.close()
        except BaseException as e:
            errors.append(e)

    for k in range(3):
        for rep in range(3):
            h.rx.expect(f"s{k}-{rep}", list(range(k * 200 + rep * 60, k * 200 + rep * 60 + 60)))
    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        for k in range(3):
            for rep in range(3):
                assert isinstance(h.wait(f"s{k}-{rep}"), list)
                dst = list(range(k * 200 + rep * 60, k * 200 + rep * 60 + 60))
                assert same_tokens(big, list(range(k * 60, k * 60 + 60)), h.cache, dst, 0, 950)
    finally:
        h.close()


def test_frames_path_still_selectable(endpoint: str, src: PagedKvCache) -> None:
    h = harness(endpoint)
    try:
        for checksum in (False, True):
            rid = f"frames-{checksum}"
            h.rx.expect(rid, [1, 2, 3])
            tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(payload="frames", checksum=checksum,
                                                            pack=PackOptions(chunk_bytes=8192)))
            tx.send(src, [7, 8, 9], 0, 40, request_id=rid)
            assert tx.payload == "frames"
            tx.close()
            assert isinstance(h.wait(rid), list)
            assert same_tokens(src, [7, 8, 9], h.cache, [1, 2, 3], 0, 40)
        assert not stream_of(h.rx)._conns
    finally:
        h.close()


def test_ipc_path_at_the_unix_socket_limit_keeps_the_stream_path(tmp_path: Path,
                                                                 src: PagedKvCache) -> None:
    """ZMQ binds ipc paths up to 107 bytes; `<path>.data` would not fit a Unix socket address,
    so the data connections go to an abstract name both ends derive from the path."""
    base = f"{tmp_path}/"
    path = base + "k" * (107 - len(base))
    assert len(path) == 107 and len(path + ".data") > 107
    data = proto.stream_ipc_path(path)
    assert data.startswith("@pdserve-") and len(data) <= 107 and data == proto.stream_ipc_path(path)
    assert proto.stream_ipc_path(path[:-1]) != data  # a different path, a different name
    h = harness(f"ipc://{path}")
    try:
        assert "stream" in h.rx._paths  # the receiver listens for stream payloads
        send_ok(h, src, "long-ipc")
        tx = ZmqKvSender(h.rx.endpoint)
        h.rx.expect("long-ipc-2", [1, 2, 3])
        tx.send(src, [7, 8, 9], 0, 40, request_id="long-ipc-2")
        assert tx.payload == "stream"  # no fallback to ZMQ frames
        tx.close()
        assert isinstance(h.wait("long-ipc-2"), list)
    finally:
        h.close()
    assert not os.path.exists(path + ".data")
    # short paths: unchanged
    assert proto.stream_ipc_path(f"{tmp_path}/kv.sock") == f"{tmp_path}/kv.sock.data"


def test_receiver_without_stream_makes_senders_fall_back(src: PagedKvCache) -> None:
    h = harness("tcp://127.0.0.1:0", is_enabled=False)
    tx = ZmqKvSender(h.rx.endpoint)
    try:
        h.rx.expect("fb", [1, 2, 3])
        tx.send(src, [7, 8, 9], 0, 40, request_id="fb")
        assert tx.payload == "frames" and isinstance(h.wait("fb"), list)
    finally:
        tx.close()
        h.close()
    with pytest.raises(ValueError):
        ZmqSenderConfig(payload="carrier-pigeon")


def test_refused_header_closes_the_data_connection_and_the_sender_recovers(
        src: PagedKvCache) -> None:
    h = harness("tcp://127.0.0.1:0")
    tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(timeout_s=5.0))
    try:
        with pytest.raises(UnexpectedTransfer):
            tx.send(src, [1, 2, 3], 0, 40, request_id="nobody")
        h.rx.expect("ok", [1, 2, 3])
        tx.send(src, [7, 8, 9], 0, 40, request_id="ok")  # a new data connection
        assert isinstance(h.wait("ok"), list)
    finally:
        tx.close()
        h.close()
    other = harness("tcp://127.0.0.1:0", SRC.with_(head_dim=128))
    tx = ZmqKvSender(other.rx.endpoint, ZmqSenderConfig(timeout_s=5.0))
    try:
        other.rx.expect("x", [1, 2])
        with pytest.raises(IncompatibleKv):
            tx.send(src, [1, 2], 0, 20, request_id="x")
        assert isinstance(other.wait("x"), IncompatibleKv)
        assert_clean(other)
    finally:
        tx.close()
        other.close()


# ---- hostile data connections ---------------------------------------------------------------
class RawPeer:
    """A hand-driven stream sender: a DEALER plus a data connection, to send anything."""

    def __init__(self, ctx: zmq.Context, endpoint: str, token: bytes | None = None):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.RCVTIMEO, 5000)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        good = os.urandom(proto.STREAM_TOKEN_BYTES)
        self.sock.send_multipart([proto.STREAM_HELLO, proto.pack([good])])
        kind, _, body = proto.parse_reply(self.sock.recv_multipart())
        assert kind == proto.STREAM_LISTEN
        if "port" in body:
            self.data = socket.create_connection(("127.0.0.1", body["port"]), timeout=5)
        else:
            self.data = socket.socket(socket.AF_UNIX)
            self.data.settimeout(5)
            self.data.connect(body["path"])
        self.data.sendall(token if token is not None else good)

    def header(self, packed: PackedKv) -> None:
        self.sock.send_multipart([proto.HEADER, packed.header.encode()])

    def reply(self) -> tuple[bytes, int | None, dict]:
        return proto.parse_reply(self.sock.recv_multipart())

    def is_closed_by_receiver(self, timeout: float = 5.0) -> bool:
        self.data.settimeout(timeout)
        try:
            while self.data.recv(4096):
                pass
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.data.close()
        self.sock.close()


def stream_message(src: PagedKvCache, rid: str, tid: int,
                   checksum: bool = False) -> tuple[PackedKv, bytes]:
    packed = pack_kv(src, [1, 2, 3], 0, 40, request_id=rid, transfer_id=tid, transport="stream",
                     checksum="xxh3_64" if checksum else None,
                     options=PackOptions(allow_views=False))
    return packed, b"".join(b.numpy().tobytes() for b in packed.all_buffers())


HOSTILE = ["bad_magic", "wrong_byte_count", "unknown_transfer", "eof_mid_payload",
           "stall_mid_payload", "bad_trailer", "cancel"]


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_data_connection(case: str, src: PagedKvCache) -> None:
    h = harness("tcp://127.0.0.1:0", idle=0.5)
    ctx = zmq.Context()
    try:
        peer = RawPeer(ctx, h.rx.endpoint)
        h.rx.expect("r", [4, 5, 6])
        packed, payload = stream_message(src, "r", 77, checksum=case == "bad_trailer")
        if case != "unknown_transfer":
            peer.header(packed)
        t0 = time.monotonic()
        if case == "bad_magic":
            peer.data.sendall(b"XXXX" + proto.stream_prefix(77, len(payload))[4:] + payload)
        elif case == "wrong_byte_count":
            peer.data.sendall(proto.stream_prefix(77, len(payload) + 1) + payload)
        elif case == "unknown_transfer":
            peer.data.sendall(proto.stream_prefix(78, len(payload)) + payload)
        elif case == "eof_mid_payload":
            peer.data.sendall(proto.stream_prefix(77, len(payload)) + payload[:len(payload) // 2])
            time.sleep(0.1)
            peer.data.close()
        elif case == "stall_mid_payload":  # connection open, sender silent: idle timeout ends it
            peer.data.sendall(proto.stream_prefix(77, len(payload)) + payload[:len(payload) // 2])
        elif case == "bad_trailer":
            sums = [compute_checksum("xxh3_64", b.numpy()) for b in packed.all_buffers()]
            sums[-1] ^= 1
            trailer = b"".join(s.to_bytes(8, "little") for s in sums)
            peer.data.sendall(proto.stream_prefix(77, len(payload)) + payload + trailer)
        elif case == "cancel":
            peer.data.sendall(proto.stream_prefix(77, len(payload)) + payload[:1000])
            time.sleep(0.2)
            assert h.rx.cancel("r")  # mid-payload: the caller gets the blocks back at once
        if case == "unknown_transfer":
            kind, tid, body = peer.reply()
            assert kind == proto.ERROR and tid == 78 and body["name"] == "MalformedFrame"
            assert h.rx.cancel("r")
        elif case != "cancel":
            outcome = h.wait("r")
            want = {"bad_magic": MalformedFrame, "wrong_byte_count": MalformedFrame,
                    "eof_mid_payload": PeerLost, "stall_mid_payload": PeerLost,
                    "bad_trailer": ChecksumMismatch}[case]
            assert isinstance(outcome, want), outcome
            if case == "eof_mid_payload":
                assert time.monotonic() - t0 < 0.45  # EOF is evidence: no idle timeout needed
            elif case == "stall_mid_payload":
                assert time.monotonic() - t0 >= 0.45 and "silent" in str(outcome)
            else:
                kind, tid, body = peer.reply()
                assert kind == proto.ERROR and body["name"] == want.__name__
        if case != "eof_mid_payload":
            assert peer.is_closed_by_receiver()
        peer.close()
        assert "r" not in h.ended or case not in ("cancel", "unknown_transfer")
        assert_clean(h)
        send_ok(h, src, "next")  # the receiver keeps serving; the blocks are reusable
        assert_clean(h)
    finally:
        ctx.destroy(linger=0)
        h.close()


def test_garbage_token_and_silent_connections_are_closed(src: PagedKvCache) -> None:
    h = harness("tcp://127.0.0.1:0", token_timeout_s=0.3)
    ctx = zmq.Context()
    try:
        bad = RawPeer(ctx, h.rx.endpoint, token=os.urandom(proto.STREAM_TOKEN_BYTES))
        assert bad.is_closed_by_receiver()
        port = stream_of(h.rx).address["port"]
        silent = socket.create_connection(("127.0.0.1", port))
        silent.settimeout(5)
        assert silent.recv(1) == b""  # closed after token_timeout_s
        silent.close()
        bad.close()
        assert_clean(h)
        send_ok(h, src, "after")
    finally:
        ctx.destroy(linger=0)
        h.close()


SENDER_DIES = textwrap.dedent("""
    import os, signal, socket, sys, time
    sys.path.insert(0, {root!r})
    import torch, zmq
    from engine.kv_spec import KvDtype, KvSpec
    from transfer.wire import framing as proto
    from transfer.convert.cache import PagedKvCache
    from transfer.convert.pack import PackOptions, pack_kv
    cache = PagedKvCache.allocate(KvSpec(2, 2, 64, 16, dtype=KvDtype.BFLOAT16), 16)
    packed = pack_kv(cache, [1, 2, 3], 0, 40, request_id="doomed", transfer_id=9,
                     transport="stream")
    payload = b"".join(b.numpy().tobytes() for b in packed.all_buffers())
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect({endpoint!r})
    token = os.urandom(16)
    sock.send_multipart([proto.STREAM_HELLO, proto.pack([token])])
    kind, _, body = proto.parse_reply(sock.recv_multipart())
    data = socket.create_connection(("127.0.0.1", body["port"]))
    data.sendall(token)
    sock.send_multipart([proto.HEADER, packed.header.encode()])
    if {mid_payload}:  # else it dies between its header and its prefix
        data.sendall(proto.stream_prefix(9, len(payload)) + payload[:len(payload) // 3])
    time.sleep(0.3)
    os.kill(os.getpid(), signal.SIGKILL)
""")


@pytest.mark.parametrize("mid_payload", [True, False])
def test_sender_killed_mid_transfer_releases_the_reservation_quickly(src: PagedKvCache,
                                                                     mid_payload: bool) -> None:
    """Killed a third into its payload, or after its header but before its prefix: the data
    connection's EOF fails the transfer at once, not at the idle timeout."""
    h = harness("tcp://127.0.0.1:0", idle=30.0)
    try:
        h.rx.expect("doomed", [4, 5, 6])
        code = SENDER_DIES.format(root=str(ROOT), endpoint=h.rx.endpoint, mid_payload=mid_payload)
        proc = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
        assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
        outcome = h.wait("doomed", timeout=5)  # far below the 30 s idle timeout
        assert isinstance(outcome, PeerLost)
        assert ("mid-payload" if mid_payload else "closed by the sender") in str(outcome), outcome
        assert_clean(h)
        send_ok(h, src, "next")
    finally:
        h.close()


def test_receiver_cancelling_mid_payload_gives_the_sender_a_typed_error() -> None:
    """The receiver drops a transfer while its payload flows: it closes the data connection, the
    sender's write fails and the ERROR that says why comes back; both recover."""
    big = PagedKvCache.allocate(BIG, 600)
    cache = PagedKvCache.allocate(BIG, 600)
    released: list[TransferError] = []
    rx = ZmqKvReceiver(cache, ZmqReceiverConfig(stream=StreamReceiverOptions(pump_bytes=32 << 10)),
                       on_complete=lambda *a: None, on_release=lambda rid, e: released.append(e))
    tx = ZmqKvSender(rx.endpoint, ZmqSenderConfig(timeout_s=10.0))
    outcome: list[object] = []

    def send(rid: str) -> None:
        try:
            outcome.append(tx.send(big, list(range(300, 600)), 0, 4800, request_id=rid))
        except TransferError as e:
            outcome.append(e)

    try:
        rx.expect("gone", list(range(300)))
        thread = threading.Thread(target=send, args=("gone",))
        thread.start()
        deadline = time.monotonic() + 10
        while not any(j.cur is not None and j.cur.done > 0 for j in stream_of(rx)._jobs.values()):
            assert time.monotonic() < deadline
            rx.poll(0.001)  # a little payload per poll: the transfer stays in flight
        assert rx.cancel("gone") and not released
        while thread.is_alive() and time.monotonic() < deadline:
            rx.poll(0.01)
        err = outcome[0]
        assert isinstance(err, TransferCancelled) and err.is_remote, err
        rx.expect("again", list(range(300)))
        thread = threading.Thread(target=send, args=("again",))
        thread.start()
        while thread.is_alive() and time.monotonic() < deadline + 10:
            rx.poll(0.01)
        assert not isinstance(outcome[1], TransferError), outcome[1]
        assert not stream_of(rx)._jobs and len(stream_of(rx)._conns) == 1
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("threaded", [True, False])
def test_decode_inbox_wakes_the_worker_poller(src: PagedKvCache, threaded: bool) -> None:
    """The decode worker sleeps in its own zmq.Poller. Threaded inbox: the receiver reads on its
    own thread and a wake-up socket in the poller says when arrivals are queued. Not threaded:
    the poller must wake on the data connection too (sync_poller follows the receiver's
    pollables as they come and go)."""

    from decode.kv_inbox import KvInbox
    from worker.config import KvTransportConfig

    cache = PagedKvCache.allocate(SRC, 16)
    ctx = zmq.Context()
    inbox = KvInbox(ctx, "127.0.0.1", cache, KvTransportConfig(kv_receiver_thread=threaded))
    poller = zmq.Poller()
    inbox.sync_poller(poller)
    assert inbox.receiver._thread is not None if threaded else inbox.receiver._thread is None
    blocks = [1, 2, 3]
    tx = ZmqKvSender(inbox.address)
    fd_woke = False
    try:
        for i in range(3):  # the second and later transfers reuse the data connection
            rid = f"w{i}"
            inbox.expect(rid, blocks)
            thread = threading.Thread(target=tx.send, args=(src, [7, 8, 9], 0, 40),
                                      kwargs={"request_id": rid, "meta": {"first_token": 3}})
            thread.start()
            arrivals, data_fd_seen, woke = [], False, 0
            deadline = time.monotonic() + 10
            while not arrivals and time.monotonic() < deadline:
                ready = dict(poller.poll(1000))  # the worker's wait: only registered items wake it
                woke += bool(ready)
                data_fd_seen |= any(isinstance(item, int) for item in ready)
                arrivals += inbox.receive()
                inbox.sync_poller(poller)
            thread.join(10)
            assert arrivals and arrivals[0].request_id == rid and arrivals[0].error is None
            assert woke
            fd_woke |= data_fd_seen
            assert same_tokens(src, [7, 8, 9], cache, [1, 2, 3], 0, 40)
            cache.layers[0][0].zero_()  # the next transfer must write again
        assert inbox.receive() == [] and not inbox.receiver._expected
        assert fd_woke or threaded  # a data connection woke the worker (its first payload at least)
        if threaded:  # the whole transfer (payload, ack) completes while the worker does not poll
            inbox.expect("busy", blocks)
            result = tx.send(src, [7, 8, 9], 0, 40, request_id="busy", meta={"first_token": 3},
                             timeout_s=10)
            assert result.num_bytes > 0
            assert dict(poller.poll(5000))  # then the worker wakes to take the arrival
            assert [a.request_id for a in inbox.receive()] == ["busy"]
        # an expectation withdrawn before anything came: no arrival, the blocks are the caller's
        inbox.expect("gone", blocks)
        inbox.forget("gone")
        assert inbox.receive() == [] and not inbox.receiver._expected
    finally:
        tx.close()
        inbox.close()
        ctx.destroy(linger=0)
