"""Layer-wise streaming on the receiver: one reservation filled by a sequence of part transfers.

A sender that streams a prompt's KV as it is computed (prefill/layer_stream.py) sends it as
several ordinary transfers — each a token range x layer range of the reservation, with its own
header, payload and ack — and marks each with `meta["kv_part"] = [index, is_last]`: index 0, 1,
2, ... in sending order, `is_last` 1 on the final one only. How many parts there will be is not
known when the reservation is made (chunk sizes follow the prefill batch), so the count is
learnt from the parts: until the last part is admitted the reservation wants one more transfer
than it has seen, then exactly as many as there were. A transfer without the key counts as one
of the reservation's `num_transfers`, as always.

A stream must leave every layer with every token: the parts of one layer cover its tokens from
0 with no hole (a part's tokens start at or before where that layer's earlier parts ended), and
the last part ends every layer at the same token. A sender that skipped a part (a layer group
whose hook never ran) is refused at once, instead of completing a reservation whose skipped
layers hold whatever the blocks held before.

Tensor parallelism (transfer/convert/tp_routes.py): a reservation on one decode rank may be
filled by several prefill ranks, each sending its heads; each such transfer carries
`meta["kv_routes"] = n`, the number of route transfers the rank gets for the request, so the
reservation waits for exactly n (all must agree), and on completion their heads must cover the
rank's heads exactly once (`check_routes`), else IncompatibleKv naming both specs.

Both at once (layer-wise streaming between TP workers): each prefill rank streams its heads to
the decode ranks that hold them, so a decode rank's reservation is filled by n route streams,
each a sequence of parts. Every such part carries both keys: `kv_routes = n` (all must agree)
and `kv_part = [index, is_last]` counted per route, a route being the model heads the part
carries (`header.head_start/head_end`): each route's parts go in order and cover its layers
with no hole, exactly as one stream does. The reservation completes once n routes have each
admitted their last part and every part is written; then their heads must cover the rank's
heads exactly once (`check_routes`). A reservation takes whole transfers, parts, whole route
transfers or streamed routes, never a mix.

`count_part` runs in the books' admission (under the receiver's lock) and raises MalformedHeader
for a part out of order, a bad marker or a hole; the books then fail the whole reservation.
"""

from __future__ import annotations

from engine.kv_spec import KvSpec
from transfer.endpoint.records import Expectation, RouteStream
from transfer.wire.errors import IncompatibleKv, MalformedHeader
from transfer.wire.header import TransferHeader

PART_KEY = "kv_part"
ROUTES_KEY = "kv_routes"
MAX_PARTS = 1 << 16
MAX_ROUTES = 1 << 10


def part_meta(index: int, is_last: bool) -> dict[str, list[int]]:
    """The meta entry a sender adds to part `index` of a streamed reservation."""
    return {PART_KEY: [index, int(is_last)]}


def routes_meta(num_routes: int) -> dict[str, int]:
    """The meta entry of each of the `num_routes` TP route transfers into one reservation."""
    return {ROUTES_KEY: num_routes}


def count_route(exp: Expectation, header: TransferHeader) -> None:
    """Book one admitted TP route transfer of `exp` (see the module docstring)."""
    n = header.meta.get(ROUTES_KEY)
    if n is None:
        if exp.num_routes:
            raise MalformedHeader("a transfer without a route count after TP route transfers")
        return
    if type(n) is not int or not 1 <= n <= MAX_ROUTES or PART_KEY in header.meta:
        raise MalformedHeader(f"meta.{ROUTES_KEY} must be an int in [1, {MAX_ROUTES}], "
                              f"without meta.{PART_KEY}")
    if exp.num_routes and n != exp.num_transfers:
        raise MalformedHeader(f"meta.{ROUTES_KEY} {n} disagrees with {exp.num_transfers} "
                              f"announced for request {exp.request_id}")
    if exp.num_routes >= n:
        raise MalformedHeader(f"more than {n} route transfers for request {exp.request_id}")
    exp.num_routes += 1
    exp.num_transfers = n


def check_routes(exp: Expectation, src: KvSpec, dst: KvSpec) -> None:
    """Raise IncompatibleKv unless the route transfers of a complete `exp` wrote each of the
    destination's heads exactly once (no-op for a reservation without routes)."""
    if exp.route_streams:
        heads = sorted(exp.route_streams)
    elif exp.num_routes:
        heads = sorted((r.head_start, r.head_end) for r in exp.reports)
    else:
        return
    lo, hi = dst.head_range
    at = lo
    for start, end in heads:
        if start != at:
            break
        at = end
    else:
        if at == hi:
            return
    raise IncompatibleKv(f"the route transfers wrote heads {heads}, not each of this cache's "
                         f"[{lo}, {hi}) once", src, dst)


def count_part(exp: Expectation, header: TransferHeader) -> None:
    """Book one admitted transfer of `exp` if it is a part (see the module docstring)."""
    if ROUTES_KEY in header.meta and PART_KEY in header.meta:
        _count_routed_part(exp, header)
        return
    if exp.route_streams:
        raise MalformedHeader("a transfer that is not a streamed route after streamed routes")
    count_route(exp, header)
    marker = header.meta.get(PART_KEY)
    if marker is None:
        if exp.num_parts:
            raise MalformedHeader("a transfer without a part marker after streamed parts")
        return
    index, is_last = _marker(marker)
    if index != exp.num_parts or index >= MAX_PARTS:
        raise MalformedHeader(f"part {index} of request {exp.request_id} arrived; expected part "
                              f"{exp.num_parts} (parts go in order, at most {MAX_PARTS})")
    if not exp.part_tokens:
        exp.part_tokens = [0] * header.spec.num_layers
    _cover(exp.part_tokens, exp.request_id, header, index, is_last)
    exp.num_parts += 1
    exp.num_transfers = index + 1 if is_last else index + 2


def _marker(marker: object) -> tuple[int, bool]:
    if (not isinstance(marker, list) or len(marker) != 2
            or not all(type(x) is int for x in marker) or marker[1] not in (0, 1)):
        raise MalformedHeader(f"meta.{PART_KEY} must be [index, is_last (0 or 1)]")
    return marker[0], bool(marker[1])


def _count_routed_part(exp: Expectation, header: TransferHeader) -> None:
    """Book one part of a streamed TP route (see the module docstring)."""
    n, rid = header.meta[ROUTES_KEY], exp.request_id
    if type(n) is not int or not 1 <= n <= MAX_ROUTES:
        raise MalformedHeader(f"meta.{ROUTES_KEY} must be an int in [1, {MAX_ROUTES}]")
    if exp.num_parts or exp.num_routes:
        raise MalformedHeader(f"a streamed route part of request {rid} after other transfers")
    if exp.route_streams and n != exp.num_route_streams:
        raise MalformedHeader(f"meta.{ROUTES_KEY} {n} disagrees with {exp.num_route_streams} "
                              f"announced for request {rid}")
    heads = (header.head_start, header.head_end)
    stream = exp.route_streams.get(heads)
    if stream is None:
        if len(exp.route_streams) >= n:
            raise MalformedHeader(f"more than {n} streamed routes for request {rid}: heads "
                                  f"{heads} after {sorted(exp.route_streams)}")
        stream = exp.route_streams[heads] = RouteStream(
            part_tokens=[0] * header.spec.num_layers)
    index, is_last = _marker(header.meta[PART_KEY])
    if stream.is_done or index != stream.num_parts or index >= MAX_PARTS:
        raise MalformedHeader(f"part {index} of heads {heads} of request {rid} arrived; "
                              f"expected part {stream.num_parts}"
                              f"{' (that route had ended)' if stream.is_done else ''}")
    _cover(stream.part_tokens, rid, header, index, is_last)
    stream.num_parts += 1
    stream.is_done = is_last
    exp.num_route_streams = n
    num_admitted = sum(s.num_parts for s in exp.route_streams.values())
    is_complete = len(exp.route_streams) == n and all(
        s.is_done for s in exp.route_streams.values())
    exp.num_transfers = num_admitted if is_complete else num_admitted + 1


def _cover(covered: list[int], rid: str, header: TransferHeader, index: int,
           is_last: bool) -> None:
    """Book part `index`'s tokens on its layers in `covered` (tokens per layer); raise
    MalformedHeader on a hole (see above)."""
    num_layers = header.spec.num_layers
    t0, t1, l0, l1 = header.token_start, header.token_end, header.layer_start, header.layer_end
    if len(covered) != num_layers or not 0 <= l0 < l1 <= num_layers:
        raise MalformedHeader(f"part {index} of request {rid}: layers [{l0}, {l1}) of a "
                              f"{num_layers}-layer spec, after parts of {len(covered)} layers")
    holes = [layer for layer in range(l0, l1) if t0 > covered[layer]]
    if holes:
        raise MalformedHeader(f"part {index} of request {rid} carries tokens [{t0}, {t1}) of "
                              f"layers [{l0}, {l1}), but layer {holes[0]} has tokens only up to "
                              f"{covered[holes[0]]}: a part is missing")
    for layer in range(l0, l1):
        covered[layer] = max(covered[layer], t1)
    short = [layer for layer, n in enumerate(covered) if n != t1] if is_last else []
    if short:
        raise MalformedHeader(f"the last part ({index}) of request {rid} ends at token {t1}, but "
                              f"{len(short)} layer(s) from layer {short[0]} end at token "
                              f"{covered[short[0]]}: parts are missing (every layer needs every "
                              f"token)")
