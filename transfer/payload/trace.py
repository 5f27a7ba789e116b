"""Tracer: optional timing marks of one transfer, for benchmarks (bench/transfer.py).

A payload path calls its tracer at the points a benchmark wants on a timeline; the serving path
runs with `NO_TRACE`, whose methods do nothing (no clock read, no CUDA event), so tracing costs
nothing unless a benchmark passes a tracer in (e.g. `NcclSenderPlugin(device, tracer=...)`).
Marks use `time.perf_counter()`, one clock for every process on a host, so a benchmark can line
up the sender's and the receiver's marks on one timeline. A tracer is called from the thread
that runs the transfer; reading it between transfers is the benchmark's business.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch


class Tracer(Protocol):
    def mark(self, name: str) -> None:
        """This moment, under `name` (a point on the transfer's timeline)."""

    def span(self, name: str) -> AbstractContextManager[Any]:
        """CPU time spent inside the `with` block, summed per `name` over the transfer."""

    def gpu_mark(self, name: str, stream: torch.cuda.Stream) -> None:
        """A timing event recorded on `stream` now (GPU spans are read once it completed)."""


class NoTrace:
    """The default tracer: does nothing."""

    _NULL = contextlib.nullcontext()

    def mark(self, name: str) -> None:
        pass

    def span(self, name: str) -> AbstractContextManager[Any]:
        return self._NULL

    def gpu_mark(self, name: str, stream: torch.cuda.Stream) -> None:
        pass


NO_TRACE: Tracer = NoTrace()
