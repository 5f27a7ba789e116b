"""TP routes over the real KV endpoints (ZMQ sender -> receiver on 127.0.0.1; stream and frames
payloads).

What the serving path does per rank (prefill/tp_sends.py, decode/tp_rank.py), without models:
P1 -> D3 splits one cache's heads over three receivers; P3 -> D1 fills one reservation from
three senders, the receiver learning from `meta["kv_routes"]` how many to wait for; each rank
ends bit-exactly with its heads of the source. A rank sent heads it does not hold refuses with
IncompatibleKv naming both specs; route transfers that do not cover the rank's heads exactly
once, or disagree on their count, fail the reservation with a typed error.
"""

from __future__ import annotations

import pytest
import torch

from bench.kv_fill import ReceiverHarness, fill_random
from engine.kv_spec import KvDtype, KvSpec
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import read_tokens_float
from transfer.convert.tp_routes import rank_spec, sends_of
from transfer.endpoint.parts import routes_meta
from transfer.endpoint.receiver import ZmqReceiverConfig
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
from transfer.wire.errors import IncompatibleKv, MalformedHeader

FULL = KvSpec(2, 3, 64, 16, dtype=KvDtype.FLOAT32)  # SmolLM2's 3 KV heads, 2 layers
NUM_TOKENS = 40
TABLE = [5, 1, 7]
CONFIG = ZmqSenderConfig(timeout_s=10.0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _shard(spec: KvSpec, tp: int, rank: int) -> KvSpec:
    return spec.with_(num_kv_heads=spec.num_kv_heads // tp, tp_rank=rank, tp_size=tp)


def _receivers(tp: int) -> list[ReceiverHarness]:
    return [ReceiverHarness(PagedKvCache.allocate(_shard(FULL, tp, r), 16),
                            ZmqReceiverConfig(endpoint="tcp://127.0.0.1:0")) for r in range(tp)]


def _source(tp: int, rank: int, full: PagedKvCache) -> PagedKvCache:
    """Rank `rank` of a TP `tp` prefill worker: its heads of `full`."""
    from transfer.convert.local import convert_kv

    cache = PagedKvCache.allocate(_shard(FULL, tp, rank), 16)
    convert_kv(full, TABLE, cache, TABLE, 0, NUM_TOKENS, head_range=cache.spec.head_range)
    return cache


def _send(src: PagedKvCache, rx: ReceiverHarness, rid: str, heads: tuple[int, int],
          num_routes: int, config: ZmqSenderConfig = CONFIG) -> None:
    tx = ZmqKvSender(rx.rx.endpoint, config)
    try:
        tx.send(src, TABLE, 0, NUM_TOKENS, request_id=rid, head_range=heads,
                meta=routes_meta(num_routes))
    finally:
        tx.close()


def _assert_holds_its_heads(rx: ReceiverHarness, full: PagedKvCache) -> None:
    lo, hi = rx.cache.spec.head_range
    want = read_tokens_float(full, TABLE, 0, NUM_TOKENS)  # per layer [C, T, H, D]
    got = read_tokens_float(rx.cache, TABLE, 0, NUM_TOKENS)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w.narrow(2, lo, hi - lo)), rx.cache.spec


@pytest.fixture
def full() -> PagedKvCache:
    cache = PagedKvCache.allocate(FULL, 16)
    fill_random(cache, torch.Generator().manual_seed(1))
    return cache


@pytest.mark.parametrize("payload", ["stream", "frames"])
@pytest.mark.parametrize(("p_tp", "d_tp"), [(1, 3), (3, 1), (3, 3)])
def test_every_decode_rank_gets_its_heads_straight_from_the_prefill_ranks(
        full: PagedKvCache, p_tp: int, d_tp: int, payload: str) -> None:
    receivers = _receivers(d_tp)
    try:
        for rx in receivers:
            rx.rx.expect("r", TABLE)  # one transfer until a route header says how many
        sources = [_source(p_tp, rank, full) for rank in range(p_tp)]
        dst0 = receivers[0].cache.spec
        for rank, src in enumerate(sources):
            for route, num_routes in sends_of(src.spec, dst0, rank):
                rx = receivers[route.dst_rank]
                assert rx.cache.spec == rank_spec(dst0, route.dst_rank)
                assert "r" not in rx.ended  # a reservation waits for all of its routes
                _send(src, rx, "r", route.heads, num_routes,
                      ZmqSenderConfig(timeout_s=10.0, payload=payload))
        for rx in receivers:
            reports = rx.wait("r")
            assert isinstance(reports, list), reports
            assert len(reports) == max(1, p_tp // d_tp)
            _assert_holds_its_heads(rx, full)
    finally:
        for rx in receivers:
            rx.close()


def test_heads_a_rank_does_not_hold_are_refused_naming_both_specs(full: PagedKvCache) -> None:
    rx = _receivers(3)[1]  # holds head 1 only
    try:
        rx.rx.expect("r", TABLE)
        with pytest.raises(IncompatibleKv) as err:
            _send(full, rx, "r", (0, 1), 1)  # head 0: rank 0's
        message = str(err.value)
        assert "tp=0/1" in message and "tp=1/3" in message, message
        assert "heads [0, 1)" in message and "[1, 2)" in message, message
        assert isinstance(rx.wait("r"), IncompatibleKv)
    finally:
        rx.close()


def test_routes_that_do_not_cover_the_heads_once_fail_the_reservation(
        full: PagedKvCache) -> None:
    rx = _receivers(1)[0]  # holds heads [0, 3)
    try:
        rx.rx.expect("r", TABLE)
        _send(full, rx, "r", (0, 2), 2)
        _send(full, rx, "r", (1, 3), 2)  # head 1 twice
        outcome = rx.wait("r")
        assert isinstance(outcome, IncompatibleKv) and "not each of" in str(outcome), outcome
    finally:
        rx.close()


def test_route_counts_that_disagree_fail_the_reservation(full: PagedKvCache) -> None:
    rx = _receivers(1)[0]
    try:
        rx.rx.expect("r", TABLE)
        _send(full, rx, "r", (0, 1), 3)
        with pytest.raises(MalformedHeader, match="disagrees"):
            _send(full, rx, "r", (1, 2), 2)
        assert isinstance(rx.wait("r"), MalformedHeader)
    finally:
        rx.close()
