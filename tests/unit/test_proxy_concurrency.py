"""`--limit-concurrency` at the application (proxy/concurrency.py): the request over the limit
gets the OpenAI error body (503 `overloaded`, Retry-After) the SDK can read, counted as a
`concurrency` rejection; /health is never refused; a finished request frees its slot."""

from __future__ import annotations

import asyncio

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from proxy.concurrency import ConcurrencyLimitMiddleware


def test_the_request_over_the_limit_gets_an_openai_503_and_health_still_answers() -> None:
    async def body() -> None:
        release = asyncio.Event()

        async def slow(request: Request) -> PlainTextResponse:
            await release.wait()
            return PlainTextResponse("done")

        async def health(request: Request) -> PlainTextResponse:
            return PlainTextResponse("ok")

        rejected: list[str] = []
        app = ConcurrencyLimitMiddleware(
            Starlette(routes=[Route("/v1/completions", slow, methods=["POST"]),
                              Route("/health", health)]), limit=2, on_reject=rejected.append)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = [asyncio.create_task(client.post("/v1/completions")) for _ in range(2)]
            while app.in_flight < 2:
                await asyncio.sleep(0.01)
            over = await client.post("/v1/completions")
            assert over.status_code == 503 and over.headers["retry-after"] == "1"
            error = over.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", "overloaded")
            assert "--limit-concurrency 2" in error["message"]
            assert rejected == ["concurrency"]
            assert (await client.get("/health")).text == "ok"
            release.set()
            assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
            assert app.in_flight == 0
            assert (await client.post("/v1/completions")).status_code == 200
    asyncio.run(body())
