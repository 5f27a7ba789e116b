"""Tensor-parallel workers on a Ray cluster (`ray.cluster_utils.Cluster` on 127.0.0.1): a P1->D3
deployment (`pdserve serve --ray --decode-tp 3`) places the decode worker's placement-group
bundle with three workers' CPUs on the one node that has room, its actor (rank 0) starts the
other two ranks there, and greedy completions equal the local TP=1 engine's; /status lists the
three rank pids. A TP size no node has room for fails at start with the bundle and the free
resources, naming the flags (3 ranks x --cpus-per-worker 2 on nodes of 4 and 1 CPUs)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
from serving import Server, serve

from engine.config import EngineConfig
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
    with serve("--ray", "--address", cluster[0], "--deployment-name", "pd-ray-tp",
               "--prefill", "1", "--decode", "1", "--decode-tp", "3", "--placement", "remote",
               "--kv-cache-memory", "128MiB", "--max-model-len", "2048", timeout_s=360) as s:
        yield s


def test_p1_d3_on_ray_serves_the_local_engines_tokens(deployment: Server,
                                                      cluster: tuple[str, str]) -> None:
    reference = LLMEngine.from_config(EngineConfig(kv_cache_memory="128MiB",
                                                   max_model_len=2048), log_plan=False)
    tok = reference.tokenizer
    for prompt in PROMPTS:
        want = reference.generate([tok.encode(prompt)], SamplingParams(
            max_tokens=12, temperature=0.0, ignore_eos=True))[0]
        with deployment.client() as c:
            r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 12,
                                                "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode(want.output_ids)
    with deployment.client() as c:
        workers = {w["worker_id"]: w for w in c.get("/status").json()["workers"]}
    assert len(workers["decode-0"]["rank_pids"]) == 3, workers["decode-0"]
    assert len(workers["decode-0"]["kv_rank_addresses"]) == 3
    assert deployment.metric("pdserve:prefill_placement_total") >= len(PROMPTS)


def test_a_tp_size_no_node_has_room_for_fails_naming_the_flags(
        cluster: tuple[str, str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "deploy.cli", "serve", "--ray", "--address", cluster[0],
         "--deployment-name", "pd-ray-tp-big", "--port", "0", "--prefill", "1", "--decode", "1",
         "--decode-tp", "3", "--cpus-per-worker", "2", "--placement-timeout-s", "5",
         "--kv-cache-memory", "64MiB", "--max-model-len", "1024"],
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert out.returncode != 0
    assert "no room" in out.stderr and "'CPU': 6.0" in out.stderr, out.stderr[-2000:]
    assert "--decode-tp" in out.stderr
