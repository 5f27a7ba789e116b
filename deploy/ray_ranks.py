"""One Ray actor per tensor-parallel rank: the launcher a worker actor hands its engine.

A tensor-parallel worker on Ray has its own placement group, one bundle per rank, STRICT_PACK
(deploy/ray_launcher.py); its worker actor is rank 0 in bundle 0. When rank 0's engine starts
its followers (engine/tp_executor.py), `RayRankLauncher.start` creates actor `<worker>-rank<r>`
in bundle r of the same group, which runs `follower_main` in its own process, as a spawned
rank would locally: it joins rank 0's TCP store and gloo/NCCL group on 127.0.0.1 (STRICT_PACK
put every bundle on rank 0's node), loads its shard and serves its steps and its KV endpoint.

Ownership and failure: rank 0's actor owns its rank actors (not detached), so Ray ends them
when rank 0 dies or restarts, and the new rank 0 starts fresh ones. Rank 0 watches each through
its `serve` call (`RayRankProcess`): a rank actor that dies (`ray.kill`, its process killed, its
node lost) makes the call fail, which the executor sees as a dead rank, as it would a local
process' exit; the group's collectives fail too (gloo sockets close, `--distributed-timeout`).
The worker then stops and is handled as a dead worker (Ray restarts it, `--max-restarts`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from deploy.ray_config import rank_actor_name
from deploy.ray_env import setup_actor_logging, where_am_i
from engine.config import ConfigError, EngineConfig
from engine.tp_executor import follower_main
from engine.tp_service import RankService

log = logging.getLogger("pdserve.ray.ranks")
NAME_FREE_TIMEOUT_S = 30.0
"""How long a restarted rank 0 waits for the name of its previous life's rank actor to free."""
KILLED = -9
"""`RayRankProcess.exitcode` of a rank whose actor died without returning (killed, lost)."""


class RankActor:
    """Follower rank `rank` of worker `worker_id`: `serve` runs it until STOP or a failure."""

    def __init__(self, worker_id: str, rank: int, log_level: str = "INFO") -> None:
        self.worker_id, self.rank = worker_id, rank
        setup_actor_logging(log_level, f"{worker_id} rank {rank}")
        self.where = {"worker_id": worker_id, "rank": rank, "role": "rank", **where_am_i()}

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return f"{self.worker_id} rank {self.rank}"

    def serve(self, config: EngineConfig, size: int, port: int, service: RankService | None,
              num_threads: int) -> int:
        """Run the rank; its exit status (0: STOP, 1: the group failed)."""
        try:
            follower_main(config, self.rank, size, port, service, num_threads)
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
        return 0

    def info(self) -> dict[str, Any]:
        return self.where


class RayRankProcess:
    """Rank 0's handle on one rank actor, shaped like a `multiprocessing.Process`
    (engine/tp_launch.py: RankProcess)."""

    def __init__(self, name: str, actor: Any, serving: Any) -> None:
        self.name, self.actor, self.serving = name, actor, serving
        self._exitcode: int | None = None
        self._pid: int | None = None

    def _poll(self, timeout: float | None) -> int | None:
        import ray

        if self._exitcode is None:
            done, _ = ray.wait([self.serving], timeout=timeout)
            if done:
                try:
                    self._exitcode = int(ray.get(done[0]))
                except ray.exceptions.RayActorError:
                    self._exitcode = KILLED
                except ray.exceptions.RayTaskError as e:
                    log.error("%s failed: %s", self.name, e.cause)
                    self._exitcode = 1
        return self._exitcode

    @property
    def exitcode(self) -> int | None:
        return self._poll(0)

    @property
    def pid(self) -> int | None:
        """The rank actor's process id (asked once; None while it cannot answer)."""
        import ray

        if self._pid is None and self.is_alive():
            with contextlib.suppress(Exception):
                self._pid = int(ray.get(self.actor.info.remote(), timeout=10)["pid"])
        return self._pid

    def is_alive(self) -> bool:
        return self._poll(0) is None

    def join(self, timeout: float | None = None) -> None:
        self._poll(timeout)

    def terminate(self) -> None:
        self.close()

    def kill(self) -> None:
        self.close()

    def close(self) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.kill(self.actor, no_restart=True)


@dataclass(frozen=True)
class RayRankLauncher:
    """Starts a worker's follower ranks as actors in bundles 1.. of the worker's placement group
    (the one its rank 0 actor runs in), each reserving `bundle`."""

    worker_id: str
    bundle: dict[str, float]
    num_threads: int = 0
    log_level: str = "INFO"
    runtime_env: dict[str, Any] | None = field(default=None, compare=False)

    def start(self, config: EngineConfig, rank: int, size: int, port: int,
              service: RankService | None) -> RayRankProcess:
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = get_current_placement_group()
        if pg is None or len(pg.bundle_specs) < size:
            raise ConfigError(f"{self.worker_id}: a tensor-parallel worker of {size} ranks must "
                              f"run in a placement group of {size} bundles (pdserve serve --ray "
                              f"creates it)")
        name = rank_actor_name(self.worker_id, rank)
        custom = {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU")}
        options = dict(
            name=name, max_restarts=0, max_concurrency=2, num_cpus=self.bundle.get("CPU", 0),
            num_gpus=self.bundle.get("GPU", 0), resources=custom, runtime_env=self.runtime_env,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=rank))
        actor = _create(ray, name, options, (self.worker_id, rank, self.log_level))
        serving = actor.serve.remote(config, size, port, service, self.num_threads)
        return RayRankProcess(name, actor, serving)


def _create(ray: Any, name: str, options: dict[str, Any], args: tuple) -> Any:
    """The rank actor `name`; a stale one of that name (rank 0's previous life) is removed
    first, and its name waited for."""
    deadline = time.monotonic() + NAME_FREE_TIMEOUT_S
    while True:
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(name), no_restart=True)
        try:
            return ray.remote(RankActor).options(**options).remote(*args)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
