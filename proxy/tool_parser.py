"""Tool calls out of generated text (the `<tool_call>{json}</tool_call>` format of
proxy/tools.py), whole or while streaming.

A call is a `<tool_call>` block whose JSON is an object with a `name` among the request's tools
and `arguments` (an object, or a JSON string of one). A block that does not parse, or names an
unknown tool, stays in the content as text. A final block left unclosed at the end of the
output still counts when its JSON is complete (a stop string may have cut `</tool_call>`).

Streaming: `ToolStreamFilter.push()` returns the text that is certainly content (everything
before the first `<tool_call>`, holding back a tail that could start one); `finish()` parses
what was held back into calls, or hands it back as content when it holds none.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from proxy.tools import CALL_CLOSE, CALL_OPEN, FunctionCall, ToolCall, ToolPlan

_BLOCK = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CALL_CLOSE) + r"|\Z)",
                    re.DOTALL)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _as_call(body: str, names: frozenset[str]) -> ToolCall | None:
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(id=new_call_id(), function=FunctionCall(name=obj["name"],
                                                            arguments=json.dumps(args)))


def parse_tool_calls(text: str, plan: ToolPlan) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a finished output; content is None when only calls remain."""
    calls: list[ToolCall] = []
    content: list[str] = []
    pos = 0
    for match in _BLOCK.finditer(text):
        call = _as_call(match.group(1), plan.names)
        if call is None:
            continue
        content.append(text[pos:match.start()])
        calls.append(call)
        pos = match.end()
    content.append(text[pos:])
    if not calls:
        return text, []
    rest = "".join(content).strip()
    return rest or None, calls


@dataclass
class ToolStreamFilter:
    plan: ToolPlan
    _held: str = ""
    _in_call: bool = False

    def push(self, text: str) -> str:
        """The part of `text` (and of what was held) that is content for sure."""
        self._held += text
        if self._in_call:
            return ""
        at = self._held.find(CALL_OPEN)
        if at >= 0:
            self._in_call = True
            out, self._held = self._held[:at], self._held[at:]
            return out
        keep = _partial_suffix(self._held, CALL_OPEN)
        out = self._held[:len(self._held) - keep]
        self._held = self._held[len(out):]
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(content still to send, calls) at the end of the output."""
        held, self._held = self._held, ""
        content, calls = parse_tool_calls(held, self.plan)
        return (content or ""), calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
