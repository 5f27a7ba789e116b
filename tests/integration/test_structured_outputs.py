"""Structured outputs and tool calling end to end with the official `openai` SDK, against a
colocated deployment and a disaggregated one (`--prefill 1 --decode 1 --placement remote`: the
prefill worker samples the first token under the grammar, the decode worker rebuilds its
matcher from it), real SmolLM2, greedy: json_schema outputs validate against their schemas
(nested objects, enums, arrays) and agree across both paths; `chat.completions.parse()` fills a
pydantic model; json_object parses; guided_regex / guided_choice on /v1/completions; streaming;
a grammar that cannot compile is a 400 naming the parameter; a two-turn tool-calling loop with
a forced call, then the tool's result, then the final answer; streamed tool-call deltas.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from serving import COLOCATED, DISAGG, Server

DEPLOYMENTS = {"colocated": COLOCATED, "disaggregated": DISAGG}
SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 12},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 12},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "string", "enum": ["S", "M", "L"]},
        "ok": {"type": "boolean"}},
        "required": ["color", "size", "ok"], "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                 "minItems": 1, "maxItems": 3},
        "scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                              "maximum": 100}, "maxItems": 3}},
        "required": ["tags", "scores"], "additionalProperties": False},
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a timezone",
    "parameters": {"type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}},
                   "required": ["tz"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "Describe a person who lives in Paris, as JSON."}]
WEATHER_ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]
    population_millions: int = Field(ge=0, le=100)


@pytest.fixture(scope="module", params=list(DEPLOYMENTS))
def server(request: pytest.FixtureRequest,
           shared_deployment: Callable[..., Server]) -> tuple[str, Server]:
    """Each deployment is shared with other test modules (tests/conftest.py)."""
    return request.param, shared_deployment(*DEPLOYMENTS[request.param])


@pytest.fixture(scope="module")
def seen() -> dict[str, str]:
    """Outputs of the first deployment, which the second must repeat (greedy)."""
    return {}


def _client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", timeout=300,
                         max_retries=0)


def _same_on_both_paths(seen: dict[str, str], key: str, text: str) -> None:
    assert seen.setdefault(key, text) == text, f"{key}: paths disagree"


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_outputs_validate(server: tuple[str, Server], seen: dict[str, str],
                                      name: str) -> None:
    _, s = server
    r = _client(s).chat.completions.create(
        model="smollm2", messages=ASK, temperature=0, max_tokens=200,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {
            "name": name, "schema": SCHEMAS[name], "strict": True}})
    text = r.choices[0].message.content or ""
    jsonschema.validate(json.loads(text), SCHEMAS[name])
    assert r.choices[0].finish_reason == "stop"
    _same_on_both_paths(seen, f"schema-{name}", text)


def test_parse_into_pydantic_and_json_object(server: tuple[str, Server],
                                             seen: dict[str, str]) -> None:
    _, s = server
    client = _client(s)
    parsed = client.chat.completions.parse(
        model="smollm2", temperature=0, max_tokens=200, response_format=City,
        messages=[{"role": "user", "content": "Tell me about Tokyo."}])
    city = parsed.choices[0].message.parsed
    assert isinstance(city, City)
    _same_on_both_paths(seen, "parse", city.model_dump_json())
    r = client.chat.completions.create(
        model="smollm2", temperature=0, max_tokens=120, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Return a JSON object with the keys name and age "
                   "for a person called Bob who is 30."}])
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


def test_streaming_json_schema(server: tuple[str, Server], seen: dict[str, str]) -> None:
    _, s = server
    stream = _client(s).chat.completions.create(
        model="smollm2", messages=ASK, temperature=0, max_tokens=200, stream=True,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {
            "name": "nested", "schema": SCHEMAS["nested"]}})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS["nested"])
    assert chunks[-1].choices[0].finish_reason == "stop"
    _same_on_both_paths(seen, "schema-nested", text)  # the same as without streaming


def test_completions_guided_regex_choice_and_schema(server: tuple[str, Server]) -> None:
    _, s = server
    client = _client(s)
    r = client.completions.create(model="smollm2", prompt="The date today is", temperature=0,
                                  max_tokens=20, extra_body={"guided_regex": r"\d{4}-\d{2}-\d{2}"})
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", r.choices[0].text)
    r = client.completions.create(model="smollm2", prompt="Is the sky blue? Answer:",
                                  temperature=1.0, seed=3, max_tokens=5,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no")
    r = client.completions.create(model="smollm2", prompt="A JSON object:", temperature=0,
                                  max_tokens=120, extra_body={"response_format": {
                                      "type": "json_schema", "json_schema": {
                                          "name": "e", "schema": SCHEMAS["enum"]}}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS["enum"])


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectx"}}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_grammar_is_a_400_naming_the_parameter(server: tuple[str, Server], body: dict,
                                                   param: str) -> None:
    _, s = server
    with s.client() as c:
        r = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 5, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_tool_calling_loop(server: tuple[str, Server], seen: dict[str, str]) -> None:
    """Turn 1: a forced call (required); turn 2: the tool's result -> the final answer."""
    _, s = server
    client = _client(s)
    messages: list = list(WEATHER_ASK)
    first = client.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                           max_tokens=100, tools=[WEATHER, TIME],  # type: ignore[list-item]
                                           tool_choice="required")
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
    args = json.loads(calls[0].function.arguments)
    params = (WEATHER if calls[0].function.name == "get_weather" else TIME)["function"]
    jsonschema.validate(args, params["parameters"])  # type: ignore[index]
    _same_on_both_paths(seen, "call", calls[0].function.model_dump_json())
    messages.append(choice.message)
    messages.append({"role": "tool", "tool_call_id": calls[0].id,
                     "content": json.dumps({"temperature": 21, "sky": "sunny"})})
    final = client.chat.completions.create(model="smollm2", messages=messages, temperature=0,
                                           max_tokens=60, tools=[WEATHER, TIME],  # type: ignore[list-item]
                                           tool_choice="none")
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_named_tool_choice_streams_a_call(server: tuple[str, Server]) -> None:
    _, s = server
    stream = _client(s).chat.completions.create(
        model="smollm2", messages=WEATHER_ASK, temperature=0, max_tokens=100, stream=True,  # type: ignore[arg-type]
        tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}})
    chunks = [c for c in stream if c.choices]
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [d.function.name for d in deltas if d.function] == ["get_time"]
    assert deltas[0].id and deltas[0].index == 0
    jsonschema.validate(json.loads(deltas[0].function.arguments or ""),  # type: ignore[union-attr]
                        TIME["function"]["parameters"])  # type: ignore[index]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
