"""Per-request sampling parameters, validated in the constructor.

The proxy builds them once from the HTTP request; they travel as they are (typed, on the
control plane's codec, which builds them through this constructor) to the worker that samples,
so a decoded `SamplingParams` is checked exactly as one built in-process.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

from engine.errors import RequestError

# Bounds the control plane's codec checks before building one (protocol/bounds.py: the same
# keys; "max_model_len" and "vocab_size" are the receiving worker's own limits).
_TOKEN_IDS = types.MappingProxyType({"lo": 0, "below": "vocab_size", "max_len": 1024})


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = field(default=16, metadata={"hi": "max_model_len"})
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = field(default=(), metadata=_TOKEN_IDS)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0 = only the sampled one)
    # eos / stop ids do not end the sequence before this many tokens
    min_tokens: int = field(default=0, metadata={"lo": 0, "hi": "max_model_len"})

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise RequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise RequestError(f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise RequestError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.min_tokens < 0:
            raise RequestError(f"min_tokens must be at least 0, got {self.min_tokens}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
