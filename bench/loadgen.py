"""The load generator: sends a workload to an OpenAI-compatible server and times every chunk.

Arrivals follow a Poisson process at `request_rate` (exponential gaps; `burstiness` != 1 draws
gamma gaps of the same mean, as vLLM's benchmark does), or all at once when the rate is
infinite; `max_concurrency` caps the requests in flight (latency is then timed from the moment
a request is actually sent, not from its arrival). Arrival times come from the seed, so a run
is reproducible up to the server's own timing.

Each request streams (`stream: true`, `stream_options.include_usage`) over one shared
`httpx.AsyncClient`; the SSE body is read line by line (`data: {...}` then `data: [DONE]`).
A failure never raises out of `run_load`: it becomes the request's `error` kind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from bench.datasets import BenchRequest
from bench.metrics import RequestResult

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
DONE = "[DONE]"


@dataclass(frozen=True)
class LoadConfig:
    """How to send: the server, the endpoint, the arrival process, sampling."""

    base_url: str = field(default="http://127.0.0.1:8000", metadata={
        "help": "Server URL (with or without /v1)."})
    endpoint: str | None = field(default=None, metadata={
        "help": "completions or chat (default: chat for --dataset multiturn, else completions)."})
    model: str | None = field(default=None, metadata={
        "help": "Model name to request (default: the first of /v1/models)."})
    api_key: str | None = field(default=None, metadata={
        "help": "Sent as 'Authorization: Bearer KEY' (default: $OPENAI_API_KEY)."})
    request_rate: float = field(default=math.inf, metadata={
        "help": "Requests per second, Poisson arrivals (inf = all at once)."})
    burstiness: float = field(default=1.0, metadata={
        "help": "Gamma shape of the inter-arrival gaps (1 = Poisson; < 1 burstier)."})
    max_concurrency: int | None = field(default=None, metadata={
        "help": "At most this many requests in flight."})
    temperature: float = field(default=0.0, metadata={"help": "Sampling temperature."})
    ignore_eos: bool = field(default=True, metadata={
        "help": "Ask the server to generate exactly max_tokens (pdserve, vLLM, SGLang)."})
    request_timeout: float = field(default=600.0, metadata={
        "help": "Seconds before one request counts as a timeout."})
    seed: int = field(default=0, metadata={"help": "Seed of the dataset and the arrival times."})

    def __post_init__(self) -> None:
        if self.endpoint is not None and self.endpoint not in ENDPOINTS:
            raise ValueError(f"--endpoint must be completions or chat, got {self.endpoint!r}")
        if not self.request_rate > 0 or not self.burstiness > 0:
            raise ValueError("--request-rate and --burstiness must be > 0")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError("--max-concurrency must be >= 1")

    @property
    def root_url(self) -> str:
        return root_url(self.base_url)

    def headers(self) -> dict[str, str]:
        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        return {"Authorization": f"Bearer {key}"} if key else {}


@dataclass
class LoadRun:
    """The outcome of `run_load`: one result per request, in the workload's order."""

    results: list[RequestResult]
    duration_s: float
    model: str
    endpoint: str
    started_at: float  # time.time() of the first arrival


def root_url(url: str) -> str:
    """`http://host:port/v1/` -> `http://host:port` (the API paths are added to it)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def arrival_offsets(n: int, rate: float, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """Seconds from the start at which each of n requests arrives; the first at 0."""
    if math.isinf(rate):
        return np.zeros(n)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(n - 1, 0))
    return np.concatenate([[0.0], np.cumsum(gaps)])


def build_payload(req: BenchRequest, endpoint: str, model: str,
                  cfg: LoadConfig) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": req.max_tokens,
                            "temperature": cfg.temperature, "stream": True,
                            "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if endpoint == "chat":
        body["messages"] = list(req.messages)
    else:
        body["prompt"] = req.prompt
    return body


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """A `data:` line's JSON object, or DONE; None for blank lines, comments and other fields.
    Raises ValueError on a data line that is not JSON."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == DONE:
        return DONE
    obj = json.loads(data)
    if not isinstance(obj, dict):
        raise ValueError(f"SSE data is not a JSON object: {data[:80]}")
    return obj


def chunk_text(event: dict[str, Any]) -> tuple[str, str | None]:
    """(text, finish_reason) of a completions or chat chunk (first choice)."""
    choices = event.get("choices") or []
    if not choices:
        return "", None
    choice = choices[0]
    text = choice.get("text")
    if text is None:
        text = (choice.get("delta") or {}).get("content")
    return text or "", choice.get("finish_reason")


def _error_kind(event: dict[str, Any]) -> tuple[str, str]:
    err = event.get("error")
    if not isinstance(err, dict):
        return "stream_error", str(err)[:200]
    code = err.get("code") or err.get("type") or "unknown"
    return f"stream_error:{code}", str(err.get("message", ""))[:200]


class _Timer:
    """Folds the stream's events into a RequestResult."""

    def __init__(self, result: RequestResult, start: float) -> None:
        self.result, self.start, self.last = result, start, start

    def on_event(self, event: dict[str, Any], now: float) -> None:
        r = self.result
        if "error" in event and not event.get("choices"):
            r.error, r.error_detail = _error_kind(event)
            return
        text, finish = chunk_text(event)
        if text or (finish and r.ttft_s is None):
            if r.ttft_s is None:
                r.ttft_s = now - self.start
            else:
                r.itl_s.append(now - self.last)
            self.last = now
            r.num_chunks += bool(text)
        if finish:
            r.finish_reason = finish
        usage = event.get("usage")
        if isinstance(usage, dict):
            r.prompt_tokens = usage.get("prompt_tokens")
            r.completion_tokens = usage.get("completion_tokens")


async def send_request(client: httpx.AsyncClient, path: str, payload: dict[str, Any],
                       result: RequestResult, t0: float) -> None:
    """Stream one request into `result` (times relative to `t0`); never raises for the server's
    failures (they become `result.error`)."""
    start = time.perf_counter()
    result.start_s = start - t0
    timer, done = _Timer(result, start), False
    try:
        async with client.stream("POST", path, json=payload) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                result.error, result.error_detail = f"http_{resp.status_code}", _message(body)
                return
            async for line in resp.aiter_lines():
                event = parse_sse_line(line)
                if event == DONE:
                    done = True
                    break
                if isinstance(event, dict):
                    timer.on_event(event, time.perf_counter())
                    if result.error:
                        break
        result.e2e_s = time.perf_counter() - start
        if result.error is None and not done:
            result.error, result.error_detail = ("incomplete_stream",
                                                 "the stream ended without [DONE]")
        elif result.error is None and result.ttft_s is None:
            result.error, result.error_detail = "no_output", "no chunk with text or finish_reason"
    except httpx.TimeoutException as e:
        result.error, result.error_detail = "timeout", type(e).__name__
    except httpx.ConnectError as e:
        result.error, result.error_detail = "connect_error", str(e)[:200]
    except httpx.HTTPError as e:
        result.error, result.error_detail = _snake(type(e).__name__), str(e)[:200]
    except ValueError as e:  # bad JSON in a data line
        result.error, result.error_detail = "bad_sse", str(e)[:200]


def _message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:200]
    except (ValueError, KeyError, TypeError):
        return body[:200]


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


async def fetch_model(client: httpx.AsyncClient) -> str:
    """The first model id of GET /v1/models."""
    resp = await client.get("/v1/models")
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise ValueError(f"{client.base_url}/v1/models lists no model; pass --model")
    return str(data[0]["id"])


def make_client(cfg: LoadConfig, max_connections: int | None = None) -> httpx.AsyncClient:
    timeout = httpx.Timeout(cfg.request_timeout, connect=min(30.0, cfg.request_timeout))
    limits = httpx.Limits(max_connections=max_connections,
                          max_keepalive_connections=max_connections)
    return httpx.AsyncClient(base_url=cfg.root_url, timeout=timeout, limits=limits,
                             headers=cfg.headers())


def default_endpoint(dataset: str) -> str:
    return "chat" if dataset == "multiturn" else "completions"


async def run_load(cfg: LoadConfig, requests: Sequence[BenchRequest], endpoint: str,
                   on_result: Callable[[RequestResult], None] | None = None) -> LoadRun:
    """Send `requests` as `cfg` says and wait for all of them."""
    offsets = arrival_offsets(len(requests), cfg.request_rate, cfg.burstiness,
                              np.random.default_rng(cfg.seed))
    limit = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    results = [RequestResult(i, scheduled_s=float(off),
                             expected_prompt_tokens=req.num_prompt_tokens,
                             expected_output_tokens=req.max_tokens if cfg.ignore_eos else 0)
               for i, (req, off) in enumerate(zip(requests, offsets, strict=True))]
    async with make_client(cfg) as client:
        model = cfg.model or await fetch_model(client)
        path = ENDPOINTS[endpoint]

        async def one(req: BenchRequest, result: RequestResult) -> None:
            payload = build_payload(req, endpoint, model, cfg)
            async with limit or contextlib.nullcontext():
                try:  # httpx's timeout is per read; this one bounds the whole request
                    await asyncio.wait_for(send_request(client, path, payload, result, t0),
                                           cfg.request_timeout)
                except asyncio.TimeoutError:
                    result.error, result.error_detail = "timeout", f"over {cfg.request_timeout:g} s"
            if on_result is not None:
                on_result(result)

        started_at, t0 = time.time(), time.perf_counter()
        tasks = []
        for req, result in zip(requests, results, strict=True):
            delay = t0 + result.scheduled_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(req, result)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    return LoadRun(results, duration, model, endpoint, started_at)
