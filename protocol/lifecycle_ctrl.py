"""Control messages both worker roles take from the proxy: stop one request, drop them all, stop.

Part of both ctrl families (decode_ctrl.py and prefill_ctrl.py re-export them), so the proxy
sends the same types to either role.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.bounds import MAX_ID_LEN, MAX_TEXT_LEN, bounded


@dataclass(frozen=True)
class Abort:
    """Stop one request and free what it holds here (client gone, timeout, the other side
    failed)."""

    request_id: str = bounded(max_len=MAX_ID_LEN)
    reason: str = bounded("aborted", max_len=MAX_TEXT_LEN)


@dataclass(frozen=True)
class AbortAll:
    """Drop every request this worker holds (a restarted proxy: their clients are gone)."""

    reason: str = bounded("proxy restarted", max_len=MAX_TEXT_LEN)


@dataclass(frozen=True)
class Shutdown:
    reason: str = bounded("shutdown", max_len=MAX_TEXT_LEN)
