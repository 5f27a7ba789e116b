"""Layer-wise streaming between TP workers on the receiver (transfer/endpoint/parts.py): each
prefill rank streams its heads to the decode ranks that hold them as parts (token range x layer
group), every part carrying both `kv_routes` and `kv_part` (counted per route, a route being the
heads it carries). Over the real ZMQ endpoints (stream and frames payloads), P1->D3, P3->D1 and
P3->D3 with the routes' parts interleaved: a reservation completes only after every route's last
part, and each decode rank ends bit-exactly with its heads. A route with a hole, a part after
its route's last, one route too many or counts that disagree fail the reservation with a typed
error; routes whose heads overlap fail it with IncompatibleKv.

The receiving end of `--kv-streaming layerwise` with TP workers (the sending end:
prefill/layer_stream.py; served end to end in tests/integration/test_pd_tp_serving.py)."""

from __future__ import annotations

import itertools

import pytest
import torch

from bench.kv_fill import ReceiverHarness, fill_random
from engine.kv_spec import KvDtype, KvSpec
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import convert_kv, read_tokens_float
from transfer.convert.tp_routes import sends_of
from transfer.endpoint.parts import part_meta, routes_meta
from transfer.endpoint.receiver import ZmqReceiverConfig
from transfer.endpoint.sender import ZmqKvSender, ZmqSenderConfig
from transfer.wire.errors import IncompatibleKv, MalformedHeader

FULL = KvSpec(2, 3, 64, 16, dtype=KvDtype.FLOAT32)  # SmolLM2's 3 KV heads, 2 layers
NUM_TOKENS = 40
TABLE = [5, 1, 7]
# cached prefix [0, 16) all layers; chunk [16, 40) in two layer groups
PARTS = [((0, 16), (0, 2)), ((16, 40), (0, 1)), ((16, 40), (1, 2))]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _shard(tp: int, rank: int) -> KvSpec:
    return FULL.with_(num_kv_heads=FULL.num_kv_heads // tp, tp_rank=rank, tp_size=tp)


@pytest.fixture
def full() -> PagedKvCache:
    cache = PagedKvCache.allocate(FULL, 16)
    fill_random(cache, torch.Generator().manual_seed(2))
    return cache


def _source(tp: int, rank: int, full: PagedKvCache) -> PagedKvCache:
    cache = PagedKvCache.allocate(_shard(tp, rank), 16)
    convert_kv(full, TABLE, cache, TABLE, 0, NUM_TOKENS, head_range=cache.spec.head_range)
    return cache


def _receiver(tp: int, rank: int) -> ReceiverHarness:
    rx = ReceiverHarness(PagedKvCache.allocate(_shard(tp, rank), 16), ZmqReceiverConfig())
    rx.rx.expect("r", TABLE)
    return rx


def _send_part(tx: ZmqKvSender, src: PagedKvCache, heads: tuple[int, int], num_routes: int,
               index: int, is_last: bool, part: tuple = ()) -> None:
    (t0, t1), layers = part or PARTS[index]
    tx.send(src, TABLE, t0, t1, request_id="r", layer_range=layers, head_range=heads,
            meta={**routes_meta(num_routes), **part_meta(index, is_last)})


@pytest.mark.parametrize("payload", ["stream", "frames"])
@pytest.mark.parametrize(("p_tp", "d_tp"), [(1, 3), (3, 1), (3, 3)])
def test_streamed_routes_fill_every_decode_rank_with_its_heads(
        full: PagedKvCache, p_tp: int, d_tp: int, payload: str) -> None:
    receivers = [_receiver(d_tp, r) for r in range(d_tp)]
    sources = [_source(p_tp, rank, full) for rank in range(p_tp)]
    config = ZmqSenderConfig(timeout_s=10.0, payload=payload)
    routes = [(src, route, n) for rank, src in enumerate(sources)
              for route, n in sends_of(src.spec, receivers[0].cache.spec, rank)]
    senders = [ZmqKvSender(receivers[route.dst_rank].rx.endpoint, config)
               for _, route, _ in routes]
    try:
        # part by part, the routes interleaved (as ranks stream while the layers compute)
        for index, (tx, (src, route, n)) in itertools.product(
                range(len(PARTS)), zip(senders, routes, strict=True)):
            rx = receivers[route.dst_rank]
            assert "r" not in rx.ended  # complete after every route's last part only
            _send_part(tx, src, route.heads, n, index, index == len(PARTS) - 1)
        for rx in receivers:
            reports = rx.wait("r")
            assert isinstance(reports, list), reports
            assert len(reports) == len(PARTS) * max(1, p_tp // d_tp)
            lo, hi = rx.cache.spec.head_range
            want = read_tokens_float(full, TABLE, 0, NUM_TOKENS)
            got = read_tokens_float(rx.cache, TABLE, 0, NUM_TOKENS)
            assert all(torch.equal(g, w.narrow(2, lo, hi - lo))
                       for g, w in zip(got, want, strict=True))
            assert not rx.rx._expected and not rx.rx._inflight
    finally:
        for tx in senders:
            tx.close()
        for rx in receivers:
            rx.close()


@pytest.mark.parametrize(("sends", "error", "match"), [
    # heads, routes announced, part index, is_last, (tokens, layers) if not PARTS[index]
    ([((0, 1), 2, 0, 0, ()), ((0, 1), 2, 1, 1, ((16, 40), (0, 2))),
      ((1, 2), 2, 0, 1, ((0, 40), (1, 2)))], MalformedHeader, "missing"),
    ([((0, 1), 2, 0, 1, ((0, 40), (0, 2))), ((0, 1), 2, 1, 1, ())], MalformedHeader,
     "had ended"),
    ([((0, 1), 2, 0, 0, ()), ((1, 2), 2, 0, 0, ()), ((2, 3), 2, 0, 0, ())], MalformedHeader,
     "more than 2"),
    ([((0, 1), 3, 0, 0, ()), ((1, 2), 2, 0, 0, ())], MalformedHeader, "disagrees"),
    ([((0, 2), 2, 0, 1, ((0, 40), (0, 2))), ((1, 3), 2, 0, 1, ((0, 40), (0, 2)))],
     IncompatibleKv, "not each of"),
], ids=["a-hole", "after-the-last", "one-route-too-many", "counts-disagree", "heads-overlap"])
def test_bad_streamed_routes_fail_the_reservation(full: PagedKvCache, sends: list,
                                                  error: type, match: str) -> None:
    rx = _receiver(1, 0)  # holds heads [0, 3)
    tx = ZmqKvSender(rx.rx.endpoint, ZmqSenderConfig(timeout_s=10.0))
    try:
        for heads, n, index, is_last, part in sends:
            try:
                _send_part(tx, full, heads, n, index, bool(is_last), part)
            except MalformedHeader as e:  # refused at admission: the sender hears it
                assert error is MalformedHeader and match in str(e), e
                break
        outcome = rx.wait("r")
        assert isinstance(outcome, error) and match in str(outcome), outcome
        assert not rx.rx._expected and not rx.rx._inflight
    finally:
        tx.close()
        rx.close()
