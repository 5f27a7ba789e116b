"""Shared by the stream payload path's tests (test_transfer_stream.py,
test_transfer_stream_hostile.py): the cache specs, a receiver harness on a cache of stale random
contents, token comparison, and the checks that a receiver left nothing behind. The `src`
fixture (a random 16-block `SRC` cache) is in tests/unit/conftest.py.
"""

from __future__ import annotations

import time

import torch

from bench.kv_fill import ReceiverHarness, fill_random
from engine.kv_spec import KvDtype, KvLayout, KvSpec
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import read_tokens_float
from transfer.endpoint.receiver import ZmqKvReceiver, ZmqReceiverConfig
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
from transfer.stream.receiver import StreamReceiver, StreamReceiverOptions

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
