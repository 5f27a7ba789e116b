"""HTTP limits without a model: flag parsing, the body-limit middleware over raw ASGI messages,
the header/body watchdog of the uvicorn protocol on a real socket, lone surrogates."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from proxy.http_server import uvicorn_config
from proxy.limits import BodyLimitMiddleware, HttpLimits, lone_surrogate_path, parse_size


def test_parse_size() -> None:
    assert parse_size("4MiB") == 4 * 2**20
    assert parse_size("512 kb") == 512_000
    assert parse_size("1000") == parse_size(1000) == 1000
    with pytest.raises(ValueError, match="4MiB"):
        parse_size("lots")


@pytest.mark.parametrize("field,value", [("max_request_bytes", 0), ("tokenizer_threads", 0),
                                         ("header_timeout_s", 0.0), ("body_timeout_s", -1.0),
                                         ("limit_concurrency", 0)])
def test_limits_refuse_nonsense(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field.replace("_", "-").removesuffix("-s")):
        HttpLimits(**{field: value})


def test_lone_surrogates_are_found_with_their_path() -> None:
    assert lone_surrogate_path({"messages": [{"content": "ok"}, {"content": "a\ud800"}]}) == \
        "messages[1].content"
    assert lone_surrogate_path({"stop": ["x", "\udfff"]}) == "stop[1]"
    assert lone_surrogate_path({"\ud800": 1}) == "\ud800"
    assert lone_surrogate_path({"prompt": "emoji \U0001f600 fine", "n": 1}) is None


async def _run_middleware(limit: int, messages: list[dict[str, Any]],
                          headers: list[tuple[bytes, bytes]] = ()) -> tuple[list[dict], int, Any]:
    """(what was sent, how many receive() calls, the body the app saw)."""
    sent: list[dict] = []
    calls = 0
    seen: list[Any] = []

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        return messages[calls - 1] if calls <= len(messages) else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def app(scope: Any, rcv: Any, snd: Any) -> None:
        seen.append((await rcv())["body"])

    rejected: list[str] = []
    middleware = BodyLimitMiddleware(app, HttpLimits(max_request_bytes=limit), rejected.append)
    await middleware({"type": "http", "headers": list(headers)}, receive, send)
    return sent, calls, (seen[0] if seen else None, rejected)


def test_middleware_refuses_a_declared_length_without_reading() -> None:
    sent, calls, (seen, rejected) = asyncio.run(_run_middleware(
        10, [{"type": "http.request", "body": b"x" * 11}], [(b"content-length", b"11")]))
    assert sent[0]["status"] == 413 and calls == 0 and seen is None
    assert rejected == ["body_too_large"]


def test_middleware_stops_a_chunked_body_at_the_limit() -> None:
    chunks = [{"type": "http.request", "body": b"x" * 4, "more_body": True}] * 100
    sent, calls, (seen, rejected) = asyncio.run(_run_middleware(10, chunks))
    assert sent[0]["status"] == 413 and calls == 3 and seen is None
    assert rejected == ["body_too_large"]


def test_middleware_hands_the_body_over_in_one_piece() -> None:
    chunks = [{"type": "http.request", "body": b"ab", "more_body": True},
              {"type": "http.request", "body": b"cd", "more_body": False}]
    sent, calls, (seen, rejected) = asyncio.run(_run_middleware(10, chunks))
    assert seen == b"abcd" and calls == 2 and not rejected and not sent


@pytest.fixture(scope="module")
def tiny_server() -> Iterator[tuple[int, list[str]]]:
    """uvicorn with the limited protocol (0.5 s header, 1 s body timeout, 1 MiB bodies) and a
    tiny app."""
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    rejected: list[str] = []
    limits = HttpLimits(header_timeout_s=0.5, body_timeout_s=1.0, max_request_bytes=2**20)
    server = uvicorn.Server(uvicorn_config(BodyLimitMiddleware(app, limits, rejected.append),
                                           limits, rejected.append))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield sock.getsockname()[1], rejected
    server.should_exit = True
    thread.join(10)


def _seconds_until_closed(sock: socket.socket, limit_s: float = 5.0) -> float:
    t0 = time.monotonic()
    sock.settimeout(limit_s)
    while sock.recv(4096):
        pass
    return time.monotonic() - t0


@pytest.mark.parametrize("sent,reason,timeout_s", [
    (b"", "header_timeout", 0.5),
    (b"GET / HTTP/1.1\r\nHost:", "header_timeout", 0.5),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nabc", "body_timeout", 1.0),
])
def test_slow_requests_are_closed(tiny_server: tuple[int, list[str]], sent: bytes,
                                  reason: str, timeout_s: float) -> None:
    port, rejected = tiny_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(sent)
        took = _seconds_until_closed(sock)
    assert timeout_s * 0.8 < took < timeout_s + 2
    assert rejected[-1] == reason


def test_keep_alive_requests_get_a_fresh_header_deadline(
        tiny_server: tuple[int, list[str]]) -> None:
    port, _ = tiny_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(3):  # three requests over 1.2 s on one connection: none is cut
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            sock.settimeout(2)
            answer = b""
            while not answer.endswith(b"ok"):
                answer += sock.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200")
            time.sleep(0.4)
        sock.sendall(b"GET / HTTP/1.1\r\n")  # a partial next request still times out
        assert _seconds_until_closed(sock) < 2.5


def _post_head(size: int) -> bytes:
    return f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()


def test_a_refused_body_is_drained_so_its_413_arrives_whole(
        tiny_server: tuple[int, list[str]]) -> None:
    """The 413 (Connection: close) comes while the client is still sending 32 MiB; closing at
    once with unread bytes resets the connection (the client's send fails after a MiB or two
    and the response can be lost). Lingering: every byte is accepted, then the 413 and EOF."""
    port, rejected = tiny_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(5)
        sock.sendall(_post_head(32 * 2**20))
        for _ in range(32):
            sock.sendall(b"x" * 2**20)  # ConnectionResetError here without the linger
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower()
    assert b'"code":"request_too_large"' in body and head.lower().count(b"content-length") == 1
    assert rejected[-1] == "body_too_large"


def test_a_lingering_client_is_closed_at_the_body_deadline(
        tiny_server: tuple[int, list[str]]) -> None:
    port, rejected = tiny_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(_post_head(8 * 2**20) + b"x" * 2**16)  # refused, then it stops sending
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 413")
        took = _seconds_until_closed(sock)
    assert took < 2.5
    assert rejected[-1] == "body_too_large"  # the deadline of a refused body is not a 2nd count


def test_too_many_messages_are_refused_before_each_is_validated() -> None:
    from pydantic import ValidationError

    from proxy.limits import MAX_MESSAGES
    from proxy.openai_api import ChatCompletionRequest

    messages = [{"role": "user", "content": "x"}] * MAX_MESSAGES
    assert len(ChatCompletionRequest(messages=messages).messages) == MAX_MESSAGES
    with pytest.raises(ValidationError, match=f"at most {MAX_MESSAGES} messages"):
        ChatCompletionRequest(messages=[*messages, {"role": "nobody"}])


def test_unfinished_headers_past_h11s_limit_are_a_400(tiny_server: tuple[int, list[str]]) -> None:
    port, rejected = tiny_server
    with socket.create_connection(("127.0.0.1", port)) as sock:
        # unfinished: h11 bounds what it buffers while waiting for the end of the headers
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000)
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 400")
    assert rejected[-1] == "bad_http"


def test_uvicorn_gets_the_limits() -> None:
    from proxy.http_server import LimitedH11Protocol

    config = uvicorn_config(None, HttpLimits(limit_concurrency=7, keep_alive_timeout_s=3),
                            print)
    assert (config.limit_concurrency, config.timeout_keep_alive) == (14, 3)  # connection cap
    assert issubclass(config.http, LimitedH11Protocol)  # type: ignore[arg-type]
