"""Which worker gets a request: routing policies over worker snapshots.

Owns `WorkerState` (a snapshot of one worker as the proxy last saw it), the policies —
`RoundRobin`, `LeastLoaded` (decode: queue, KV usage, running requests) and `PrefixAware`
(prefill: requests sharing a prompt prefix go to the same worker, so its prefix cache hits) —
and `NoWorkerAvailable`. Policies only choose; they never talk to workers, and the snapshots
they get are the caller's (the proxy's worker monitor). Hashing is xxhash over token bytes,
never Python's `hash()`, so a choice is the same in every process and after a restart.
"""

from __future__ import annotations

import math
import struct
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import xxhash

from engine.block_hashes import block_hashes as engine_block_hashes

Role = Literal["prefill", "decode"]


class NoWorkerAvailable(RuntimeError):
    """No live worker of `role` (the proxy answers 503; /health reports it)."""

    def __init__(self, role: str, num_known: int) -> None:
        super().__init__(f"no live {role} worker ({num_known} known, none alive)")
        self.role = role
        self.num_known = num_known


@dataclass(frozen=True)
class WorkerState:
    """One worker as last reported. `kv_usage` is the fraction of KV blocks in use."""

    worker_id: str
    role: Role
    address: str
    is_alive: bool = True
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_free_blocks: int = 0
    num_total_blocks: int = 0

    def __post_init__(self) -> None:
        if self.role not in ("prefill", "decode"):
            raise ValueError(f"worker {self.worker_id}: role must be prefill or decode, "
                             f"got {self.role!r}")
        if min(self.num_running, self.num_waiting, self.num_free_blocks,
               self.num_total_blocks) < 0:
            raise ValueError(f"worker {self.worker_id}: negative counter in {self}")
        if not 0.0 <= self.kv_usage <= 1.0:
            raise ValueError(f"worker {self.worker_id}: kv_usage {self.kv_usage} not in [0, 1]")

    @property
    def num_requests(self) -> int:
        return self.num_running + self.num_waiting


class RouterPolicy(Protocol):
    """`choose` returns one live worker of `workers` or raises NoWorkerAvailable."""

    def choose(self, workers: Sequence[WorkerState], prompt_ids: Sequence[int]) -> WorkerState:
        ...


def alive_workers(workers: Sequence[WorkerState]) -> list[WorkerState]:
    """The live workers sorted by id (a stable order), or NoWorkerAvailable."""
    alive = sorted((w for w in workers if w.is_alive), key=lambda w: w.worker_id)
    if not alive:
        role = workers[0].role if workers else "worker"
        raise NoWorkerAvailable(role, len(workers))
    return alive


class RoundRobin:
    """Each live worker in turn (ordered by id; a dead one is skipped)."""

    def __init__(self) -> None:
        self._num_chosen = 0

    def choose(self, workers: Sequence[WorkerState], prompt_ids: Sequence[int]) -> WorkerState:
        alive = alive_workers(workers)
        worker = alive[self._num_chosen % len(alive)]
        self._num_chosen += 1
        return worker


class LeastLoaded:
    """The live worker with the lowest (queued requests, KV usage, running requests).

    A queue means the worker cannot admit now, so it ranks first. KV usage is compared in steps
    of `kv_usage_step` so that noise does not outweigh the running count. Ties rotate, so a
    burst that arrives before fresh snapshots still spreads over equal workers.
    """

    def __init__(self, kv_usage_step: float = 0.05) -> None:
        if kv_usage_step <= 0:
            raise ValueError(f"kv_usage_step must be > 0, got {kv_usage_step}")
        self.kv_usage_step = kv_usage_step
        self._num_chosen = 0

    def score(self, worker: WorkerState) -> tuple[int, int, int]:
        kv_step = math.floor(worker.kv_usage / self.kv_usage_step + 1e-9)  # 0.3/0.05 -> 6
        return (worker.num_waiting, kv_step, worker.num_running)

    def choose(self, workers: Sequence[WorkerState], prompt_ids: Sequence[int]) -> WorkerState:
        alive = alive_workers(workers)
        best = min(self.score(w) for w in alive)
        tied = [w for w in alive if self.score(w) == best]
        worker = tied[self._num_chosen % len(tied)]
        self._num_chosen += 1
        return worker


def block_hashes(prompt_ids: Sequence[int], block_size: int, max_blocks: int) -> list[int]:
    """The engine's prefix-cache keys of the prompt's first full blocks (at most `max_blocks`)."""
    return engine_block_hashes(prompt_ids, block_size, max_blocks)


def rendezvous(key: int, workers: Sequence[WorkerState]) -> WorkerState:
    """Highest-random-weight choice: stable for `key`; only a dead worker's keys move."""
    def weight(worker: WorkerState) -> int:
        return xxhash.xxh64_intdigest(struct.pack("<Q", key) + worker.worker_id.encode())
    return max(workers, key=weight)


class PrefixAware:
    """Prefill routing that keeps requests with a common prompt prefix on one worker.

    1. Each request's prompt is remembered (a bounded LRU map) by the chained hash of its last
       full block -> the worker chosen. A later request whose prompt extends a remembered one —
       the next turn of a chat — goes to the same worker, whose prefix cache holds that prefix.
       Only whole prompts are remembered, so a system prompt shared by many conversations
       never pins them all to one worker.
    2. Otherwise the worker is chosen by rendezvous hashing of the first `num_key_blocks`
       blocks (all full blocks of a shorter prompt): the same in every proxy and after a
       restart, and different conversations spread over the workers.
    3. Prompts shorter than one block, and choices whose worker has `max_queue_imbalance` more
       queued requests than the least queued live worker, go to `fallback` (least-loaded).
       A dead worker is never chosen: its conversations move to their next rendezvous choice.
    """

    def __init__(
        self,
        block_size: int = 16,
        num_key_blocks: int = 4,
        max_prefix_blocks: int = 512,
        max_entries: int = 100_000,
        max_queue_imbalance: int = 8,
        fallback: RouterPolicy | None = None,
    ) -> None:
        if min(block_size, num_key_blocks, max_prefix_blocks, max_entries) < 1:
            raise ValueError("block_size, num_key_blocks, max_prefix_blocks and max_entries "
                             "must be >= 1")
        self.block_size = block_size
        self.num_key_blocks = num_key_blocks
        self.max_prefix_blocks = max_prefix_blocks
        self.max_entries = max_entries
        self.max_queue_imbalance = max_queue_imbalance
        self.fallback: RouterPolicy = fallback or LeastLoaded()
        self._owners: OrderedDict[int, str] = OrderedDict()  # prompt hash -> worker id

    def choose(self, workers: Sequence[WorkerState], prompt_ids: Sequence[int]) -> WorkerState:
        alive = alive_workers(workers)
        hashes = block_hashes(prompt_ids, self.block_size, self.max_prefix_blocks)
        if not hashes:
            return self.fallback.choose(alive, prompt_ids)
        worker = self._remembered(hashes, alive)
        if worker is None:
            worker = rendezvous(hashes[min(self.num_key_blocks, len(hashes)) - 1], alive)
        min_waiting = min(w.num_waiting for w in alive)
        if worker.num_waiting - min_waiting > self.max_queue_imbalance:
            worker = self.fallback.choose(alive, prompt_ids)
        self._remember(hashes[-1], worker.worker_id)
        return worker

    def _remembered(self, hashes: list[int], alive: list[WorkerState]) -> WorkerState | None:
        by_id = {w.worker_id: w for w in alive}
        for h in reversed(hashes):
            owner = self._owners.get(h)
            if owner in by_id:
                return by_id[owner]
        return None

    def _remember(self, prompt_hash: int, worker_id: str) -> None:
        self._owners[prompt_hash] = worker_id
        self._owners.move_to_end(prompt_hash)
        while len(self._owners) > self.max_entries:
            self._owners.popitem(last=False)


def make_policy(name: str, block_size: int = 16) -> RouterPolicy:
    """A policy by its CLI name: round_robin, least_loaded or prefix_aware."""
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "prefix_aware":
        return PrefixAware(block_size=block_size)
    raise ValueError(f"unknown router policy {name!r}; choose round_robin, least_loaded or "
                     f"prefix_aware")
