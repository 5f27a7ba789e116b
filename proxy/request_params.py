"""Request parameters that change the logits before sampling: `frequency_penalty`,
`presence_penalty`, `repetition_penalty` and `logit_bias`, shared by both generation endpoints;
and /v1/completions' `prompt` as one prompt or a list of them (`PromptList`).

A pydantic mixin of `proxy/openai_api.py`'s request models: a bad value is a 400 naming the
parameter (OpenAI's ranges: penalties in [-2, 2], bias values in [-100, 100] keyed by token id
strings; vLLM's `repetition_penalty` > 0). `check_logit_bias_vocab` checks the ids against the
tokenizer's vocabulary once the app knows it; the engine checks them again at admission.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator
from pydantic_core import PydanticCustomError

from engine.sampling_params import MAX_LOGIT_BIAS_ENTRIES
from proxy.errors import invalid_request

MAX_PROMPTS = 256  # completions (prompts x n) in one request


class PenaltyParams(BaseModel):
    """The fields; `None` means the neutral value."""

    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0, allow_inf_nan=False)
    repetition_penalty: float | None = Field(None, gt=0.0, le=100.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return value
        if len(value) > MAX_LOGIT_BIAS_ENTRIES:
            raise _error(f"at most {MAX_LOGIT_BIAS_ENTRIES} entries are allowed, "
                         f"got {len(value)}")
        seen: set[int] = set()
        for key, bias in value.items():
            token = _token_id(key)
            if token in seen:
                raise _error(f"token id {token} appears twice")
            seen.add(token)
            if not -100.0 <= bias <= 100.0:
                raise _error(f"the bias of token {key} must be in [-100, 100], got {bias}")
        return value

    def penalty_kwargs(self) -> dict[str, Any]:
        """`SamplingParams` keyword arguments for the fields that were given."""
        kwargs: dict[str, Any] = {}
        for name in ("frequency_penalty", "presence_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        if self.logit_bias:
            kwargs["logit_bias"] = tuple((_token_id(k), b) for k, b in self.logit_bias.items())
        return kwargs

    def check_logit_bias_vocab(self, vocab_size: int) -> None:
        """A 400 naming `logit_bias` when a token id is outside the vocabulary."""
        for key in self.logit_bias or {}:
            if _token_id(key) >= vocab_size:
                raise invalid_request(f"logit_bias token id {key} is outside the vocabulary "
                                      f"(0..{vocab_size - 1})", "logit_bias")


class PromptList(BaseModel):
    """`prompt`: a string, a list of token ids, or a list of prompts of either kind."""

    prompt: str | list[int] | list[str | list[int]]

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if not value:
            raise _error("prompt must not be empty")
        if _is_ids(value):
            return value
        if not all(isinstance(x, str) or (isinstance(x, list) and _is_ids(x)) for x in value):
            raise _error("prompt must be a string, a list of token ids, or a list of prompts "
                         "(strings or non-empty lists of non-negative token ids)")
        if len(value) > MAX_PROMPTS:
            raise _error(f"at most {MAX_PROMPTS} prompts per request, got {len(value)}")
        return value[0] if len(value) == 1 and isinstance(value[0], str) else value

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request (one unless `prompt` was a list of prompts)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


def _is_ids(value: list[Any]) -> bool:
    """A non-empty list of non-negative ints (bools are not token ids)."""
    return bool(value) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                               for x in value)


def _token_id(key: str) -> int:
    if not key.isascii() or not key.isdigit():
        raise _error(f"keys must be token ids (non-negative integers as strings), got {key!r}")
    return int(key)


def _error(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", "{message}", {"message": message})
