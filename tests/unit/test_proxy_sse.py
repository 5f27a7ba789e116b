"""SSE framing (proxy/sse.py): what a client's SSE parser reads back."""

from __future__ import annotations

import json

from proxy import errors
from proxy.openai_api import ChatChunkChoice, ChatCompletionChunk, DeltaMessage
from proxy.sse import SSE_DONE, SSE_MEDIA_TYPE, sse_error, sse_event, sse_headers


def parse_stream(raw: bytes) -> list[str]:
    """The `data:` payloads of a stream, as an SSE client splits them."""
    events = raw.decode().split("\n\n")
    assert events[-1] == ""
    return [e.removeprefix("data: ") for e in events[:-1] if not e.startswith(":")]


def test_dict_event_is_compact_utf8() -> None:
    assert sse_event({"a": 1, "b": "世界 😀"}) == 'data: {"a":1,"b":"世界 😀"}\n\n'.encode()


def test_model_event_and_done() -> None:
    chunk = ChatCompletionChunk(id="c1", model="m", created=1, choices=[
        ChatChunkChoice(delta=DeltaMessage(content="hi\n\nthere"))])
    raw = sse_event(chunk) + SSE_DONE
    payloads = parse_stream(raw)
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[0])["choices"][0]["delta"]["content"] == "hi\n\nthere"
    assert b" " not in sse_event(chunk).split(b": ", 1)[1].replace(b"hi\\n\\nthere", b"")


def test_error_event() -> None:
    raw = sse_error(errors.internal("decode worker lost", request_id="r1")) + SSE_DONE
    payloads = parse_stream(raw)
    body = json.loads(payloads[0])
    assert body["error"]["type"] == "server_error" and "r1" in body["error"]["message"]
    assert payloads[1] == "[DONE]"


def test_headers() -> None:
    assert SSE_MEDIA_TYPE == "text/event-stream"
    assert sse_headers()["Cache-Control"] == "no-cache"
