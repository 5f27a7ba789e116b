"""Per-request sampling parameters (validated once, at admission)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import RequestError


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
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "seed": self.seed, "stop_token_ids": list(self.stop_token_ids),
            "ignore_eos": self.ignore_eos, "logprobs": self.logprobs, "min_tokens": self.min_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> SamplingParams:
        """From the wire (msgpack); unknown keys or bad values raise RequestError."""
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise RequestError(f"unknown sampling parameters {sorted(unknown)}")
        try:
            return cls(**d)  # type: ignore[arg-type]
        except TypeError as e:
            raise RequestError(f"bad sampling parameters: {e}") from None
