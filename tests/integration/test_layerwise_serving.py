"""End-to-end `--kv-streaming layerwise`: 1 prefill + 1 decode worker process on SmolLM2, a
64-token step budget so longer prompts prefill in chunks (chunk x layer-group parts on the
wire). Greedy and seeded outputs equal the colocated engine's, also on a prefix-cache hit; a
prefill worker killed (SIGKILL) while a long prompt streams leaves the request served (retried
or prefilled locally) and no block used."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from serving import NO_WARMUP, Server, serve

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

LONG = ("The history of the printing press begins with movable type in East Asia and continues "
        "with Gutenberg's press in Mainz around 1450, which spread across Europe within fifty "
        "years and changed how knowledge, religion and politics travelled. ") * 3
PROMPTS = ["The three primary colors are", LONG + "In short,"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def server() -> Server:
    with serve("--prefill", "1", "--decode", "1", "--placement", "remote",
               "--kv-streaming", "layerwise", "--max-num-batched-tokens", "64", *NO_WARMUP) as s:
        yield s


@pytest.fixture(scope="module")
def reference(smollm2_reference: LLMEngine) -> LLMEngine:
    return smollm2_reference  # tests/conftest.py: loaded once per session


def complete(server: Server, body: dict) -> str:
    with server.client() as c:
        r = c.post("/v1/completions", json={"max_tokens": MAX_TOKENS, "ignore_eos": True, **body})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_greedy_seeded_and_prefix_hit_equal_colocated(server: Server,
                                                      reference: LLMEngine) -> None:
    tok = reference.tokenizer
    assert len(tok.encode(PROMPTS[1])) > 2 * 64  # three chunks or more
    for i, prompt in enumerate(PROMPTS):
        ids = tok.encode(prompt)
        greedy = reference.generate([ids], SamplingParams(max_tokens=MAX_TOKENS, temperature=0,
                                                          ignore_eos=True))[0]
        assert complete(server, {"prompt": prompt, "temperature": 0}) == tok.decode(
            greedy.output_ids)
        seeded = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=77 + i,
                                ignore_eos=True)
        want = tok.decode(reference.generate([ids], seeded)[0].output_ids)
        assert complete(server, {"prompt": prompt, "temperature": 0.9, "seed": 77 + i}) == want
    hits = server.metric("pdserve:prefix_cache_hits_total")
    prompt = PROMPTS[1] + " Moreover,"  # shares the long prefix prefilled above
    greedy = reference.generate([tok.encode(prompt)], SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0]
    assert complete(server, {"prompt": prompt, "temperature": 0}) == tok.decode(greedy.output_ids)
    assert server.metric("pdserve:prefix_cache_hits_total") > hits
    assert server.wait_idle_blocks() == 0


def test_kill_prefill_worker_mid_stream(server: Server) -> None:
    pid = server.worker_pids()["prefill-0"]
    results: list[int] = []

    def request() -> None:
        with server.client() as c:
            r = c.post("/v1/completions", json={"prompt": LONG * 4 + "Finally,", "max_tokens": 4})
            results.append(r.status_code)

    thread = threading.Thread(target=request)
    thread.start()
    time.sleep(1.0)  # the long prompt is prefilling (dozens of chunks on this CPU)
    os.kill(pid, signal.SIGKILL)
    thread.join(180)
    assert results and results[0] in (200, 503), results
    # count the live workers' blocks (a worker restarted under the same id may still be booting)
    deadline = time.monotonic() + 60
    while (used := live_used_blocks(server)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert used == 0


def live_used_blocks(server: Server) -> int:
    with server.client() as c:
        workers = c.get("/status").json()["workers"]
    return sum(w["used_blocks"] for w in workers if w["alive"])
