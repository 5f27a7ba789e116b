"""The proxy's HTTP server settings: uvicorn with header and body timeouts it lacks.

uvicorn (h11) times out only idle keep-alive connections: a client that opens a connection and
sends nothing, or sends a request line and headers one byte every few seconds (slowloris), or
a body that never ends, holds its connection (and a slot of `--limit-concurrency`) forever.
`LimitedH11Protocol` adds a watchdog per connection, driven by h11's view of the client:

- waiting for a request line and headers (connection just made, or the first bytes of the next
  request on a keep-alive connection): closed `--header-timeout-s` after it started;
- sending a body: closed `--body-timeout-s` after the headers ended. That also bounds how long
  the rest of a refused body (413) is read and thrown away before the connection closes.

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

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm("header_timeout", self.limits.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch()

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
        if self._watching == reason or self.transport.is_closing():
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
        if not self.transport.is_closing():
            self.on_reject(reason)
            self.transport.close()


def protocol_class(limits: HttpLimits, on_reject: OnReject) -> type[LimitedH11Protocol]:
    """A `LimitedH11Protocol` bound to these limits and this rejection counter."""
    return type("LimitedH11Protocol", (LimitedH11Protocol,),
                {"limits": limits, "on_reject": staticmethod(on_reject)})


def uvicorn_config(app: Any, limits: HttpLimits, on_reject: OnReject) -> uvicorn.Config:
    return uvicorn.Config(app, http=protocol_class(limits, on_reject),
                          limit_concurrency=connection_cap(limits.limit_concurrency),
                          timeout_keep_alive=limits.keep_alive_timeout_s,
                          log_level="warning", timeout_graceful_shutdown=5)
