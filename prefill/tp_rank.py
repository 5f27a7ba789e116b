"""A prefill worker's follower TP rank: sends its own heads of each prefilled prompt.

`PrefillRankService` is what the prefill worker hands the engine (engine/tp_service.py); each
follower rank starts it over its own cache shard: a `KvOutbox` (background sender threads, one
lane per decode rank address), so the rank keeps running model steps while its KV is on the
wire. Rank 0 (prefill/tp_outbox.py) drives it with protocol/tp_ranks.py messages:
`KvSend` (queue this rank's routes of a prefilled request: prefill/tp_sends.py) and
`RankPoll` (answer how each slot's sends ended here; drop the slots that ended on every rank).
The blocks a `KvSend` names stay allocated until every rank's sends ended: rank 0 owns them and
frees them only then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import zmq

from engine.model_runner import ModelRunner
from engine.tp_group import TpGroup
from prefill.kv_outbox import KvOutbox, TransferOutcome
from prefill.tp_sends import RouteTally, queue_routes
from protocol.auth import ClusterAuth
from protocol.tp_ranks import TP_RANKS, KvSend, RankPoll
from transfer.convert.cache import PagedKvCache
from worker.config import KvTransportConfig
from worker.tp_link import poll_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefillRankService:
    kv: KvTransportConfig
    cluster_secret: bytes | None = None

    def start(self, runner: ModelRunner, tp: TpGroup) -> PrefillRankHandler:
        return PrefillRankHandler(self, runner, tp)


class PrefillRankHandler:
    info = b""  # prefill ranks bind nothing: they connect to the decode ranks

    def __init__(self, service: PrefillRankService, runner: ModelRunner, tp: TpGroup) -> None:
        self.tp = tp
        self.ctx = zmq.Context()
        self.auth = ClusterAuth(self.ctx, service.cluster_secret, self._refused)
        cache = PagedKvCache(runner.plan.spec, runner.kv_caches)
        self.outbox = KvOutbox(self.ctx, cache, service.kv, security=self.auth,
                               on_refused=self._refused)
        self.tallies: dict[int, RouteTally] = {}  # by slot
        self.slot_of: dict[str, int] = {}  # request id -> slot

    def _refused(self, plane: str, reason: str) -> None:
        log.warning("tp rank %d refused a %s message or connection: %s", self.tp.rank, plane,
                    reason)

    def handle(self, data: bytes) -> None:
        msg = TP_RANKS.decode(data)
        if isinstance(msg, KvSend):
            self._send(msg)
        elif isinstance(msg, RankPoll):
            self._poll(msg.slots)

    def _send(self, msg: KvSend) -> None:
        try:
            tally = queue_routes(self.outbox, self.tp.rank, msg.request_id, msg.kv_spec,
                                 list(msg.kv_addresses), list(msg.block_ids), msg.num_tokens,
                                 {}, msg.kv_token)
        except Exception as e:  # rank 0 computed the same routes: it fails the same way
            tally = RouteTally(1)
            tally.add(TransferOutcome.failed(msg.request_id, e))
        self.tallies[msg.slot] = tally
        self.slot_of[msg.request_id] = msg.slot

    def _poll(self, slots: list[int]) -> None:
        for outcome in self.outbox.poll_results():
            slot = self.slot_of.get(outcome.request_id)
            if slot is not None and slot in self.tallies:
                self.tallies[slot].add(outcome)
            if outcome.error is not None:
                log.warning("tp rank %d: KV send of %s failed: %s", self.tp.rank,
                            outcome.request_id, outcome.error)
        rows = poll_rows(len(slots))
        for i, slot in enumerate(slots):
            tally = self.tallies.get(slot)
            if tally is not None:
                tally.poll_column(rows, i)
        total = self.tp.all_reduce_host(rows)
        for i, slot in enumerate(slots):
            if total[0, i] + total[1, i] == self.tp.size and slot in self.tallies:
                del self.tallies[slot]
                self.slot_of = {r: s for r, s in self.slot_of.items() if s != slot}

    def close(self) -> None:
        self.outbox.close()
        self.auth.close()
        self.ctx.term()
