"""The proxy's HTTP server settings: uvicorn with header and body timeouts it lacks.

uvicorn (h11) times out only idle keep-alive connections: a client that opens a connection and
sends nothing, or sends a request line and headers one byte every few seconds (slowloris), or
a body that never ends, holds its connection (and a slot of `--limit-concurrency`) forever.
`LimitedH11Protocol` adds a watchdog per connection, driven by h11's view of the client:

- waiting for a request line and headers (connection just made, or the first bytes of the next
  request on a keep-alive connection): closed `--header-timeout-s` after it started;
- sending a body: closed `--body-timeout-s` after the headers ended. That also bounds how long
  the rest of a refused body (413) is read and thrown away before the connection closes.

A response that closes the connection while the client is still sending its body (the 413 of
a body past `--max-request-bytes`, `Connection: close`) closes it *lingering*, as nginx does:
the response is flushed and the write side shut (FIN), then the rest of the body is read and
dropped unparsed until the client finishes and closes, or the body deadline. Closing at once
with unread bytes makes the kernel send a reset, and a reset can destroy the response before
the client, still busy sending, reads it (seen in CI: a 50 MB body's 413 arrived without its
body). A client past the deadline still gets that reset: the deadline bounds the work.

Each close is counted as `pdserve:rejected_messages_total{component="proxy",plane="http",
reason="header_timeout"|"body_timeout"}`, and a request h11 cannot parse (bad syntax, or an
unfinished request line + headers over h11's 16 KiB) as `reason="bad_http"` (a 400).
`uvicorn_config()` is what both launchers (local and Ray) run: this protocol, a connection cap
of twice `--limit-concurrency` (requests over the limit itself get an OpenAI-shaped 503 from
proxy/concurrency.py), `--keep-alive-timeout-s`.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from proxy.concurrency import connection_cap
from proxy.limits import HttpLimits, OnReject


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus the header and body timeouts (class attributes set by
    `protocol_class`)."""

    limits: ClassVar[HttpLimits]
    on_reject: ClassVar[OnReject]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._watchdog: asyncio.TimerHandle | None = None
        self._watching: str | None = None  # "header_timeout" | "body_timeout"
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._socket = transport
        super().connection_made(_LingeringClose(transport, self))  # type: ignore[arg-type]
        self._arm("header_timeout", self.limits.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # the rest of a refused body: dropped unparsed
            return
        super().data_received(data)
        self._watch()

    def close_or_linger(self) -> None:
        """uvicorn's close: lingering while the client is still sending a body (see module
        doc), at once otherwise."""
        if (self._lingering or self._socket.is_closing()
                or self.conn.their_state is not h11.SEND_BODY):
            self._socket.close()
            return
        self._lingering = True
        self._arm("body_timeout", self.limits.body_timeout_s)  # armed since the headers
        if self._socket.can_write_eof():
            self._socket.write_eof()  # after the response is flushed
        self._socket.resume_reading()

    @property
    def lingering(self) -> bool:
        return self._lingering

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is not h11.SEND_BODY:  # a refused body keeps its deadline
            self._disarm()

    def send_400_response(self, msg: str) -> None:
        self.on_reject("bad_http")
        super().send_400_response(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _watch(self) -> None:
        state = self.conn.their_state
        if state is h11.IDLE:
            self._arm("header_timeout", self.limits.header_timeout_s)
        elif state is h11.SEND_BODY:
            self._arm("body_timeout", self.limits.body_timeout_s)
        else:
            self._disarm()

    def _arm(self, reason: str, seconds: float) -> None:
        """Start the `reason` deadline unless it already runs (deadlines never move later)."""
        if self._watching == reason or self._socket.is_closing():
            return
        self._disarm()
        self._watching = reason
        self._watchdog = self.loop.call_later(seconds, self._expired, reason)

    def _disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog, self._watching = None, None

    def _expired(self, reason: str) -> None:
        self._watchdog, self._watching = None, None
        if not self._socket.is_closing():
            if not self._lingering:  # a lingering body was counted when it was refused
                self.on_reject(reason)
            self._socket.close()


class _LingeringClose:
    """The transport as uvicorn sees it: the connection's own, except that `close()` asks the
    protocol whether to linger, and a lingering connection reads as closing (so uvicorn
    neither writes to it nor keeps it alive)."""

    def __init__(self, transport: asyncio.Transport, protocol: LimitedH11Protocol) -> None:
        self._transport, self._protocol = transport, protocol

    def close(self) -> None:
        self._protocol.close_or_linger()

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def protocol_class(limits: HttpLimits, on_reject: OnReject) -> type[LimitedH11Protocol]:
    """A `LimitedH11Protocol` bound to these limits and this rejection counter."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,),
                {"limits": limits, "on_reject": staticmethod(on_reject)})


def uvicorn_config(app: Any, limits: HttpLimits, on_reject: OnReject) -> uvicorn.Config:
    return uvicorn.Config(app, http=protocol_class(limits, on_reject),
                          limit_concurrency=connection_cap(limits.limit_concurrency),
                          timeout_keep_alive=limits.keep_alive_timeout_s,
                          log_level="warning", timeout_graceful_shutdown=5,
                          lifespan="off")  # no startup hooks: and Ctrl-C logs no cancelled lifespan
