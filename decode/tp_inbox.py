"""TpKvInbox: a tensor-parallel decode worker's KV endpoint, as one `KvInbox` to the worker.

Every rank receives its own heads of a reservation (rank 0 here, the followers in
decode/tp_rank.py), into the same block ids: rank 0's scheduler owns the block table, and the
follower ranks' caches mirror its blocks. This wrapper gives decode/worker.py the `KvInbox`
interface over all of them:
- `expect` expects on rank 0's receiver, tells the followers (`KvExpect`, with a slot number)
  and waits until each has expected it, so no rank's KV can arrive before its reservation;
- `receive` asks the followers how their slots went (`RankPoll`: one broadcast, one sum over
  the group); a request arrives once every rank has its heads (the first token is rank 0's:
  it comes in the meta of prefill rank 0's transfer), and fails as soon as one rank's transfer
  failed: every rank withdraws its expectation in the same poll, so no rank writes those
  blocks afterwards, and the failure is retryable unless one rank's was not;
- `forget` withdraws the expectation on every rank.
`addresses` lists every rank's KV receiver, rank 0 first (the worker's Hello carries them; the
proxy hands them to the prefill worker with each request).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import zmq

from decode.kv_inbox import KvArrival, KvInbox
from decode.tp_rank import slot_status
from protocol.tp_ranks import KvExpect, KvForget
from worker.tp_link import RankLink, poll_rows


class TpKvInbox:
    def __init__(self, local: KvInbox, link: RankLink) -> None:
        self.local, self.link = local, link
        self.address = local.address
        self.addresses = [local.address, *link.infos()]
        self.slots: dict[str, int] = {}  # request id -> slot, while expected
        self.mine: dict[str, KvArrival] = {}  # rank 0's own arrivals, until every rank's

    def sync_poller(self, poller: zmq.Poller) -> None:
        self.local.sync_poller(poller)

    def expect(self, request_id: str, block_ids: list[int], token: str = "") -> None:
        self.local.expect(request_id, block_ids, token)
        slot = self.link.new_slot()
        self.slots[request_id] = slot
        self.link.tell(KvExpect(slot, request_id, list(block_ids), token))
        self.link.sync()

    def forget(self, request_id: str) -> None:
        self.local.forget(request_id)
        self.mine.pop(request_id, None)
        slot = self.slots.pop(request_id, None)
        if slot is not None:
            self.link.tell(KvForget(slot))

    def receive(self) -> list[KvArrival]:
        for arrival in self.local.receive():
            if arrival.request_id in self.slots:
                self.mine[arrival.request_id] = arrival
        if not self.slots:
            return []
        pending = list(self.slots.items())
        rows = poll_rows(len(pending))
        for i, (rid, _) in enumerate(pending):
            slot_status(rows, i, self.mine.get(rid))
        total = self.link.poll([slot for _, slot in pending], rows)
        return [a for i, (rid, _) in enumerate(pending)
                if (a := self._outcome(rid, total[:, i])) is not None]

    def _outcome(self, request_id: str, column: np.ndarray) -> KvArrival | None:
        num_done, num_failed, num_fatal = (int(x) for x in column[:3])
        if num_failed == 0 and num_done < self.link.size:
            return None
        del self.slots[request_id]
        mine = self.mine.pop(request_id, None)
        if num_failed == 0:
            assert mine is not None
            return mine
        if mine is None or mine.error is None:
            self.local.forget(request_id)  # its other ranks' transfers failed: stop writing
        if mine is not None and mine.error is not None:
            return dataclasses.replace(mine, retryable=mine.retryable and num_fatal == 0)
        return KvArrival(request_id, error=f"the KV transfer to {num_failed} tensor-parallel "
                         f"rank(s) of this decode worker failed (their log says why)",
                         retryable=num_fatal == 0)

    def close(self) -> None:
        self.local.close()
