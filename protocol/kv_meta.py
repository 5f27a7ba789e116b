"""Channel prefill worker -> decode worker, inside the KV transfer header's `meta`: the first
token sampled after the prompt, its logprob (typed, written by the control plane's codec, never
as a JSON string) and how many prompt tokens the prefill worker's prefix cache served.

The transfer layer bounds meta's shape (transfer/wire/header.py: scalars, lists and maps, a few
levels deep); this module gives it its type. Without a valid first token the KV is useless to
the decode worker (`MalformedMessage`); a malformed logprob or count is dropped (None / 0), as
the KV itself is good.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.outputs import TokenLogprob
from protocol.codec import MalformedMessage, ValueCodec

log = logging.getLogger(__name__)
_LOGPROB = ValueCodec(TokenLogprob | None)
FIRST_TOKEN_KEY = "first_token"


@dataclass(frozen=True)
class FirstToken:
    token_id: int
    logprob: TokenLogprob | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefill worker's prefix cache served

    def to_meta(self) -> dict[str, Any]:
        return {FIRST_TOKEN_KEY: self.token_id,
                "first_logprob": _LOGPROB.encode(TokenLogprob | None, self.logprob),
                "num_cached_tokens": self.num_cached_tokens}

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> FirstToken:
        token = meta.get(FIRST_TOKEN_KEY)
        if type(token) is not int or token < 0:
            raise MalformedMessage("KV arrived without a valid first token")
        try:
            logprob = _LOGPROB.decode(TokenLogprob | None, meta.get("first_logprob"),
                                      "first_logprob")
        except MalformedMessage as e:
            log.warning("dropped the first token's logprob: %s", e)
            logprob = None
        cached = meta.get("num_cached_tokens", 0)
        return cls(token, logprob, cached if type(cached) is int and cached >= 0 else 0)
