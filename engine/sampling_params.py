"""Per-request sampling parameters, validated in the constructor.

The proxy builds them once from the HTTP request; they travel as they are (typed, on the
control plane's codec, which builds them through this constructor) to the worker that samples,
so a decoded `SamplingParams` is checked exactly as one built in-process.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

from engine.errors import RequestError
from engine.guided import GuidedDecoding

MAX_LOGIT_BIAS_ENTRIES = 1024
_MASK64 = (1 << 64) - 1


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of choice `choice` of a request seeded with `seed` (`n` > 1): choice 0 keeps
    `seed`; choice j > 0 gets splitmix64(seed + j * 0xD1B54A32D192ED03), so neighbouring seeds
    and choices give unrelated streams, and the seed stays within the API's [-2**63, 2**64)."""
    if seed is None or choice == 0:
        return seed
    z = (seed + choice * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


# Bounds the control plane's codec checks before building one (protocol/bounds.py: the same
# keys; "max_model_len" and "vocab_size" are the receiving worker's own limits).
_TOKEN_IDS = types.MappingProxyType({"lo": 0, "below": "vocab_size", "max_len": 1024})
_BIAS = types.MappingProxyType({"keys_below": "vocab_size", "max_len": 1024})


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
    # top-n logprobs per prompt token (engine/prompt_logprobs)
    prompt_logprobs: int | None = field(default=None, metadata={"lo": 0, "hi": 20})
    # engine/penalties.py: OpenAI's over the output so far, vLLM/HF's over prompt + output
    frequency_penalty: float = 0.0  # minus this times the token's count in the output
    presence_penalty: float = 0.0  # minus this once the token is in the output
    repetition_penalty: float = 1.0  # seen tokens: positive logits / this, negative * this
    # (token id, added to its logit); ids below the receiving worker's vocabulary
    logit_bias: tuple[tuple[int, float], ...] = field(default=(), metadata=_BIAS)
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
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise RequestError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")
        if self.min_tokens < 0:
            raise RequestError(f"min_tokens must be at least 0, got {self.min_tokens}")
        if self.guided is not None and not isinstance(self.guided, GuidedDecoding):
            raise RequestError(f"guided must be a GuidedDecoding, got {type(self.guided)}")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self._check_penalties()

    def _check_penalties(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2], got {value}")
        if not 0.0 < self.repetition_penalty <= 100.0:
            raise RequestError(
                f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}")
        bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise RequestError(f"logit_bias has {len(bias)} entries, at most "
                               f"{MAX_LOGIT_BIAS_ENTRIES} are allowed")
        if len({t for t, _ in bias}) != len(bias):
            raise RequestError("logit_bias names a token id twice")
        for token, value in bias:
            if token < 0:
                raise RequestError(f"logit_bias token id {token} is negative")
            if not -100.0 <= value <= 100.0:
                raise RequestError(f"logit_bias value for token {token} must be in [-100, 100], "
                                   f"got {value}")
        object.__setattr__(self, "logit_bias", bias)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        """Whether the logits change before sampling (penalties or a bias)."""
        return bool(self.frequency_penalty or self.presence_penalty
                    or self.repetition_penalty != 1.0 or self.logit_bias)
