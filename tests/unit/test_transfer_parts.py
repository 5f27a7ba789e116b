"""Layer-wise streaming on the wire: one reservation filled by parts (transfer/endpoint/parts.py),
each a token range x layer range with `meta["kv_part"]`; the receiver completes it after the
last part only, bit-identical to one whole transfer (lossless conversions, both payload paths);
a part out of order, a bad marker or a stream with a hole fails the reservation with a typed
error."""

from __future__ import annotations

import pytest
import torch

from bench.kv_fill import ReceiverHarness, fill_random
from engine.kv_spec import KvDtype, KvLayout, KvSpec
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import read_tokens_float
from transfer.endpoint.parts import part_meta
from transfer.endpoint.receiver import ZmqReceiverConfig
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
from transfer.wire.errors import MalformedHeader, UnexpectedTransfer

SRC = KvSpec(4, 2, 64, 16, dtype=KvDtype.BFLOAT16)
TABLE = [3, 12, 7, 0, 8]  # 70 tokens
# cached prefix [0, 16); chunks [16, 40) and [40, 70); two layer groups
PARTS = [((0, 16), (0, 4)), ((16, 40), (0, 2)), ((16, 40), (2, 4)), ((40, 70), (0, 2)),
         ((40, 70), (2, 4))]


@pytest.fixture
def src() -> PagedKvCache:
    cache = PagedKvCache.allocate(SRC, 16)
    fill_random(cache, torch.Generator().manual_seed(0))
    return cache


@pytest.mark.parametrize("payload", ["stream", "frames"])
@pytest.mark.parametrize("dst_spec", [SRC, KvSpec(4, 2, 64, 8, layout=KvLayout.PAGED_V1,
                                                  is_kv_stacked=False)])
def test_parts_equal_a_whole_transfer(src: PagedKvCache, payload: str, dst_spec: KvSpec) -> None:
    h = ReceiverHarness(PagedKvCache.allocate(dst_spec, 40), ZmqReceiverConfig())
    tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(timeout_s=10.0, payload=payload))
    try:
        whole, streamed = list(range(0, 10)), list(range(39, 29, -1))
        h.rx.expect("whole", whole)
        tx.send(src, TABLE, 0, 70, request_id="whole", meta={"first_token": 5})
        h.rx.expect("parts", streamed)
        for i, ((t0, t1), layers) in enumerate(PARTS):
            is_last = i == len(PARTS) - 1
            meta = {"first_token": 5} if is_last else {}
            tx.send(src, TABLE, t0, t1, request_id="parts", layer_range=layers,
                    meta={**meta, **part_meta(i, is_last)})
            assert is_last or "parts" not in h.ended  # admitted after the last part only
        reports = h.wait("parts")
        assert isinstance(reports, list) and len(reports) == len(PARTS)
        assert reports[-1].meta["first_token"] == 5
        want = read_tokens_float(h.cache, whole, 0, 70)
        got = read_tokens_float(h.cache, streamed, 0, 70)
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
        assert not h.rx._expected and not h.rx._inflight
    finally:
        tx.close()
        h.close()


@pytest.mark.parametrize("marker", [[1, 0], [0, 2], ["0", 1], [0]])
def test_a_part_out_of_order_or_malformed_fails_the_reservation(src: PagedKvCache,
                                                                marker: list) -> None:
    h = ReceiverHarness(PagedKvCache.allocate(SRC, 16), ZmqReceiverConfig())
    tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(timeout_s=10.0))
    try:
        h.rx.expect("r", list(range(5)))
        with pytest.raises(MalformedHeader):
            tx.send(src, TABLE, 0, 16, request_id="r", meta={"kv_part": marker})
        assert isinstance(h.wait("r"), MalformedHeader)
        with pytest.raises(UnexpectedTransfer):  # the reservation is gone: nothing more lands
            tx.send(src, TABLE, 16, 70, request_id="r", meta=part_meta(1, True))
    finally:
        tx.close()
        h.close()


@pytest.mark.parametrize("kept", [[0, 2, 3, 4], [0, 1, 2, 3], [4]],
                         ids=["a-chunk-group", "the-last-group", "only-the-last-part"])
def test_a_stream_with_a_hole_fails_the_reservation(src: PagedKvCache, kept: list[int]) -> None:
    """Parts that leave a layer without some of its tokens (a group never sent: issue 17's H100
    run sent only the last part, its layer hooks never ran) fail the reservation with a typed
    error instead of completing it over blocks that hold stale KV."""
    h = ReceiverHarness(PagedKvCache.allocate(SRC, 16), ZmqReceiverConfig())
    tx = ZmqKvSender(h.rx.endpoint, ZmqSenderConfig(timeout_s=10.0))
    try:
        h.rx.expect("r", list(range(5)))
        with pytest.raises(MalformedHeader, match="missing"):
            for i, k in enumerate(kept):
                (t0, t1), layers = PARTS[k]
                tx.send(src, TABLE, t0, t1, request_id="r", layer_range=layers,
                        meta=part_meta(i, i == len(kept) - 1))
        assert isinstance(h.wait("r"), MalformedHeader)
        assert not h.rx._expected and not h.rx._inflight
    finally:
        tx.close()
        h.close()


def _lossless_cells() -> list[tuple[str, str, str]]:
    from transfer.convert.profiles import PROFILES
    from transfer.convert.quant import is_lossless_cast

    cells = []
    for kind in ("gqa", "mla"):
        shape = _shape(kind)
        for a in PROFILES:
            for b in PROFILES:
                if kind == "mla" and not (a.supports_mla and b.supports_mla):
                    continue
                if is_lossless_cast(a.spec_for(shape, 16), b.spec_for(shape, 16)):
                    cells.append((a.name, b.name, kind))
    return cells


def _shape(kind: str) -> object:
    from transfer.convert.profiles import KvModelShape

    return KvModelShape(kind, 2, 2 if kind == "gqa" else 1, 64, is_latent=kind == "mla")


@pytest.mark.parametrize(("src_name", "dst_name", "kind"), _lossless_cells())
def test_parts_are_bit_identical_to_whole_on_every_lossless_matrix_pair(
        src_name: str, dst_name: str, kind: str) -> None:
    """The matrix's lossless cells, whole vs (prefix + chunk x layer-group) parts, through the
    real codec (pack -> header bytes -> decode_header -> KvWriter), re-blocking 16 -> 32."""
    from transfer.convert.local import convert_kv
    from transfer.convert.profiles import profile

    gen = torch.Generator().manual_seed(7)
    src = PagedKvCache.allocate(profile(src_name).spec_for(_shape(kind), 16), 8)
    fill_random(src, gen)
    dst_spec = profile(dst_name).spec_for(_shape(kind), 32)
    whole, parts = PagedKvCache.allocate(dst_spec, 4), PagedKvCache.allocate(dst_spec, 4)
    for d in (whole, parts):  # fixed (per-tensor / per-head) scales: the same calibration
        for s, t in zip(src.scales or [], d.scales or [], strict=False):
            t.copy_(s.reshape(t.shape) if s.numel() == t.numel() else t)
    src_table, dst_table = [5, 1, 7, 2], [3, 0]
    convert_kv(src, src_table, whole, dst_table, 0, 61)
    for (t0, t1), layers in [((0, 16), (0, 2)), ((16, 40), (0, 1)), ((16, 40), (1, 2)),
                             ((40, 61), (0, 1)), ((40, 61), (1, 2))]:
        convert_kv(src, src_table, parts, dst_table, t0, t1, layer_range=layers)
    want = read_tokens_float(whole, dst_table, 0, 61)
    got = read_tokens_float(parts, dst_table, 0, 61)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
