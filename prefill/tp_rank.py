"""A prefill worker's follower TP rank: sends its own heads of each prefilled prompt.

`PrefillRankService` is what the prefill worker hands the engine (engine/tp_service.py); each
follower rank starts it over its own cache shard: a `KvOutbox` (background sender threads, one
lane per decode rank address), so the rank keeps running model steps while its KV is on the
wire. Rank 0 (prefill/tp_outbox.py) drives it with protocol/tp_ranks.py messages:
`KvSend` (queue this rank's routes of a prefilled request: prefill/tp_sends.py) and
`RankPoll` (answer how each slot's sends ended here; drop the slots that ended on every rank);
with `--kv-streaming layerwise`, `StreamStep` (the next step's streaming chunks: this rank's
own `LayerStreamer` hooks its layers and streams its heads of them) and `StreamEnd`.
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
from prefill.layer_stream import Chunk, LayerStreamer, StreamDest
from prefill.tp_sends import RouteTally, queue_routes
from protocol.auth import ClusterAuth
from protocol.tp_ranks import TP_RANKS, KvSend, RankPoll, StreamEnd, StreamStep
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
        self.stream = LayerStreamer(runner, self.outbox, service.kv.kv_stream_groups, tp.rank,
                                    tp.size) if service.kv.kv_streaming == "layerwise" else None

    def _refused(self, plane: str, reason: str) -> None:
        log.warning("tp rank %d refused a %s message or connection: %s", self.tp.rank, plane,
                    reason)

    def handle(self, data: bytes) -> None:
        msg = TP_RANKS.decode(data)
        if isinstance(msg, KvSend):
            self._send(msg)
        elif isinstance(msg, RankPoll):
            self._poll(msg.slots)
        elif isinstance(msg, StreamStep | StreamEnd) and self.stream is not None:
            self.stream.end_step()  # the previous step's groups whose hooks did not run
            if isinstance(msg, StreamStep):
                self._stream_step(msg)
            elif msg.is_cancel:
                self.stream.cancel(msg.request_id)
            else:
                self.stream.finish(msg.request_id, {})  # the first token is rank 0's to send

    def _stream_step(self, msg: StreamStep) -> None:
        """The next step's streaming chunks: this rank's hooks send its heads of them."""
        assert self.stream is not None
        try:
            self.stream.begin_chunks([Chunk(StreamDest(c.request_id, c.kv_spec,
                                                       list(c.kv_addresses), c.kv_token),
                                            list(c.block_ids), c.token_start, c.token_end,
                                            c.is_final) for c in msg.chunks])
        except Exception as e:  # rank 0 computed the same routes: it fails the same way
            log.error("tp rank %d: cannot stream this step's KV: %s", self.tp.rank, e)
            return
        slots = {c.request_id: c.slot for c in msg.chunks}
        for rid in self.stream.new_requests:
            if slots[rid]:
                self.tallies[slots[rid]] = RouteTally(self.stream.targets(rid))
                self.slot_of[rid] = slots[rid]

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
        if self.stream is not None:
            self.stream.close()
        self.outbox.close()
        self.auth.close()
        self.ctx.term()
