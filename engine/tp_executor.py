"""Tensor-parallel ranks of one engine: rank 0 (the caller's process) starts the others.

`TpExecutor.start(config)` serves a TCP store on 127.0.0.1 (a free port), starts one process
per follower rank through its launcher (engine/tp_launch.py; by default multiprocessing "spawn";
each gets its `EngineConfig.for_rank`: on CUDA its own GPU) and joins the process group with
them (engine/tp_group.py). Every rank then loads only its shard (`load_rank`) and all agree on
the number of KV blocks (the smallest any rank can hold). Followers run `serve_steps`: wait for
rank 0's next command, run their share of the step, repeat until STOP.

Contract: rank 0 owns the followers. `shutdown()` stops them (STOP, then terminate after a
grace period, then kill) and is safe after a failure. A follower that dies makes rank 0's next
collective raise `TpError`; rank 0 dying makes the followers' wait fail (their gloo sockets
close) and they exit. Nothing waits on a dead rank past `--distributed-timeout`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import sys
import time
from dataclasses import replace
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from engine.checkpoint import Checkpoint, load_checkpoint
from engine.config import EngineConfig
from engine.memory_plan import KvPlan, plan_kv_cache
from engine.model_runner import ModelRunner
from engine.step_inputs import (
    HEADER_LEN,
    Command,
    payload_len,
    service_bytes,
    service_message,
    stop_header,
    unpack_step,
)
from engine.tp_group import HOST, TpError, TpGroup
from engine.tp_launch import RankLauncher, RankProcess
from engine.tp_service import INFO_KEY, RankHandler, RankService

log = logging.getLogger(__name__)
STOP_GRACE_S = 10.0
STARTED_KEY = "pdserve/started/"


def load_rank(config: EngineConfig, tp: TpGroup) -> tuple[Checkpoint, KvPlan]:
    """This rank's shard of the checkpoint and its cache plan, with the block count all ranks
    agree on."""
    checkpoint = load_checkpoint(config.model, config.torch_dtype, config.load_format,
                                 tp.rank, tp.size)
    plan = plan_kv_cache(checkpoint.config, config, checkpoint.identity, tp_rank=tp.rank)
    return checkpoint, replace(plan, num_blocks=tp.min_int(plan.num_blocks))


def share_cpu_threads(size: int, num_threads: int = 0) -> None:
    """On CPU, each of `size` ranks takes its share of the cores (no oversubscription), or
    `num_threads` when its launcher reserved that many for it."""
    torch.set_num_threads(num_threads or max(1, (os.cpu_count() or 1) // size))


class SpawnLauncher:
    """Follower ranks as local processes (multiprocessing "spawn"), children of rank 0."""

    num_threads = 0

    def start(self, config: EngineConfig, rank: int, size: int, port: int,
              service: RankService | None) -> RankProcess:
        proc = mp.get_context("spawn").Process(
            target=follower_main, name=f"pdserve-tp-rank{rank}", daemon=True,
            args=(config, rank, size, port, service))
        proc.start()
        return proc


class TpExecutor:
    def __init__(self, tp: TpGroup, procs: list[RankProcess],
                 store: dist.Store | None = None, timeout_s: float = 60.0) -> None:
        self.tp, self.procs, self.store, self.timeout_s = tp, procs, store, timeout_s
        self.num_threads = torch.get_num_threads()  # restored at shutdown

    @classmethod
    def start(cls, config: EngineConfig, service: RankService | None = None,
              launcher: RankLauncher | None = None) -> TpExecutor:
        """Start the follower ranks (by `launcher`, default: local processes); each runs
        `service` (engine/tp_service.py) if given."""
        size, timeout = config.tensor_parallel_size, config.distributed_timeout
        launcher = launcher or SpawnLauncher()
        store = dist.TCPStore(HOST, 0, size, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=timeout))
        executor = cls(TpGroup.single(), [], store, timeout)
        try:
            for rank in range(1, size):
                executor.procs.append(launcher.start(config.for_rank(rank), rank, size,
                                                     store.port, service))
        except BaseException:
            executor.shutdown()
            raise
        log.info("tensor parallel: started ranks 1..%d (pids %s: %s), store on %s:%d",
                 size - 1, [p.pid for p in executor.procs], [p.name for p in executor.procs],
                 HOST, store.port)
        if config.torch_device.type == "cpu":
            share_cpu_threads(size, launcher.num_threads)
        try:
            executor.wait_started(store, timeout)
            executor.tp = TpGroup.join(0, size, store.port, config.torch_device, timeout,
                                       store=store)
        except BaseException:
            executor.shutdown()
            raise
        return executor

    def wait_started(self, store: dist.Store, timeout_s: float,
                     key: str = STARTED_KEY) -> None:
        """Until every follower has set `key`<rank> in the store; a follower that dies first
        (bad spawn, import error) fails at once with its exit code instead of after the
        timeout."""
        deadline = time.monotonic() + timeout_s
        keys = [f"{key}{rank}" for rank in range(1, len(self.procs) + 1)]
        while not store.check(keys):
            dead = [(p.name, p.exitcode) for p in self.procs if not p.is_alive()]
            if dead:
                raise TpError(f"tensor-parallel ranks exited while starting (name, exit code): "
                              f"{dead}; see their log above")
            if time.monotonic() > deadline:
                raise TpError(f"tensor-parallel ranks did not start within "
                              f"--distributed-timeout {timeout_s:g} s")
            time.sleep(0.05)

    def rank_infos(self) -> list[bytes]:
        """Each follower's service `info`, rank 1 first (waits for them to publish it)."""
        assert self.store is not None
        self.wait_started(self.store, self.timeout_s, INFO_KEY)
        return [self.store.get(f"{INFO_KEY}{rank}") for rank in range(1, len(self.procs) + 1)]

    def check_alive(self) -> None:
        """Raise TpError if a follower process has exited (an idle engine runs no collective
        that would notice)."""
        dead = [(p.name, p.exitcode) for p in self.procs if not p.is_alive()]
        if dead:
            self.tp.is_broken = True
            raise TpError(f"tensor-parallel ranks exited (name, exit code): {dead}")

    def tell_ranks(self, data: bytes) -> None:
        """Send `data` to every follower's service handler (they handle it in order, between
        steps). Raises TpError when a follower is gone."""
        for array in service_message(data):
            self.tp.broadcast_host(array)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def shutdown(self) -> None:
        """Stop the followers and leave the group (idempotent; safe after a failure)."""
        if not self.tp.is_single and not self.tp.is_broken:
            with contextlib.suppress(TpError):
                self.tp.broadcast_host(stop_header())
        for proc in self.procs:
            if self.tp.is_broken or self.tp.is_single:  # no STOP was sent: do not wait for one
                proc.terminate()
            proc.join(STOP_GRACE_S)
            if proc.is_alive():
                proc.terminate()
                proc.join(STOP_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
            with contextlib.suppress(Exception):
                proc.close()
        self.procs = []
        self.tp.destroy()
        torch.set_num_threads(self.num_threads)


def serve_steps(runner: ModelRunner, tp: TpGroup, handler: RankHandler | None = None) -> None:
    """A follower's loop: run rank 0's commands until STOP. Raises TpError when rank 0 dies."""
    header = np.zeros(HEADER_LEN, dtype=np.int64)
    while True:
        tp.broadcast_host(header)  # receive: waits while the engine is idle
        command = Command(int(header[0]))
        if command is Command.STOP:
            return
        payload = np.empty(payload_len(header), dtype=np.int64)
        tp.broadcast_host(payload)
        if command is Command.STEP:
            runner.run_step(unpack_step(header, payload))
        elif command is Command.SERVICE:
            if handler is not None:
                handler.handle(service_bytes(header, payload))
        else:
            runner.copy_local_blocks([(int(a), int(b)) for a, b in payload.reshape(-1, 2)])


def follower_main(config: EngineConfig, rank: int, size: int, port: int,
                  service: RankService | None = None, num_threads: int = 0) -> None:
    """Entry point of follower rank `rank` (a spawned process, or a launcher's: `num_threads`
    torch threads, 0 = its share of the node's cores). Exits 1 (SystemExit) when the group
    fails."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s tp-rank{rank} %(name)s: %(message)s")
    device = config.torch_device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        share_cpu_threads(size, num_threads)
    tp = TpGroup.single()
    handler: RankHandler | None = None
    try:
        store = dist.TCPStore(HOST, port, size, is_master=False,
                              timeout=timedelta(seconds=config.distributed_timeout))
        store.set(f"{STARTED_KEY}{rank}", "1")
        tp = TpGroup.join(rank, size, port, device, config.distributed_timeout, store=store)
        checkpoint, plan = load_rank(config, tp)
        runner = ModelRunner(checkpoint.config, checkpoint.weights, plan, config.torch_dtype,
                             device, tp=tp)
        del checkpoint
        if service is not None:
            handler = service.start(runner, tp)
            store.set(f"{INFO_KEY}{rank}", handler.info)
        serve_steps(runner, tp, handler)
    except TpError as e:
        log.error("%s; this rank exits", e)
        sys.exit(1)
    finally:
        if handler is not None:
            handler.close()
        tp.destroy()
