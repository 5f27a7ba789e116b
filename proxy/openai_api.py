"""OpenAI wire types: request validation, response and chunk shapes, the sampling handoff.

Owns the pydantic models of /v1/completions and /v1/chat/completions requests (a value pdserve
cannot honour is a 400 naming the parameter; unknown harmless fields are ignored, as OpenAI
does), of responses, stream chunks and the model list, and `to_sampling()`, which turns a
request into the engine's `SamplingParams`, the one form the workers get (typed, on the
control plane). No tokenizers, sockets or HTTP.
"""

import time
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from engine.errors import RequestError
from engine.guided import GuidedDecoding
from engine.sampling_params import SamplingParams
from proxy.errors import context_length_exceeded, invalid_request
from proxy.limits import check_num_messages
from proxy.openai_logprobs import MIN_LOGPROB as MIN_LOGPROB  # re-exported: callers use api.X
from proxy.openai_logprobs import ChatLogprobs, CompletionLogprobs
from proxy.openai_logprobs import ChatLogprobToken as ChatLogprobToken
from proxy.openai_logprobs import TextLogprob as TextLogprob
from proxy.openai_logprobs import TopLogprob as TopLogprob
from proxy.openai_logprobs import finite as finite
from proxy.request_params import PenaltyParams, PromptList
from proxy.tools import ToolCall, ToolCallDelta, ToolDefinition

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 1024  # per stop string: the proxy matches them against every streamed delta
MAX_TOP_LOGPROBS = 20
# what a client sees (an abort is an error)
ApiFinishReason = Literal["stop", "length", "tool_calls"]
Role = Literal["system", "user", "assistant", "developer", "tool"]
_OptInt = Annotated[int | None, Field(strict=True)]
_OptBool = Annotated[bool | None, Field(strict=True)]


def _error(message: str, kind: str = "invalid") -> PydanticCustomError:
    """A validation error whose message is used as is; kind 'unsupported' sets that code."""
    return PydanticCustomError(f"{kind}_value", "{message}", {"message": message})


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _RequestBase(PenaltyParams):
    """Fields shared by both endpoints. `None` everywhere means "the default"."""

    model_config = ConfigDict(extra="allow")
    # Parameters accepted only at a neutral value; anything else is a 400 naming the field.
    _NEUTRAL: ClassVar[Mapping[str, Any]] = MappingProxyType({
        "best_of": 1, "echo": False, "min_p": 0.0, "suffix": "",
        "functions": [],
    })

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: _OptInt = Field(None, ge=-1)
    seed: _OptInt = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: list[str] | None = None
    stream: _OptBool = False
    stream_options: StreamOptions | None = None
    ignore_eos: _OptBool = False
    user: str | None = None
    n: _OptInt = Field(None, ge=1)  # the upper bound is --max-n (proxy/app.py)
    best_of: _OptInt = None
    echo: _OptBool = None
    min_p: float | None = None
    suffix: str | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            if len(value) > MAX_STOP_STRINGS:
                raise _error(f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
            if all(isinstance(s, str) for s in value):
                if any(len(s) > MAX_STOP_CHARS for s in value):
                    raise _error(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
                return [s for s in value if s]  # an empty stop string means nothing
        return value

    @field_validator("min_tokens", check_fields=False)  # declared after max_tokens in subclasses
    @classmethod
    def _check_min_tokens(cls, value: int, info: ValidationInfo) -> int:
        limit = info.data.get("max_completion_tokens") or info.data.get("max_tokens")
        if limit is not None and value > limit:
            raise _error(f"min_tokens ({value}) must not exceed max_tokens ({limit})")
        return value

    @field_validator(*_NEUTRAL, check_fields=False)
    @classmethod
    def _check_neutral(cls, value: Any, info: ValidationInfo) -> Any:
        neutral = cls._NEUTRAL.get(info.field_name or "", value)  # a subclass may accept it
        if value is not None and value != neutral:
            raise _error(f"pdserve supports only {info.field_name}={neutral!r}", "unsupported")
        return value

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (`stream_options` is ignored unless
        streaming)."""
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_RequestBase, PromptList):
    """`POST /v1/completions`. `prompt` ends up as a `str`, a list of token ids, or a list of
    several prompts of either kind (`prompts()`)."""

    _NEUTRAL: ClassVar[Mapping[str, Any]] = MappingProxyType(
        {k: v for k, v in _RequestBase._NEUTRAL.items() if k != "echo"})

    prompt: str | list[int] | list[str | list[int]]  # checked by PromptList
    max_tokens: int | None = Field(16, strict=True, ge=1)  # OpenAI's legacy default
    min_tokens: int = Field(0, strict=True, ge=0)
    logprobs: int | None = Field(None, strict=True, ge=0, le=MAX_TOP_LOGPROBS)
    prompt_logprobs: int | None = Field(None, strict=True, ge=0, le=MAX_TOP_LOGPROBS)  # vLLM's

class ChatMessage(BaseModel):
    """One message; list-of-parts content is joined into one string at validation."""

    role: Role
    content: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls (proxy/tools.py)
    tool_call_id: str | None = None  # which call a 'tool' message answers

    @field_validator("content", mode="before")
    @classmethod
    def _join_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise _error(f"content part type {kind!r} is not supported (only 'text' "
                             f"parts with a string 'text')", "unsupported")
            texts.append(part["text"])
        return "\n".join(texts)


class ChatCompletionRequest(_RequestBase):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, strict=True, ge=1)
    max_completion_tokens: int | None = Field(None, strict=True, ge=1)
    min_tokens: int = Field(0, strict=True, ge=0)
    logprobs: bool | None = Field(False, strict=True)
    top_logprobs: int | None = Field(None, strict=True, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[ToolDefinition] | None = None
    tool_choice: str | dict[str, Any] | None = None  # checked with tools (proxy/tools.py)
    parallel_tool_calls: _OptBool = None
    functions: list[Any] | None = None

    _check_num_messages = field_validator("messages", mode="before")(check_num_messages)
    @field_validator("messages")
    @classmethod
    def _check_messages(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        for i, message in enumerate(value):
            if message.content is None and message.role != "assistant":
                raise _error(f"messages[{i}].content is required for role '{message.role}'")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _check_tool_choice(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("tools"):
            raise _error("'tool_choice' is only allowed when 'tools' are specified")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _check_top_logprobs(cls, value: int | None, info: ValidationInfo) -> Any:
        if value and not info.data.get("logprobs"):
            raise _error("top_logprobs requires logprobs to be true")
        return value

    def template_messages(self) -> list[dict[str, str]]:
        """[{role, content}] for the chat template; 'developer' is rendered as 'system'."""
        return [{"role": "system" if m.role == "developer" else m.role,
                 "content": m.content or ""} for m in self.messages]


def to_sampling(request: CompletionRequest | ChatCompletionRequest, num_prompt_tokens: int,
                max_model_len: int, guided: GuidedDecoding | None = None) -> SamplingParams:
    """The sampling parameters of a validated request, defaults filled in; a 400 when they
    cannot run (`context_length_exceeded` when they do not fit --max-model-len).

    Chat: `max_completion_tokens` wins over the deprecated `max_tokens`; `logprobs: true`
    with `top_logprobs` k becomes `logprobs=k`. Completions: `logprobs` is already k. `top_k`
    -1 means off, as 0 does. `max_tokens` omitted: up to the context limit (see
    `resolve_max_tokens`). Stop strings are not sampling: the proxy applies `request.stop`.
    """
    max_tokens, logprobs = request.max_tokens, request.logprobs
    param, prompt_logprobs = "prompt", None
    if isinstance(request, CompletionRequest):
        prompt_logprobs = request.prompt_logprobs
        if request.echo and logprobs is not None:  # echo + logprobs: the prompt's too
            prompt_logprobs = max(prompt_logprobs or 0, logprobs)
    if isinstance(request, ChatCompletionRequest):
        max_tokens = request.max_completion_tokens or request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        param = "messages"
    try:
        return SamplingParams(
            max_tokens=resolve_max_tokens(max_tokens, num_prompt_tokens, max_model_len, param),
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            top_k=max(request.top_k or 0, 0),
            seed=request.seed,
            ignore_eos=bool(request.ignore_eos),
            logprobs=logprobs,
            min_tokens=request.min_tokens,
            guided=guided,
            prompt_logprobs=prompt_logprobs,
            **request.penalty_kwargs(),
        )
    except RequestError as e:
        raise invalid_request(str(e)) from None


def resolve_max_tokens(
    max_tokens: int | None, num_prompt_tokens: int, max_model_len: int, param: str = "prompt"
) -> int:
    """The completion budget that fits --max-model-len, or `context_length_exceeded` (400)."""
    if num_prompt_tokens >= max_model_len:
        raise context_length_exceeded(num_prompt_tokens, max_tokens, max_model_len, param)
    if max_tokens is None:
        return max_model_len - num_prompt_tokens
    if num_prompt_tokens + max_tokens > max_model_len:
        raise context_length_exceeded(num_prompt_tokens, max_tokens, max_model_len, param)
    return max_tokens


def _omitted_if_none() -> Any:
    """A None-default field left out of the JSON while None (OpenAI omits such keys)."""
    return Field(None, exclude_if=lambda value: value is None)


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, num_prompt: int, num_completion: int, num_cached: int | None = None) -> "UsageInfo":
        details = None if num_cached is None else PromptTokensDetails(cached_tokens=num_cached)
        return cls(prompt_tokens=num_prompt, completion_tokens=num_completion,
                   total_tokens=num_prompt + num_completion, prompt_tokens_details=details)


class _Response(BaseModel):
    """What every response and chunk starts with."""

    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: ApiFinishReason | None = None
    prompt_logprobs: list[dict[str, dict[str, Any]] | None] | None = _omitted_if_none()  # vLLM


class CompletionResponse(_Response):
    """`text_completion`: the whole response, and also each streamed chunk."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = _omitted_if_none()


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = _omitted_if_none()


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: ApiFinishReason | None = None


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """The first chunk carries `role` (and content ""); later ones only `content`."""

    role: Literal["assistant"] | None = _omitted_if_none()
    content: str | None = _omitted_if_none()
    tool_calls: list[ToolCallDelta] | None = _omitted_if_none()


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: ApiFinishReason | None = None


class ChatCompletionChunk(_Response):
    """One `chat.completion.chunk`: first a role delta, then text deltas, then (with
    `stream_options.include_usage`) a chunk with `choices=[]` and `usage` set."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = _omitted_if_none()


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pdserve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = []
