"""Frames that do not decode are dropped, counted by plane and reason, and harm nobody; the same
garbage from a peer without the deployment's secret never even reaches the decoder."""

from __future__ import annotations

import time
from pathlib import Path

from attacks import secret_file, send_as
from serving import NO_WARMUP, serve


def test_malformed_control_frames_are_counted_and_the_worker_keeps_serving(
        tmp_path: Path) -> None:
    path, secret = secret_file(tmp_path)
    with serve("--colocated", "--decode", "1", *NO_WARMUP,
               "--cluster-secret-file", str(path)) as server, \
            server.client() as c:
        worker = c.get("/status").json()["workers"][0]
        garbage = [b"\x00not msgpack", b"\x92\x01\x02", b"\x81\xa4type\xa5Bogus"]
        send_as(worker["ctrl_address"], garbage, "right-key", secret)  # a holder of the secret
        send_as(worker["ctrl_address"], garbage, "plain")  # anyone else
        component = f'component="{worker["worker_id"]}",plane="control"'
        deadline = time.monotonic() + 20
        while server.metric("pdserve:rejected_messages_total",
                            f'{component},reason="malformed"') < len(garbage) \
                or server.metric("pdserve:rejected_messages_total",
                                 f'{component},reason="unauthenticated"') < 1:
            assert time.monotonic() < deadline, "the worker's rejections never reached /metrics"
            time.sleep(0.3)
        assert server.metric("pdserve:rejected_messages_total",
                             f'{component},reason="malformed"') == len(garbage)
        r = c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200, r.text
        assert c.get("/status").json()["workers"][0]["pid"] == worker["pid"]
