"""Control messages both worker roles take from the proxy: stop one request, drop them all, stop.

Part of both ctrl families (decode_ctrl.py and prefill_ctrl.py re-export them), so the proxy
sends the same types to either role.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Abort:
    """Stop one request and free what it holds here (client gone, timeout, the other side
    failed)."""

    request_id: str
    reason: str = "aborted"


@dataclass(frozen=True)
class AbortAll:
    """Drop every request this worker holds (a restarted proxy: their clients are gone)."""

    reason: str = "proxy restarted"


@dataclass(frozen=True)
class Shutdown:
    reason: str = "shutdown"
