"""`--insecure-internal` (benchmarks only) still serves, says loudly that the internal planes are
open, and then really is open: a plain socket's garbage reaches the worker's decoder."""

from __future__ import annotations

import time

from attacks import send_as
from serving import serve


def test_insecure_internal_warns_and_serves() -> None:
    with serve("--colocated", "--decode", "1", "--warmup-s", "0",
               "--insecure-internal") as server, server.client() as c:
        assert any("--insecure-internal" in line and "NOT authenticated" in line
                   for line in server.log)
        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text
        worker = c.get("/status").json()["workers"][0]
        send_as(worker["ctrl_address"], [b"\x00not msgpack"], "plain")
        labels = f'component="{worker["worker_id"]}",plane="control",reason="malformed"'
        deadline = time.monotonic() + 20
        while server.metric("pdserve:rejected_messages_total", labels) < 1:
            assert time.monotonic() < deadline, "the plain peer's frame never reached the worker"
            time.sleep(0.3)
