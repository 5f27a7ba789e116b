"""The stream payload path against hostile and failing peers: a refused header, hostile data
connections (garbage token, bad prefix, wrong byte count, unknown transfer, EOF, a stall, a bad
checksum trailer), a sender killed mid-payload, and a receiver cancelling mid-payload; each
time the receiver keeps serving and leaves nothing behind. Valid transfers are in
test_transfer_stream.py; the shared helpers in transfer_stream_helpers.py."""

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
import zmq
from transfer_stream_helpers import (
    BIG,
    SRC,
    assert_clean,
    harness,
    send_ok,
    stream_of,
)

from transfer.convert.cache import PagedKvCache
from transfer.convert.pack import PackedKv, PackOptions, pack_kv
from transfer.endpoint.receiver import ZmqKvReceiver, ZmqReceiverConfig
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
from transfer.stream.receiver import StreamReceiverOptions
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


# ---- refused headers -----------------------------------------------------------------------------
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

