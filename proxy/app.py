"""The OpenAI-compatible HTTP front end (FastAPI): routes, auth, tokenization, length checks.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET|HEAD /health
(503 when no decode worker is alive), GET /metrics (Prometheus), GET /status (topology); and
proxy/extra_routes.py's GET /v1/models/{id}, POST /tokenize, POST /detokenize, CORS. /status,
like /v1/*, needs the API key when one is set. Every error is OpenAI-shaped JSON
(proxy/errors.py); `X-Request-Id` is echoed or generated. The HTTP limits (body size, prompt
length, tokenizer threads, client disconnects) are proxy/limits.py, proxy/prompts.py and
proxy/disconnect.py; timeouts and concurrency are the server's (proxy/http_server.py).
"""

from __future__ import annotations

import dataclasses
import hmac
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from engine.sampling_params import choice_seed
from protocol.rejections import Plane
from proxy import choices, responses
from proxy import openai_api as api
from proxy.cluster import ClusterClient
from proxy.concurrency import ConcurrencyLimitMiddleware
from proxy.disconnect import until_disconnected
from proxy.echo import Echo
from proxy.errors import (
    ApiError,
    install_error_handlers,
    invalid_request,
    model_not_found,
    unauthorized,
)
from proxy.extra_routes import add_cors, add_extra_routes
from proxy.limits import (
    BodyLimitMiddleware,
    HttpLimits,
    lone_surrogate_path,
    may_hold_surrogates,
)
from proxy.metrics import ProxyMetrics
from proxy.prompts import PromptEncoder
from proxy.prompts import PromptTokenizer as ChatTokenizer
from proxy.request_params import MAX_PROMPTS
from proxy.sse import sse_headers
from proxy.structured import request_guided
from proxy.tools import template_messages


@dataclass(frozen=True)
class ProxyConfig:
    model_name: str
    max_model_len: int
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()  # CORS: origins browsers may call from (none: off)
    max_n: int = 16  # most choices (`n`) per prompt
    limits: HttpLimits = field(default_factory=HttpLimits)


def build_app(config: ProxyConfig, cluster: ClusterClient, tokenizer: ChatTokenizer,
              metrics: ProxyMetrics) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    _add_request_id_and_auth(app, config)
    app.add_middleware(BodyLimitMiddleware, limits=config.limits,  # type: ignore[arg-type]
                       on_reject=http_rejections(metrics))  # before auth and routes
    app.add_middleware(ConcurrencyLimitMiddleware,  # type: ignore[arg-type]
                       limit=config.limits.limit_concurrency,
                       on_reject=http_rejections(metrics))  # outermost: before reading a body
    _add_views(app, config, cluster, metrics)
    prompts = PromptEncoder(tokenizer, config.max_model_len, config.limits)
    add_extra_routes(app, config.model_name, config.max_model_len,
                     tokenizer, prompts)  # type: ignore[arg-type]
    add_cors(app, config.allowed_origins)
    _add_generation(app, _Generation(config, cluster, tokenizer, metrics, prompts))
    return app


def http_rejections(metrics: ProxyMetrics) -> Callable[[str], None]:
    """Counts what the HTTP layer refuses, by reason, in pdserve:rejected_messages_total."""
    return lambda reason: metrics.on_rejected("proxy", Plane.HTTP.value, reason)


def _add_request_id_and_auth(app: FastAPI, config: ProxyConfig) -> None:
    @app.middleware("http")
    async def request_id_and_auth(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = rid
        if config.api_key and (request.url.path.startswith("/v1/")
                               or request.url.path in ("/tokenize", "/detokenize", "/status")):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                response: Response = unauthorized().to_response()
                response.headers["X-Request-Id"] = rid
                return response
        response = await call_next(request)
        response.headers["X-Request-Id"] = rid
        return response


def _add_views(app: FastAPI, config: ProxyConfig, cluster: ClusterClient,
               metrics: ProxyMetrics) -> None:
    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health() -> JSONResponse:
        decode, prefill = cluster.alive("decode"), cluster.alive("prefill")
        body = {"status": "ok" if decode else "unavailable", "decode_workers": len(decode),
                "prefill_workers": len(prefill)}
        return JSONResponse(body, status_code=200 if decode else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/status")
    async def status() -> JSONResponse:
        return JSONResponse({"model": config.model_name, "max_model_len": config.max_model_len,
                             "workers": cluster.topology()})

    @app.get("/v1/models")
    async def models() -> api.ModelList:
        return api.ModelList(data=[api.ModelCard(id=config.model_name,
                                                 max_model_len=config.max_model_len)])


@dataclass(frozen=True)
class _Generation:
    """What the two generation endpoints share: checks, tokenization, the request's stream."""

    config: ProxyConfig
    cluster: ClusterClient
    tokenizer: ChatTokenizer
    metrics: ProxyMetrics
    prompts: PromptEncoder

    def check(self, body: api.CompletionRequest | api.ChatCompletionRequest, raw: bytes) -> None:
        """400 for text that is not Unicode (a lone surrogate), 404 for another model."""
        where = may_hold_surrogates(raw) and lone_surrogate_path(body.model_dump())
        if where:
            raise invalid_request(f"'{where}' holds a lone UTF-16 surrogate (e.g. \\ud800 "
                                  f"without its pair): not valid Unicode text", where,
                                  "invalid_unicode")
        if body.model and body.model != self.config.model_name:
            raise model_not_found(body.model, [self.config.model_name])

    def stream(self, body: api.CompletionRequest | api.ChatCompletionRequest,
               prompt_ids: list[int], choice: int = 0) -> responses.GenerationStream:
        if not prompt_ids:
            param = "prompt" if isinstance(body, api.CompletionRequest) else "messages"
            raise invalid_request("the prompt is empty", param)
        body.check_logit_bias_vocab(self.tokenizer.vocab_size)  # type: ignore[attr-defined]
        _, guided = request_guided(body)  # checked before any work by the handlers
        params = api.to_sampling(body, len(prompt_ids), self.config.max_model_len, guided)
        if choice:
            params = dataclasses.replace(params, seed=choice_seed(params.seed, choice))
        # Internal id: unique even when clients reuse an X-Request-Id.
        return responses.GenerationStream(self.cluster, self.tokenizer, self.metrics,
                                          uuid.uuid4().hex, prompt_ids, params,
                                          list(body.stop or []))

    def choices(self, body: api.CompletionRequest | api.ChatCompletionRequest,
                prompts: list[list[int]]) -> list[list[choices.Choice]] | None:
        """One group of `n` choices per prompt (index i * n + j), or None for a request of
        one prompt and one choice (the plain path)."""
        n = body.n or 1
        if n > self.config.max_n:
            raise invalid_request(f"n must be at most {self.config.max_n} (--max-n), got {n}",
                                  "n")
        if len(prompts) * n > MAX_PROMPTS:
            raise invalid_request(f"{len(prompts)} prompts x n={n} choices is more than "
                                  f"{MAX_PROMPTS} completions in one request", "n")
        if len(prompts) == 1 and n == 1:
            return None
        return [[choices.Choice(i * n + j, self.stream(body, ids, j)) for j in range(n)]
                for i, ids in enumerate(prompts)]


def _add_generation(app: FastAPI, gen: _Generation) -> None:
    model = gen.config.model_name

    @app.post("/v1/completions", response_model=None)
    async def completions(body: api.CompletionRequest,
                          request: Request) -> Response | api.CompletionResponse:
        gen.check(body, await request.body())
        request_guided(body)  # a 400 for a grammar that cannot compile, before any work
        want_lp, echo = body.logprobs is not None, Echo.of(body)
        prompts = [await gen.prompts.completion_ids(p) for p in body.prompts()]
        groups = gen.choices(body, prompts)
        if groups is not None:
            if body.stream:
                events = choices.completion_sse(groups, model, want_lp, body.include_usage, echo)
                return StreamingResponse(events, headers=sse_headers(),
                                         media_type="text/event-stream")
            return await until_disconnected(
                request, choices.completion_response(groups, model, want_lp, echo))
        stream = gen.stream(body, prompts[0])
        if body.stream:
            events = responses.completion_sse(stream, model, want_lp, body.include_usage, echo)
            return StreamingResponse(events, headers=sse_headers(), media_type="text/event-stream")
        return await until_disconnected(
            request, responses.completion_response(stream, model, want_lp, echo))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: api.ChatCompletionRequest,
                   request: Request) -> Response | api.ChatCompletionResponse:
        gen.check(body, await request.body())
        plan, _ = request_guided(body)  # a 400 for a grammar that cannot compile, before work
        # tools in the Hermes format (proxy/tools.py); n > 1 choices do not parse tool calls
        prompt_ids = await gen.prompts.chat_ids(template_messages(body.messages, plan, False))
        want_lp = bool(body.logprobs)
        groups = gen.choices(body, [prompt_ids])
        if groups is not None:
            if body.stream:
                events = choices.chat_sse(groups, model, want_lp, body.include_usage)
                return StreamingResponse(events, headers=sse_headers(),
                                         media_type="text/event-stream")
            return await until_disconnected(
                request, choices.chat_response(groups, model, want_lp))
        stream = gen.stream(body, prompt_ids)
        if body.stream:
            events = responses.chat_sse(stream, model, want_lp, body.include_usage, plan)
            return StreamingResponse(events, headers=sse_headers(), media_type="text/event-stream")
        return await until_disconnected(request,
                                        responses.chat_response(stream, model, want_lp, plan))


__all__ = ["ApiError", "ProxyConfig", "build_app"]
