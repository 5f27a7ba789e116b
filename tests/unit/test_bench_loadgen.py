"""The load generator end to end against a tiny fake OpenAI SSE server (no model), plus the
`pdserve bench` / `bench sweep` command lines and the sweep's own server launching.

The fake server (FAKE_SERVER below) streams `max_tokens` tokens, the first chunk carrying two
of them (as a detokenizer holding back a partial character does), with a usage chunk when
asked; prompts containing FAIL503 / MIDERR / NODONE / SLOW make it fail in those ways. The same file
runs in a thread here and, as `python fake.py`, as a stand-in for `pdserve serve` in sweeps.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import uvicorn

from bench.datasets import BenchRequest, DatasetConfig, build_dataset
from bench.loadgen import DONE, LoadConfig, arrival_offsets, chunk_text, parse_sse_line, run_load
from bench.metrics import Slo, check_request, summarize
from bench.sweep import ServerSpec, SweepPlan, run_sweep, serve_cmd
from deploy.bench_cli import add_bench_parser, parse_rates, parse_seconds

FAKE_SERVER = r'''
import asyncio, json, socket, sys

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

FIRST_DELAY_S, TOKEN_DELAY_S = 0.03, 0.002


def build_app() -> FastAPI:
    app = FastAPI()
    app.state.in_flight = app.state.max_in_flight = 0

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(app, await request.json(), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(app, await request.json(), chat=True)

    return app


async def handle(app, body, chat):
    text = json.dumps(body["messages"]) if chat else body["prompt"]
    if "FAIL503" in text:
        return JSONResponse({"error": {"message": "queue full", "type": "server_error",
                                       "code": 503}},
                            status_code=503)
    n = body.get("max_tokens", 16)
    usage = (body.get("stream_options") or {}).get("include_usage")

    def event(piece, finish=None, usage=None):
        choice = ({"index": 0, "delta": {"content": piece}, "finish_reason": finish} if chat
                  else {"index": 0, "text": piece, "finish_reason": finish})
        obj = {"id": "x", "model": "fake-model", "choices": [] if usage else [choice]}
        if usage:
            obj["usage"] = usage
        return f"data: {json.dumps(obj)}\n\n".encode()

    async def gen():
        app.state.in_flight += 1
        app.state.max_in_flight = max(app.state.max_in_flight, app.state.in_flight)
        try:
            if chat:
                yield (b'data: {"choices": [{"index": 0, '
                       b'"delta": {"role": "assistant", "content": ""}}]}\n\n')
                yield b": keep-alive\n\n"
            await asyncio.sleep(2.0 if "SLOW" in text else FIRST_DELAY_S)
            sent = 0
            while sent < n:
                if "MIDERR" in text and sent >= 2:
                    yield (b'data: {"error": {"message": "worker died", '
                           b'"type": "server_error", "code": "worker_lost"}}\n\n')
                    yield b"data: [DONE]\n\n"
                    return
                k = 2 if sent == 0 and n > 2 else 1
                sent += k
                yield event(" tok" * k, "length" if sent == n else None)
                await asyncio.sleep(TOKEN_DELAY_S)
            if usage:
                yield event("", usage={"prompt_tokens": len(text.split()), "completion_tokens": n,
                                       "total_tokens": len(text.split()) + n})
            if "NODONE" not in text:
                yield b"data: [DONE]\n\n"
        finally:
            app.state.in_flight -= 1

    return StreamingResponse(gen(), media_type="text/event-stream")


if __name__ == "__main__":  # stand-in for `pdserve serve --port 0 FLAGS`
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"pdserve: serving fake-model on http://127.0.0.1:{sock.getsockname()[1]} "
          f"(fake {' '.join(sys.argv[1:])})", flush=True)
    uvicorn.Server(uvicorn.Config(build_app(), log_level="warning")).run(sockets=[sock])
'''


@pytest.fixture(scope="module")
def fake_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fake") / "fake_openai_server.py"
    path.write_text(FAKE_SERVER)
    return path


@pytest.fixture(scope="module")
def fake(fake_file: Path) -> Iterator[tuple[str, Any]]:
    """(url, app) of the fake server running in a thread of this process."""
    spec = importlib.util.spec_from_file_location("fake_openai_server", fake_file)
    assert spec and spec.loader
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.build_app()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app
    server.should_exit = True
    thread.join(10)


def requests_of(prompts: list[str], max_tokens: int = 6) -> list[BenchRequest]:
    return [BenchRequest(({"role": "user", "content": p},), p, len(p.split()), max_tokens)
            for p in prompts]


def run(url: str, reqs: list[BenchRequest], endpoint: str = "completions", **kw: Any):
    return asyncio.run(run_load(LoadConfig(base_url=url, **kw), reqs, endpoint))


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_streams_are_timed_and_counted(fake: tuple[str, Any], endpoint: str) -> None:
    url, _ = fake
    out = run(url + "/v1", requests_of([f"hello {i}" for i in range(8)], max_tokens=6), endpoint)
    assert out.model == "fake-model" and len(out.results) == 8
    for r in out.results:
        assert r.ok, (r.error, r.error_detail)
        assert 0.03 <= r.ttft_s <= r.e2e_s  # the chat role chunk does not count as a token
        assert r.completion_tokens == 6 and r.num_chunks == 5  # first chunk carries 2 tokens
        assert len(r.itl_s) == r.num_chunks - 1 and r.finish_reason == "length"
        assert r.prompt_tokens == (2 if endpoint == "completions" else 5) and check_request(r) == []
    s = summarize(out.results, out.duration_s, Slo(10.0, 1.0))
    assert s.attainment == 1.0 and s.output_tokens == 48 and s.num_chunks == 40 and s.checks == {}


def test_failures_are_counted_by_kind(fake: tuple[str, Any]) -> None:
    url, _ = fake
    out = run(url, requests_of(["fine", "FAIL503 please", "MIDERR now", "NODONE ever"]))
    kinds = [r.error for r in out.results]
    assert kinds == [None, "http_503", "stream_error:worker_lost", "incomplete_stream"]
    assert out.results[1].error_detail == "queue full"
    s = summarize(out.results, out.duration_s, Slo(10.0, 1.0))
    assert s.num_ok == 1 and s.attainment == 0.25
    assert s.errors == {"http_503": 1, "stream_error:worker_lost": 1, "incomplete_stream": 1}


def test_request_timeout_bounds_the_whole_request(fake: tuple[str, Any]) -> None:
    url, _ = fake
    t = time.perf_counter()
    out = run(url, requests_of(["SLOW one", "quick one"]), request_timeout=0.5)
    assert [r.error for r in out.results] == ["timeout", None]
    assert time.perf_counter() - t < 1.5


def test_unreachable_server_is_a_connect_error() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    out = run(f"http://127.0.0.1:{port}", requests_of(["x", "y"]), model="m", request_timeout=5.0)
    assert [r.error for r in out.results] == ["connect_error"] * 2


def test_max_concurrency_caps_requests_in_flight(fake: tuple[str, Any]) -> None:
    url, app = fake
    app.state.max_in_flight = 0
    out = run(url, requests_of([f"p{i}" for i in range(6)]), max_concurrency=2)
    assert all(r.ok for r in out.results)
    assert app.state.max_in_flight == 2


def test_poisson_arrivals_are_paced_and_reproducible(fake: tuple[str, Any]) -> None:
    url, _ = fake
    rate = 20.0
    out = run(url, requests_of([f"p{i}" for i in range(10)], max_tokens=2), request_rate=rate,
              seed=7)
    expected = arrival_offsets(10, rate, 1.0, np.random.default_rng(7))
    assert [r.scheduled_s for r in out.results] == pytest.approx(list(expected))
    for r in out.results:  # sent at (not before) its arrival time, and not much later
        assert r.scheduled_s - 1e-3 <= r.start_s <= r.scheduled_s + 0.25
    assert out.duration_s >= expected[-1]


def test_arrival_offsets() -> None:
    rng = lambda: np.random.default_rng(0)  # noqa: E731
    x = arrival_offsets(20001, 4.0, 1.0, rng())
    assert x[0] == 0.0 and np.all(np.diff(x) >= 0)
    assert np.mean(np.diff(x)) == pytest.approx(0.25, rel=0.03)
    assert np.std(np.diff(x)) == pytest.approx(0.25, rel=0.05)  # exponential: std = mean
    bursty = np.diff(arrival_offsets(20001, 4.0, 0.25, rng()))
    assert np.mean(bursty) == pytest.approx(0.25, rel=0.05) and np.std(bursty) > 0.4
    assert np.array_equal(arrival_offsets(5, math.inf, 1.0, rng()), np.zeros(5))
    assert np.array_equal(arrival_offsets(50, 3.0, 1.0, rng()),
                          arrival_offsets(50, 3.0, 1.0, rng()))


def test_sse_parsing() -> None:
    assert parse_sse_line("") is None and parse_sse_line(": keep-alive") is None
    assert parse_sse_line("event: message") is None
    assert parse_sse_line("data: [DONE]") == DONE
    assert parse_sse_line('data:{"a": 1}') == {"a": 1}
    with pytest.raises(ValueError):
        parse_sse_line("data: {not json")
    with pytest.raises(ValueError):
        parse_sse_line("data: [1, 2]")
    assert chunk_text({"choices": [{"text": "hi", "finish_reason": None}]}) == ("hi", None)
    assert chunk_text({"choices": [{"delta": {"content": "yo"}, "finish_reason": "stop"}]}) == (
        "yo", "stop")
    assert chunk_text({"choices": [{"delta": {"role": "assistant"}}]}) == ("", None)
    assert chunk_text({"choices": [], "usage": {"completion_tokens": 3}}) == ("", None)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pdserve")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_bench_cli_writes_result_json_and_plot(fake: tuple[str, Any], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = fake
    result = tmp_path / "r.json"
    rc = cli(["bench", "--base-url", url, "--num-prompts", "6", "--input-len", "uniform:3:9",
              "--output-len", "5", "--request-rate", "50", "--tokenizer", "none", "--no-progress",
              "--slo-ttft", "500ms", "--slo-tpot", "0.2", "--result-file", str(result), "--plot",
              "--warmup", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "SLO attainment:" in out and "100.0% (6/6)" in out and "TTFT" in out
    doc = json.loads(result.read_text())
    assert doc["kind"] == "bench" and doc["model"] == "fake-model"
    assert doc["endpoint"] == "completions"
    assert doc["summary"]["num_ok"] == 6 and doc["summary"]["output_tokens"] == 30
    assert doc["slo"]["ttft_s"] == 0.5 and len(doc["requests"]) == 6
    assert "itl_s" not in doc["requests"][0]
    assert doc["machine"]["cpus"] >= 1 and doc["load"]["request_rate"] == 50.0
    if importlib.util.find_spec("matplotlib"):
        assert result.with_suffix(".png").stat().st_size > 1000


def test_sweep_over_urls_reports_goodput(fake: tuple[str, Any], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = fake
    prefix = tmp_path / "sw"
    rc = cli(["bench", "sweep", "--url", f"a={url}", "--url", f"b={url}/v1",
              "--request-rates", "40,20", "--num-prompts", "4", "--input-len", "4",
              "--output-len", "3", "--tokenizer", "none", "--no-progress", "--warmup", "1",
              "--slo-ttft", "5", "--output", str(prefix)])
    assert rc == 0
    tables = capsys.readouterr().out
    assert "| a | " in tables and "| 20 | 100% |" in tables
    doc = json.loads(prefix.with_suffix(".json").read_text())
    assert [c["name"] for c in doc["configs"]] == ["a", "b"]
    for c in doc["configs"]:
        assert [p["request_rate"] for p in c["points"]] == [20.0, 40.0], c
        assert c["goodput"] == {"rate": 40.0, "first_miss": None}
        for p in c["points"]:  # what aligns a point with server logs (bench.serving_trace)
            assert len(p["requests"]) == 4 and "itl_s" not in p["requests"][0]
            assert abs(p["started_at"] - time.time()) < 120
    assert "goodput (req/s)" in prefix.with_suffix(".md").read_text()
    if importlib.util.find_spec("matplotlib"):
        assert prefix.with_suffix(".png").stat().st_size > 1000


def test_sweep_starts_and_stops_its_servers(fake_file: Path, tmp_path: Path) -> None:
    cfg = DatasetConfig(num_prompts=3, input_len="4", output_len="3")
    plan = SweepPlan(rates=(30.0,), requests=(tuple(build_dataset(cfg, None, 0)),), warmup=(),
                     endpoint="chat", slo=Slo(5.0, 1.0))
    specs = [ServerSpec.parse("fake=--prefill 1 --decode 1", is_url=False),
             ServerSpec.parse("broken=--colocated", is_url=False)]
    launched: list[str] = []

    def on_point(name: str, rate: float, run: Any, s: Any) -> None:
        launched.append(run.results[0].error or "ok")

    results = run_sweep(specs[:1], LoadConfig(), plan, serve_cmd=[sys.executable, str(fake_file)],
                        log_dir=tmp_path, on_point=on_point, startup_timeout_s=30)
    broken = run_sweep(specs[1:], LoadConfig(), plan, startup_timeout_s=30,
                       serve_cmd=[sys.executable, "-c",
                                  "import sys; print('bad flag'); sys.exit(2)"])
    assert launched == ["ok"] and results[0].error is None
    assert results[0].points[0][1].num_ok == 3
    log = (tmp_path / "server_fake.log").read_text()
    assert "pdserve: serving fake-model" in log and "--prefill 1 --decode 1" in log
    assert broken[0].points == [] and "exited" in (broken[0].error or "")
    assert "bad flag" in broken[0].error


def test_cli_value_parsers() -> None:
    assert parse_seconds("250ms") == 0.25 and parse_seconds("2") == 2.0
    assert parse_seconds("0.5s") == 0.5
    assert parse_rates("2, 0.5,1") == (0.5, 1.0, 2.0) and parse_rates("inf") == (math.inf,)
    for bad in ("fast", "1h"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_seconds(bad)
    for bad in ("", "0,1", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_rates(bad)
    with pytest.raises(ValueError, match="NAME=VALUE"):
        ServerSpec.parse("http://x", is_url=True)
    with pytest.raises(ValueError, match="http"):
        ServerSpec.parse("a=localhost:8000", is_url=True)
    assert ServerSpec.parse("1p1d=--prefill 1 --decode 1", is_url=False).flags == (
        "--prefill", "1", "--decode", "1")


def test_sweep_records_the_servers_prefill_placements(fake: tuple[str, Any]) -> None:
    from bench.sweep import PLACED_RE, placement_counts

    text = ('# TYPE pdserve:prefill_placement_total counter\n'
            'pdserve:prefill_placement_total{placement="remote"} 7.0\n'
            'pdserve:prefill_placement_total{placement="local"} 3.0\n')
    assert dict(PLACED_RE.findall(text)) == {"remote": "7.0", "local": "3.0"}
    assert placement_counts(fake[0]) == {}  # a server without those metrics


def test_the_sweep_starts_servers_at_the_log_level_it_is_given() -> None:
    """`bench sweep --server-log-level debug`: `pdserve --log-level debug serve ...` (the flag
    is pdserve's, before the command), on 127.0.0.1 and a free port."""
    from deploy.cli import build_parser

    args = build_parser().parse_args(list(serve_cmd("debug")[3:]))
    assert args.log_level == "debug" and (args.host, args.port) == ("127.0.0.1", 0)
    default = build_parser().parse_args(list(serve_cmd()[3:]))
    assert default.log_level == "INFO" and (default.host, default.port) == ("127.0.0.1", 0)

