"""RankLink: rank 0's line to the follower ranks' KV endpoints, and the followers' answers.

Rank 0 of a tensor-parallel worker tells its followers what to expect or send
(protocol/tp_ranks.py, over the step broadcast: engine/tp_service.py) and asks how their
transfers went with a `RankPoll`, answered by a sum over the group (`poll_answer`): every rank
then knows the same outcome of each slot, so all of them drop a finished slot together. All of
it runs on rank 0's worker thread, between model steps, like the steps themselves; a follower
that is gone makes these calls raise TpError (the worker then stops, as for a failed step).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from engine.llm_engine import LLMEngine
from engine.tp_executor import TpExecutor
from engine.tp_group import TpGroup
from protocol.tp_ranks import POLL_ROWS, TP_RANKS, RankPoll


def poll_rows(num_slots: int) -> np.ndarray:
    """A rank's empty answer to a poll of `num_slots` slots: [len(POLL_ROWS), num_slots]."""
    return np.zeros((len(POLL_ROWS), num_slots), dtype=np.int64)


def sync(tp: TpGroup) -> None:
    """Every rank of the group has got this far (a sum of nothing)."""
    tp.all_reduce_host(np.zeros(1, dtype=np.int64))


class RankLink:
    def __init__(self, executor: TpExecutor) -> None:
        self.executor = executor
        self.tp = executor.tp
        self._next_slot = 0

    @classmethod
    def of(cls, engine: LLMEngine) -> RankLink | None:
        """The link of a tensor-parallel engine (None without TP)."""
        return cls(engine.executor) if engine.executor is not None else None

    @property
    def size(self) -> int:
        return self.tp.size

    def infos(self) -> list[str]:
        """The followers' service infos (their KV addresses), rank 1 first."""
        return [info.decode() for info in self.executor.rank_infos()]

    def new_slot(self) -> int:
        self._next_slot += 1
        return self._next_slot

    def tell(self, msg: object) -> None:
        self.executor.tell_ranks(TP_RANKS.encode(msg))

    def sync(self) -> None:
        """Wait until every follower has handled what it was told (the message's sum)."""
        sync(self.tp)

    def poll(self, slots: Sequence[int], mine: np.ndarray) -> np.ndarray:
        """Ask every follower about `slots`; the sum of their answers and `mine` (rank 0's)."""
        self.tell(RankPoll(list(slots)))
        return self.tp.all_reduce_host(mine)
