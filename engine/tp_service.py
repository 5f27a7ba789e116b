"""RankService: what a worker runs on each tensor-parallel follower rank beside the model.

A tensor-parallel worker's KV cache is spread over its ranks, so each rank needs its own KV
endpoint (decode: a receiver for its heads; prefill: a sender of its heads). The engine knows
nothing of networks: the worker hands `LLMEngine.from_config` a picklable `RankService`, and
every follower rank (engine/tp_executor.py) calls `service.start(runner, tp)` once its shard is
loaded. The handler's `info` (e.g. its KV address) is published to rank 0 through the group's
TCP store (`TpExecutor.rank_infos`). From then on rank 0 sends the handler messages as opaque
bytes with the step broadcast (`TpExecutor.tell_ranks`, command SERVICE): the follower runs
`handle(data)` between model steps, in the order rank 0 sent them, and takes part in whatever
collective the message implies (rank 0 runs the same one right after sending it).

Contract: `handle` runs on the follower's main thread and must not block past its own
collectives (a long wait belongs on the handler's threads); `close` runs once when the
follower stops (STOP, or rank 0 gone).
"""

from __future__ import annotations

from typing import Protocol

from engine.model_runner import ModelRunner
from engine.tp_group import TpGroup

INFO_KEY = "pdserve/rank_info/"


class RankHandler(Protocol):
    @property
    def info(self) -> bytes:
        """Published once to rank 0 (e.g. this rank's KV address)."""

    def handle(self, data: bytes) -> None:
        """One message from rank 0 (see the module contract)."""

    def close(self) -> None:
        """The follower stops."""


class RankService(Protocol):
    def start(self, runner: ModelRunner, tp: TpGroup) -> RankHandler:
        """Start this follower rank's service over its runner's cache."""
