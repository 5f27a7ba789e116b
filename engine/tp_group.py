"""TpGroup: the collectives one tensor-parallel rank takes part in.

One process per rank; torch.distributed with NCCL on CUDA and gloo on CPU (the same code).
Three process groups:
- the model group (NCCL or gloo, timeout `--distributed-timeout`): the all-reduces of the
  row-parallel layers and the embedding, the gather of the logits to rank 0;
- the control group (gloo, on the host): rank 0 broadcasts each step's inputs as two int64
  tensors (engine/step_inputs.py; no pickle), and the messages of the ranks' services
  (engine/tp_service.py). Followers wait on it while the engine is idle, so its timeout is
  long; a dead peer is noticed at once on gloo (its sockets close);
- the service group (gloo, timeout `--distributed-timeout`): the services' answers, a sum
  over the group (`all_reduce_host`).

Any failure of a collective becomes `TpError` (an EngineError) naming the rank: a dead rank
takes the engine down with a clear message, it never hangs past the timeout.
`TpGroup.single()` is the group of an engine without TP: every collective is the identity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist

from engine.errors import EngineError

T = TypeVar("T")
CONTROL_TIMEOUT = timedelta(days=7)  # idle followers wait this long for rank 0's next step
HOST = "127.0.0.1"


class TpError(EngineError):
    """A tensor-parallel collective failed (a rank died or timed out); the engine stops."""


@dataclass
class TpGroup:
    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    control: dist.ProcessGroup | None = None
    service: dist.ProcessGroup | None = None  # the services' answers (gloo, the model timeout)
    is_broken: bool = False

    @classmethod
    def single(cls, device: torch.device | None = None) -> TpGroup:
        return cls(0, 1, device or torch.device("cpu"))

    @classmethod
    def join(cls, rank: int, size: int, port: int, device: torch.device,
             timeout_s: float, store: dist.Store | None = None) -> TpGroup:
        """Join the world of `size` ranks whose TCP store rank 0 serves on 127.0.0.1:`port`
        (rank 0 passes the store it created)."""
        timeout = timedelta(seconds=timeout_s)
        if store is None:
            store = dist.TCPStore(HOST, port, size, is_master=False, timeout=timeout)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        try:
            dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                                    timeout=timeout, **({"device_id": device}
                                                        if device.type == "cuda" else {}))
            control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
            service = dist.new_group(backend="gloo", timeout=timeout)
        except Exception as e:
            raise TpError(f"tensor-parallel rank {rank} of {size} could not join the group "
                          f"within --distributed-timeout {timeout_s:g} s: {e}") from e
        return cls(rank, size, device, control, service)

    @property
    def is_single(self) -> bool:
        return self.size == 1

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        if self.is_broken:
            raise TpError(f"tensor-parallel group of rank {self.rank} is broken; restart")
        try:
            return fn()
        except Exception as e:
            self.is_broken = True
            raise TpError(f"tensor-parallel {what} failed on rank {self.rank} of {self.size} "
                          f"(another rank died or stalled past --distributed-timeout): "
                          f"{str(e)[:300]}") from e

    # ---- model collectives (model group) -------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over all ranks, in place."""
        if self.size > 1:
            self._guard("all-reduce", lambda: dist.all_reduce(x))
        return x

    def gather_vocab(self, local: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
        """Rank 0: [N, vocab_size] from every rank's [N, V'] vocabulary slice; others: None."""
        if self.size == 1:
            return local[:, :vocab_size]
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.size)] if self.rank == 0 else None
        self._guard("logits gather", lambda: dist.gather(local, parts, dst=0))
        if parts is None:
            return None
        return torch.cat(parts, dim=-1)[:, :vocab_size]

    def min_int(self, value: int) -> int:
        """The smallest `value` over all ranks (e.g. the KV blocks every rank can hold)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._guard("all-reduce(min)", lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN))
        return int(t.item())

    # ---- control (host, gloo) ------------------------------------------------------------------
    def broadcast_host(self, array: np.ndarray) -> None:
        """Rank 0 sends an int64 host array to every follower (who pass one of the same shape)."""
        tensor = torch.from_numpy(array)
        self._guard("step broadcast",
                    lambda: dist.broadcast(tensor, src=0, group=self.control))

    def all_reduce_host(self, array: np.ndarray) -> np.ndarray:
        """Sum of an int64 host array over all ranks, in place: the followers' services answer
        rank 0 through it (engine/tp_service.py). On its own gloo group, whose timeout is
        `--distributed-timeout`: a stalled rank fails it instead of holding rank 0 forever."""
        if self.size > 1:
            tensor = torch.from_numpy(array)
            self._guard("service all-reduce", lambda: dist.all_reduce(tensor, group=self.service))
        return array

    def destroy(self) -> None:
        if self.size > 1 and dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
