"""RoutedOutbox: rank 0's KV sends when either side of a transfer is tensor parallel.

Wraps the prefill worker's `KvOutbox`. A request whose prefill worker or decode worker has
several TP ranks is sent over its routes (transfer/convert/tp_routes.py): rank 0 queues its
own routes here (prefill/tp_sends.py) and tells the follower ranks to queue theirs (`KvSend`,
prefill/tp_rank.py) — each rank sends its heads straight to the decode ranks that hold them,
nothing is gathered through rank 0. The first token travels in the meta of rank 0's transfers.

`poll_results` gives the worker one `TransferOutcome` per request, once every rank's sends
ended (rank 0's tally, and a `RankPoll` sum over the group): only then may the worker free the
blocks, which the follower ranks read until their sends end. The outcome fails if any rank's
send failed (retryable unless one failure was not); its bytes are every rank's. Outcomes of
sends that are not routed (one rank each side) pass through unchanged; layer-wise streamed
routes (`stream_slot`) combine like whole ones, one outcome per route and rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.kv_spec import KvSpec
from prefill.kv_outbox import KvOutbox, TransferOutcome
from prefill.tp_sends import RouteTally, queue_routes
from protocol.errors import ErrorCode
from protocol.tp_ranks import KvSend
from worker.tp_link import RankLink, poll_rows


@dataclass
class _Routed:
    tally: RouteTally
    slot: int = 0  # 0: no follower ranks
    is_stream: bool = False  # layer-wise parts (prefill/layer_stream.py), not a whole send


class RoutedOutbox:
    def __init__(self, outbox: KvOutbox, link: RankLink | None) -> None:
        self.outbox, self.link = outbox, link
        self.pending: dict[str, _Routed] = {}

    def is_routed(self, dest_spec: KvSpec) -> bool:
        """Whether a send to a cache of `dest_spec` goes over TP routes."""
        return self.link is not None or dest_spec.tp_size > 1

    def send(self, request_id: str, dest_spec: KvSpec, addresses: list[str],
             block_table: list[int], num_tokens: int, meta: dict[str, Any],
             kv_token: str) -> None:
        """Queue every rank's routes of a prefilled request (see the module docstring).
        Raises (nothing queued) when the two workers do not hold the same heads."""
        tally = queue_routes(self.outbox, 0, request_id, dest_spec, addresses, block_table,
                             num_tokens, meta, kv_token)
        routed = _Routed(tally)
        if self.link is not None:
            routed.slot = self.link.new_slot()
            self.link.tell(KvSend(routed.slot, request_id, list(block_table), num_tokens,
                                  dest_spec, list(addresses), kv_token))
        self.pending[request_id] = routed

    def stream_slot(self, request_id: str, num_targets: int) -> int:
        """A layer-wise streamed request over TP routes (prefill/layer_stream.py): its slot
        (0: no followers), registered on its first chunk with rank 0's `num_targets` routes;
        its outcome then comes as a routed send's."""
        routed = self.pending.get(request_id)
        if routed is None:
            routed = self.pending[request_id] = _Routed(RouteTally(num_targets), is_stream=True)
            if self.link is not None:
                routed.slot = self.link.new_slot()
        return routed.slot

    def forget(self, request_id: str) -> None:
        """A streamed request that queued nothing (cancelled before its first part); a whole
        send in flight is kept (its outcome frees the blocks)."""
        routed = self.pending.get(request_id)
        if routed is not None and routed.is_stream:
            del self.pending[request_id]

    def poll_results(self) -> list[TransferOutcome]:
        out = []
        for outcome in self.outbox.poll_results():
            routed = self.pending.get(outcome.request_id)
            if routed is None:
                out.append(outcome)
            else:
                routed.tally.add(outcome)
        alone = [rid for rid, r in self.pending.items() if not r.slot and r.tally.is_over]
        out.extend(self._ended(rid, None) for rid in alone)
        tp = [(rid, r) for rid, r in self.pending.items() if r.slot]
        if tp and self.link is not None:
            rows = poll_rows(len(tp))
            for i, (_, routed) in enumerate(tp):
                routed.tally.poll_column(rows, i)
            total = self.link.poll([r.slot for _, r in tp], rows)
            out.extend(self._ended(rid, total[:, i]) for i, (rid, _) in enumerate(tp)
                       if total[0, i] + total[1, i] == self.link.size)
        return out

    def _ended(self, request_id: str, column: np.ndarray | None) -> TransferOutcome:
        """The request's outcome: from rank 0's tally alone (`column` None: no followers), or
        from the poll's sum over the group."""
        tally = self.pending.pop(request_id).tally
        if column is None:
            rows = poll_rows(1)
            tally.poll_column(rows, 0)
            column = rows[:, 0]
        num_failed, num_fatal, num_bytes = (int(x) for x in column[1:4])
        if num_failed == 0:
            return TransferOutcome(request_id, num_bytes, tally.seconds)
        error = tally.error or (f"the KV send of {num_failed} tensor-parallel rank(s) of this "
                                f"prefill worker failed (their log says why)")
        return TransferOutcome(request_id, num_bytes, tally.seconds, error,
                               ErrorCode.of_transfer(num_fatal == 0))
