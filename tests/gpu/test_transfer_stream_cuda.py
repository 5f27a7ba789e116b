"""The stream payload path with caches on CUDA: GPU → GPU, CPU → GPU and GPU → CPU over tcp
loopback (a GPU sender gathers on the GPU and writes host copies; a GPU receiver stages)."""

from __future__ import annotations

import pytest
import torch

from bench.kv_fill import ReceiverHarness, fill_random
from engine.kv_spec import KvDtype, KvLayout, KvSpec
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import read_tokens_float
from transfer.endpoint.receiver import ZmqReceiverConfig
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SPEC = KvSpec(4, 2, 64, 16, dtype=KvDtype.BFLOAT16)


@pytest.mark.parametrize("src_dev,dst_dev", [("cuda", "cuda"), ("cpu", "cuda"), ("cuda", "cpu")])
@pytest.mark.parametrize("checksum", [False, True])
def test_stream_with_cuda_caches(src_dev: str, dst_dev: str, checksum: bool) -> None:
    src = PagedKvCache.allocate(SPEC, 64)
    fill_random(src, torch.Generator().manual_seed(0))
    src = PagedKvCache(SPEC, [tuple(t.to(src_dev) for t in ts) for ts in src.layers])
    dst_spec = SPEC if dst_dev == "cuda" else SPEC.with_(layout=KvLayout.HND, dtype=KvDtype.FLOAT32)
    h = ReceiverHarness(PagedKvCache.allocate(dst_spec, 64, device=dst_dev), ZmqReceiverConfig())
    tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(checksum=checksum, stream_chunk_bytes=64 << 10))
    src_table, dst_table = list(range(40, 60)), [3 * i % 64 for i in range(20)]
    try:
        h.rx.expect("g", dst_table)
        tx.send(src, src_table, 5, 310, request_id="g")
        assert isinstance(h.wait("g"), list) and tx.payload == "stream"
        want = read_tokens_float(src, src_table, 5, 310)
        got = read_tokens_float(h.cache, dst_table, 5, 310)
        assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(want, got, strict=True))
    finally:
        tx.close()
        h.close()


def test_a_backed_up_socket_never_sends_a_reused_pinned_slot() -> None:
    """GPU sender: ~150 buffers of 64 KiB through two reused pinned host slots while a 64 KiB
    send buffer keeps the socket full: every byte arrives as it was (a slot refilled before its
    bytes were written would corrupt the copy)."""
    src = PagedKvCache.allocate(SPEC, 300)
    fill_random(src, torch.Generator().manual_seed(1))
    src = PagedKvCache(SPEC, [tuple(t.to("cuda") for t in ts) for ts in src.layers])
    h = ReceiverHarness(PagedKvCache.allocate(SPEC, 300, device="cuda"), ZmqReceiverConfig())
    tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(stream_chunk_bytes=64 << 10,
                                                    stream_sndbuf=64 << 10))
    table = list(range(299, -1, -1))
    try:
        h.rx.expect("big", list(range(300)))
        r = tx.send(src, table, 0, 4800, request_id="big")
        assert isinstance(h.wait("big"), list) and tx.payload == "stream" and r.fill_s > 0
        want = read_tokens_float(src, table, 0, 4800)
        got = read_tokens_float(h.cache, list(range(300)), 0, 4800)
        assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(want, got, strict=True))
    finally:
        tx.close()
        h.close()
