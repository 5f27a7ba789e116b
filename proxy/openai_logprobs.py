"""OpenAI's logprob shapes: a generated token's logprob and its top alternatives as text
(`TextLogprob`), and how completions (`CompletionLogprobs`) and chat (`ChatLogprobs`) send
them. Split from openai_api.py, which re-exports them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from pydantic import BaseModel

MIN_LOGPROB = -9999.0  # what OpenAI sends instead of -inf


@dataclass
class TextLogprob:
    """One generated token's logprob and its top alternatives, as text: the engine's
    `TokenLogprob` with its ids detokenized (proxy/responses.py)."""

    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)
    token_bytes: bytes | None = None  # the token's own bytes (default: the text's)
    top_bytes: list[bytes] | None = None


def finite(logprob: float) -> float:
    """A logprob as JSON can carry it (-inf is sent as MIN_LOGPROB, as OpenAI does)."""
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


class CompletionLogprobs(BaseModel):
    """`token_logprobs` / `top_logprobs` are None for an echoed prompt's first token."""

    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []

    @classmethod
    def build(cls, entries: Sequence[TextLogprob], text_offset: int = 0) -> CompletionLogprobs:
        """`text_offset` is where the first token starts in the completion text so far."""
        offsets = list(accumulate((len(e.token) for e in entries), initial=text_offset))[:-1]
        return cls(tokens=[e.token for e in entries],
                   token_logprobs=[finite(e.logprob) for e in entries],
                   top_logprobs=[{t: finite(lp) for t, lp in e.top} for e in entries],
                   text_offset=offsets)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None

    @classmethod
    def of(cls, token: str, logprob: float, raw: bytes | None = None,
           **extra: Any) -> TopLogprob:
        """`raw`: the token's own bytes (a piece of a character is not its U+FFFD text)."""
        raw = token.encode() if raw is None else raw
        return cls(token=token, logprob=finite(logprob), bytes=list(raw), **extra)


class ChatLogprobToken(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobToken] | None = None

    @classmethod
    def build(cls, entries: Sequence[TextLogprob]) -> ChatLogprobs:
        return cls(content=[ChatLogprobToken.of(e.token, e.logprob, e.token_bytes, top_logprobs=[
            TopLogprob.of(t, lp, None if e.top_bytes is None else e.top_bytes[j])
            for j, (t, lp) in enumerate(e.top)]) for e in entries])
