"""Compressed KV on the wire (`--kv-wire-dtype`): the wire spec, the header that names it, and
real transfers over the stream and frames payloads dequantized into the receiver's own dtype
within the int8 / fp8 bound."""

from __future__ import annotations

import pytest
import torch

from bench.kv_fill import ReceiverHarness, fill_random
from engine.kv_spec import KvDtype, KvLayout, KvSpec, ScaleGranularity
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import read_tokens_float, write_kv
from transfer.convert.pack import pack_kv
from transfer.convert.wire_dtype import to_wire, wire_spec
from transfer.endpoint.receiver import ZmqReceiverConfig
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
from transfer.wire.header import ReceiverLimits, decode_header

SRC = KvSpec(3, 2, 64, 16, model_fingerprint="m")
DST = KvSpec(3, 2, 64, 8, dtype=KvDtype.BFLOAT16, layout=KvLayout.HND, is_kv_stacked=False)
TABLE = [7, 2, 9, 4, 11, 0]  # 96 tokens
# |error| bound per (token, head), relative to that token-head's amax
BOUND = {"int8": 0.5 / 127 + 2**-8, "fp8_e4m3": 2**-4 + 2**-8}


@pytest.fixture
def src() -> PagedKvCache:
    cache = PagedKvCache.allocate(SRC, 12)
    fill_random(cache, torch.Generator().manual_seed(1))
    return cache


def assert_close(want: list[torch.Tensor], got: list[torch.Tensor], name: str) -> None:
    for a, b in zip(want, got, strict=True):  # [C, T, H, D]
        amax = a.abs().amax(dim=-1, keepdim=True)
        assert bool(((a - b).abs() <= BOUND[name] * amax + 1e-6).all())
        assert not torch.equal(a, b)  # lossy: it did quantize


def test_wire_spec() -> None:
    assert wire_spec(SRC, "auto") is None
    assert wire_spec(SRC.with_(dtype=KvDtype.INT8, scale_granularity="per_head"), "int8") is None
    spec = wire_spec(SRC.with_(layout=KvLayout.HND, is_kv_stacked=False), "fp8_e4m3")
    assert spec is not None and spec.dtype is KvDtype.FP8_E4M3
    assert spec.scale_granularity is ScaleGranularity.PER_TOKEN_HEAD and spec.layout is KvLayout.NHD
    with pytest.raises(ValueError, match="wire dtype"):
        wire_spec(SRC, "int4")
    with pytest.raises(ValueError, match="wire_dtype"):
        ZmqSenderConfig(wire_dtype="bf8")


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("layout", [KvLayout.NHD, KvLayout.PAGED_V1])  # fast path, generic path
def test_header_round_trip_and_dequantize(src: PagedKvCache, name: str, layout: KvLayout) -> None:
    if layout is not KvLayout.NHD:
        other = PagedKvCache.allocate(SRC.with_(layout=layout, is_kv_stacked=False), 12)
        write_kv(pack_kv(src, TABLE, 0, 96, request_id="c").header,
                 pack_kv(src, TABLE, 0, 96, request_id="c").all_buffers(), other, TABLE)
        src = other
    spec = wire_spec(src.spec, name)
    assert spec is not None
    wire, table = to_wire(src, TABLE, 21, 90, spec)
    assert wire.num_blocks == 5  # blocks 1..5 of the sequence
    packed = pack_kv(wire, table, 21, 90, request_id="r")
    header = decode_header(packed.header.encode(), ReceiverLimits())
    assert header == packed.header
    assert header.spec.dtype is spec.dtype and header.spec.model_fingerprint == "m"
    assert header.payload_bytes < 0.4 * 69 * SRC.bytes_per_token
    dst = PagedKvCache.allocate(DST, 24)
    dst_table = list(range(12, 24))
    report = write_kv(header, packed.all_buffers(), dst, dst_table)
    assert not report.is_lossless and report.num_clamped == 0
    want = read_tokens_float(src, TABLE, 21, 90)
    got = read_tokens_float(dst, dst_table, 21, 90)
    assert_close([w.to(torch.bfloat16).float() for w in want], got, name)


@pytest.mark.parametrize("payload", ["stream", "frames"])
def test_over_the_wire(src: PagedKvCache, payload: str) -> None:
    h = ReceiverHarness(PagedKvCache.allocate(DST, 24),
                        ZmqReceiverConfig(idle_timeout_s=5.0, transfer_timeout_s=10.0))
    plain = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(timeout_s=10.0, payload=payload))
    tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(timeout_s=10.0, payload=payload,
                                                    wire_dtype="int8", checksum=True))
    try:
        h.rx.expect("plain", list(range(12)))
        full = plain.send(src, TABLE, 0, 96, request_id="plain")
        h.rx.expect("q", list(range(12, 24)))
        res = tx.send(src, TABLE, 0, 96, request_id="q", meta={"first_token": 3})
        assert tx.payload == payload and isinstance(h.wait("q"), list)
        assert res.num_bytes < 0.3 * full.num_bytes  # int8 + fp32 scales vs fp32
        assert res.report["path"] == "convert" and not res.report["is_lossless"]
        want = read_tokens_float(h.cache, list(range(12)), 0, 96)  # fp32 -> bf16, exact
        got = read_tokens_float(h.cache, list(range(12, 24)), 0, 96)
        assert_close(want, got, "int8")
    finally:
        tx.close()
        plain.close()
        h.close()
