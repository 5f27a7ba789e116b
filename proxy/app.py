"""The OpenAI-compatible HTTP front end (FastAPI): routes, auth, tokenization, length checks.

Endpoints: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health
(503 when no decode worker is alive), GET /metrics (Prometheus), GET /status (topology).
Every error is OpenAI-shaped JSON (proxy/errors.py); `X-Request-Id` is echoed or generated.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from engine.guided import GuidedDecoding
from proxy import openai_api as api
from proxy import responses
from proxy.cluster import ClusterClient
from proxy.detokenizer import TokenDecoder
from proxy.errors import (
    ApiError,
    install_error_handlers,
    invalid_request,
    model_not_found,
    unauthorized,
)
from proxy.metrics import ProxyMetrics
from proxy.sse import sse_headers
from proxy.structured import guided_decoding
from proxy.tools import template_messages, template_tools, tool_plan


class ChatTokenizer(TokenDecoder):
    chat_template: str | None

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str: ...


@dataclass(frozen=True)
class ProxyConfig:
    model_name: str
    max_model_len: int
    api_key: str | None = None


def build_app(config: ProxyConfig, cluster: ClusterClient, tokenizer: ChatTokenizer,
              metrics: ProxyMetrics) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
    install_error_handlers(app)
    _add_request_id_and_auth(app, config)
    _add_views(app, config, cluster, metrics)
    _add_generation(app, _Generation(config, cluster, tokenizer, metrics))
    return app


def _add_request_id_and_auth(app: FastAPI, config: ProxyConfig) -> None:
    @app.middleware("http")
    async def request_id_and_auth(
            request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = rid
        if config.api_key and request.url.path.startswith("/v1/"):
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
    @app.get("/health")
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

    def check_model(self, model: str | None) -> None:
        if model and model != self.config.model_name:
            raise model_not_found(model, [self.config.model_name])

    def prompt_ids(self, prompt: object) -> list[int]:
        """A completion's prompt (a string, a list of one string, token ids) as token ids."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            vocab = self.tokenizer.vocab_size  # type: ignore[attr-defined]
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise invalid_request(
                    f"token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", "prompt")
            return list(prompt)
        raise invalid_request(
            "prompt must be a string, a list of one string, or a list of token ids", "prompt")

    def stream(self, body: api.CompletionRequest | api.ChatCompletionRequest,
               prompt_ids: list[int], guided: GuidedDecoding | None = None
               ) -> responses.GenerationStream:
        if not prompt_ids:
            param = "prompt" if isinstance(body, api.CompletionRequest) else "messages"
            raise invalid_request("the prompt is empty", param)
        params = api.to_sampling(body, len(prompt_ids), self.config.max_model_len, guided)
        # Internal id: unique even when clients reuse an X-Request-Id.
        return responses.GenerationStream(self.cluster, self.tokenizer, self.metrics,
                                          uuid.uuid4().hex, prompt_ids, params,
                                          list(body.stop or []))


def _add_generation(app: FastAPI, gen: _Generation) -> None:
    model = gen.config.model_name

    @app.post("/v1/completions", response_model=None)
    async def completions(body: api.CompletionRequest) -> Response | api.CompletionResponse:
        gen.check_model(body.model)
        guided = guided_decoding(body)  # a 400 for a grammar that cannot compile, before work
        stream = gen.stream(body, gen.prompt_ids(body.prompt), guided)
        want_lp = body.logprobs is not None
        if body.stream:
            events = responses.completion_sse(stream, model, want_lp, body.include_usage)
            return StreamingResponse(events, headers=sse_headers(), media_type="text/event-stream")
        return await responses.completion_response(stream, model, want_lp)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: api.ChatCompletionRequest) -> Response | api.ChatCompletionResponse:
        gen.check_model(body.model)
        plan = tool_plan(body.tools, body.tool_choice)
        forced = None if plan is None else plan.grammar()
        guided = guided_decoding(body, None if forced is None else ("tool_choice", forced))
        has_tools = "tools" in (getattr(gen.tokenizer, "chat_template", None) or "")
        try:
            extra = {"tools": template_tools(plan)} if has_tools else {}
            text = gen.tokenizer.apply_chat_template(
                template_messages(body.messages, plan, has_tools), **extra)
        except Exception as e:  # template errors are the request's fault (raise_exception)
            raise invalid_request(f"chat template rejected the messages: {e}", "messages") from None
        stream = gen.stream(body, gen.tokenizer.encode(text), guided)
        want_lp = bool(body.logprobs)
        if body.stream:
            events = responses.chat_sse(stream, model, want_lp, body.include_usage, plan)
            return StreamingResponse(events, headers=sse_headers(), media_type="text/event-stream")
        return await responses.chat_response(stream, model, want_lp, plan)


__all__ = ["ApiError", "ProxyConfig", "build_app"]
