"""The HTTP edge holds: huge, chunked and slow requests are refused in bounded time and memory,
other clients stay served, and a client that leaves frees its blocks (issue #14, item 5).

One real deployment (`pdserve serve --colocated`, SmolLM2, 127.0.0.1) with short timeouts,
shared with tests/integration/test_colocated.py (tests/conftest.py, `shared_deployment`).
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from serving import API_KEY, BODY_TIMEOUT_S, GUARDED, HEADER_TIMEOUT_S, Server

KEY = API_KEY
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(shared_deployment: Callable[..., Server]) -> Server:
    """`--api-key KEY`, short header and body timeouts; shared with test_colocated.py."""
    return shared_deployment(*GUARDED)


def _rejected(server: Server, reason: str) -> float:
    return server.metric("pdserve:rejected_messages_total",
                         f'component="proxy",plane="http",reason="{reason}"')


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        line = next(x for x in f if x.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


class _HealthProbe:
    """Polls /health from a thread; records the slowest answer."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self.count = url, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while not self._stop.is_set():
                t0 = time.monotonic()
                assert c.get("/health").status_code == 200
                self.worst = max(self.worst, time.monotonic() - t0)
                self.count += 1
                time.sleep(0.05)

    def __enter__(self) -> _HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)


def test_a_50mb_json_body_is_413_fast_and_health_stays_fast(server: Server) -> None:
    body = json.dumps({"prompt": "a" * (50 * 2**20), "max_tokens": 1}).encode()
    before, rss_before = _rejected(server, "body_too_large"), _rss_mib(server.proc.pid)
    with _HealthProbe(server.url) as probe, server.client(timeout=30) as c:
        time.sleep(0.3)
        t0 = time.monotonic()
        r = c.post("/v1/completions", content=body, headers=AUTH)
        elapsed = time.monotonic() - t0
        time.sleep(0.3)
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "request_too_large"
    assert elapsed < 5.0, f"the 413 took {elapsed:.1f} s"
    assert probe.count >= 3 and probe.worst < 1.0, f"/health took {probe.worst:.2f} s"
    assert _rss_mib(server.proc.pid) - rss_before < 100, "the proxy's memory grew"
    assert _rejected(server, "body_too_large") == before + 1


def test_a_chunked_body_past_the_limit_is_413(server: Server) -> None:
    sent = []

    def chunks() -> Iterator[bytes]:
        for _ in range(64):  # 64 MiB if nobody stops it
            sent.append(1)
            yield b"x" * 2**20

    before = _rejected(server, "body_too_large")
    with server.client(timeout=30) as c:
        r = c.post("/v1/completions", content=chunks(), headers=AUTH)
    assert r.status_code == 413, r.text
    assert _rejected(server, "body_too_large") == before + 1


def _port(server: Server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def _closed_after(sock: socket.socket, limit_s: float, drip: bytes = b"") -> float:
    """Drip `drip` one byte every 0.3 s (then nothing) until the server closes the socket;
    seconds it took (fails past `limit_s`)."""
    t0 = time.monotonic()
    sock.settimeout(0.3)
    for i in range(int(limit_s / 0.3) + 1):
        if i < len(drip):
            try:
                sock.send(drip[i:i + 1])
            except OSError:
                return time.monotonic() - t0
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - t0
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - t0
    raise AssertionError(f"the server kept the connection open past {limit_s} s")


def test_slowloris_headers_are_timed_out_and_do_not_block_others(server: Server) -> None:
    before = _rejected(server, "header_timeout")
    silent = socket.create_connection(("127.0.0.1", _port(server)))
    slow = socket.create_connection(("127.0.0.1", _port(server)))
    slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    with _HealthProbe(server.url) as probe:
        took = _closed_after(slow, HEADER_TIMEOUT_S + 5, drip=b"X-Slow: " + b"a" * 100)
        took_silent = _closed_after(silent, HEADER_TIMEOUT_S + 5)
    silent.close()
    slow.close()
    assert took < HEADER_TIMEOUT_S + 3
    assert took_silent < HEADER_TIMEOUT_S + 3
    assert probe.count >= 3 and probe.worst < 1.0
    assert _rejected(server, "header_timeout") >= before + 2


def test_a_body_that_never_ends_is_timed_out(server: Server) -> None:
    before = _rejected(server, "body_timeout")
    sock = socket.create_connection(("127.0.0.1", _port(server)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n"
                 b'{"prompt": ')
    took = _closed_after(sock, BODY_TIMEOUT_S + 5)
    sock.close()
    assert took < BODY_TIMEOUT_S + 3
    assert _rejected(server, "body_timeout") == before + 1


def test_a_non_streaming_request_is_aborted_when_its_client_leaves(server: Server) -> None:
    assert server.wait_idle_blocks() == 0
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True})
    sock = socket.create_connection(("127.0.0.1", _port(server)))
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n{body}"
                 .encode())
    deadline = time.monotonic() + 30
    while server.metric("pdserve:kv_cache_used_blocks") == 0:
        assert time.monotonic() < deadline, "the request never reserved blocks"
        time.sleep(0.2)
    sock.close()
    t0 = time.monotonic()
    assert server.wait_idle_blocks(timeout_s=10) == 0, "blocks still held after the client left"
    assert time.monotonic() - t0 < 10
    with server.client() as c:  # and the server still serves
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, headers=AUTH)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("path,payload,fixed_status", [
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\ud800b"}], '
                             b'"max_tokens": 2}', 200),
    ("/v1/completions", b'{"prompt": "\\udfff", "max_tokens": 2}', 200),
    ("/v1/completions", b'{"prompt": "hi", "model": "\\ud800", "max_tokens": 2}', 404),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["\\ud800"], "max_tokens": 2}', 200),
])
def test_a_lone_surrogate_is_a_400(server: Server, path: str, payload: bytes,
                                   fixed_status: int) -> None:
    with server.client() as c:
        r = c.post(path, content=payload, headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_unicode"
        ok = c.post(path, content=payload.replace(b"\\ud800", b"\\ud83d\\ude00")
                    .replace(b"\\udfff", b"\\ud83d\\ude00"),
                    headers={**AUTH, "Content-Type": "application/json"})
        assert ok.status_code == fixed_status, ok.text  # a surrogate *pair* is an emoji


def test_prompts_too_long_to_fit_are_refused_before_tokenizing(server: Server) -> None:
    with server.client() as c:
        ids = c.post("/v1/completions", json={"prompt": [1] * 2048, "max_tokens": 1},
                     headers=AUTH)
        huge = c.post("/v1/completions", json={"prompt": "ab" * 1_500_000, "max_tokens": 1},
                      headers=AUTH)
        chat = c.post("/v1/chat/completions", headers=AUTH,
                      json={"messages": [{"role": "user", "content": "ab" * 1_500_000}]})
        stop = c.post("/v1/completions", json={"prompt": "a", "stop": ["x" * 5000]},
                      headers=AUTH)
    for r in (ids, huge, chat):
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
    assert stop.status_code == 400 and stop.json()["error"]["param"] == "stop", stop.text


def test_status_needs_the_api_key(server: Server) -> None:
    with server.client() as c:
        assert c.get("/status").status_code == 401
        assert c.get("/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/status", headers=AUTH).status_code == 200
        assert c.get("/health").status_code == 200  # probes stay open


def test_the_official_openai_client_still_works(server: Server) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, timeout=60)
    chat = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4,
        temperature=0)
    assert chat.choices[0].message.content and chat.usage.completion_tokens >= 1
    text = client.completions.create(model="smollm2", prompt="The capital of France is",
                                     max_tokens=3, temperature=0)
    assert text.choices[0].text
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="smollm2", prompt="x" * (5 * 2**20), max_tokens=1)
    assert e.value.status_code == 413
