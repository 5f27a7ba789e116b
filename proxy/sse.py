"""Server-sent-events framing for streamed OpenAI responses.

Owns the bytes of a stream: one `data: {compact json}\\n\\n` event per chunk, the closing
`data: [DONE]\\n\\n`, the error event sent when a request fails after the stream has started
(followed by `[DONE]`, as vLLM and OpenAI do), and the response headers a stream needs.
Knows nothing of what the chunks mean.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from proxy.errors import ApiError

SSE_MEDIA_TYPE = "text/event-stream"
SSE_DONE = b"data: [DONE]\n\n"
# A comment line: clients ignore it; it keeps idle proxies from closing a quiet stream.
SSE_KEEPALIVE = b": keep-alive\n\n"


def sse_headers() -> dict[str, str]:
    """Headers for a StreamingResponse: no caching, no buffering by nginx-like proxies."""
    return {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no"}


def _to_json(obj: BaseModel | Mapping[str, Any]) -> str:
    if isinstance(obj, BaseModel):
        return obj.model_dump_json()  # compact already
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def sse_event(obj: BaseModel | Mapping[str, Any]) -> bytes:
    """`data: {json}\\n\\n` for a pydantic model or a plain dict (compact, UTF-8)."""
    return f"data: {_to_json(obj)}\n\n".encode()


def sse_error(error: ApiError) -> bytes:
    """The event for a failure mid-stream: `data: {"error": {...}}\\n\\n`; send SSE_DONE next."""
    return sse_event(error.to_dict())
