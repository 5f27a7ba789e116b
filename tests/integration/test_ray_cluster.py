"""End-to-end on a three-node Ray cluster on this machine (`ray.cluster_utils.Cluster`, every node
on 127.0.0.1): the head runs the proxy, node A (resource `prefill`) the prefill workers, node B
(resource `decode`, label pdserve-role=decode) the decode workers. `pdserve serve --ray` runs as
a real process; placement is read back with `pdserve status --json` (Ray's node ids joined with
the proxy's /status).

Tests run in file order on one cluster: deployment 1 (1 prefill + 1 decode, in the foreground)
checks placement, output equality with the local engine, a decode actor killed mid-stream and
Ctrl-C; deployment 2 (2 + 2, --detach, decode pinned by node label) takes 32 concurrent requests
and is removed by `pdserve stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from serving import Server, serve, sse_events

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="needs Ray: pip install 'pdserve[ray]'"),
              pytest.mark.timeout(300)]

RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # loopback stays loopback (never the host's IP)
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_COLOR_PREFIX": "0",
}
NODE_ARGS = {"include_dashboard": False, "object_store_memory": 100 << 20,
             "node_ip_address": "127.0.0.1"}
# remote placement uses no step-cost model: no start-up warm-up (`--warmup-s 0`)
WORKER_FLAGS = ("--kv-cache-memory", "128MiB", "--placement", "remote", "--warmup-s", "0",
                "--prefill-resource", "prefill", "--decode-resource", "decode")
LABEL_FLAGS = ("--kv-cache-memory", "128MiB", "--placement", "remote", "--warmup-s", "0",
               "--prefill-resource", "prefill", "--decode-label", "pdserve-role=decode")
MAX_TOKENS = 24


@dataclass(frozen=True)
class Nodes:
    address: str
    head: str
    prefill: str  # node A
    decode: str  # node B


@pytest.fixture(scope="module")
def cluster() -> Iterator[Nodes]:
    env = pytest.MonkeyPatch()
    for key, value in RAY_ENV.items():
        env.setenv(key, value)
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **NODE_ARGS})
    try:
        a = c.add_node(num_cpus=2, resources={"prefill": 1}, **NODE_ARGS)
        b = c.add_node(num_cpus=2, resources={"decode": 1}, labels={"pdserve-role": "decode"},
                       **NODE_ARGS)
        c.wait_for_nodes()
        yield Nodes(c.address, c.head_node.node_id, a.node_id, b.node_id)
    finally:
        c.shutdown()
        env.undo()


@pytest.fixture(scope="module")
def deployment(cluster: Nodes) -> Iterator[Server]:
    with serve("--ray", "--address", cluster.address, "--deployment-name", "pd-ray-1",
               *WORKER_FLAGS, timeout_s=240) as s:
        yield s


@pytest.fixture(scope="module")
def reference(smollm2_reference: LLMEngine) -> LLMEngine:
    return smollm2_reference  # tests/conftest.py: built once per session (the same config)


def pdserve(*args: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deploy.cli", *args], capture_output=True,
                          text=True, timeout=timeout_s,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def status(cluster: Nodes, name: str) -> dict:
    out = pdserve("status", "--address", cluster.address, "--deployment-name", name, "--json",
                  timeout_s=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def by_id(view: dict) -> dict[str, dict]:
    return {w["worker_id"]: w for w in view["workers"]}


def test_placement_proxy_on_head_prefill_on_a_decode_on_b(deployment: Server,
                                                          cluster: Nodes) -> None:
    view = status(cluster, "pd-ray-1")
    assert view["proxy"]["node_id"] == cluster.head
    assert view["proxy"]["url"] == deployment.url
    workers = by_id(view)
    assert set(workers) == {"prefill-0", "decode-0"}
    assert workers["prefill-0"]["node_id"] == cluster.prefill
    assert workers["decode-0"]["node_id"] == cluster.decode
    for w in workers.values():
        assert w["alive"] and w["actor_state"] == "ALIVE" and w["num_restarts"] == 0
        assert w["ctrl_address"].startswith("tcp://127.0.0.1:")  # bound on the node's IP
        assert "KV cache:" in w["kv_plan"]
    assert workers["decode-0"]["kv_address"].startswith("tcp://127.0.0.1:")
    table = pdserve("status", "--address", cluster.address, "--deployment-name", "pd-ray-1",
                    timeout_s=60)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[2:4]}
    assert rows["prefill-0"][1:3] == ["prefill", cluster.prefill[:12]]
    assert rows["decode-0"][1:3] == ["decode", cluster.decode[:12]]


def test_same_name_is_refused_and_left_running(deployment: Server, cluster: Nodes) -> None:
    again = pdserve("serve", "--ray", "--address", cluster.address, "--deployment-name", "pd-ray-1",
                    "--port", "0", timeout_s=120)
    assert again.returncode == 2 and "already running" in again.stderr, again.stderr[-2000:]
    with deployment.client() as c:
        assert c.get("/health").json()["decode_workers"] == 1


def test_chat_equals_local_engine(deployment: Server, reference: LLMEngine) -> None:
    text = "What is the capital of France?"
    tok = reference.tokenizer
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))
    seq = reference.generate([ids], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS,
            "temperature": 0}
    with deployment.client() as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == tok.decode(seq.output_ids)
    assert r.json()["usage"]["completion_tokens"] == seq.num_output_tokens


def _wait_for_restart(c: httpx.Client, worker_id: str, old_pid: int,
                      timeout_s: float = 90.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        workers = {w["worker_id"]: w for w in c.get("/status").json()["workers"]}
        w = workers.get(worker_id)
        if w and w["alive"] and w["pid"] != old_pid:
            return w
        time.sleep(0.5)
    raise AssertionError(f"{worker_id} did not come back in {timeout_s:.0f} s")


def test_kill_decode_actor_mid_stream_then_ray_restarts_it(deployment: Server,
                                                           cluster: Nodes) -> None:
    body = {"prompt": "Count slowly from one to one thousand:", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with deployment.client() as c:
        old_pid = deployment.worker_pids()["decode-0"]
        killed_at, error = None, None
        with c.stream("POST", "/v1/completions", json=body) as r:
            for event in sse_events(r):
                if killed_at is None and isinstance(event, dict) and event.get("choices"):
                    os.kill(old_pid, signal.SIGKILL)  # the actor's process: Ray sees it die
                    killed_at = time.monotonic()
                if isinstance(event, dict) and "error" in event:
                    error = event["error"]
                    break
        assert killed_at is not None and error is not None
        assert time.monotonic() - killed_at < 10.0
        assert error["code"] == "worker_lost"
        restarted = _wait_for_restart(c, "decode-0", old_pid)
        for i in range(3):
            r = c.post("/v1/completions",
                       json={"prompt": f"After the restart {i}", "max_tokens": 4})
            assert r.status_code == 200, r.text
    assert deployment.wait_idle_blocks() == 0
    decode = by_id(status(cluster, "pd-ray-1"))["decode-0"]
    assert decode["pid"] == restarted["pid"] and decode["node_id"] == cluster.decode
    assert decode["num_restarts"] == 1 and decode["actor_state"] == "ALIVE"


def test_kill_proxy_actor_then_ray_restarts_it_on_the_same_url(deployment: Server,
                                                               cluster: Nodes) -> None:
    """The proxy is a Ray actor with restarts: killed mid-stream, it comes back on the same ports,
    registers the running workers from their actors, has them drop the dead proxy's requests
    (blocks free at once, not after the stream's 1500 tokens) and serves again; the launcher
    keeps watching (the Ctrl-C test after this one removes the deployment through it)."""
    old = status(cluster, "pd-ray-1")["proxy"]
    body = {"prompt": "Count slowly from one to one thousand:", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with deployment.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        for event in sse_events(r):
            if isinstance(event, dict) and event.get("choices"):
                os.kill(old["pid"], signal.SIGKILL)  # a request in flight on the decode worker
                break
    deadline = time.monotonic() + 90
    with deployment.client(timeout=10) as c:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                health = c.get("/health")
                if health.status_code == 200 and health.json()["prefill_workers"] == 1:
                    break
            assert time.monotonic() < deadline, "the proxy did not come back in 90 s"
            time.sleep(0.5)
        r = c.post("/v1/completions", json={"prompt": "After the proxy restart", "max_tokens": 4})
        assert r.status_code == 200, r.text
        alive = {w["worker_id"] for w in c.get("/status").json()["workers"] if w["alive"]}
        assert alive == {"prefill-0", "decode-0"}
    assert deployment.wait_idle_blocks(timeout_s=15) == 0  # the orphaned stream was dropped
    new = status(cluster, "pd-ray-1")["proxy"]
    assert new["url"] == old["url"] == deployment.url and new["pid"] != old["pid"]
    deadline = time.monotonic() + 10
    while (not any("the proxy is back" in line for line in deployment.log)
           and time.monotonic() < deadline):
        time.sleep(0.2)
    assert any("the proxy is back" in line for line in deployment.log), (
        "".join(deployment.log[-20:]))
    assert deployment.proc.poll() is None  # the launcher still runs


def test_ctrl_c_removes_the_deployment(deployment: Server, cluster: Nodes) -> None:
    deployment.proc.send_signal(signal.SIGINT)
    assert deployment.proc.wait(60) == 0
    assert any("removed 3 actor(s) and the placement group" in line for line in deployment.log)
    gone = pdserve("stop", "--address", cluster.address, "--deployment-name", "pd-ray-1",
                   timeout_s=60)
    assert gone.returncode == 1 and "no deployment named 'pd-ray-1'" in gone.stdout


async def _chat(client: httpx.AsyncClient, i: int) -> str:
    body = {"messages": [{"role": "user", "content": f"Say a word about the number {i}."}],
            "max_tokens": 6, "temperature": 0.7, "seed": i}
    r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


@pytest.mark.slow  # run with -m slow: kept out of CI for time (README, Development)
def test_detached_2p2d_32_concurrent_then_stop(cluster: Nodes,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NCCL_DEBUG", "WARN")  # forwarded to every worker actor
    args = ("--address", cluster.address, "--deployment-name", "pd-ray-2")
    started = pdserve("serve", "--ray", "--detach", *args, "--prefill", "2", "--decode", "2",
                      "--host", "127.0.0.1", "--port", "0", "--max-model-len", "2048", *LABEL_FLAGS)
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    match = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", started.stdout)
    url = match.group(1)  # type: ignore[union-attr]
    try:
        workers = by_id(status(cluster, "pd-ray-2"))
        assert sorted(workers) == ["decode-0", "decode-1", "prefill-0", "prefill-1"]
        for wid, w in workers.items():
            assert w["node_id"] == (cluster.prefill if wid.startswith("prefill")
                                    else cluster.decode)
            assert w["alive"] and w["nccl_env"] == {"NCCL_DEBUG": "WARN"}

        async def run() -> list[str]:
            async with httpx.AsyncClient(base_url=url, timeout=240) as client:
                return await asyncio.gather(*(_chat(client, i) for i in range(32)))

        assert all(asyncio.run(run()))
        served = {w["worker_id"]: w for w in httpx.get(url + "/status").json()["workers"]}
        assert all(w["alive"] for w in served.values()) and len(served) == 4
    finally:
        stopped = pdserve("stop", *args, timeout_s=60)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert "removed decode-0, decode-1, prefill-0, prefill-1, proxy" in stopped.stdout
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=5)
