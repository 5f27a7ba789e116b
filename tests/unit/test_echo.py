"""proxy/echo.py: the prompt part of an echoed completion (OpenAI's shape) and vLLM's
`prompt_logprobs`, built from a stream's prompt logprobs with SmolLM2's real tokenizer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from deploy.local_launcher import load_tokenizer
from engine.outputs import TokenLogprob
from proxy.echo import Echo
from proxy.openai_api import MIN_LOGPROB, CompletionChoice, CompletionLogprobs, TextLogprob


@dataclass
class Stream:
    tokenizer: Any
    prompt_ids: list[int]
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)


def _stream() -> Stream:
    tok = load_tokenizer("smollm2")
    ids = tok.encode("Hello world, café")
    entries = [TokenLogprob(t, -1.0 - i, [(t, -1.0 - i), (99, -0.5)], 2)
               for i, t in enumerate(ids[1:])]
    entries[-1] = TokenLogprob(ids[-1], -math.inf, [], 7)
    return Stream(tok, ids, entries)


def test_echo_with_logprobs_prepends_the_prompt() -> None:
    stream = _stream()
    choice = CompletionChoice(text=" there", logprobs=CompletionLogprobs.build(
        [TextLogprob(" there", -0.3, [(" there", -0.3)])]))
    Echo(echo=True, want_logprobs=True).apply(choice, stream)  # type: ignore[arg-type]
    n = len(stream.prompt_ids)
    assert choice.text == "Hello world, café there"
    lps = choice.logprobs
    assert lps is not None and len(lps.tokens) == n + 1
    assert "".join(lps.tokens) == choice.text
    assert lps.token_logprobs[:2] == [None, -1.0] and lps.top_logprobs[0] is None
    assert lps.token_logprobs[n - 1] == MIN_LOGPROB and lps.token_logprobs[n] == -0.3
    assert lps.text_offset[0] == 0 and lps.text_offset[n] == len("Hello world, café")
    assert choice.prompt_logprobs is None


def test_echo_without_logprobs_and_vllm_prompt_logprobs() -> None:
    stream = _stream()
    choice = CompletionChoice(text="!")
    Echo(echo=True).apply(choice, stream)  # type: ignore[arg-type]
    assert choice.text == "Hello world, café!" and choice.logprobs is None
    choice = CompletionChoice(text="!")
    Echo(prompt_logprobs=True).apply(choice, stream)  # type: ignore[arg-type]
    assert choice.text == "!"
    vllm = choice.prompt_logprobs
    assert vllm is not None and vllm[0] is None and len(vllm) == len(stream.prompt_ids)
    first = stream.prompt_ids[1]
    assert vllm[1][str(first)] == {"logprob": -1.0, "rank": 2, "decoded_token": " world"}
    assert vllm[1]["99"]["rank"] == 2  # second of the top-2
    CompletionChoice.model_validate(choice.model_dump())  # stays a valid choice
