"""The KV endpoints with the deployment's authentication (protocol/auth.py as their
`SocketSecurity`): a transfer is tied to its reservation's token, a DEALER with another key never
reaches the receiver, a data connection without a valid token is closed, the send lanes are
capped, and each refusal is counted; the reservation a forger aimed at still takes its real KV."""

from __future__ import annotations

import contextlib
import socket
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
import zmq
from transfer_stream_helpers import SRC, assert_clean, same_tokens, stream_of

from bench.kv_fill import ReceiverHarness, fill_random
from protocol.auth import ClusterAuth, generate_secret
from transfer.convert.cache import PagedKvCache
from transfer.endpoint.receiver import ZmqReceiverConfig
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
from transfer.stream.receiver import StreamReceiverOptions
from transfer.wire.errors import ReservationMismatch, TransferTimeout, UnexpectedTransfer

SECRET = generate_secret()


class Side:
    """A context with the deployment's (or another) authentication."""

    def __init__(self, secret: bytes | None) -> None:
        self.refused: Counter[tuple[str, str]] = Counter()
        self.ctx = zmq.Context()
        self.auth = ClusterAuth(self.ctx, secret, lambda p, r: self.refused.update([(p, r)]))

    def sender(self, endpoint: str, timeout_s: float = 10.0) -> ZmqKvSender:
        return ZmqKvSender(endpoint, ZmqSenderConfig(timeout_s=timeout_s), context=self.ctx,
                           security=self.auth)

    def close(self) -> None:
        self.auth.close()
        self.ctx.term()


@pytest.fixture
def rx() -> Iterator[tuple[ReceiverHarness, Side]]:
    side = Side(SECRET)
    cache = PagedKvCache.allocate(SRC, 16)
    fill_random(cache, torch.Generator().manual_seed(99))
    config = ZmqReceiverConfig(endpoint="tcp://127.0.0.1:0", idle_timeout_s=5.0,
                               stream=StreamReceiverOptions(token_timeout_s=1.0))
    h = ReceiverHarness(cache, config, context=side.ctx, security=side.auth,
                        on_refused=lambda p, r: side.refused.update([(p, r)]))
    try:
        yield h, side
    finally:
        h.close()
        side.close()


def _eventually(cond: object, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_a_wrong_token_is_refused_and_the_reservation_keeps_waiting(
        rx: tuple[ReceiverHarness, Side], src: PagedKvCache) -> None:
    h, side = rx
    h.rx.expect("victim", [1, 2, 3], token="t" * 32)
    peer = Side(SECRET)  # holds the secret, but was not sent there by the proxy
    tx = peer.sender(h.rx.endpoint)
    try:
        with pytest.raises(ReservationMismatch, match="victim"):
            tx.send(src, [4, 5, 6], 0, 40, request_id="victim", reservation_token="x" * 32)
        with pytest.raises(UnexpectedTransfer):
            tx.send(src, [4, 5, 6], 0, 40, request_id="nobody", reservation_token="t" * 32)
        assert "victim" not in h.ended
        tx.send(src, [7, 8, 9], 0, 40, request_id="victim", reservation_token="t" * 32)
        assert isinstance(h.wait("victim"), list)
        assert same_tokens(src, [7, 8, 9], h.cache, [1, 2, 3], 0, 40)
    finally:
        tx.close()
        peer.close()
    assert side.refused[("kv", "bad_token")] == 1
    assert side.refused[("kv", "unknown_reservation")] == 1
    assert_clean(h)


def test_a_dealer_with_another_key_never_reaches_the_receiver(
        rx: tuple[ReceiverHarness, Side], src: PagedKvCache) -> None:
    h, side = rx
    h.rx.expect("victim", [1, 2, 3])  # no token: only the key protects it here
    for secret in (generate_secret(), None):
        forger = Side(secret)
        tx = forger.sender(h.rx.endpoint, timeout_s=1.5)
        try:
            with pytest.raises(TransferTimeout):
                tx.send(src, [4, 5, 6], 0, 40, request_id="victim")
        finally:
            tx.close()
            forger.close()
    assert "victim" not in h.ended and h.rx.num_failed == 0
    _eventually(lambda: side.refused[("kv", "unauthenticated")] >= 2)
    good = Side(SECRET)
    tx = good.sender(h.rx.endpoint)
    try:
        tx.send(src, [7, 8, 9], 0, 40, request_id="victim")
        assert isinstance(h.wait("victim"), list)
    finally:
        tx.close()
        good.close()


@pytest.mark.parametrize("payload", [b"", b"\x00" * 16, b"GET / HTTP/1.1\r\n\r\n"])
def test_a_raw_data_connection_without_a_token_is_closed_and_counted(
        rx: tuple[ReceiverHarness, Side], payload: bytes) -> None:
    h, side = rx
    port = stream_of(h.rx).address["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(payload)
        conn.settimeout(5.0)
        # closed by the receiver: no valid token (or none in time); reset if bytes were unread
        with contextlib.suppress(ConnectionResetError):
            assert conn.recv(1) == b""
    _eventually(lambda: side.refused[("kv_data", "unauthenticated")] == 1)
    assert_clean(h)


def test_send_lanes_are_capped() -> None:
    from prefill.kv_outbox import KvOutbox
    from transfer.wire.errors import TooManyPeers
    from worker.config import KvTransportConfig

    refused: Counter[tuple[str, str]] = Counter()
    ctx = zmq.Context()
    cache = PagedKvCache.allocate(SRC, 4)
    outbox = KvOutbox(ctx, cache, KvTransportConfig(max_kv_peers=2, transfer_timeout_s=0.5),
                      on_refused=lambda p, r: refused.update([(p, r)]))
    try:
        for port in (1, 2):
            outbox.send(f"r{port}", f"tcp://127.0.0.1:{port}", [0], 4, SRC, {})
        with pytest.raises(TooManyPeers, match="KV send lanes 3"):
            outbox.send("r3", "tcp://127.0.0.1:3", [0], 4, SRC, {})
        outbox.send("r4", "tcp://127.0.0.1:1", [0], 4, SRC, {})  # an existing lane: fine
        assert outbox.num_lanes == 2 and refused == {("kv", "too_many_lanes"): 1}
    finally:
        outbox.close()
        ctx.term()
