"""Adaptive prefill placement end to end (SmolLM2, real worker processes, 1 prefill + 1 decode).

- Outputs do not depend on placement: with every prompt prefilled by the decode worker in
  capped chunks (`--placement local`), greedy and seeded completions equal the colocated
  engine's, as remote ones do (tests/integration/test_serving.py).
- With the prefill worker kept busy by long prompts while the decode worker runs a batch, new
  short requests are placed locally and reach their first token sooner than the same requests
  under `--placement remote`, measured in the same test.
- 64 concurrent mixed requests all finish and leave no used block on any worker.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from serving import NO_WARMUP, Server, serve

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPTS = ["The three primary colors are", "def fibonacci(n):",
           "Once upon a time, in a small village by the sea,"]
LONG = "Summarise the following notes. " + " ".join(
    f"Note {i}: the shipment of item {i} left the warehouse on day {i % 7}." for i in range(60))
SHORT = "Say hi."
ONE_P_ONE_D = ("--prefill", "1", "--decode", "1", "--max-num-batched-tokens", "512")


@pytest.fixture(scope="module")
def reference(smollm2_reference: LLMEngine) -> LLMEngine:
    return smollm2_reference  # tests/conftest.py: built once per session (the same config)


def test_local_placement_outputs_equal_colocated(reference: LLMEngine) -> None:
    """Chunk caps from the placement rule (tight TPOT SLO, a running stream beside) change how
    the prompts are cut into steps and batched, never the tokens (all sent at once)."""
    tok = reference.tokenizer
    cases = []  # (request body, the colocated engine's text)
    for i, prompt in enumerate([*PROMPTS, LONG]):
        for params in (SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True),
                       SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95,
                                      seed=99 + i, ignore_eos=True)):
            want = tok.decode(reference.generate([tok.encode(prompt)], params)[0].output_ids)
            cases.append(({"prompt": prompt, "max_tokens": 16, "ignore_eos": True,
                           "temperature": params.temperature, "top_p": params.top_p,
                           "seed": params.seed}, want))

    async def run(url: str) -> list[str]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            async def one(body: dict) -> str:
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                return r.json()["choices"][0]["text"]
            return list(await asyncio.gather(*[one(body) for body, _ in cases]))

    with serve(*ONE_P_ONE_D, "--placement", "local", "--slo-tpot", "30ms") as s, \
            s.client() as c, c.stream("POST", "/v1/completions", json={
                "prompt": SHORT, "max_tokens": 400, "ignore_eos": True, "stream": True}) as bg:
        texts = asyncio.run(run(s.url))
        assert texts == [want for _, want in cases]
        assert s.metric("pdserve:prefill_placement_total", 'placement="remote"') == 0
        assert s.metric("pdserve:prefill_placement_total", 'placement="local"') >= 9
        bg.close()


async def _ttft(client: httpx.AsyncClient, prompt: str, max_tokens: int) -> float:
    """Seconds from sending a streamed completion to its first text chunk (read to the end)."""
    t0 = time.monotonic()
    ttft = None
    async with client.stream("POST", "/v1/completions", json={
            "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "temperature": 0}) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            if ttft is None and line.startswith("data: {") and '"text"' in line:
                ttft = time.monotonic() - t0
    assert ttft is not None
    return ttft


async def _busy_then_short(url: str) -> list[float]:
    """Two long streams decoding, two long prompts for the prefill side, then three short
    requests: their times to first token."""
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        streams = [asyncio.create_task(_ttft(client, SHORT, 96)) for _ in range(2)]
        await asyncio.sleep(1.5)  # the streams are decoding
        longs = [asyncio.create_task(_ttft(client, f"Ticket {uuid.uuid4().hex}. {LONG}", 1))
                 for _ in range(2)]  # a new prefix each: no prefix-cache hit
        await asyncio.sleep(0.3)
        shorts = await asyncio.gather(*[_ttft(client, f"{SHORT} {i}", 4) for i in range(3)])
        await asyncio.gather(*longs, *streams)
    return list(shorts)


def _placements(s: Server) -> tuple[float, float]:
    return (s.metric("pdserve:prefill_placement_total", 'placement="local"'),
            s.metric("pdserve:prefill_placement_total", 'placement="remote"'))


SLOS = ("--slo-ttft", "2s", "--slo-tpot", "150ms")


@pytest.fixture(scope="module")
def adaptive() -> Iterator[Server]:
    """One adaptive 1P1D server for the module's adaptive tests (a start-up costs ~10 s)."""
    with serve(*ONE_P_ONE_D, "--placement", "adaptive", *SLOS) as s:
        yield s


def test_short_requests_go_local_while_the_prefill_worker_is_busy(adaptive: Server) -> None:
    # No warm-up: it seeds adaptive placement's cost models, and remote placement has none
    with serve(*ONE_P_ONE_D, "--placement", "remote", *SLOS, *NO_WARMUP) as s:
        remote = asyncio.run(_busy_then_short(s.url))
    s = adaptive
    asyncio.run(_busy_then_short(s.url))  # the cost models learn from a first round
    local_before, remote_before = _placements(s)
    measured = asyncio.run(_busy_then_short(s.url))
    local_after, remote_after = _placements(s)
    assert remote_after - remote_before >= 2, "the long prompts should go remote"
    assert local_after - local_before >= 3, "the short prompts should go local"
    assert s.wait_idle_blocks() == 0
    assert statistics.median(measured) < 0.7 * statistics.median(remote), (measured, remote)


def test_64_concurrent_mixed_requests_leave_no_block_used(adaptive: Server) -> None:
    async def run(url: str) -> list[int]:
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            async def one(i: int) -> int:
                prompt = LONG if i % 4 == 0 else PROMPTS[i % 3] + f" #{i}"
                r = await client.post("/v1/completions", json={
                    "prompt": prompt, "max_tokens": 4 + i % 13, "temperature": 0})
                return r.status_code
            return await asyncio.gather(*[one(i) for i in range(64)])

    s = adaptive
    local_before, remote_before = _placements(s)
    codes = asyncio.run(run(s.url))
    assert codes == [200] * 64
    local, remote = _placements(s)
    assert (local - local_before) + (remote - remote_before) == 64
    assert s.wait_idle_blocks() == 0
