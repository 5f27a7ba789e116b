"""Structured-output and tool-calling parameters in the proxy, with no model: response_format /
guided_* -> one checked GuidedDecoding (a grammar that cannot compile is a 400 naming its
parameter), tool_choice rules, the Hermes-style prompt for templates without tools, the forced
call's grammar, and parsing calls out of text, whole and streamed piece by piece."""

from __future__ import annotations

import json

import pytest
from llguidance import LLMatcher

from engine.guided import GuidedKind, to_grammar
from proxy.errors import ApiError
from proxy.openai_api import ChatCompletionRequest, CompletionRequest
from proxy.structured import guided_decoding
from proxy.tool_parser import ToolStreamFilter, parse_tool_calls
from proxy.tools import ToolDefinition, template_messages, tool_plan

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], **fields})


def tools(*defs: dict) -> list[ToolDefinition]:
    return [ToolDefinition.model_validate(d) for d in defs]


def api_error(fn: object, *args: object) -> ApiError:
    with pytest.raises(ApiError) as exc:
        fn(*args)  # type: ignore[operator]
    assert exc.value.status == 400
    return exc.value


def test_response_format_and_guided_params_map_to_one_grammar() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    g = guided_decoding(chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": schema, "strict": True}}))
    assert g is not None and g.kind is GuidedKind.JSON_SCHEMA and json.loads(g.spec) == schema
    assert guided_decoding(chat(response_format={"type": "text"})) is None
    assert guided_decoding(chat()) is None
    g = guided_decoding(chat(response_format={"type": "json_object"}))
    assert g is not None and g.kind is GuidedKind.JSON_OBJECT
    g = guided_decoding(CompletionRequest(prompt="x", guided_choice=["a", "b"]))
    assert g is not None and g.kind is GuidedKind.CHOICE
    g = guided_decoding(CompletionRequest(prompt="x", guided_json=json.dumps(schema)))
    assert g is not None and json.loads(g.spec) == schema
    g = guided_decoding(CompletionRequest(prompt="x", guided_grammar='start: "a" | "b"'))
    assert g is not None and g.kind is GuidedKind.LARK


@pytest.mark.parametrize("fields, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": "{bad"}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "string", "pattern": "(("}}}}, "response_format"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"response_format": {"type": 3}}, "response_format"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_choice": ["a", 1]}, "guided_choice"),
    ({"guided_json": [1]}, "guided_json"),
    ({"guided_grammar": "start: nothere"}, "guided_grammar"),
    ({"guided_regex": "x" * 70_000}, "guided_regex"),
    ({"guided_regex": "a+", "response_format": {"type": "json_object"}}, "guided_regex"),
])
def test_bad_structured_outputs_are_a_400_naming_the_parameter(fields: dict, param: str) -> None:
    assert api_error(guided_decoding, chat(**fields)).param == param


def test_tool_choice_rules() -> None:
    assert tool_plan(None, None) is None and tool_plan([], "none") is None
    assert api_error(tool_plan, None, "auto").param == "tool_choice"
    assert api_error(tool_plan, None, "required").param == "tool_choice"
    plan = tool_plan(tools(WEATHER, TIME), None)
    assert plan is not None and plan.mode == "auto" and plan.grammar() is None
    named = tool_plan(tools(WEATHER, TIME), {"type": "function", "function": {"name": "get_time"}})
    assert named is not None and named.mode == "named" and named.name == "get_time"
    assert api_error(tool_plan, tools(WEATHER), {"type": "function",
                                                 "function": {"name": "x"}}).param == "tool_choice"
    assert api_error(tool_plan, tools(WEATHER), "sometimes").param == "tool_choice"
    assert api_error(tool_plan, tools(WEATHER, WEATHER), "auto").param == "tools"
    with pytest.raises(ValueError):
        chat(tools=[{"type": "function", "function": {"name": "bad name!"}}])


def test_forced_call_grammar_accepts_exactly_a_valid_call() -> None:
    plan = tool_plan(tools(WEATHER, TIME), "required")
    assert plan is not None
    grammar = plan.grammar()
    assert grammar is not None and LLMatcher.validate_grammar(to_grammar(grammar)) == ""
    named = tool_plan(tools(WEATHER, TIME), {"type": "function", "function": {"name": "get_time"}})
    assert named is not None and named.grammar() is not None
    assert "get_weather" not in named.grammar().spec  # type: ignore[union-attr]
    request = chat(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"})
    forced = ("tool_choice", plan.grammar())
    assert api_error(guided_decoding, request, forced).param == "tool_choice"


def test_hermes_prompt_for_a_template_without_tools() -> None:
    request = chat(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21C"}], tools=[WEATHER])
    plan = tool_plan(request.tools, request.tool_choice)
    out = template_messages(request.messages, plan, template_has_tools=False)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "get_weather"' in out[0]["content"] and "<tools>" in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": CALL}
    assert out[3] == {"role": "user", "content": "<tool_response>\n21C\n</tool_response>"}
    none = template_messages(request.messages, tool_plan(request.tools, "none"), False)
    assert none[0] == {"role": "system", "content": "Be brief."}  # tools not shown
    native = template_messages(request.messages, plan, template_has_tools=True)
    assert native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert native[3] == {"role": "tool", "content": "21C", "tool_call_id": "call_1"}


def test_parse_tool_calls() -> None:
    plan = tool_plan(tools(WEATHER, TIME), "auto")
    assert plan is not None
    content, calls = parse_tool_calls(f"Let me check.\n{CALL}", plan)
    assert content == "Let me check." and len(calls) == 1
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    content, calls = parse_tool_calls(CALL + CALL.replace("get_weather", "get_time"), plan)
    assert content is None and [c.function.name for c in calls] == ["get_weather", "get_time"]
    for text in ("no calls here", CALL.replace("get_weather", "unknown"), "<tool_call>{oops"):
        assert parse_tool_calls(text, plan) == (text, [])
    _, calls = parse_tool_calls(CALL.removesuffix("</tool_call>"), plan)  # cut by a stop string
    assert len(calls) == 1


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_stream_filter_holds_back_only_what_may_be_a_call(size: int) -> None:
    plan = tool_plan(tools(WEATHER), "auto")
    assert plan is not None
    text = "Sure <tool. " + CALL
    f = ToolStreamFilter(plan)
    sent = "".join(f.push(text[i:i + size]) for i in range(0, len(text), size))
    rest, calls = f.finish()
    assert sent + rest == "Sure <tool. " and len(calls) == 1
    f = ToolStreamFilter(plan)
    plain = "a <tool_ca then nothing"
    sent = "".join(f.push(plain[i:i + size]) for i in range(0, len(plain), size))
    assert sent + f.finish()[0] == plain
