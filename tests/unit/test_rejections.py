"""Rejection counters: thread-safe totals that travel in heartbeats through the real codec."""

from __future__ import annotations

import threading

import pytest

from protocol import worker_events as ev
from protocol.codec import MalformedMessage
from protocol.rejections import Plane, RejectedCount, Rejections


def test_counts_by_plane_and_reason_from_many_threads() -> None:
    r = Rejections()
    threads = [threading.Thread(target=lambda: [r.add(Plane.KV, "forged") for _ in range(1000)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r.add(Plane.KV, "oversized", 2)
    r.add(Plane.CONTROL, "malformed")
    assert r.count(Plane.KV) == 4002
    assert r.count(Plane.KV, "forged") == 4000
    assert r.snapshot() == [RejectedCount(Plane.CONTROL, "malformed", 1),
                            RejectedCount(Plane.KV, "forged", 4000),
                            RejectedCount(Plane.KV, "oversized", 2)]


def test_heartbeat_carries_totals_and_refuses_an_unknown_plane() -> None:
    hb = ev.Heartbeat("d0", "decode", 0, 0, 0, 10, 10,
                      rejected=[RejectedCount(Plane.EVENTS, "malformed", 3)])
    frame = ev.WORKER_EVENTS.encode(hb)
    assert ev.WORKER_EVENTS.decode(frame) == hb
    forged = frame.replace(b"events", b"evxnts")  # same length: still msgpack
    with pytest.raises(MalformedMessage, match="plane"):
        ev.WORKER_EVENTS.decode(forged)
