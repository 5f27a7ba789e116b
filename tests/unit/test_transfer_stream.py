"""The stream payload path (header on ZMQ, payload by writev/readv on a data connection), valid
transfers: bit-exact over tcp:// (port 0) and ipc:// (tmp dir), placed and staged buffers,
partial blocks, checksums, interleaved senders, fallbacks, the frames path still selectable,
and the decode worker's poller woken by arrivals. Hostile data connections, a sender killed
mid-payload and cancels are in test_transfer_stream_hostile.py; the shared helpers in
transfer_stream_helpers.py."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
import torch
import zmq
from transfer_stream_helpers import (
    BIG,
    CONVERT,
    SRC,
    harness,
    same_tokens,
    send_ok,
    stream_of,
)

from bench.kv_fill import fill_random
from engine.kv_spec import KvDtype, KvLayout, KvSpec, ScaleGranularity
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import read_tokens_float
from transfer.convert.pack import PackOptions
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
from transfer.wire import framing as proto


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
