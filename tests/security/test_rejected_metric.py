"""Frames that do not decode are dropped, counted by plane and reason, and harm nobody."""

from __future__ import annotations

import time

import zmq
from serving import serve


def _send_raw(address: str, frames: list[bytes]) -> None:
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(address)
        for f in frames:
            sock.send(f)
        sock.close(linger=2000)
    finally:
        ctx.term()


def test_malformed_control_frames_are_counted_and_the_worker_keeps_serving() -> None:
    with serve("--colocated", "--decode", "1") as server, server.client() as c:
        worker = c.get("/status").json()["workers"][0]
        garbage = [b"\x00not msgpack", b"\x92\x01\x02", b"\x81\xa4type\xa5Bogus"]
        _send_raw(worker["ctrl_address"], garbage)
        labels = f'component="{worker["worker_id"]}",plane="control",reason="malformed"'
        deadline = time.monotonic() + 20
        while server.metric("pdserve:rejected_messages_total", labels) < len(garbage):
            assert time.monotonic() < deadline, "the worker's rejections never reached /metrics"
            time.sleep(0.3)
        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert c.get("/status").json()["workers"][0]["pid"] == worker["pid"]
