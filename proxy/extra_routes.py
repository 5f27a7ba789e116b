"""Routes besides generation: `GET /v1/models/{id}`, vLLM's `/tokenize` and `/detokenize`, and
CORS (`--allowed-origins`).

`/tokenize` takes vLLM's two request shapes (`{"prompt": ...}` or `{"messages": [...]}`, with
`add_special_tokens`, `add_generation_prompt`, `return_token_strs`) and answers
`{"count", "max_model_len", "tokens", "token_strs"}`; `/detokenize` takes `{"tokens": [...]}`
and answers `{"prompt": ...}`. The chat form renders the chat template exactly as
`/v1/chat/completions` does, so `count` is the `usage.prompt_tokens` a request would report.
"""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel, ConfigDict, Field

from proxy import openai_api as api
from proxy.errors import invalid_request, model_not_found
from proxy.limits import HttpLimits
from proxy.prompts import PromptEncoder

MAX_DETOKENIZE_TOKENS = 1 << 20


class RouteTokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True,
               parse_special: bool = True) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                    special_in_content: bool = False,
                    add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def id_to_token(self, token_id: int) -> str | None: ...

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str: ...


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest / TokenizeChatRequest in one model (exactly one of
    `prompt` and `messages`)."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[api.ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(True, strict=True)
    add_generation_prompt: bool = Field(True, strict=True)
    return_token_strs: bool | None = Field(False, strict=True)


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str | None] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int] = Field(max_length=MAX_DETOKENIZE_TOKENS)


class DetokenizeResponse(BaseModel):
    prompt: str


def add_cors(app: FastAPI, allowed_origins: tuple[str, ...]) -> None:
    """Browsers may call the API from these origins (none: no CORS headers at all)."""
    if allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins),
                           allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["X-Request-Id"])


def add_extra_routes(app: FastAPI, model_name: str, max_model_len: int,
                     tokenizer: RouteTokenizer, prompts: PromptEncoder) -> None:
    """`prompts`: /tokenize runs on its thread pool with the same special-token policy as the
    generation endpoints (so it counts what they see)."""
    def check_model(model: str | None) -> None:
        if model and model != model_name:
            raise model_not_found(model, [model_name])

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> api.ModelCard:
        check_model(model_id or "?")
        return api.ModelCard(id=model_name, max_model_len=max_model_len)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        check_model(body.model)
        limits = prompts.limits
        ids = await prompts.run(lambda: _ids_of(body, tokenizer, limits), "messages")
        strs = [tokenizer.id_to_token(t) for t in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=max_model_len, tokens=ids,
                                token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        check_model(body.model)
        bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise invalid_request(f"token id {bad[0]} is outside the vocabulary "
                                  f"(0..{tokenizer.vocab_size - 1})", "tokens")
        return DetokenizeResponse(prompt=tokenizer.decode(body.tokens, skip_special_tokens=False))


def _ids_of(body: TokenizeRequest, tokenizer: RouteTokenizer, limits: HttpLimits) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise invalid_request("give exactly one of 'prompt' and 'messages'", "prompt")
    if body.prompt is not None:
        return tokenizer.encode(body.prompt, body.add_special_tokens,
                                limits.allow_special_tokens_in_prompt)
    messages: list[dict[str, Any]] = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.content or ""}
        for m in body.messages or []]
    try:
        return tokenizer.encode_chat(messages, body.add_generation_prompt,
                                     limits.allow_special_tokens_in_content,
                                     body.add_special_tokens)
    except UnicodeError:
        raise
    except Exception as e:  # template errors are the request's fault (raise_exception)
        raise invalid_request(f"chat template rejected the messages: {e}", "messages") from None
