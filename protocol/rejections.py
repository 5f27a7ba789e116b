"""Counting what a component refused: messages, frames and connections dropped before a handler.

Every plane that can receive from a peer (control, events, KV headers and acks, KV data
connections, NCCL hellos, HTTP) counts what it refuses here, by plane and reason, so an attack
or a broken peer is visible: workers report their totals in every `Heartbeat`, the proxy adds its
own and exports `pdserve:rejected_messages_total{component,plane,reason}`.

`Rejections` is thread-safe (the KV receiver thread and the worker loop both count) and holds no
module-level state: each component owns one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum


class Plane(str, Enum):
    CONTROL = "control"  # proxy -> worker control messages
    EVENTS = "events"  # worker -> proxy events
    KV = "kv"  # KV headers, acks and payload frames on the KV endpoint
    KV_DATA = "kv_data"  # the stream payload's data connections
    NCCL = "nccl"  # NCCL link hellos / unique-id exchange
    HTTP = "http"  # the OpenAI API


@dataclass(frozen=True)
class RejectedCount:
    """A running total: `count` messages on `plane` refused for `reason` since start."""

    plane: Plane
    reason: str
    count: int


class Rejections:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[Plane, str], int] = {}

    def add(self, plane: Plane, reason: str, n: int = 1) -> None:
        with self._lock:
            key = (plane, reason)
            self._counts[key] = self._counts.get(key, 0) + n

    def count(self, plane: Plane, reason: str | None = None) -> int:
        """Total refused on `plane` (for one `reason`, or all)."""
        with self._lock:
            return sum(n for (p, r), n in self._counts.items()
                       if p == plane and (reason is None or r == reason))

    def snapshot(self) -> list[RejectedCount]:
        with self._lock:
            return [RejectedCount(p, r, n) for (p, r), n in sorted(self._counts.items())]
