"""`pdserve serve --colocated -tp 3`: a tensor-parallel decode worker (SmolLM2 on 3 ranks, gloo)
serves the OpenAI API with the TP=1 engine's tokens; /status lists its ranks; kill -9 of one
of its ranks fails the request it was streaming with a clean error, within a bound, and the
worker exits (the launcher handles it as a dead worker).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from serving import NO_WARMUP, assert_exits, kill_rank_mid_stream, serve

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPT = "The capital of France is"
FAIL_BOUND_S = 60.0


@pytest.fixture(scope="module")
def reference(smollm2_engine: Callable[..., LLMEngine]) -> LLMEngine:
    """The TP=1 engine, on the session's SmolLM2 checkpoint (tests/conftest.py)."""
    return smollm2_engine(kv_cache_memory="32MiB", max_model_len=512)


def _want(engine: LLMEngine, **params: float | int) -> str:
    seq = engine.generate([engine.tokenizer.encode(PROMPT)],
                          SamplingParams(max_tokens=10, ignore_eos=True, **params))[0]
    return engine.tokenizer.decode(seq.output_ids)


def test_tp3_colocated_worker_serves_tp1_tokens_and_fails_cleanly_on_rank_death(
        reference: LLMEngine) -> None:
    with serve("--colocated", "--decode", "1", "-tp", "3", "--max-model-len", "512",
               "--kv-cache-memory", "32MiB", *NO_WARMUP, "--max-restarts", "0",
               timeout_s=300) as server, \
            server.client(timeout=120) as c:
        workers = c.get("/status").json()["workers"]
        assert len(workers) == 1 and len(workers[0]["rank_pids"]) == 3, workers
        assert "per rank (each of 3 TP ranks holds 1 of 3 KV heads" in workers[0]["kv_plan"]
        for params in ({"temperature": 0.0}, {"temperature": 0.8, "seed": 5}):
            body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 10, "ignore_eos": True,
                    **params}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == _want(reference, **params), params

        worker_pid, rank = workers[0]["pid"], workers[0]["rank_pids"][1]
        body = {"model": "smollm2", "prompt": PROMPT, "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        error = kill_rank_mid_stream(c, body, rank, FAIL_BOUND_S)
        assert error["code"] == "worker_lost" or "tensor-parallel" in error["message"], error
        assert_exits(worker_pid, FAIL_BOUND_S, "the worker with a dead rank")

