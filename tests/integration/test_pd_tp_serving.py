"""Prefill and decode workers of different tensor-parallel sizes exchange KV rank to rank (whole
prompts, and layer-wise streams with `--kv-streaming layerwise`).

`pdserve serve --prefill 1 --decode 1 --placement remote` with `--decode-tp 3` (P1 -> D3: the
prefill worker splits its heads over the decode ranks) and `--prefill-tp 3` (P3 -> D1: each
prefill rank sends its head, the decode worker's one rank takes all three) on SmolLM2 (3 KV
heads): the colocated TP=1 engine's tokens for greedy and seeded requests, one at a time and
concurrently, every KV block free afterwards. kill -9 of one decode rank fails the request it
was streaming with a clean error within a bound (nothing hangs in a collective) and the broken
worker exits; kill -9 of an idle prefill rank makes its worker exit within a bound, and the
decode worker serves on.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving import NO_WARMUP, Server, assert_exits, kill_rank_mid_stream, serve

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPTS = ["The capital of France is",
           "Write a short story about a robot who learns to paint. Once upon a time, in a city "
           "of glass towers and humming machines, there lived a small robot named"]
PARAMS: list[dict[str, float | int]] = [{"temperature": 0.0}, {"temperature": 0.8, "seed": 5}]
FAIL_BOUND_S = 60.0
ARGS = ("--prefill", "1", "--decode", "1", "--placement", "remote", "--max-model-len", "512",
        "--kv-cache-memory", "32MiB", *NO_WARMUP)  # remote placement: no cost models to seed
ENGINE: dict[str, str | int] = {"kv_cache_memory": "32MiB", "max_model_len": 512}  # as ARGS
CASES = [(p, params) for p in PROMPTS for params in PARAMS]
NO_RESTART = ("--max-restarts", "0")  # a worker whose rank was killed stays down


@pytest.fixture(scope="module")
def reference(smollm2_engine: Callable[..., LLMEngine]) -> list[str]:
    """The colocated TP=1 engine's text for each of CASES, computed once for the module."""
    engine = smollm2_engine(**ENGINE)
    return [_want(engine, *case) for case in CASES]


def _want(engine: LLMEngine, prompt: str, params: dict[str, float | int]) -> str:
    seq = engine.generate([engine.tokenizer.encode(prompt)],
                          SamplingParams(max_tokens=8, ignore_eos=True, **params))[0]
    return engine.tokenizer.decode(seq.output_ids)


def _complete(server: Server, prompt: str, params: dict[str, float | int]) -> str:
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 8, "ignore_eos": True, **params}
    with server.client(timeout=120) as c:
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _serves_reference_tokens(server: Server, reference: list[str]) -> None:
    for case, want in zip(CASES, reference, strict=True):  # one at a time
        assert _complete(server, *case) == want, case[1]
    with ThreadPoolExecutor(len(CASES)) as pool:  # several transfers in flight at once
        got = list(pool.map(lambda case: _complete(server, *case), CASES))
    assert got == reference
    assert server.metric("pdserve:prefill_placement_total", 'placement="remote"') == 2 * len(CASES)
    assert server.metric("pdserve:kv_transfer_bytes_total") > 0
    assert server.wait_idle_blocks() == 0


def test_p3_to_d1_serves_the_colocated_tokens_and_survives_a_prefill_rank_death(
        reference: list[str]) -> None:
    with serve(*ARGS, "--prefill-tp", "3", *NO_RESTART, timeout_s=300) as server:
        with server.client() as c:
            workers = {w["role"]: w for w in c.get("/status").json()["workers"]}
        assert len(workers["prefill"]["rank_pids"]) == 3, workers
        _serves_reference_tokens(server, reference)

        worker_pid = workers["prefill"]["pid"]
        os.kill(workers["prefill"]["rank_pids"][1], signal.SIGKILL)  # while idle
        assert_exits(worker_pid, FAIL_BOUND_S, "the prefill worker with a dead rank")
        assert _complete(server, *CASES[0]) == reference[0]  # the decode worker serves on


def test_p1_to_d3_serves_the_colocated_tokens_and_fails_cleanly_on_rank_death(
        reference: list[str]) -> None:
    with serve(*ARGS, "--decode-tp", "3", *NO_RESTART, timeout_s=300) as server:
        with server.client() as c:
            workers = {w["role"]: w for w in c.get("/status").json()["workers"]}
        assert len(workers["decode"]["rank_pids"]) == 3, workers
        addresses = workers["decode"]["kv_rank_addresses"]
        assert len(set(addresses)) == 3 and addresses[0] == workers["decode"]["kv_address"]
        _serves_reference_tokens(server, reference)

        worker_pid, rank = workers["decode"]["pid"], workers["decode"]["rank_pids"][2]
        body = {"model": "smollm2", "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True,
                "stream": True}
        with server.client(timeout=120) as c:
            error = kill_rank_mid_stream(c, body, rank, FAIL_BOUND_S)
        assert error["code"] == "worker_lost" or "tensor-parallel" in error["message"], error
        assert_exits(worker_pid, FAIL_BOUND_S, "the decode worker with a dead rank")



@pytest.mark.parametrize("tp_flag", ["--prefill-tp", "--decode-tp"])
def test_layerwise_streaming_between_tp_sizes_serves_the_colocated_tokens(
        reference: list[str], tp_flag: str) -> None:
    """`--kv-streaming layerwise` with P3 -> D1 and P1 -> D3: every prefill rank streams its
    heads' layer groups to the decode ranks that hold them (the second turn of each prompt
    streams its prefix-cache hit first); tokens equal, every block free after."""
    with serve(*ARGS, tp_flag, "3", "--kv-streaming", "layerwise", "--kv-stream-groups", "3",
               timeout_s=300) as server:
        _serves_reference_tokens(server, reference)
        assert server.metric("pdserve:kv_transfer_bytes_total") > 0


def test_layerwise_streaming_of_chunked_prompts_from_tp_ranks(
        smollm2_engine: Callable[..., LLMEngine]) -> None:
    """P3 -> D1 layer-wise with 16-token chunks: a prompt of several chunks streams each chunk's
    groups from every prefill rank; its greedy tokens equal an engine's prefilling the same
    chunks."""
    chunked = smollm2_engine(**ENGINE, max_num_batched_tokens=16)
    want = _want(chunked, PROMPTS[1], PARAMS[0])
    with serve(*ARGS, "--prefill-tp", "3", "--kv-streaming", "layerwise",
               "--max-num-batched-tokens", "16", timeout_s=300) as server:
        for _ in range(2):  # the second turn streams its prefix-cache hit first
            assert _complete(server, PROMPTS[1], PARAMS[0]) == want
        assert server.wait_idle_blocks() == 0
