"""Structured outputs: `response_format` and vLLM's `guided_*` parameters -> a `GuidedDecoding`.

OpenAI's `response_format` (`{"type": "text"}`, `{"type": "json_object"}`, `{"type":
"json_schema", "json_schema": {"name", "schema", "strict", "description"}}`) and vLLM's extra
parameters (`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` in llguidance's
Lark dialect) choose one grammar for the output; at most one of them per request. The grammar
is compiled here (llguidance, no model, no torch) so one that cannot compile is a 400 naming
the parameter before any work. The worker compiles it again against the model's vocabulary
(engine/grammar_runtime.py).
"""

from __future__ import annotations

import json
from typing import Any

from engine.errors import RequestError
from engine.guided import GuidedDecoding, GuidedKind, grammar_error
from proxy.errors import invalid_request
from proxy.tools import ToolPlan, tool_plan

GUIDED_PARAMS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _make(kind: GuidedKind, spec: str, param: str) -> GuidedDecoding:
    try:
        return GuidedDecoding(kind, spec)
    except RequestError as e:  # its own bounds (the spec's size)
        raise invalid_request(str(e), param) from None


def _json_text(value: Any, param: str) -> str:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise invalid_request(f"{param} is not valid JSON: {e}", param) from None
    if not isinstance(value, dict):
        raise invalid_request(f"{param} must be a JSON Schema object", param)
    return json.dumps(value)


def from_response_format(value: Any) -> GuidedDecoding | None:
    """The grammar of a `response_format` value (None for text); a 400 naming it otherwise."""
    param = "response_format"
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise invalid_request("response_format must be an object with a string 'type'", param)
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return _make(GuidedKind.JSON_OBJECT, "", param)
    if kind != "json_schema":
        raise invalid_request(f"response_format type {kind!r} is not supported (use 'text', "
                              "'json_object' or 'json_schema')", param, "unsupported_value")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid_request("response_format.json_schema must be an object with a 'schema'",
                              param)
    if "name" in spec and not isinstance(spec["name"], str):
        raise invalid_request("response_format.json_schema.name must be a string", param)
    if "schema" not in spec:
        raise invalid_request("response_format.json_schema.schema is required", param)
    return _make(GuidedKind.JSON_SCHEMA,
                 _json_text(spec["schema"], "response_format.json_schema.schema"), param)


def from_guided_param(name: str, value: Any) -> GuidedDecoding:
    if name == "guided_json":
        return _make(GuidedKind.JSON_SCHEMA, _json_text(value, name), name)
    if name == "guided_choice":
        if (not isinstance(value, list) or not value
                or not all(isinstance(c, str) and c for c in value)):
            raise invalid_request("guided_choice must be a non-empty list of non-empty strings",
                                  name)
        return _make(GuidedKind.CHOICE, json.dumps(value), name)
    if not isinstance(value, str) or not value:
        raise invalid_request(f"{name} must be a non-empty string", name)
    kind = GuidedKind.REGEX if name == "guided_regex" else GuidedKind.LARK
    return _make(kind, value, name)


def guided_decoding(request: Any, forced: tuple[str, GuidedDecoding] | None = None
                    ) -> GuidedDecoding | None:
    """The one grammar a request asks for, checked to compile; `forced` is another source
    (a tool choice that requires a call) as (parameter, grammar)."""
    found: list[tuple[str, GuidedDecoding]] = []
    rf = from_response_format(getattr(request, "response_format", None))
    if rf is not None:
        found.append(("response_format", rf))
    extra = request.model_extra or {}
    for name in GUIDED_PARAMS:
        if extra.get(name) is not None:
            found.append((name, from_guided_param(name, extra[name])))
    if forced is not None:
        found.append(forced)
    if len(found) > 1:
        names = ", ".join(n for n, _ in found)
        raise invalid_request(f"at most one of response_format (json), guided_* and a required "
                              f"tool call can constrain the output; got {names}", found[1][0])
    if not found:
        return None
    param, guided = found[0]
    check_compiles(guided, param)
    return guided


def check_compiles(guided: GuidedDecoding, param: str) -> None:
    error = grammar_error(guided)
    if error is not None:
        raise invalid_request(f"{param} cannot be compiled into a grammar: {error.strip()}",
                              param)




def request_guided(request: Any) -> tuple[ToolPlan | None, GuidedDecoding | None]:
    """A request's tool plan (chat) and its one checked grammar: response_format / guided_*,
    or the forced tool call of `tool_choice` required / named."""
    plan = tool_plan(request.tools, request.tool_choice) if hasattr(request, "tools") else None
    forced = None if plan is None else plan.grammar()
    return plan, guided_decoding(request, None if forced is None else ("tool_choice", forced))
