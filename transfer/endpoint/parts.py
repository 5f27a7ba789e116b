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

`count_part` runs in the books' admission (under the receiver's lock) and raises MalformedHeader
for a part out of order, a bad marker or a hole; the books then fail the whole reservation.
"""

from __future__ import annotations

from engine.kv_spec import KvSpec
from transfer.endpoint.records import Expectation
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
    if not exp.num_routes:
        return
    heads = sorted((r.head_start, r.head_end) for r in exp.reports)
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
    count_route(exp, header)
    marker = header.meta.get(PART_KEY)
    if marker is None:
        if exp.num_parts:
            raise MalformedHeader("a transfer without a part marker after streamed parts")
        return
    if (not isinstance(marker, list) or len(marker) != 2
            or not all(type(x) is int for x in marker) or marker[1] not in (0, 1)):
        raise MalformedHeader(f"meta.{PART_KEY} must be [index, is_last (0 or 1)]")
    index, is_last = marker
    if index != exp.num_parts or index >= MAX_PARTS:
        raise MalformedHeader(f"part {index} of request {exp.request_id} arrived; expected part "
                              f"{exp.num_parts} (parts go in order, at most {MAX_PARTS})")
    _cover(exp, header, index, bool(is_last))
    exp.num_parts += 1
    exp.num_transfers = index + 1 if is_last else index + 2


def _cover(exp: Expectation, header: TransferHeader, index: int, is_last: bool) -> None:
    """Book part `index`'s tokens on its layers; raise MalformedHeader on a hole (see above)."""
    num_layers = header.spec.num_layers
    if not exp.part_tokens:
        exp.part_tokens = [0] * num_layers
    covered, rid = exp.part_tokens, exp.request_id
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
