"""One prefill rank's share of a request's KV: its TP routes, queued on its outbox, and a tally.

Between a prefill worker of TP size a and a decode worker of TP size b, each prefill rank sends
the heads it holds to the decode ranks that hold them (transfer/convert/tp_routes.py): one
transfer per route, on the rank's own `KvOutbox` lanes (one per decode rank address), each with
`head_range` set and `meta["kv_routes"]` telling the decode rank how many route transfers it
gets for the request (transfer/endpoint/parts.py). Rank 0 and the follower ranks
(prefill/tp_rank.py) run the same code; `RouteTally` counts how this rank's sends ended, and
`poll_column` writes that into a poll answer (protocol/tp_ranks.py POLL_ROWS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.kv_spec import KvSpec
from prefill.kv_outbox import KvOutbox, TransferOutcome
from protocol.errors import ErrorCode
from transfer.convert.tp_routes import rank_spec, sends_of
from transfer.endpoint.parts import routes_meta


@dataclass
class RouteTally:
    """How this rank's route sends of one request ended so far."""

    num_left: int
    num_bytes: int = 0
    seconds: float = 0.0
    error: str | None = None
    code: ErrorCode | None = None

    @property
    def is_over(self) -> bool:
        return self.num_left == 0

    def add(self, outcome: TransferOutcome) -> None:
        self.num_left -= 1
        self.num_bytes += outcome.num_bytes
        self.seconds = max(self.seconds, outcome.seconds)
        if outcome.error is not None and (self.error is None or not outcome.retryable):
            self.error, self.code = outcome.error, outcome.code

    def poll_column(self, rows: np.ndarray, column: int) -> None:
        if not self.is_over:
            return
        if self.error is None:
            rows[0, column] = 1
        else:
            rows[1, column] = 1
            rows[2, column] = int(not (self.code is not None and self.code.retryable))
        rows[3, column] = self.num_bytes


def queue_routes(outbox: KvOutbox, rank: int, request_id: str, dest_spec: KvSpec,
                 addresses: list[str], block_table: list[int], num_tokens: int,
                 meta: dict[str, Any], kv_token: str) -> RouteTally:
    """Queue rank `rank`'s routes of a request (its cache is `outbox.cache`) to the decode
    ranks at `addresses` (rank 0 first; `dest_spec` is rank 0's). Raises IncompatibleKv
    before queueing anything when the two workers do not hold the same heads; a lane refused
    later (TooManyPeers) counts as that route's failure."""
    sends = sends_of(outbox.cache.spec, dest_spec, rank)
    if any(route.dst_rank >= len(addresses) for route, _ in sends):
        raise ValueError(f"the decode worker has {dest_spec.tp_size} TP ranks but "
                         f"{len(addresses)} KV addresses")
    tally = RouteTally(len(sends))
    for route, num_routes in sends:
        try:
            outbox.send(request_id, addresses[route.dst_rank], block_table, num_tokens,
                        rank_spec(dest_spec, route.dst_rank), {**meta, **routes_meta(num_routes)},
                        kv_token, head_range=route.heads)
        except Exception as e:
            tally.add(TransferOutcome.failed(request_id, e))
    return tally
