"""Per-request sampling parameters, validated in the constructor.

The proxy builds them once from the HTTP request; they travel as they are (typed, on the
control plane's codec, which builds them through this constructor) to the worker that samples,
so a decoded `SamplingParams` is checked exactly as one built in-process.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import RequestError
from engine.guided import GuidedDecoding


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-n logprobs per generated token (0 = only the sampled one)
    min_tokens: int = 0  # eos / stop ids do not end the sequence before this many tokens
    guided: GuidedDecoding | None = None  # the output must match this (engine/guided.py)

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
        if self.guided is not None and not isinstance(self.guided, GuidedDecoding):
            raise RequestError(f"guided must be a GuidedDecoding, got {type(self.guided)}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0
