"""A decode worker's follower TP rank: its own KV receiver, for its heads of every reservation.

`DecodeRankService` is what the decode worker hands the engine (engine/tp_service.py); each
follower rank starts it over its own cache shard: a threaded `KvInbox` bound on the worker's
host (port 0), whose address rank 0 reports in the worker's Hello (`kv_rank_addresses`).
Prefill ranks send this rank's heads straight here (transfer/convert/tp_routes.py); the
receiver checks each header against this rank's spec (heads it does not hold: IncompatibleKv
naming both specs) and its reservation token.

Rank 0 (decode/tp_inbox.py) drives it with protocol/tp_ranks.py messages: `KvExpect` (expect,
then a sum over the group so rank 0 knows every rank expects before it says Reserved),
`KvForget`, and `RankPoll` (answer whether each slot landed or failed here; drop the slots the
sum shows as over, withdrawing this rank's expectation of one that failed elsewhere).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import zmq

from decode.kv_inbox import KvArrival, KvInbox
from engine.model_runner import ModelRunner
from engine.tp_group import TpGroup
from protocol.auth import ClusterAuth
from protocol.tp_ranks import TP_RANKS, KvExpect, KvForget, RankPoll
from transfer.convert.cache import PagedKvCache
from worker.config import KvTransportConfig
from worker.tp_link import poll_rows, sync

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeRankService:
    host: str
    kv: KvTransportConfig
    cluster_secret: bytes | None = None

    def start(self, runner: ModelRunner, tp: TpGroup) -> DecodeRankHandler:
        return DecodeRankHandler(self, runner, tp)


def slot_status(rows: np.ndarray, column: int, arrival: KvArrival | None) -> None:
    """Fill one slot's column of a poll answer from this rank's arrival (None: pending)."""
    if arrival is None:
        return
    if arrival.error is None:
        rows[0, column] = 1
    else:
        rows[1, column] = 1
        rows[2, column] = int(not arrival.retryable)


class DecodeRankHandler:
    def __init__(self, service: DecodeRankService, runner: ModelRunner, tp: TpGroup) -> None:
        self.tp = tp
        self.ctx = zmq.Context()
        self.auth = ClusterAuth(self.ctx, service.cluster_secret, self._refused)
        cache = PagedKvCache(runner.plan.spec, runner.kv_caches)
        self.inbox = KvInbox(self.ctx, service.host, cache,
                             dataclasses.replace(service.kv, kv_receiver_thread=True),
                             security=self.auth, on_refused=self._refused,
                             has_first_token=False)
        self.slots: dict[int, str] = {}  # slot -> request id
        self.ended: dict[str, KvArrival] = {}  # by request id, until its slot is over
        log.info("tp rank %d: KV receiver on %s", tp.rank, self.inbox.address)

    @property
    def info(self) -> bytes:
        return self.inbox.address.encode()

    def _refused(self, plane: str, reason: str) -> None:
        log.warning("tp rank %d refused a %s message or connection: %s", self.tp.rank, plane,
                    reason)

    def handle(self, data: bytes) -> None:
        msg = TP_RANKS.decode(data)
        if isinstance(msg, KvExpect):
            self.slots[msg.slot] = msg.request_id
            try:
                self.inbox.expect(msg.request_id, list(msg.block_ids), msg.kv_token)
            except Exception as e:  # this rank cannot take it: the next poll fails it everywhere
                log.error("tp rank %d cannot expect %s: %s", self.tp.rank, msg.request_id, e)
                self.ended[msg.request_id] = KvArrival(msg.request_id, error=str(e))
            sync(self.tp)
        elif isinstance(msg, KvForget):
            rid = self.slots.pop(msg.slot, None)
            if rid is not None:
                self._forget(rid)
        elif isinstance(msg, RankPoll):
            self._poll(msg.slots)

    def _forget(self, request_id: str) -> None:
        if self.ended.pop(request_id, None) is None:
            self.inbox.forget(request_id)

    def _poll(self, slots: list[int]) -> None:
        live = set(self.slots.values())
        for arrival in self.inbox.receive():
            if arrival.request_id in live:
                self.ended[arrival.request_id] = arrival
            if arrival.error is not None:
                log.warning("tp rank %d: KV for %s failed: %s", self.tp.rank,
                            arrival.request_id, arrival.error)
        rows = poll_rows(len(slots))
        for i, slot in enumerate(slots):
            rid = self.slots.get(slot)
            slot_status(rows, i, self.ended.get(rid) if rid is not None else None)
        total = self.tp.all_reduce_host(rows)
        for i, slot in enumerate(slots):
            if total[1, i] > 0 or total[0, i] == self.tp.size:
                rid = self.slots.pop(slot, None)
                if rid is not None:
                    self._forget(rid)

    def close(self) -> None:
        self.inbox.close()
        self.auth.close()
        self.ctx.term()
