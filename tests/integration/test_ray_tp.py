"""Tensor-parallel workers on a Ray cluster (`ray.cluster_utils.Cluster` on 127.0.0.1): a P1->D3
deployment (`pdserve serve --ray --decode-tp 3`) gives the decode worker a placement group of
its own, three one-rank bundles STRICT_PACK on the one node that has room, and one actor per
rank: the worker's actor is rank 0, ranks 1 and 2 are actors `decode-0-rank1/2` (not its child
processes); greedy completions equal the local TP=1 engine's and /status lists the three rank
actors' pids. `ray.kill` of one rank actor mid-stream ends the stream with an error event, the
worker's rank 0 exits, and Ray's restart of it serves again with new rank actors. A TP size no
node has room for fails at start naming the bundles, their total on one node, the free
resources and the flags (3 ranks x --cpus-per-worker 2 on nodes of 4 and 1 CPUs)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from serving import Server, assert_exits, break_mid_stream, serve

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                 reason="needs Ray: pip install 'pdserve[ray]'"),
              pytest.mark.timeout(420)]

RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_DEDUP_LOGS": "0", "RAY_COLOR_PREFIX": "0"}
NODE_ARGS = {"include_dashboard": False, "object_store_memory": 100 << 20,
             "node_ip_address": "127.0.0.1"}
PROMPTS = ["The three primary colors are", "def fibonacci(n):"]
NAME = "pd-ray-tp"
FAIL_BOUND_S = 60.0
RESTART_BOUND_S = 240.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, str]]:
    env = pytest.MonkeyPatch()
    for key, value in RAY_ENV.items():
        env.setenv(key, value)
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, **NODE_ARGS})
    try:
        node = c.add_node(num_cpus=4, **NODE_ARGS)  # logical CPUs: room for 1 + 3 ranks
        c.wait_for_nodes()
        yield c.address, node.node_id
    finally:
        c.shutdown()
        env.undo()


@pytest.fixture(scope="module")
def deployment(cluster: tuple[str, str]) -> Iterator[Server]:
    with serve("--ray", "--address", cluster[0], "--deployment-name", NAME,
               "--prefill", "1", "--decode", "1", "--decode-tp", "3", "--placement", "remote",
               "--warmup-s", "0", "--kv-cache-memory", "128MiB", "--max-model-len", "2048",
               timeout_s=360) as s:
        yield s


@pytest.fixture(scope="module")
def driver(cluster: tuple[str, str], deployment: Server) -> Iterator[Any]:
    """This test process joined to the cluster, in the deployment's namespace."""
    import ray

    ray.init(address=cluster[0], namespace=NAME, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _decode_worker(deployment: Server) -> dict:
    with deployment.client() as c:
        return {w["worker_id"]: w for w in c.get("/status").json()["workers"]}["decode-0"]


def test_p1_d3_on_ray_serves_the_local_engines_tokens(deployment: Server,
                                                      cluster: tuple[str, str], driver: Any,
                                                      smollm2_reference: LLMEngine) -> None:
    reference = smollm2_reference  # tests/conftest.py: the local engine, built once per session
    tok = reference.tokenizer
    for prompt in PROMPTS:
        want = reference.generate([tok.encode(prompt)], SamplingParams(
            max_tokens=12, temperature=0.0, ignore_eos=True))[0]
        with deployment.client() as c:
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12,
                                                "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode(want.output_ids)
    decode = _decode_worker(deployment)
    assert len(decode["rank_pids"]) == 3, decode
    assert len(decode["kv_rank_addresses"]) == 3
    assert deployment.metric("pdserve:prefill_placement_total") >= len(PROMPTS)
    # one actor per rank: the follower ranks are actors of their own, not rank 0's children
    rank0 = driver.get(driver.get_actor("decode-0").info.remote(), timeout=30)
    assert decode["rank_pids"][0] == rank0["pid"]
    for r in (1, 2):
        info = driver.get(driver.get_actor(f"decode-0-rank{r}").info.remote(), timeout=30)
        assert info["pid"] == decode["rank_pids"][r], (r, info, decode["rank_pids"])
        assert info["node_id"] == rank0["node_id"] == cluster[1]
        assert psutil.Process(info["pid"]).ppid() != rank0["pid"]
    # the worker's own placement group: a bundle per rank, STRICT_PACK, on one node
    groups = {g["name"]: g for g in driver.util.placement_group_table().values()
              if g["state"] == "CREATED"}
    group = groups[f"{NAME}-workers/decode-0"]
    assert group["strategy"] == "STRICT_PACK" and len(group["bundles"]) == 3, group
    assert set(group["bundles_to_node_id"].values()) == {cluster[1]}
    assert f"{NAME}-workers" in groups  # the prefill worker (TP 1) in the shared group
    # `pdserve status` lists the rank actors under their worker, not as workers of their own
    out = subprocess.run([sys.executable, "-m", "deploy.cli", "status", "--address", cluster[0],
                          "--deployment-name", NAME, "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    view = {w["worker_id"]: w for w in json.loads(out.stdout)["workers"]}
    assert sorted(view) == ["decode-0", "prefill-0"], sorted(view)
    ranks = view["decode-0"]["rank_actors"]
    assert [(r["rank"], r["pid"], r["actor_state"]) for r in ranks] == [
        (1, decode["rank_pids"][1], "ALIVE"), (2, decode["rank_pids"][2], "ALIVE")], ranks


def test_killing_a_rank_actor_takes_its_worker_down_and_ray_restarts_it(
        deployment: Server, driver: Any) -> None:
    old = _decode_worker(deployment)["rank_pids"]
    rank1 = driver.get_actor("decode-0-rank1")
    body = {"model": "smollm2", "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True,
            "stream": True}
    with deployment.client() as c:
        error = break_mid_stream(c, body, lambda: driver.kill(rank1, no_restart=True),
                                 FAIL_BOUND_S)
    assert error["code"] == "worker_lost" or "tensor-parallel" in error["message"], error
    assert_exits(old[0], FAIL_BOUND_S, "rank 0 of the worker with a dead rank actor")
    assert_exits(old[2], FAIL_BOUND_S, "the other rank actor of that worker")
    # Ray restarts the worker's actor (--max-restarts), which starts new rank actors
    deadline = time.monotonic() + RESTART_BOUND_S
    while time.monotonic() < deadline:
        with deployment.client() as c:
            r = c.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 4,
                                                "temperature": 0})
        if r.status_code == 200:
            break
        time.sleep(0.5)
    assert r.status_code == 200, r.text
    new = _decode_worker(deployment)["rank_pids"]
    assert len(new) == 3 and not set(new) & set(old), (old, new)
    assert deployment.wait_idle_blocks() == 0


def test_a_tp_size_no_node_has_room_for_fails_naming_the_flags(
        cluster: tuple[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "serve", "--ray", "--address", cluster[0],
         "--deployment-name", "pd-ray-tp-big", "--port", "0", "--prefill", "1", "--decode", "1",
         "--decode-tp", "3", "--cpus-per-worker", "2", "--placement-timeout-s", "1",
         "--kv-cache-memory", "64MiB", "--max-model-len", "1024"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode != 0
    assert "no room for tensor-parallel worker decode-0" in out.stderr, out.stderr[-2000:]
    assert "3 bundles {'CPU': 2.0}" in out.stderr and "{'CPU': 6.0} on ONE node" in out.stderr
    assert "--decode-tp" in out.stderr
