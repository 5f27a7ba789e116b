"""Limits of the HTTP edge: what one request or connection may cost the proxy.

Owns `HttpLimits` (the `pdserve serve` flags: body size, header/body timeouts, concurrency,
tokenizer threads, special tokens in prompts) and `BodyLimitMiddleware`, a pure ASGI middleware
that reads each request body before any route sees it: a `Content-Length` over
`--max-request-bytes` is answered 413 without reading a byte, a chunked body is counted as it
arrives and answered 413 the moment it passes the limit, so memory per request stays bounded
and a 50 MB body costs the event loop nothing. The body then reaches the app in one piece, and
later `receive()` calls pass through (disconnect detection keeps working).

Header and body *timeouts* live in the connection protocol (proxy/http_server.py); what the
HTTP layer refuses is counted by `on_reject(reason)` as
`pdserve:rejected_messages_total{component="proxy",plane="http",reason=...}`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from pydantic_core import PydanticCustomError

from proxy.errors import ApiError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
OnReject = Callable[[str], None]

_SIZE = re.compile(r"\s*([0-9]+)\s*(|b|kib|kb|mib|mb|gib|gb)\s*", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kib": 2**10, "kb": 10**3, "mib": 2**20, "mb": 10**6, "gib": 2**30,
          "gb": 10**9}


def parse_size(text: str | int) -> int:
    """'4MiB' -> 4194304, '1000' -> 1000 (the size syntax of `--max-request-bytes`)."""
    if isinstance(text, int):
        return text
    m = _SIZE.fullmatch(text)
    if not m:
        raise ValueError(f"expected a size like 4MiB, 512KiB or 1000000, got {text!r}")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


@dataclass(frozen=True)
class HttpLimits:
    """What one HTTP request or connection may cost; every field is a `pdserve serve` flag."""

    max_request_bytes: int = field(default=4 * 2**20, metadata={
        "parse": parse_size, "help": "Largest request body (e.g. 4MiB); a larger one is answered "
                                     "413 before it is read."})
    header_timeout_s: float = field(default=10.0, metadata={
        "help": "Seconds a connection may take to send a request's line and headers (slow or "
                "partial requests are closed)."})
    body_timeout_s: float = field(default=30.0, metadata={
        "help": "Seconds a request may take to send its body once the headers are in."})
    keep_alive_timeout_s: int = field(default=5, metadata={
        "help": "Seconds an idle keep-alive connection stays open."})
    limit_concurrency: int = field(default=1024, metadata={
        "help": "Most HTTP requests served at once; beyond it a request gets an OpenAI-shaped "
                "503 with Retry-After (open connections are capped at twice this)."})
    tokenizer_threads: int = field(default=2, metadata={
        "help": "Threads that apply the chat template and tokenize prompts, off the event "
                "loop."})
    allow_special_tokens_in_content: bool = field(default=False, metadata={
        "help": "Parse special tokens written in chat message content as control tokens "
                "(default: encoded as text, so content cannot open a turn of its own)."})
    allow_special_tokens_in_prompt: bool = field(default=True, metadata={
        "help": "Parse special tokens written in a /v1/completions prompt (as vLLM does); "
                "--no-allow-special-tokens-in-prompt encodes them as text."})

    def __post_init__(self) -> None:
        for flag, value in (("--max-request-bytes", self.max_request_bytes),
                            ("--limit-concurrency", self.limit_concurrency),
                            ("--tokenizer-threads", self.tokenizer_threads),
                            ("--keep-alive-timeout-s", self.keep_alive_timeout_s)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
        for flag, seconds in (("--header-timeout-s", self.header_timeout_s),
                              ("--body-timeout-s", self.body_timeout_s)):
            if not 0 < seconds <= 3600:
                raise ValueError(f"{flag} must be above 0 and at most 3600, got {seconds!r}")


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than this server accepts ({limit} bytes, "
                         f"the server's --max-request-bytes).", code="request_too_large",
                    headers={"Connection": "close"})


def lone_surrogate_path(value: object) -> str | None:
    """Where a JSON value holds a lone UTF-16 surrogate (`"\\ud800"`), e.g. 'messages[0].content';
    None if nowhere. Such a string cannot be encoded as UTF-8, so it is refused as a 400.
    Linear in the value's size, with no work per number (a prompt of token ids)."""
    found = _surrogate_keys(value)
    if found is None:
        return None
    path = ""
    for key in found:
        path = f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)
    return path or "body"


def _surrogate_keys(value: object) -> list[str | int] | None:
    """The keys leading to the first lone surrogate (innermost last), or None."""
    if isinstance(value, str):
        return [] if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _SURROGATE.search(key):
                return [key]
            if isinstance(item, (str, dict, list)):
                inner = _surrogate_keys(item)
                if inner is not None:
                    return [key, *inner]
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, (str, dict, list)):
                inner = _surrogate_keys(item)
                if inner is not None:
                    return [i, *inner]
    return None


_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_MESSAGES = 2048  # per chat request


def check_num_messages(cls: type, value: Any) -> Any:
    """Before-validator of a chat request's `messages`: more than `MAX_MESSAGES` is refused
    before any message is validated (validating 100k tiny messages would hold the loop)."""
    if isinstance(value, list) and len(value) > MAX_MESSAGES:
        raise PydanticCustomError("invalid_value", "{message}", {
            "message": f"at most {MAX_MESSAGES} messages are allowed, got {len(value)}"})
    return value
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def may_hold_surrogates(body: bytes) -> bool:
    """False when a JSON body cannot decode to a surrogate (it has no `\\uD800`-`\\uDFFF`
    escape): the cheap test that spares most requests `lone_surrogate_path`'s walk."""
    return _ESCAPED_SURROGATE.search(body) is not None


class BodyLimitMiddleware:
    """Reads each HTTP request body up to `limits.max_request_bytes`; 413 past it."""

    def __init__(self, app: ASGIApp, limits: HttpLimits, on_reject: OnReject) -> None:
        self.app, self.limits, self.on_reject = app, limits, on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.max_request_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await self._refuse(scope, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left (or a timeout closed it)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        self.on_reject("body_too_large")
        response = body_too_large(self.limits.max_request_bytes).to_response()
        await response(scope, _no_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that returns `body` once, then defers to the connection's (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
