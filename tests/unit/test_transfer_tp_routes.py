"""KV between prefill and decode workers of different TP sizes: the transfer matrix's TP pairs.

For each pair (1↔2, 2↔4, 1↔4) and model shape (GQA 4 KV heads, 2 KV heads,
MQA with one replicated head, MLA latent), a TP=1 cache of random contents is cut into the
prefill ranks' caches, every route of `tp_routes` runs through the real codec
(pack → header bytes → decode_header → KvWriter) from its prefill rank into its decode rank,
and each decode rank must then hold bit-exactly its heads of the original. A route aimed at the
wrong rank is refused with IncompatibleKv naming both specs.
"""

from __future__ import annotations

import pytest
import torch

from bench.kv_fill import fill_random
from transfer.convert.cache import PagedKvCache
from transfer.convert.local import convert_kv, read_tokens_float
from transfer.convert.profiles import KvModelShape, profile
from transfer.convert.tp_routes import TpRoute, tp_routes
from transfer.wire.errors import IncompatibleKv

SHAPES = {"gqa4": KvModelShape("gqa4", 2, 4, 64), "gqa2": KvModelShape("gqa2", 2, 2, 64),
          "mqa": KvModelShape("mqa", 2, 1, 64), "mla": KvModelShape("mla", 2, 1, 64,
                                                                     is_latent=True)}
PAIRS = [(1, 2), (2, 1), (2, 4), (4, 2), (1, 4), (4, 1)]
NUM_TOKENS, NUM_BLOCKS, BLOCK = 21, 4, 8
TABLE = [2, 0, 3]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _caches(shape: KvModelShape, tp: int, source: PagedKvCache | None = None
            ) -> list[PagedKvCache]:
    prof = profile("ampere")
    caches = [PagedKvCache.allocate(prof.spec_for(shape, BLOCK, tp_rank=r, tp_size=tp),
                                    NUM_BLOCKS) for r in range(tp)]
    if source is not None:  # each rank's heads of the TP=1 source
        for cache in caches:
            convert_kv(source, TABLE, cache, TABLE, 0, NUM_TOKENS,
                       head_range=cache.spec.head_range)
    return caches


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize(("p_tp", "d_tp"), PAIRS)
def test_routes_rebuild_every_decode_rank(shape: str, p_tp: int, d_tp: int) -> None:
    full = _caches(SHAPES[shape], 1)[0]
    fill_random(full, torch.Generator().manual_seed(3))
    prefill, decode = _caches(SHAPES[shape], p_tp, full), _caches(SHAPES[shape], d_tp)
    routes = tp_routes(prefill[0].spec, decode[0].spec)
    for d_rank, cache in enumerate(decode):  # each decode rank gets each of its heads once
        got = sorted(r.heads for r in routes if r.dst_rank == d_rank)
        lo, hi = cache.spec.head_range
        assert [h for a, b in got for h in range(a, b)] == list(range(lo, hi)), routes
    for route in routes:
        convert_kv(prefill[route.src_rank], TABLE, decode[route.dst_rank], TABLE, 0, NUM_TOKENS,
                   head_range=route.heads)
    want = read_tokens_float(full, TABLE, 0, NUM_TOKENS)  # per layer [C, T, H, D]
    head_axis = 2
    for cache in decode:
        lo, hi = cache.spec.head_range
        got = read_tokens_float(cache, TABLE, 0, NUM_TOKENS)
        for layer, (g, w) in enumerate(zip(got, want, strict=True)):
            w = w if SHAPES[shape].is_latent else w.narrow(head_axis, lo, hi - lo)
            assert torch.equal(g, w), f"{shape} P{p_tp}->D{d_tp} rank {cache.spec.tp_rank} " \
                                      f"layer {layer}"
    if p_tp > 1 and len(routes) > 1:  # sends spread over the prefill ranks
        assert len({r.src_rank for r in routes}) > 1


def test_replicated_heads_spread_over_their_holders() -> None:
    src = profile("ampere").spec_for(SHAPES["gqa2"], BLOCK, tp_size=4)  # heads 0,0,1,1
    dst = profile("ampere").spec_for(SHAPES["gqa2"], BLOCK, tp_size=4)
    assert tp_routes(src, dst) == [TpRoute(0, 0, (0, 1)), TpRoute(1, 1, (0, 1)),
                                   TpRoute(2, 2, (1, 2)), TpRoute(3, 3, (1, 2))]


def test_a_route_to_the_wrong_rank_is_refused_naming_both_specs() -> None:
    shape = SHAPES["gqa4"]
    full = _caches(shape, 1)[0]
    fill_random(full, torch.Generator().manual_seed(0))
    prefill, decode = _caches(shape, 2, full), _caches(shape, 2)
    with pytest.raises(IncompatibleKv) as err:  # rank 0's heads [0, 2) into rank 1 ([2, 4))
        convert_kv(prefill[0], TABLE, decode[1], TABLE, 0, NUM_TOKENS)
    assert "tp=0/2" in str(err.value) and "tp=1/2" in str(err.value)


def test_different_models_have_no_routes() -> None:
    src = profile("ampere").spec_for(SHAPES["gqa4"], BLOCK, tp_size=2)
    dst = profile("ampere").spec_for(SHAPES["gqa2"], BLOCK, tp_size=2)
    with pytest.raises(IncompatibleKv, match="model KV heads differ"):
        tp_routes(src, dst)
