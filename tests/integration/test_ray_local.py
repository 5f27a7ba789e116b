"""`pdserve serve --ray` with no Ray cluster running starts a local one (as a bare `ray.init()`
does), says so, serves, and takes the local cluster down with it."""

from __future__ import annotations

import importlib.util

import pytest
from serving import serve

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="needs Ray: pip install 'pdserve[ray]'"),
              pytest.mark.timeout(300)]

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DEDUP_LOGS": "0", "RAY_COLOR_PREFIX": "0"}


def test_serve_ray_without_a_cluster_starts_a_local_one(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():  # "auto" would join it (another test's cluster on this machine)
        pytest.skip("a Ray cluster is already running on this machine")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in RAY_ENV.items():
        monkeypatch.setenv(key, value)
    with serve("--ray", "--colocated", "--deployment-name", "pd-ray-local",
               "--kv-cache-memory", "128MiB", timeout_s=240) as server:
        assert any("no Ray cluster is running: started a local one" in line
                   for line in server.log), "".join(server.log[-30:])
        with server.client() as c:
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
            assert r.status_code == 200, r.text
    assert server.proc.returncode is not None
