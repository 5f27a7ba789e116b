"""OpenAI-shaped errors: constructors and the FastAPI handlers of proxy/errors.py."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from proxy import errors
from proxy.errors import ApiError, install_error_handlers, loc_to_param
from proxy.openai_api import ChatCompletionRequest


def make_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(request: ChatCompletionRequest) -> dict[str, Any]:
        return {"ok": True}

    @app.get("/busy")
    async def busy() -> None:
        raise errors.overloaded(2.2)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    return app


@pytest.fixture(scope="module")
def client() -> TestClient:
    return TestClient(make_app(), raise_server_exceptions=False)


def assert_openai_error(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_constructors() -> None:
    assert errors.invalid_request("bad", "x").to_dict() == {"error": {
        "message": "bad", "type": "invalid_request_error", "param": "x", "code": None}}
    not_found = errors.model_not_found("gpt-9", ["smollm2"])
    assert (not_found.status, not_found.param, not_found.code) == (404, "model", "model_not_found")
    assert "smollm2" in not_found.message
    unauthorized = errors.unauthorized()
    assert unauthorized.status == 401 and unauthorized.headers["WWW-Authenticate"] == "Bearer"
    busy = errors.overloaded(0.2)
    assert busy.status == 503 and busy.headers["Retry-After"] == "1"
    assert errors.overloaded(2.5).headers["Retry-After"] == "3"
    assert errors.internal(request_id="abc").status == 500
    assert "abc" in errors.internal(request_id="abc").message
    too_long = errors.context_length_exceeded(3000, 100, 2048, "messages")
    assert "2048" in too_long.message and "3100" in too_long.message


def test_loc_to_param() -> None:
    assert loc_to_param(("body", "messages", 0, "content")) == "messages[0].content"
    assert loc_to_param(("body", "temperature")) == "temperature"
    assert loc_to_param(("body",)) is None
    assert loc_to_param(("query", "limit")) == "limit"


def test_validation_error_names_parameter(client: TestClient) -> None:
    error = assert_openai_error(client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "temperature": 3}), 400)
    assert error["param"] == "temperature" and "temperature" in error["message"]
    assert error["code"] == "invalid_value" and error["type"] == "invalid_request_error"


def test_nested_and_unsupported_parameters(client: TestClient) -> None:
    error = assert_openai_error(client.post("/v1/chat/completions", json={
        "messages": [{"role": "robot", "content": "x"}]}), 400)
    assert error["param"] == "messages[0].role"
    error = assert_openai_error(client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "x"}], "best_of": 3}), 400)
    assert (error["param"], error["code"]) == ("best_of", "unsupported_value")
    assert "best_of=1" in error["message"]


def test_missing_parameter(client: TestClient) -> None:
    error = assert_openai_error(client.post("/v1/chat/completions", json={"model": "m"}), 400)
    assert (error["param"], error["code"]) == ("messages", "missing_required_parameter")


@pytest.mark.parametrize("body, headers, needle", [
    (b"{not json", {"content-type": "application/json"}, "parse the JSON"),
    (b"", {"content-type": "application/json"}, "body is required"),
    (b"[1, 2]", {"content-type": "application/json"}, "valid dictionary"),
    (b'{"messages": []}', {"content-type": "application/x-www-form-urlencoded"},
     "Content-Type: application/json"),  # curl -d without -H
])
def test_malformed_bodies(client: TestClient, body: bytes, headers: dict, needle: str) -> None:
    error = assert_openai_error(client.post("/v1/chat/completions", content=body,
                                            headers=headers), 400)
    assert needle in error["message"]


def test_unknown_route_and_wrong_method(client: TestClient) -> None:
    error = assert_openai_error(client.get("/v1/nothing"), 404)
    assert "/v1/nothing" in error["message"]
    response = client.get("/v1/chat/completions")
    error = assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST"


def test_api_error_and_unexpected_exception(client: TestClient) -> None:
    response = client.get("/busy")
    error = assert_openai_error(response, 503)
    assert response.headers["retry-after"] == "3" and error["code"] == "overloaded"
    response = client.get("/boom", headers={"x-request-id": "req-7"})
    error = assert_openai_error(response, 500)
    assert "secret internals" not in error["message"] and "req-7" in error["message"]
    assert "Traceback" not in response.text


def test_api_error_is_an_exception() -> None:
    with pytest.raises(ApiError) as exc:
        raise errors.invalid_request("nope", "stop")
    assert exc.value.to_response().status_code == 400
