"""OpenAI-shaped errors at the HTTP edge.

Owns: `ApiError` (status + the `{"error": {"message", "type", "param", "code"}}` body + extra
headers), one constructor per failure a client can cause or meet (bad request, unknown model,
bad key, overload, context too long, internal), and `install_error_handlers(app)`, which makes
every failure of a FastAPI app — pydantic validation, malformed JSON, unknown route, wrong
method, an unexpected exception — answer in that shape. Never a bare traceback.

Never touches workers or tokenizers; callers raise these, the handlers render them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
SERVER_ERROR = "server_error"

# pydantic error types that mean "wrong JSON type" rather than "bad value".
_TYPE_ERRORS = frozenset({
    "string_type", "int_type", "int_parsing", "int_from_float", "float_type", "float_parsing",
    "bool_type", "bool_parsing", "list_type", "dict_type", "model_type", "model_attributes_type",
})


class ApiError(Exception):
    """An error that reaches the client as an OpenAI-shaped JSON body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def to_dict(self) -> dict[str, Any]:
        """The JSON body: `{"error": {"message", "type", "param", "code"}}`."""
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def to_response(self) -> JSONResponse:
        return JSONResponse(self.to_dict(), status_code=self.status, headers=self.headers)

    def __repr__(self) -> str:
        return (f"ApiError({self.status}, {self.message!r}, param={self.param!r}, "
                f"code={self.code!r})")


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """400: the request is malformed or asks for something pdserve does not do."""
    return ApiError(400, message, INVALID_REQUEST, param, code)


def model_not_found(model: str, available: Sequence[str] = ()) -> ApiError:
    """404: `model` is not served here (the message lists what is)."""
    hint = f" Available models: {', '.join(available)}." if available else ""
    return ApiError(404, f"The model '{model}' does not exist.{hint}", INVALID_REQUEST,
                    "model", "model_not_found")


def not_found(message: str) -> ApiError:
    """404 for anything that is not a model (unknown route, unknown id)."""
    return ApiError(404, message, INVALID_REQUEST, None, "not_found")


def unauthorized(message: str = "Incorrect API key provided.") -> ApiError:
    """401: missing or wrong `Authorization: Bearer <key>` (the server runs with --api-key)."""
    return ApiError(401, message, AUTHENTICATION, None, "invalid_api_key",
                    {"WWW-Authenticate": "Bearer"})


def overloaded(retry_after_s: float, message: str | None = None) -> ApiError:
    """503 with a `Retry-After` header (whole seconds, at least 1): queues are full."""
    seconds = max(1, math.ceil(retry_after_s))
    text = message or f"The server is overloaded; retry after {seconds} s."
    return ApiError(503, text, SERVER_ERROR, None, "overloaded", {"Retry-After": str(seconds)})


def context_length_exceeded(
    num_prompt_tokens: int, max_tokens: int | None, max_model_len: int, param: str = "prompt"
) -> ApiError:
    """400 naming both numbers: prompt tokens (+ max_tokens) against --max-model-len."""
    if max_tokens is None:
        asked = (f"your prompt has {num_prompt_tokens} tokens, which leaves no room "
                 f"for a completion")
    else:
        asked = (f"you requested {num_prompt_tokens + max_tokens} tokens "
                 f"({num_prompt_tokens} in the {param}, {max_tokens} in the completion)")
    message = (f"This model's maximum context length is {max_model_len} tokens "
               f"(the server's --max-model-len). However, {asked}. Please reduce the length "
               f"of the {param} or of max_tokens.")
    return ApiError(400, message, INVALID_REQUEST, param, "context_length_exceeded")


def internal(message: str = "Internal server error.", request_id: str | None = None) -> ApiError:
    """500: a bug or a lost worker; the message carries the request id to grep logs for."""
    text = f"{message} (request id {request_id})" if request_id else message
    return ApiError(500, text, SERVER_ERROR, None, "internal_error")


def loc_to_param(loc: Sequence[str | int]) -> str | None:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'; ('body',) -> None."""
    parts = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or None


def _describe(error: Mapping[str, Any]) -> tuple[str, str | None, str | None]:
    """One pydantic error -> (message, code, param)."""
    kind = str(error.get("type", ""))
    param = loc_to_param(error.get("loc", ()))
    raw = error.get("input")
    if kind == "missing":
        if param is None:
            return "The request body is required: a JSON object.", "invalid_json", None
        return f"Missing required parameter: '{param}'.", "missing_required_parameter", param
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return f"We could not parse the JSON body of your request: {detail}.", "invalid_json", None
    if param is None and isinstance(raw, (bytes, str)):
        try:
            json.loads(raw)
        except ValueError:
            return "We could not parse the JSON body of your request.", "invalid_json", None
        return ("The request body must be a JSON object sent with "
                "'Content-Type: application/json'.", "invalid_json", None)
    msg = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    code = kind if kind.startswith("unsupported") else (
        "invalid_type" if kind in _TYPE_ERRORS else "invalid_value")
    got = f" (got {raw!r})" if isinstance(raw, (int, float, bool)) or (
        isinstance(raw, str) and len(raw) <= 40) else ""
    where = f"Invalid value for '{param}'" if param else "Invalid request body"
    return f"{where}: {msg}{got}.", code, param


def from_validation_errors(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """pydantic/FastAPI validation errors -> one 400 naming the first offending parameter."""
    if not errors:
        return invalid_request("Invalid request.")
    message, code, param = _describe(errors[0])
    others = [p for p in (_describe(e)[2] for e in errors[1:]) if p and p != param]
    if others:
        message += f" Also invalid: {', '.join(dict.fromkeys(others))}."
    return invalid_request(message, param, code)


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.to_response()


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return from_validation_errors(exc.errors()).to_response()


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    route = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        error = not_found(f"Unknown route: {route}.")
    elif exc.status_code == 405:
        error = ApiError(405, f"Method not allowed: {route}.", INVALID_REQUEST, None,
                         "method_not_allowed")
    else:
        kind = SERVER_ERROR if exc.status_code >= 500 else INVALID_REQUEST
        error = ApiError(exc.status_code, str(exc.detail), kind)
    error.headers.update(exc.headers or {})
    return error.to_response()


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    request_id = request.headers.get("x-request-id")
    logger.exception("unhandled error on %s %s (request id %s)", request.method,
                     request.url.path, request_id)
    return internal(request_id=request_id).to_response()


def install_error_handlers(app: FastAPI) -> None:
    """Make every error `app` can produce an OpenAI-shaped JSON response."""
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
