"""One prefill or decode worker as a Ray actor: the actor process *is* the worker process.

The constructor starts the same worker as `python -m prefill|decode` (build_worker, then
`worker.run()`) on a thread, bound to this node's IP with free ports, so it says Hello to the
proxy with addresses other nodes can reach. Because Ray re-runs the constructor when it
restarts a dead actor (`max_restarts`), a restarted worker says Hello again with the same
worker id and the proxy puts it back into routing.

A tensor-parallel worker's actor is its rank 0: its engine starts the other ranks as actors of
their own in the worker's placement group (`ranks`, deploy/ray_ranks.py).

Crash-only: if the worker loop raises (a rank died, say), the process stops its rank actors and
exits so Ray restarts it; a worker that cannot even start on its first try reports why through
`ready()` and the launcher gives up.
Ownership: the launcher (deploy/ray_launcher.py) creates and kills these actors; the proxy talks
to the worker only over its ZMQ sockets, never through Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import warnings
from typing import Any

from decode.worker import DecodeWorker
from deploy.ray_env import setup_actor_logging, where_am_i
from deploy.ray_ranks import RayRankLauncher
from engine.config import EngineConfig
from prefill.worker import PrefillWorker
from worker.base import WorkerBase
from worker.config import WorkerConfig
from worker.main import build_worker

log = logging.getLogger("pdserve.ray.worker")

WORKER_CLASSES = {"prefill": PrefillWorker, "decode": DecodeWorker}


class WorkerActor:
    def __init__(self, role: str, worker_config: WorkerConfig, engine_config: EngineConfig,
                 num_threads: int, log_level: str = "INFO",
                 ranks: RayRankLauncher | None = None) -> None:
        """`engine_config` has the GPU profile (if any) applied and the device set by the
        launcher; `ranks` starts a tensor-parallel engine's follower ranks."""
        import ray

        self.role, self.worker_id = role, worker_config.worker_id
        setup_actor_logging(log_level, f"{role} {self.worker_id}")
        with warnings.catch_warnings():  # Ray's own property calls a deprecated one
            warnings.simplefilter("ignore")
            self.is_restart = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.where = {"worker_id": self.worker_id, "role": role, **where_am_i(),
                      "restarted": self.is_restart}
        self.config = dataclasses.replace(worker_config, host=self.where["node_ip"])
        if num_threads > 0:
            import torch
            torch.set_num_threads(num_threads)
        self.ranks = ranks
        self.worker: WorkerBase | None = None
        self.error: str | None = None
        self._built = threading.Event()
        threading.Thread(target=self._main, args=(engine_config,), name="worker-loop",
                         daemon=True).start()

    def __repr__(self) -> str:  # Ray prefixes this actor's log lines with it
        return f"{self.role} {self.worker_id}"

    def _main(self, engine_config: EngineConfig) -> None:
        try:
            worker = build_worker(WORKER_CLASSES[self.role], self.config, engine_config,
                                  self.ranks)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            self._built.set()
            log.error("cannot start: %s", self.error)
            if self.is_restart:  # it ran before: let Ray try again (up to --max-restarts)
                os._exit(1)
            return
        self.worker = worker
        self._built.set()
        try:
            worker.run()
        except BaseException:
            log.exception("worker loop crashed; exiting so that Ray restarts this actor")
            with contextlib.suppress(BaseException):
                worker.engine.close()  # its rank actors go first (Ray would end them anyway)
            os._exit(1)
        worker.close()

    def ready(self, timeout_s: float) -> dict[str, Any]:
        """Block until the engine is built; its placement, or RuntimeError saying why it failed."""
        if not self._built.wait(timeout_s):
            raise TimeoutError(f"{self.role} worker {self.worker_id} did not load in "
                               f"{timeout_s:.0f} s")
        if self.error:
            raise RuntimeError(f"{self.role} worker {self.worker_id} on node "
                               f"{self.where['node_ip']} cannot start: {self.error}")
        worker = self.worker
        return {**self.where, "rank_pids": worker.engine.rank_pids if worker else []}

    def info(self) -> dict[str, Any]:
        return {**self.where, "is_ready": self._built.is_set() and not self.error,
                "error": self.error,
                "nccl_env": {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}}

    def hello(self) -> Any:
        """This worker's Hello (an `ev.Hello`; a restarted proxy registers the running workers
        with it), or None until the engine is built."""
        worker = self.worker
        return worker.hello() if worker is not None and not self.error else None

    def stop(self) -> None:
        """Leave the worker loop (the proxy's Shutdown message does the same)."""
        if self.worker is not None:
            self.worker.stopping = True
