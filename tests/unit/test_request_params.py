"""The penalty and bias parameters at the HTTP edge (proxy/request_params.py): accepted values
reach `SamplingParams`; bad ones are a 400 naming the parameter, through the real app."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from proxy_app_helpers import app_client
from pydantic import ValidationError

from proxy.errors import ApiError
from proxy.openai_api import ChatCompletionRequest, CompletionRequest, to_sampling
from proxy.request_params import PenaltyParams


def _request(kind: type, **fields: Any) -> Any:
    base = ({"prompt": "hi"} if kind is CompletionRequest
            else {"messages": [{"role": "user", "content": "hi"}]})
    return kind.model_validate({**base, **fields})


@pytest.mark.parametrize("kind", [CompletionRequest, ChatCompletionRequest])
def test_values_reach_sampling_params(kind: type) -> None:
    request = _request(kind, frequency_penalty=0.5, presence_penalty=-2, repetition_penalty=1.3,
                       logit_bias={"50": -100, "7": 2.5})
    params = to_sampling(request, 10, 2048)
    assert (params.frequency_penalty, params.presence_penalty) == (0.5, -2)
    assert params.repetition_penalty == 1.3
    assert params.logit_bias == ((50, -100.0), (7, 2.5))
    neutral = to_sampling(_request(kind), 10, 2048)
    assert not neutral.has_penalties


@pytest.mark.parametrize("field, value", [
    ("frequency_penalty", 2.5), ("frequency_penalty", "x"), ("presence_penalty", -3),
    ("presence_penalty", float("inf")), ("repetition_penalty", 0), ("repetition_penalty", -1),
    ("logit_bias", {"abc": 1}), ("logit_bias", {"-5": 1}), ("logit_bias", {"5": 101}),
    ("logit_bias", {"5": "x"}), ("logit_bias", [1, 2]), ("logit_bias", {"5": 1, "05": 2}),
    ("logit_bias", {str(i): 1 for i in range(1025)}),
])
@pytest.mark.parametrize("kind", [CompletionRequest, ChatCompletionRequest])
def test_bad_values_name_the_parameter(kind: type, field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as exc:
        _request(kind, **{field: value})
    assert exc.value.errors()[0]["loc"][0] == field


def test_bias_outside_the_vocabulary_is_a_400() -> None:
    request = PenaltyParams(logit_bias={"49151": 1.0})
    request.check_logit_bias_vocab(49152)
    with pytest.raises(ApiError) as exc:
        PenaltyParams(logit_bias={"49152": 1.0}).check_logit_bias_vocab(49152)
    assert (exc.value.status, exc.value.param) == (400, "logit_bias")


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with app_client() as c:
        yield c


def test_http_400_is_openai_shaped(client: TestClient) -> None:
    for body in ({"frequency_penalty": 3}, {"logit_bias": {"999999": 1}},
                 {"repetition_penalty": 0}, {"logit_bias": {"x": 1}}):
        r = client.post("/v1/completions", json={"prompt": "hi", **body})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == next(iter(body))
        assert error["type"] == "invalid_request_error"
