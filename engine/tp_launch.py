"""RankLauncher: how a tensor-parallel engine's follower ranks come to run.

`TpExecutor.start` (engine/tp_executor.py) serves the group's TCP store on 127.0.0.1 and asks
its launcher to start each follower rank r (1..N-1) with `follower_main(config, r, N, port,
service, num_threads)`; the launcher returns a `RankProcess`, the handle rank 0 watches and stops
it by. The default launcher spawns local processes (`SpawnLauncher`); deploy/ray_ranks.py starts
one Ray actor per rank in the worker's placement group instead. Whatever starts a rank must put
it on rank 0's node: the store and the gloo group are reached on 127.0.0.1.

Contract: `start` returns at once (the rank joins the group on its own); the executor owns the
handle from then on and ends it with `close()` once it has stopped (STOP, terminate or kill).
"""

from __future__ import annotations

from typing import Protocol

from engine.config import EngineConfig
from engine.tp_service import RankService


class RankProcess(Protocol):
    """One follower rank as rank 0 sees it (a `multiprocessing.Process` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def exitcode(self) -> int | None:
        """None while the rank runs; its exit status once it is gone."""

    def is_alive(self) -> bool: ...

    def join(self, timeout: float | None = None) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def close(self) -> None:
        """Release what the rank held (called once it has stopped)."""


class RankLauncher(Protocol):
    @property
    def num_threads(self) -> int:
        """torch CPU threads of each rank; 0: the node's cores shared among the ranks."""

    def start(self, config: EngineConfig, rank: int, size: int, port: int,
              service: RankService | None) -> RankProcess:
        """Start follower `rank` of `size`, joining the store on 127.0.0.1:`port`."""
