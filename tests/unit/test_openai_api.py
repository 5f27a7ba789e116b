"""Request validation, sampling handoff and response shapes of proxy/openai_api.py."""

from __future__ import annotations

import json
import math

import openai.types as oai
import openai.types.chat as oai_chat
import pytest
from pydantic import ValidationError

from engine.sampling_params import SamplingParams
from proxy.errors import ApiError
from proxy.openai_api import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
    TextLogprob,
    UsageInfo,
    resolve_max_tokens,
    to_sampling,
)

USER = [{"role": "user", "content": "hi"}]


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": USER, **fields})


def completion(**fields: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def sampling(request: CompletionRequest | ChatCompletionRequest, num_prompt_tokens: int = 100,
             max_model_len: int = 2048) -> SamplingParams:
    return to_sampling(request, num_prompt_tokens, max_model_len)


def first_error(exc: pytest.ExceptionInfo[ValidationError]) -> tuple[tuple, str]:
    error = exc.value.errors()[0]
    return error["loc"], error["type"]


def test_chat_messages_parts_roles_and_extras() -> None:
    request = ChatCompletionRequest.model_validate({
        "model": "m",
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "be"},
                                              {"type": "text", "text": "brief"}]},
            {"role": "user", "content": "hi", "name": "bob"},
            {"role": "assistant", "content": None},
        ],
        "parallel_tool_calls": False, "store": True,  # store: unknown but harmless, ignored
    })
    assert request.template_messages() == [
        {"role": "system", "content": "be\nbrief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},
    ]
    assert set(request.model_extra or {}) == {"store"}


@pytest.mark.parametrize("messages, loc", [
    ([], ("messages",)),
    ([{"role": "robot", "content": "x"}], ("messages", 0, "role")),
    ([{"role": "tool"}], ("messages",)),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     ("messages", 0, "content")),
    ([{"role": "user"}], ("messages",)),
])
def test_chat_bad_messages_name_the_field(messages: list, loc: tuple) -> None:
    with pytest.raises(ValidationError) as exc:
        ChatCompletionRequest.model_validate({"messages": messages})
    assert first_error(exc)[0] == loc


@pytest.mark.parametrize("prompt, expected", [
    ("hello", ["hello"]), (["hello"], ["hello"]), ([1, 2, 3], [[1, 2, 3]]),
    (["a", "b"], ["a", "b"]), ([[1, 2], [3]], [[1, 2], [3]]), (["a", [3]], ["a", [3]]),
])
def test_prompt_forms(prompt: object, expected: object) -> None:
    assert completion(prompt=prompt).prompts() == expected


@pytest.mark.parametrize("prompt, kind", [
    ([], "invalid_value"), ([1, "a"], "invalid_value"), ([[]], "invalid_value"),
    ([-1], "invalid_value"), ([True], "invalid_value"), ([[1, -2]], "invalid_value"),
    (["a"] * 257, "invalid_value"),
])
def test_bad_prompts(prompt: object, kind: str) -> None:
    with pytest.raises(ValidationError) as exc:
        completion(prompt=prompt)
    assert first_error(exc) == (("prompt",), kind)


@pytest.mark.parametrize("field, value", [
    ("best_of", 3), ("min_p", 0.1), ("suffix", "x"),
])
def test_unsupported_values_name_the_parameter(field: str, value: object) -> None:
    for make in (chat, completion):
        with pytest.raises(ValidationError) as exc:
            make(**{field: value})
        assert first_error(exc) == ((field,), "unsupported_value")


def test_echo_is_for_completions_only() -> None:
    assert completion(echo=True, logprobs=2).echo
    assert sampling(completion(echo=True, logprobs=2)).prompt_logprobs == 2
    assert sampling(completion(echo=True)).prompt_logprobs is None
    assert sampling(completion(prompt_logprobs=0)).prompt_logprobs == 0
    with pytest.raises(ValidationError) as exc:
        chat(echo=True)
    assert first_error(exc) == (("echo",), "unsupported_value")


@pytest.mark.parametrize("field", ["functions"])  # the deprecated form of tools
def test_tool_calling_is_unsupported(field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        chat(**{field: [{"type": "function", "function": {"name": "f"}}]})
    assert first_error(exc) == ((field,), "unsupported_value")
    assert chat(**{field: []}).model_extra == {}


def test_neutral_values_are_accepted() -> None:
    chat(n=1, best_of=1, echo=False, presence_penalty=0, frequency_penalty=0.0,
         logit_bias={}, response_format={"type": "text"}, tools=None, user="u")


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", 2.01), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("max_tokens", 0), ("max_tokens", "10"), ("max_tokens", True),
    ("stream", "yes"), ("seed", 1.5), ("seed", 2**64), ("stop", ["a", "b", "c", "d", "e"]),
    ("stop", [1]), ("logprobs", 21), ("min_tokens", -1), ("n", 0), ("n", 1.5),
])
def test_out_of_range_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as exc:
        completion(**{field: value})
    assert first_error(exc)[0][0] == field


def test_chat_logprob_rules() -> None:
    with pytest.raises(ValidationError) as exc:
        chat(top_logprobs=3)
    assert first_error(exc)[0] == ("top_logprobs",)
    with pytest.raises(ValidationError):
        chat(logprobs=True, top_logprobs=21)
    assert sampling(chat(logprobs=True, top_logprobs=3)).logprobs == 3
    assert sampling(chat(logprobs=True)).logprobs == 0
    assert sampling(chat(logprobs=False)).logprobs is None
    assert sampling(completion(logprobs=0)).logprobs == 0


def test_min_tokens_must_fit_max_tokens() -> None:
    with pytest.raises(ValidationError) as exc:
        chat(max_completion_tokens=4, min_tokens=5)
    assert first_error(exc)[0] == ("min_tokens",)
    assert sampling(completion(max_tokens=8, min_tokens=8)).min_tokens == 8


def test_to_sampling_defaults() -> None:
    assert sampling(completion()) == SamplingParams(
        max_tokens=16, temperature=1.0, top_p=1.0, top_k=0, seed=None, logprobs=None,
        ignore_eos=False, min_tokens=0)
    assert sampling(chat(), num_prompt_tokens=100, max_model_len=2048).max_tokens == 1948


def test_to_sampling_values() -> None:
    request = chat(max_tokens=9, max_completion_tokens=7, temperature=0, top_p=0.5, top_k=40,
                   seed=-3, stop="###", ignore_eos=True)
    assert sampling(request) == SamplingParams(max_tokens=7, temperature=0.0, top_p=0.5,
                                               top_k=40, seed=-3, logprobs=None, ignore_eos=True)
    assert request.stop == ["###"]  # stop strings are the proxy's, not sampling
    assert sampling(chat(top_k=-1)).top_k == 0
    assert chat(stop=["", "x"]).stop == ["x"]


def test_to_sampling_rejects_what_cannot_run() -> None:
    """A 400: context length (naming the parameter), or SamplingParams' own checks."""
    with pytest.raises(ApiError) as exc:
        sampling(chat(max_tokens=100), num_prompt_tokens=2000, max_model_len=2048)
    assert (exc.value.status, exc.value.code, exc.value.param) == (
        400, "context_length_exceeded", "messages")
    with pytest.raises(ApiError) as exc:
        sampling(completion(), num_prompt_tokens=2048, max_model_len=2048)
    assert exc.value.param == "prompt"
    with pytest.raises(ApiError) as exc:
        sampling(completion(temperature=2.0).model_copy(update={"temperature": 101.0}))
    assert exc.value.status == 400 and "temperature" in exc.value.message


def test_stream_options() -> None:
    assert chat(stream=True, stream_options={"include_usage": True}).include_usage
    assert not chat(stream=True).include_usage
    assert not chat(stream=False, stream_options={"include_usage": True}).include_usage


def test_resolve_max_tokens() -> None:
    assert resolve_max_tokens(10, 100, 2048) == 10
    assert resolve_max_tokens(None, 100, 2048) == 1948
    assert resolve_max_tokens(1948, 100, 2048) == 1948
    with pytest.raises(ApiError) as exc:
        resolve_max_tokens(1000, 1500, 2048, param="messages")
    error = exc.value
    assert (error.status, error.code, error.param) == (400, "context_length_exceeded", "messages")
    for number in ("2048", "2500", "1500", "1000", "--max-model-len"):
        assert number in error.message
    with pytest.raises(ApiError) as exc:
        resolve_max_tokens(None, 2048, 2048)
    assert "2048" in exc.value.message


def test_chat_stream_chunks_parse_with_openai_types() -> None:
    head = {"id": "chatcmpl-1", "model": "m", "created": 1}
    role = ChatCompletionChunk(**head, choices=[ChatChunkChoice(
        delta=DeltaMessage(role="assistant", content=""))])
    text = ChatCompletionChunk(**head, choices=[ChatChunkChoice(
        delta=DeltaMessage(content="Hi"), finish_reason="stop")])
    usage = ChatCompletionChunk(**head, choices=[], usage=UsageInfo.of(5, 2, num_cached=3))
    as_json = [json.loads(c.model_dump_json()) for c in (role, text, usage)]
    assert as_json[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert as_json[1]["choices"][0]["delta"] == {"content": "Hi"}
    assert as_json[1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in as_json[0] and as_json[0]["choices"][0]["finish_reason"] is None
    assert as_json[2]["usage"]["total_tokens"] == 7
    parsed = [oai_chat.ChatCompletionChunk.model_validate(c) for c in as_json]
    assert parsed[0].object == "chat.completion.chunk" and parsed[0].choices[0].delta.role
    assert parsed[2].usage and parsed[2].usage.prompt_tokens_details.cached_tokens == 3


def test_full_responses_parse_with_openai_types() -> None:
    entries = [TextLogprob("Hi", -0.1, [("Hi", -0.1), ("Yo", -2.5)]),
               TextLogprob("!", -math.inf)]
    chat_response = ChatCompletionResponse(
        id="chatcmpl-1", model="m", usage=UsageInfo.of(5, 2),
        choices=[ChatChoice(message=ChatResponseMessage(content="Hi!"),
                            logprobs=ChatLogprobs.build(entries), finish_reason="length")])
    parsed = oai_chat.ChatCompletion.model_validate_json(chat_response.model_dump_json())
    content = parsed.choices[0].logprobs.content
    assert content[0].top_logprobs[1].token == "Yo" and content[0].bytes == [72, 105]
    assert content[1].logprob == -9999.0  # -inf is not JSON
    completion_response = CompletionResponse(
        id="cmpl-1", model="m", usage=UsageInfo.of(5, 2),
        choices=[CompletionChoice(text="Hi!", finish_reason="stop",
                                  logprobs=CompletionLogprobs.build(entries, text_offset=4))])
    parsed_completion = oai.Completion.model_validate_json(
        completion_response.model_dump_json())
    assert parsed_completion.choices[0].logprobs.text_offset == [4, 6]
    assert parsed_completion.choices[0].logprobs.top_logprobs[0] == {"Hi": -0.1, "Yo": -2.5}
    assert parsed_completion.usage.total_tokens == 7


def test_completion_chunk_omits_usage_and_model_list() -> None:
    chunk = CompletionResponse(id="cmpl-1", model="m", choices=[CompletionChoice(text="a")])
    assert "usage" not in json.loads(chunk.model_dump_json())
    models = ModelList(data=[ModelCard(id="smollm2", max_model_len=2048)])
    data = json.loads(models.model_dump_json())
    assert data["object"] == "list" and data["data"][0]["object"] == "model"
    oai.Model.model_validate(data["data"][0])
