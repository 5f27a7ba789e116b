"""`--limit-concurrency`: HTTP requests in flight beyond the limit get an OpenAI-shaped 503.

uvicorn's own `limit_concurrency` answers a plain-text 503 from below the application, so the
OpenAI SDK sees no error object. `ConcurrencyLimitMiddleware` (pure ASGI, outermost) counts the
requests being served, streaming ones until their last byte, and refuses the one over the limit
with the error body every other overload gets (`overloaded`, `Retry-After: 1`), counted as
`pdserve:rejected_messages_total{component="proxy",plane="http",reason="concurrency"}`.
`/health` and `/metrics` are never refused (probes must see an overloaded server as alive).
uvicorn keeps a cap of its own, twice the limit, on open connections (idle keep-alive ones
count there): a flood of connections beyond it still gets uvicorn's plain 503.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.errors import overloaded
from proxy.limits import OnReject

EXEMPT = ("/health", "/metrics")


def connection_cap(limit: int) -> int:
    """uvicorn's `limit_concurrency` (open connections and tasks) for a request limit."""
    return 2 * limit


class ConcurrencyLimitMiddleware:
    def __init__(self, app: ASGIApp, limit: int, on_reject: OnReject) -> None:
        self.app, self.limit, self.on_reject = app, limit, on_reject
        self.in_flight = 0  # this server's requests being served (one event loop)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in EXEMPT:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            self.on_reject("concurrency")
            message = (f"The server is serving {self.in_flight} requests, its limit "
                       f"(--limit-concurrency {self.limit}); retry after 1 s.")
            await overloaded(1.0, message).to_response()(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
