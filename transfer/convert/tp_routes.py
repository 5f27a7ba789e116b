"""Which prefill rank sends which KV heads to which decode rank, between TP sizes.

A prefill worker of TP size a and a decode worker of TP size b each hold the model's KV heads
spread over their ranks (`KvSpec.head_range`; heads split, or replicated when TP exceeds the
KV heads; an MLA latent cache is whole on every rank). `tp_routes` lists, for every decode
rank, the source ranks and head ranges that together give it exactly the heads it holds, each
head once, with no gather through any rank 0: P2→D1 concatenates (two routes into rank 0),
P1→D2 splits (one source, two slices), P2→D4 / P4→D2 do both. Where several source ranks hold
the same heads (replicas), decode ranks take them round-robin so the sends spread over them.
Each route is one `pack_kv(..., head_range=route.heads)` on the source rank and one
`KvWriter` on the destination rank; the header carries the heads, and a destination that gets
heads it does not hold refuses (`check_compatible`, naming both specs).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_spec import KvSpec
from transfer.wire.errors import IncompatibleKv


@dataclass(frozen=True)
class TpRoute:
    src_rank: int
    dst_rank: int
    heads: tuple[int, int]  # model KV heads [lo, hi) sent on this route


def rank_spec(spec: KvSpec, rank: int) -> KvSpec:
    """The spec of rank `rank` of the worker whose rank `spec.tp_rank` has `spec`."""
    return spec.with_(tp_rank=rank)


def tp_routes(src: KvSpec, dst: KvSpec) -> list[TpRoute]:
    """Routes from every rank of `src`'s worker to every rank of `dst`'s (any rank's spec of
    each will do). Raises IncompatibleKv when the two do not hold the same model heads."""
    if src.model_kv_heads != dst.model_kv_heads or src.kind is not dst.kind:
        raise IncompatibleKv(f"model KV heads differ ({src.model_kv_heads} vs "
                             f"{dst.model_kv_heads}) or kinds differ", src, dst)
    holders: dict[tuple[int, int], list[int]] = {}  # source head range -> ranks holding it
    for rank in range(src.tp_size):
        holders.setdefault(rank_spec(src, rank).head_range, []).append(rank)
    routes = []
    for d_rank in range(dst.tp_size):
        d_lo, d_hi = rank_spec(dst, d_rank).head_range
        for (s_lo, s_hi), ranks in sorted(holders.items()):
            lo, hi = max(s_lo, d_lo), min(s_hi, d_hi)
            if lo < hi:
                routes.append(TpRoute(ranks[d_rank % len(ranks)], d_rank, (lo, hi)))
    return routes


def sends_of(src: KvSpec, dst: KvSpec, rank: int) -> list[tuple[TpRoute, int]]:
    """The routes source rank `rank` sends, each with the number of routes its destination
    rank gets in all (the receiver waits for that many: transfer/endpoint/parts.py)."""
    routes = tp_routes(src, dst)
    into = {r.dst_rank: sum(1 for x in routes if x.dst_rank == r.dst_rank) for r in routes}
    return [(r, into[r.dst_rank]) for r in routes if r.src_rank == rank]
