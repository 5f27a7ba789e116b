"""The decode worker's threaded KvInbox under races: transfers land on the receiver's thread
while the worker forgets reservations at random moments (before, during, after their KV).
Every kept reservation gets exactly one arrival and its bytes, a forgotten one at most a late
arrival (its KV had landed before the forget; the worker ignores arrivals it holds no
reservation for), senders get an ack or a typed error (UnexpectedTransfer before the header,
TransferCancelled mid-payload), and nothing is left in the receiver."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
import zmq

from bench.kv_fill import fill_random
from decode.kv_inbox import KvArrival, KvInbox
from engine.kv_spec import KvDtype, KvSpec
from engine.outputs import TokenLogprob
from protocol.kv_meta import FirstToken
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import read_tokens_float
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
from transfer.wire.errors import MalformedHeader, TransferError
from worker.config import KvTransportConfig

SPEC = KvSpec(8, 4, 128, 16, dtype=KvDtype.BFLOAT16)  # 16 KiB per token: 2 MiB per transfer
N = 40


def start_sender(inbox: KvInbox, src: PagedKvCache, rids: list[str], payload: str,
                 sent: dict[str, object]) -> threading.Thread:
    """A thread that sends `src` to each of `rids` in turn, recording an ack or a typed error."""

    def sender() -> None:
        tx = ZmqKvSender(inbox.address, ZmqSenderConfig(timeout_s=10.0, payload=payload))
        try:
            for rid in rids:
                try:
                    sent[rid] = tx.send(src, list(range(8)), 0, 128, request_id=rid,
                                        meta={"first_token": 5})
                except TransferError as e:  # a forgotten reservation: a typed error, and on we go
                    sent[rid] = e
        finally:
            tx.close()

    thread = threading.Thread(target=sender)
    thread.start()
    return thread


def poll_and_forget(inbox: KvInbox, poller: zmq.Poller, rids: list[str],
                    thread: threading.Thread, rng: random.Random,
                    ) -> tuple[list[KvArrival], set[str]]:
    """The worker's side while `thread` sends: it polls, takes arrivals and now and then forgets
    a reservation it still holds; returns (arrivals, forgotten)."""
    forgotten: set[str] = set()
    arrivals: list[KvArrival] = []
    deadline = time.monotonic() + 30
    while (thread.is_alive() or len({a.request_id for a in arrivals} | forgotten) < N) \
            and time.monotonic() < deadline:
        poller.poll(rng.choice([0, 1, 5]))
        got = inbox.receive()
        arrivals += got
        held = [r for r in rids if r not in forgotten and r not in {a.request_id for a in arrivals}]
        if held and rng.random() < 0.3:  # the worker drops a reservation it still holds: most
            rid = held[0] if rng.random() < 0.7 else rng.choice(held)  # often the one on the wire
            inbox.forget(rid)
            forgotten.add(rid)
    return arrivals, forgotten


@pytest.mark.parametrize("payload", ["stream", "frames"])
def test_forgets_racing_arrivals_end_each_reservation_once(payload: str) -> None:
    src = PagedKvCache.allocate(SPEC, 8)
    fill_random(src, torch.Generator().manual_seed(0))
    dst = PagedKvCache.allocate(SPEC, 8 * N)
    ctx = zmq.Context()
    inbox = KvInbox(ctx, "127.0.0.1", dst, KvTransportConfig())
    poller = zmq.Poller()
    inbox.sync_poller(poller)
    rng = random.Random(7)
    rids = [f"r{i}" for i in range(N)]
    for i, rid in enumerate(rids):
        inbox.expect(rid, list(range(8 * i, 8 * i + 8)))
    sent: dict[str, object] = {}
    thread = start_sender(inbox, src, rids, payload, sent)
    arrivals, forgotten = poll_and_forget(inbox, poller, rids, thread, rng)
    thread.join(10)
    time.sleep(0.2)
    arrivals += inbox.receive()
    kept = [r for r in rids if r not in forgotten]
    want = read_tokens_float(src, list(range(8)), 0, 128)
    by_id: dict[str, list[KvArrival]] = {}
    for a in arrivals:
        by_id.setdefault(a.request_id, []).append(a)
    assert forgotten and kept, "the random schedule must exercise both outcomes"
    for rid in kept:
        assert len(by_id.get(rid, [])) == 1, (rid, by_id.get(rid))
        assert by_id[rid][0].error is None and by_id[rid][0].first_token == 5
        assert not isinstance(sent[rid], TransferError)
        got = read_tokens_float(dst, list(range(8 * int(rid[1:]), 8 * int(rid[1:]) + 8)), 0, 128)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True)), rid
    for rid in forgotten:
        assert len(by_id.get(rid, [])) <= 1  # at most the late arrival the worker ignores
        assert rid in sent  # its sender got an ack or a typed error, never a hang
    rx = inbox.receiver
    assert not rx._expected and not rx._inflight
    inbox.close()
    ctx.destroy(linger=0)


def test_the_first_token_arrives_typed_and_a_bad_logprob_is_dropped() -> None:
    """The first token's logprob rides in the KV header's meta as a msgpack structure
    (protocol/kv_meta.py) and comes out a TokenLogprob; a malformed one is dropped, the KV and
    the first token kept; without a first token the arrival is an error; a meta the header
    does not allow is the sender's typed MalformedHeader, and the worker sees nothing."""
    src = PagedKvCache.allocate(SPEC, 4)
    ctx = zmq.Context()
    inbox = KvInbox(ctx, "127.0.0.1", PagedKvCache.allocate(SPEC, 16), KvTransportConfig())
    first = FirstToken(5, TokenLogprob(5, -0.5, [(5, -0.5), (2, float("-inf"))]), 16)
    metas = {"typed": first.to_meta(),
             "bad-logprob": {**first.to_meta(), "first_logprob": {"token_id": "5"}},
             "no-token": {"first_logprob": first.to_meta()["first_logprob"]},
             "too-deep": {**first.to_meta(), "first_logprob": [[[[5]]]]}}
    tx = ZmqKvSender(inbox.address, ZmqSenderConfig(timeout_s=10.0))
    try:
        for i, (rid, meta) in enumerate(metas.items()):
            inbox.expect(rid, [4 * i, 4 * i + 1])
            if rid == "too-deep":
                with pytest.raises(MalformedHeader, match="nested deeper"):
                    tx.send(src, [0, 1], 0, 32, request_id=rid, meta=meta)
                inbox.forget(rid)
            else:
                tx.send(src, [0, 1], 0, 32, request_id=rid, meta=meta)
        arrivals: dict[str, KvArrival] = {}
        deadline = time.monotonic() + 10
        while len(arrivals) < 3 and time.monotonic() < deadline:
            arrivals.update((a.request_id, a) for a in inbox.receive())
            time.sleep(0.01)
        assert set(arrivals) == {"typed", "bad-logprob", "no-token"}
        assert arrivals["typed"] == KvArrival("typed", None, 5, first.logprob, 16)
        assert arrivals["bad-logprob"] == KvArrival("bad-logprob", None, 5, None, 16)
        assert arrivals["no-token"].error == "KV arrived without a valid first token"
    finally:
        tx.close()
        inbox.close()
        ctx.destroy(linger=0)
