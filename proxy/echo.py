"""`echo` and prompt logprobs on /v1/completions: the prompt's text (and its tokens' logprobs)
before the completion's, as OpenAI's legacy API gives them, and vLLM's `prompt_logprobs`.

The prompt logprobs come with the request's first token (engine/prompt_logprobs.py computes
them where the prompt is prefilled; `GenerationStream.prompt_logprobs`); the first prompt
token has none (`None` in `token_logprobs` and `top_logprobs`, as OpenAI sends it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy import openai_api as api
from proxy.responses import GenerationStream


@dataclass(frozen=True)
class Echo:
    """What a completions request asked to see of its prompt."""

    echo: bool = False
    want_logprobs: bool = False  # `logprobs` given: the completion's (with echo the prompt's)
    prompt_logprobs: bool = False  # vLLM's field on each choice

    @classmethod
    def of(cls, body: api.CompletionRequest) -> Echo:
        return cls(bool(body.echo), body.logprobs is not None, body.prompt_logprobs is not None)

    @property
    def is_on(self) -> bool:
        return self.echo or self.prompt_logprobs

    def prompt_text(self, stream: GenerationStream) -> str:
        return stream.tokenizer.decode(stream.prompt_ids, skip_special_tokens=False)

    def head(self, stream: GenerationStream, index: int = 0) -> api.CompletionChoice:
        """The prompt part of choice `index`: its text and logprobs when echoing, vLLM's
        `prompt_logprobs` when asked for."""
        text = self.prompt_text(stream) if self.echo else ""
        logprobs = self._prompt_logprobs(stream) if self.echo and self.want_logprobs else None
        vllm = self._vllm(stream) if self.prompt_logprobs else None
        return api.CompletionChoice(index=index, text=text, logprobs=logprobs,
                                    prompt_logprobs=vllm)

    def apply(self, choice: api.CompletionChoice, stream: GenerationStream) -> None:
        """Put the prompt part in front of a whole (non-streamed) choice."""
        if not self.is_on:
            return
        head = self.head(stream, choice.index)
        if choice.logprobs is not None and head.logprobs is not None:
            tail, offset = choice.logprobs, len(head.text)
            head.logprobs.tokens += tail.tokens
            head.logprobs.token_logprobs += tail.token_logprobs
            head.logprobs.top_logprobs += tail.top_logprobs
            head.logprobs.text_offset += [o + offset for o in tail.text_offset]
            choice.logprobs = head.logprobs
        choice.text = head.text + choice.text
        choice.prompt_logprobs = head.prompt_logprobs

    def _token(self, stream: GenerationStream, token_id: int) -> str:
        return stream.tokenizer.decode([token_id], skip_special_tokens=False)

    def _prompt_logprobs(self, stream: GenerationStream) -> api.CompletionLogprobs:
        ids = stream.prompt_ids
        tokens = [self._token(stream, t) for t in ids]
        offsets = [0]
        for t in tokens[:-1]:
            offsets.append(offsets[-1] + len(t))
        entries = stream.prompt_logprobs
        return api.CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[None] + [api.finite(e.logprob) for e in entries],
            top_logprobs=[None] + [{self._token(stream, t): api.finite(lp) for t, lp in e.top}
                                   for e in entries],
            text_offset=offsets)

    def _vllm(self, stream: GenerationStream) -> list[dict[str, dict[str, Any]] | None]:
        """vLLM's shape: per prompt token, {token id: {logprob, rank, decoded_token}} for the
        token itself and the top-n (None for the first token)."""
        out: list[dict[str, dict[str, Any]] | None] = [None]
        for e in stream.prompt_logprobs:
            ranked = [(e.token_id, e.logprob, e.rank)]
            ranked += [(t, lp, r + 1) for r, (t, lp) in enumerate(e.top)]
            out.append({str(t): {"logprob": api.finite(lp), "rank": rank,
                                 "decoded_token": self._token(stream, t)}
                        for t, lp, rank in reversed(ranked)})  # the token's own entry wins
        return out
