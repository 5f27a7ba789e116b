"""From a request's token events to OpenAI responses: text, stop strings, logprobs, usage, SSE.

`GenerationStream` consumes the ClusterClient's `Tokens` events for one request, detokenizes
incrementally (never broken UTF-8), applies stop strings on the text, records metrics, and
yields `Delta`s. `completion_*` / `chat_*` shape those deltas into responses or SSE chunks.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.outputs import FinishReason, TokenLogprob
from engine.sampling_params import SamplingParams
from proxy import openai_api as api
from proxy.cluster import ClusterClient
from proxy.detokenizer import IncrementalDetokenizer, TokenDecoder
from proxy.errors import ApiError, internal
from proxy.metrics import ProxyMetrics
from proxy.sse import SSE_DONE, sse_error, sse_event
from proxy.stop import StopMatcher
from proxy.tool_parser import ToolStreamFilter, parse_tool_calls
from proxy.tools import ToolCallDelta, ToolPlan

if TYPE_CHECKING:
    from proxy.echo import Echo


@dataclass
class Delta:
    text: str
    logprobs: list[api.TextLogprob]
    finish_reason: str | None = None


@dataclass
class GenerationStream:
    cluster: ClusterClient
    tokenizer: TokenDecoder
    metrics: ProxyMetrics
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stops: list[str]
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    started: float = field(default_factory=time.monotonic)
    on_first_token: Callable[[], None] | None = None  # called once, when the first token arrives
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # when asked for

    async def deltas(self) -> AsyncIterator[Delta]:
        detok = IncrementalDetokenizer(self.tokenizer, self.prompt_ids)
        stop = StopMatcher(self.stops)
        first_at: float | None = None
        last_at = self.started
        try:
            events = self.cluster.generate(self.request_id, self.prompt_ids, self.params)
            async for tokens in events:
                now = time.monotonic()
                if first_at is None:
                    first_at = now
                    self.metrics.on_first_token(now - self.started)
                    self.prompt_logprobs = list(tokens.prompt_logprobs)
                    if self.on_first_token is not None:
                        self.on_first_token()
                elif tokens.token_ids:
                    self.metrics.on_inter_token(now - last_at, len(tokens.token_ids))
                last_at = now
                self.num_completion_tokens += len(tokens.token_ids)
                self.num_cached_tokens = tokens.num_cached_tokens
                text = detok.push(tokens.token_ids)
                if tokens.finish_reason is not None:
                    text += detok.flush()
                emit, stopped = stop.push(text)
                if tokens.finish_reason is not None and not stopped:
                    emit += stop.flush()
                logprobs = self._logprobs(tokens.logprobs)
                if stopped or tokens.finish_reason is not None:
                    is_length = not stopped and tokens.finish_reason is FinishReason.LENGTH
                    self.finish_reason = "length" if is_length else "stop"  # abort: "stop"
                    yield Delta(emit, logprobs, self.finish_reason)
                    return  # leaving the cluster iterator early aborts the request on the workers
                if emit or logprobs:
                    yield Delta(emit, logprobs)
        except ApiError:
            self.metrics.on_request_failed("worker", self.num_completion_tokens)
            raise
        finally:
            if self.finish_reason is not None:
                self.metrics.on_request_finished(
                    self.finish_reason, len(self.prompt_ids), self.num_completion_tokens,
                    time.monotonic() - self.started,
                    None if first_at is None else first_at - self.started, self.num_cached_tokens)

    def _logprobs(self, entries: list[TokenLogprob]) -> list[api.TextLogprob]:
        def text(token_id: int) -> str:
            return self.tokenizer.decode([token_id], skip_special_tokens=False)

        raw = getattr(self.tokenizer, "token_bytes", None)  # a TokenDecoder may lack it
        return [api.TextLogprob(text(e.token_id), e.logprob, [(text(t), lp) for t, lp in e.top],
                                None if raw is None else raw(e.token_id),
                                None if raw is None else [raw(t) for t, _ in e.top])
                for e in entries]

    def usage(self) -> api.UsageInfo:
        return api.UsageInfo.of(len(self.prompt_ids), self.num_completion_tokens,
                                self.num_cached_tokens)


# ---- non-streaming ----------------------------------------------------------------------------
async def collect(stream: GenerationStream) -> tuple[str, list[api.TextLogprob]]:
    text, logprobs = [], []
    async for d in stream.deltas():
        text.append(d.text)
        logprobs.extend(d.logprobs)
    return "".join(text), logprobs


async def completion_response(stream: GenerationStream, model: str, want_logprobs: bool,
                              echo: Echo | None = None) -> api.CompletionResponse:
    text, logprobs = await collect(stream)
    choice = api.CompletionChoice(
        text=text, finish_reason=stream.finish_reason,  # type: ignore[arg-type]
        logprobs=api.CompletionLogprobs.build(logprobs) if want_logprobs else None)
    if echo is not None:
        echo.apply(choice, stream)
    return api.CompletionResponse(id=f"cmpl-{stream.request_id}", model=model, choices=[choice],
                                  usage=stream.usage())


async def chat_response(stream: GenerationStream, model: str, want_logprobs: bool,
                        tools: ToolPlan | None = None) -> api.ChatCompletionResponse:
    text, logprobs = await collect(stream)
    message, finish = api.ChatResponseMessage(content=text), stream.finish_reason
    if tools is not None and tools.mode != "none" and finish == "stop":
        content, calls = parse_tool_calls(text, tools)
        if calls:
            message, finish = api.ChatResponseMessage(content=content, tool_calls=calls), \
                "tool_calls"
    choice = api.ChatChoice(message=message,
                            finish_reason=finish,  # type: ignore[arg-type]
                            logprobs=api.ChatLogprobs.build(logprobs) if want_logprobs else None)
    return api.ChatCompletionResponse(id=f"chatcmpl-{stream.request_id}", model=model,
                                      choices=[choice], usage=stream.usage())


# ---- streaming ---------------------------------------------------------------------------------
async def completion_sse(stream: GenerationStream, model: str, want_logprobs: bool,
                         include_usage: bool, echo: Echo | None = None) -> AsyncIterator[bytes]:
    rid, offset = f"cmpl-{stream.request_id}", 0
    try:
        async for d in stream.deltas():
            if echo is not None and echo.is_on and offset == 0:  # the prompt part first
                head = echo.head(stream)
                yield sse_event(api.CompletionResponse(id=rid, model=model, choices=[head]))
                offset, echo = len(head.text), None
            lp = api.CompletionLogprobs.build(d.logprobs, offset) if want_logprobs else None
            offset += len(d.text)
            choice = api.CompletionChoice(text=d.text, logprobs=lp,
                                          finish_reason=d.finish_reason)  # type: ignore[arg-type]
            yield sse_event(api.CompletionResponse(id=rid, model=model, choices=[choice]))
        if include_usage:
            yield sse_event(api.CompletionResponse(id=rid, model=model, choices=[],
                                                   usage=stream.usage()))
    except ApiError as e:
        yield sse_error(e)
    except Exception as e:  # an unexpected failure still ends the stream properly
        yield sse_error(internal(f"{type(e).__name__}: {e}", stream.request_id))
    yield SSE_DONE


async def chat_sse(stream: GenerationStream, model: str, want_logprobs: bool,
                   include_usage: bool, tools: ToolPlan | None = None) -> AsyncIterator[bytes]:
    rid = f"chatcmpl-{stream.request_id}"
    first = api.ChatChunkChoice(delta=api.DeltaMessage(role="assistant", content=""))
    yield sse_event(api.ChatCompletionChunk(id=rid, model=model, choices=[first]))
    calls = None if tools is None or tools.mode == "none" else ToolStreamFilter(tools)
    try:
        async for d in stream.deltas():
            lp = api.ChatLogprobs.build(d.logprobs) if want_logprobs and d.logprobs else None
            for delta, finish in _chat_deltas(d, calls):
                choice = api.ChatChunkChoice(delta=delta, logprobs=lp,
                                             finish_reason=finish)  # type: ignore[arg-type]
                lp = None
                yield sse_event(api.ChatCompletionChunk(id=rid, model=model, choices=[choice]))
        if include_usage:
            yield sse_event(api.ChatCompletionChunk(id=rid, model=model, choices=[],
                                                    usage=stream.usage()))
    except ApiError as e:
        yield sse_error(e)
    except Exception as e:
        yield sse_error(internal(f"{type(e).__name__}: {e}", stream.request_id))
    yield SSE_DONE


def _chat_deltas(d: Delta, calls: ToolStreamFilter | None
                 ) -> list[tuple[api.DeltaMessage, str | None]]:
    """A stream delta as chat deltas; with tools, text that may be a call is held back until
    the end, then sent as one `tool_calls` delta per call (finish_reason 'tool_calls')."""
    if calls is None:
        return [(api.DeltaMessage(content=d.text), d.finish_reason)]
    text = calls.push(d.text)
    if d.finish_reason is None:
        return [(api.DeltaMessage(content=text), None)] if text or d.logprobs else []
    rest, found = calls.finish()
    if d.finish_reason != "stop" or not found:
        return [(api.DeltaMessage(content=text + rest), d.finish_reason)]
    out = [(api.DeltaMessage(content=text + rest), None)] if text + rest else []
    deltas = [ToolCallDelta(index=i, **c.model_dump()) for i, c in enumerate(found)]
    return [*out, (api.DeltaMessage(tool_calls=deltas), None),
            (api.DeltaMessage(), "tool_calls")]
