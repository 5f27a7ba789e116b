"""Layer-wise streaming on the receiver: one reservation filled by a sequence of part transfers.

A sender that streams a prompt's KV as it is computed (prefill/layer_stream.py) sends it as
several ordinary transfers — each a token range x layer range of the reservation, with its own
header, payload and ack — and marks each with `meta["kv_part"] = [index, is_last]`: index 0, 1,
2, ... in sending order, `is_last` 1 on the final one only. How many parts there will be is not
known when the reservation is made (chunk sizes follow the prefill batch), so the count is
learnt from the parts: until the last part is admitted the reservation wants one more transfer
than it has seen, then exactly as many as there were. A transfer without the key counts as one
of the reservation's `num_transfers`, as always.

`count_part` runs in the books' admission (under the receiver's lock) and raises MalformedHeader
for a part out of order or a bad marker; the books then fail the whole reservation.
"""

from __future__ import annotations

from transfer.endpoint.records import Expectation
from transfer.wire.errors import MalformedHeader
from transfer.wire.header import TransferHeader

PART_KEY = "kv_part"
MAX_PARTS = 1 << 16


def part_meta(index: int, is_last: bool) -> dict[str, list[int]]:
    """The meta entry a sender adds to part `index` of a streamed reservation."""
    return {PART_KEY: [index, int(is_last)]}


def count_part(exp: Expectation, header: TransferHeader) -> None:
    """Book one admitted transfer of `exp` if it is a part (see the module docstring)."""
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
    exp.num_parts += 1
    exp.num_transfers = index + 1 if is_last else index + 2
