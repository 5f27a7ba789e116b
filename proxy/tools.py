"""Tool calling: `tools` / `tool_choice` types, the prompt format, and the forced-call grammar.

The prompt: `template_messages(..., template_has_tools=True)` builds messages for a chat
template that renders tools itself (assistant `tool_calls` and `role: "tool"` as Hugging Face
templates expect; the app does not use it yet: the prompt encoder passes no tools to a
template). Otherwise (SmolLM2's template has no tools) it writes the Hermes / Qwen2.5 format: the
tool signatures as JSON lines inside `<tools></tools>` in the system message, each call as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, each tool result as a user
turn `<tool_response>\\n...\\n</tool_response>`. The model answers in the same format and
proxy/tool_parser.py turns it into `tool_calls`.

`tool_choice`: `auto` (the default with tools) parses calls out of free output; `none` does not
show the tools to the model and parses nothing; `required` and a named function force exactly
one call with a grammar (`<tool_call>` + JSON matching the function's parameters + `</tool_call>`),
so even a 135M model produces a valid call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from engine.guided import JSON_LAYOUT, GuidedDecoding, GuidedKind
from proxy.errors import invalid_request

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MAX_TOOLS = 128
ToolMode = Literal["none", "auto", "required", "named"]
_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


class FunctionDefinition(BaseModel):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(ToolCall):
    """One call in a stream chunk (pdserve sends each call whole, in one delta)."""

    index: int


@dataclass(frozen=True)
class ToolPlan:
    """What a request's `tools` + `tool_choice` mean for the prompt, the grammar and parsing."""

    tools: tuple[ToolDefinition, ...]
    mode: ToolMode
    name: str | None = None  # the forced function when mode == "named"

    @property
    def shows_tools(self) -> bool:
        return self.mode != "none"

    @property
    def names(self) -> frozenset[str]:
        return frozenset(t.function.name for t in self.tools)

    def grammar(self) -> GuidedDecoding | None:
        """The grammar forcing one call (`required`, named), else None."""
        if self.mode not in ("required", "named"):
            return None
        calls = [_call_schema(t.function) for t in self.tools
                 if self.mode == "required" or t.function.name == self.name]
        schema = {**(calls[0] if len(calls) == 1 else {"anyOf": calls}),
                  "x-guidance": JSON_LAYOUT}
        lark = (f"start: {json.dumps(CALL_OPEN + chr(10))} call {json.dumps(chr(10) + CALL_CLOSE)}"
                f"\ncall: %json {json.dumps(schema)}")
        return GuidedDecoding(GuidedKind.LARK, lark)


def _call_schema(fn: FunctionDefinition) -> dict[str, Any]:
    return {"type": "object", "properties": {
        "name": {"const": fn.name}, "arguments": fn.parameters or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False}


def tool_plan(tools: list[ToolDefinition] | None, tool_choice: Any) -> ToolPlan | None:
    """The plan of a chat request, or None without tools; a 400 naming `tool_choice` for a
    choice that does not fit the tools."""
    param = "tool_choice"
    if not tools:
        if tool_choice is not None and tool_choice != "none":
            raise invalid_request("tool_choice is only allowed when tools are specified", param)
        return None
    if len(tools) > MAX_TOOLS:
        raise invalid_request(f"at most {MAX_TOOLS} tools are allowed, got {len(tools)}", "tools")
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise invalid_request("tool function names must be unique", "tools")
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return ToolPlan(tuple(tools), tool_choice or "auto")
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if (not isinstance(tool_choice, dict) or tool_choice.get("type") != "function"
            or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)):
        raise invalid_request("tool_choice must be 'none', 'auto', 'required' or "
                              '{"type": "function", "function": {"name": ...}}', param)
    if fn["name"] not in names:
        raise invalid_request(f"tool_choice names function {fn['name']!r}, which is not in "
                              f"tools ({', '.join(names)})", param)
    return ToolPlan(tuple(tools), "named", fn["name"])


def template_messages(messages: list[Any], plan: ToolPlan | None,
                      template_has_tools: bool) -> list[dict[str, Any]]:
    """Chat messages for the template: 'developer' as 'system'; with tools and a template that
    lacks them, the Hermes format (module docstring)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        role = "system" if m.role == "developer" else m.role
        calls = m.tool_calls or []
        if template_has_tools:
            msg: dict[str, Any] = {"role": role, "content": m.content or ""}
            if calls:
                msg["tool_calls"] = [{"type": "function", "id": c.id, "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                    for c in calls]
            if m.tool_call_id:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        elif role == "tool":
            out.append({"role": "user",
                        "content": f"<tool_response>\n{m.content or ''}\n</tool_response>"})
        else:
            text = "\n".join([m.content or ""] * bool(m.content) + [
                f"{CALL_OPEN}\n{_call_json(c.function)}\n{CALL_CLOSE}" for c in calls])
            out.append({"role": role, "content": text})
    if plan is not None and plan.shows_tools and not template_has_tools:
        lines = "\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in plan.tools)
        system = _SYSTEM.format(tools=lines)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out


def template_tools(plan: ToolPlan | None) -> list[dict[str, Any]] | None:
    """`tools` for a template that renders them itself."""
    if plan is None or not plan.shows_tools:
        return None
    return [t.model_dump(exclude_none=True) for t in plan.tools]


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _call_json(fn: FunctionCall) -> str:
    return json.dumps({"name": fn.name, "arguments": _arguments(fn.arguments)})
