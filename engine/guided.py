"""Guided decoding specs: what a request's output must match, and the check that it compiles.

A `GuidedDecoding` (kind + one string) travels inside `SamplingParams` from the proxy to the
worker that samples; it is bounded in size and checked in its constructor, so a decoded one is
checked as one built in-process. `to_grammar()` turns it into an llguidance grammar, the one
form the matcher (engine/grammar_runtime.py) compiles; `grammar_error()` compiles it without a
model so the proxy can answer 400 before any work. Imports llguidance (pure Rust extension, no
torch or numpy), so the proxy may import this module.

Kinds: `json_schema` (a JSON Schema, as OpenAI's `response_format.json_schema.schema`),
`json_object` (any JSON object; spec ignored), `regex`, `choice` (a JSON list of strings), and
`lark` (llguidance's Lark dialect, which may embed `%json {schema}`; tool calling uses it).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from llguidance import LLMatcher

from engine.errors import RequestError

# UTF-8 bytes; under the control plane's 64 KiB cap on one string (protocol/codec.py)
MAX_GUIDED_SPEC_BYTES = 60 * 1024
# JSON is written as json.dumps writes it: one space after ',' and ':', no other whitespace
# (a small model given free whitespace can pad with newlines until max_tokens).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GuidedKind(enum.Enum):
    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    CHOICE = "choice"
    LARK = "lark"


@dataclass(frozen=True)
class GuidedDecoding:
    kind: GuidedKind
    spec: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.kind, GuidedKind):
            raise RequestError(f"guided decoding kind must be a GuidedKind, got {self.kind!r}")
        size = len(self.spec.encode("utf-8", "surrogatepass"))
        if size > MAX_GUIDED_SPEC_BYTES:
            raise RequestError(f"guided decoding spec is {size} bytes; at most "
                               f"{MAX_GUIDED_SPEC_BYTES} are allowed")
        if self.kind is not GuidedKind.JSON_OBJECT and not self.spec:
            raise RequestError(f"guided decoding of kind {self.kind.value} needs a spec")

    @property
    def cache_key(self) -> str:
        return f"{self.kind.value}\0{self.spec}"


def to_grammar(guided: GuidedDecoding) -> str:
    """The llguidance grammar of a spec; `RequestError` when the spec is not even well formed
    (invalid JSON); grammars that do not compile are found by `grammar_error()`."""
    kind = guided.kind
    try:
        if kind is GuidedKind.JSON_OBJECT:
            return LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_LAYOUT)
        if kind is GuidedKind.JSON_SCHEMA:
            return LLMatcher.grammar_from_json_schema(json.loads(guided.spec), JSON_LAYOUT)
        if kind is GuidedKind.REGEX:
            return LLMatcher.grammar_from_regex(guided.spec)
        if kind is GuidedKind.CHOICE:
            return LLMatcher.grammar_from_lark(choice_lark(json.loads(guided.spec)))
        return LLMatcher.grammar_from_lark(guided.spec)
    except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise RequestError(f"{kind.value} is not valid: {e}") from None


def choice_lark(choices: object) -> str:
    """A Lark grammar matching exactly one of `choices` (a non-empty list of strings)."""
    if (not isinstance(choices, list) or not choices
            or not all(isinstance(c, str) and c for c in choices)):
        raise RequestError("choice must be a non-empty list of non-empty strings")
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def grammar_error(guided: GuidedDecoding) -> str | None:
    """Why the spec cannot be compiled (llguidance's message), or None when it can."""
    try:
        grammar = to_grammar(guided)
    except RequestError as e:
        return str(e)
    message = LLMatcher.validate_grammar(grammar)
    return message or None
