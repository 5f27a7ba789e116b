"""End-to-end: `pdserve serve` with 2 prefill + 2 decode worker processes on SmolLM2, real
sockets on 127.0.0.1, the official `openai` client, and the failure cases (disconnect, kill -9).

Tests in this module share one deployment and run in file order: the kill tests come last.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import openai
import pytest
from serving import NO_WARMUP, Server, serve, sse_events

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]
CHATS = ["What is the capital of France?", "Give me two tips for writing clean code."]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server() -> Server:
    """A worker the kill tests kill stays down (--max-restarts 0): its restart would only load
    the model beside the tests that follow."""
    with serve("--prefill", "2", "--decode", "2", "--placement", "remote", *NO_WARMUP,
               "--max-restarts", "0") as s:
        yield s


@pytest.fixture(scope="module")
def reference(smollm2_reference: LLMEngine) -> LLMEngine:
    """The colocated engine in this process: the output the disaggregated path must equal."""
    return smollm2_reference  # tests/conftest.py: loaded once per session


@pytest.fixture(scope="module")
def greedy_text(reference: LLMEngine) -> dict[str, str]:
    """Each of PROMPTS' greedy MAX_TOKENS-token continuation by the reference, computed once."""
    return {p: greedy(reference, reference.tokenizer.encode(p)) for p in PROMPTS}


def greedy(engine: LLMEngine, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> str:
    seq = engine.generate([prompt_ids], SamplingParams(max_tokens=max_tokens, temperature=0.0))[0]
    return engine.tokenizer.decode(seq.output_ids)


def chat_ids(engine: LLMEngine, text: str) -> list[int]:
    tok = engine.tokenizer
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))


def test_health_models_status(server: Server) -> None:
    with server.client() as c:
        assert c.get("/health").json()["decode_workers"] == 2
        models = c.get("/v1/models").json()
        assert models["data"][0]["id"] == "smollm2"
        roles = sorted(w["role"] for w in c.get("/status").json()["workers"])
        assert roles == ["decode", "decode", "prefill", "prefill"]
        r = c.get("/v1/models", headers={"X-Request-Id": "abc123"})
        assert r.headers["x-request-id"] == "abc123"


def test_completions_equal_colocated(server: Server, greedy_text: dict[str, str]) -> None:
    with server.client() as c:
        for prompt in PROMPTS:
            want = greedy_text[prompt]
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "ignore_eos": True}
            r = c.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want
            with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                events = list(sse_events(resp))
            assert events[-1] == "[DONE]"
            assert "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"]) == want


def test_frames_payload_between_steps_equals_colocated(greedy_text: dict[str, str]) -> None:
    """The non-default KV options: `--kv-payload frames` (ZMQ multipart frames instead of the
    stream socket) and `--no-kv-receiver-thread` (the decode worker receives between steps)."""
    with serve("--prefill", "1", "--decode", "1", "--placement", "remote",
               "--kv-payload", "frames", "--no-kv-receiver-thread", *NO_WARMUP) as s, \
            s.client() as c:
        prompt = PROMPTS[2]
        body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        want = greedy_text[prompt]
        assert r.json()["choices"][0]["text"] == want


def test_chat_equal_colocated(server: Server, reference: LLMEngine) -> None:
    with server.client() as c:
        for text in CHATS:
            ids = chat_ids(reference, text)
            seq = reference.generate([ids],
                                     SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))[0]
            want = reference.tokenizer.decode(seq.output_ids)
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS,
                    "temperature": 0}
            r = c.post("/v1/chat/completions", json=body).json()
            assert r["choices"][0]["message"]["content"] == want
            assert r["usage"]["prompt_tokens"] == len(ids)
            assert r["usage"]["completion_tokens"] == seq.num_output_tokens
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
                events = list(sse_events(resp))
            assert events[0]["choices"][0]["delta"]["role"] == "assistant"
            text_out = "".join(e["choices"][0]["delta"].get("content", "")
                               for e in events[1:-1] if e["choices"])
            assert text_out == want
            assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


def test_seeded_sampling_equals_colocated(server: Server, reference: LLMEngine,
                                          greedy_text: dict[str, str]) -> None:
    """A seeded request draws token i from (seed, i) alone: the prefill worker draws the first
    token, the decode worker the rest, and the tokens are the colocated engine's."""
    with server.client() as c:
        for i, prompt in enumerate(PROMPTS):
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.95,
                                    seed=4242 + i, ignore_eos=True)
            seq = reference.generate([reference.tokenizer.encode(prompt)], params)[0]
            want = reference.tokenizer.decode(seq.output_ids)
            assert want != greedy_text[prompt]  # really sampled
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.9, "top_p": 0.95,
                    "seed": 4242 + i, "ignore_eos": True}
            for _ in range(2):  # and again: the same seed, the same tokens
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["text"] == want


def test_openai_client(server: Server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    chat = client.chat.completions.create(model="smollm2",
                                          messages=[{"role": "user", "content": "Hi!"}],
                                          max_tokens=8, temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens <= 8
    comp = client.completions.create(model="smollm2", prompt="Hello, my name is", max_tokens=8)
    assert comp.usage.total_tokens == comp.usage.prompt_tokens + comp.usage.completion_tokens
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Count to five."}], max_tokens=12,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    stream = client.completions.create(model="smollm2", prompt="1, 2, 3,", max_tokens=6,
                                       stream=True)
    assert "".join(ch.choices[0].text for ch in stream)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="smollm2", prompt="x", max_tokens=5000)
    assert "2048" in str(e.value)


def test_bad_requests_are_openai_shaped(server: Server) -> None:
    with server.client() as c:
        r = c.post("/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
        r = c.post("/v1/chat/completions", json={"messages": [], "max_tokens": 3})
        assert r.status_code == 400 and r.json()["error"]["param"]
        r = c.post("/v1/completions", json={"prompt": "hi", "n": 17})  # over --max-n
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        r = c.post("/v1/completions", json={"prompt": "hi", "model": "gpt-7"})
        assert r.status_code == 404


async def _one_stream(client: httpx.AsyncClient, i: int) -> int:
    prompt = "Tell me a story about number " + str(i) + "." * (i % 7) * 20
    body = {"prompt": prompt, "max_tokens": 4 + i % 13, "temperature": 0.7, "seed": i,
            "stream": True, "ignore_eos": True}
    n = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                assert '"error"' not in line, line
                n += 1
    return n


def test_kv_transfer_metrics_count_requests_that_ended_first(server: Server) -> None:
    """max_tokens=1: the response can end before the prefill worker reports its transfer; the
    transfer still counts (bytes = the prompt's blocks x block size x the cache's bytes per
    token)."""
    with server.client() as c:
        # "... (float32 NHD, 45.0 KiB/token, ..."
        plan = c.get("/status").json()["workers"][0]["kv_plan"]
        bytes_per_token = round(float(re.search(r"([\d.]+) KiB/token", plan).group(1)) * 1024)
        block = int(re.search(r"blocks x (\d+) tokens", plan).group(1))  # KV moves in whole blocks
        before = server.metric("pdserve:kv_transfer_bytes_total")
        tokens = 0
        for i in range(6):
            r = c.post("/v1/completions",
                       json={"prompt": f"{i}: " + PROMPTS[i % 3], "max_tokens": 1})
            assert r.status_code == 200, r.text
            tokens += -(-r.json()["usage"]["prompt_tokens"] // block) * block
    deadline = time.monotonic() + 10
    want = tokens * bytes_per_token  # every transfer counted, once
    while ((delta := server.metric("pdserve:kv_transfer_bytes_total") - before) < want
           and time.monotonic() < deadline):
        time.sleep(0.1)
    assert delta == want, (delta, tokens, bytes_per_token)
    assert server.metric("pdserve:kv_transfer_seconds_total") > 0


def test_64_concurrent_streams_then_zero_blocks(server: Server) -> None:
    async def run() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as client:
            return await asyncio.gather(*(_one_stream(client, i) for i in range(64)))

    counts = asyncio.run(run())
    assert all(n >= 1 for n in counts)
    assert server.wait_idle_blocks() == 0


def test_multi_turn_hits_prefix_cache(server: Server, reference: LLMEngine) -> None:
    history = [{"role": "system", "content": "You are a terse assistant. " * 20},
               {"role": "user", "content": "Name a fruit."}]
    with server.client() as c:
        first = c.post("/v1/chat/completions",
                       json={"messages": history, "max_tokens": 8, "temperature": 0}).json()
        history += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                    {"role": "user", "content": "And a vegetable?"}]
        hits_before = server.metric("pdserve:prefix_cache_hits_total")
        second = c.post("/v1/chat/completions",
                        json={"messages": history, "max_tokens": 8, "temperature": 0}).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert server.metric("pdserve:prefix_cache_hits_total") > hits_before
    ids = reference.tokenizer.encode(reference.tokenizer.apply_chat_template(history))
    assert second["choices"][0]["message"]["content"] == greedy(reference, ids, 8)


def test_client_disconnect_frees_blocks(server: Server) -> None:
    body = {"prompt": "Write a very long essay about the ocean.", "max_tokens": 1500,
            "stream": True, "ignore_eos": True}
    with server.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break  # leaving the block closes the connection mid-stream
    assert server.wait_idle_blocks() == 0  # polls: the stream holds its blocks until aborted


def test_kill_prefill_worker_requests_still_served(server: Server) -> None:
    pids = server.worker_pids()
    os.kill(pids["prefill-0"], signal.SIGKILL)
    with server.client() as c:
        for i in range(4):
            r = c.post("/v1/completions", json={"prompt": f"Prefill survivor {i}", "max_tokens": 4})
            assert r.status_code == 200, r.text
    assert server.wait_idle_blocks() == 0


def _busy_decode_worker(c: httpx.Client) -> str:
    for _ in range(50):  # heartbeats refresh num_running every 0.5 s
        busy = [w for w in c.get("/status").json()["workers"]
                if w["role"] == "decode" and w["alive"] and w["num_running"] > 0]
        if busy:
            return busy[0]["worker_id"]
        time.sleep(0.1)
    raise AssertionError("no decode worker reported the running request")


def test_kill_decode_worker_mid_stream(server: Server) -> None:
    body = {"prompt": "Count slowly from one to one thousand:", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with server.client() as c:
        pids = server.worker_pids()
        with c.stream("POST", "/v1/completions", json=body) as r:
            victim = None
            for line in r.iter_lines():
                if victim is None and line.startswith("data: {"):
                    victim = _busy_decode_worker(c)
                    os.kill(pids[victim], signal.SIGKILL)
                    killed_at = time.monotonic()
                if '"error"' in line:
                    break
            assert victim is not None
            assert time.monotonic() - killed_at < 10.0
        health = c.get("/health").json()
        assert health["decode_workers"] == 1
        for i in range(3):
            r = c.post("/v1/completions", json={"prompt": f"After the crash {i}", "max_tokens": 4})
            assert r.status_code == 200, r.text
