"""Several choices in one response: `n` > 1 and lists of prompts on /v1/completions.

Each choice is its own request through the cluster (a `GenerationStream`), numbered as OpenAI
does: prompt i, choice j -> index i * n + j. The prompt's KV is computed once: the first choice
of each prompt (its leader) starts alone; the others start when its first token arrives, so
the prompt's full blocks are in the prefix cache by then (the prefill worker's, or the decode
worker's for a local prefill) and only the last partial block is computed again per choice.
(A copy-on-write fork of the prompt's blocks on the decode worker would also save the KV
transfers and that partial block; not done yet.)

Seeds: choice j of a seeded request draws with `choice_seed(seed, j)` (engine/sampling_params.py;
choice 0 keeps the seed itself), so each choice is reproducible alone and choices differ.

Usage: prompt tokens counted once per prompt (as vLLM does), completion tokens over every
choice, cached tokens those of each prompt's leader.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from proxy import openai_api as api
from proxy.echo import Echo
from proxy.errors import ApiError, internal
from proxy.responses import Delta, GenerationStream
from proxy.sse import SSE_DONE, sse_error, sse_event


@dataclass
class Choice:
    index: int
    stream: GenerationStream


_Item = tuple[int, Delta] | BaseException | None  # a delta, a failure, or one choice done


async def merged(groups: list[list[Choice]]) -> AsyncIterator[tuple[int, Delta]]:
    """Every choice's deltas as they come, tagged with its index; a failure of any choice is
    raised (the others are then aborted). `groups`: one list per prompt, leader first."""
    queue: asyncio.Queue[_Item] = asyncio.Queue()
    tasks = []
    for leader, *followers in groups:
        gate = asyncio.Event()
        leader.stream.on_first_token = gate.set
        tasks.append(asyncio.create_task(_produce(leader, queue, release=gate)))
        tasks += [asyncio.create_task(_produce(c, queue, wait=gate)) for c in followers]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()  # leaving a stream early aborts its request on the workers
        await asyncio.gather(*tasks, return_exceptions=True)


async def _produce(choice: Choice, queue: asyncio.Queue[_Item], wait: asyncio.Event | None = None,
                   release: asyncio.Event | None = None) -> None:
    try:
        if wait is not None:
            await wait.wait()
        async for delta in choice.stream.deltas():
            queue.put_nowait((choice.index, delta))
    except Exception as e:  # the consumer raises it
        queue.put_nowait(e)
    finally:
        if release is not None:
            release.set()  # the leader failed before its first token: the others go alone
        queue.put_nowait(None)


def _usage(groups: list[list[Choice]]) -> api.UsageInfo:
    leaders = [g[0].stream for g in groups]
    completion = sum(c.stream.num_completion_tokens for g in groups for c in g)
    return api.UsageInfo.of(sum(len(s.prompt_ids) for s in leaders), completion,
                            sum(s.num_cached_tokens for s in leaders))


async def _collect(groups: list[list[Choice]]) -> dict[int, tuple[str, list[api.TextLogprob]]]:
    out: dict[int, tuple[list[str], list[api.TextLogprob]]] = {
        c.index: ([], []) for g in groups for c in g}
    async for index, d in merged(groups):
        out[index][0].append(d.text)
        out[index][1].extend(d.logprobs)
    return {i: ("".join(texts), lps) for i, (texts, lps) in out.items()}


def _finish(groups: list[list[Choice]]) -> dict[int, str | None]:
    return {c.index: c.stream.finish_reason for g in groups for c in g}


async def completion_response(groups: list[list[Choice]], model: str, want_logprobs: bool,
                              echo: Echo = Echo()) -> api.CompletionResponse:
    results, finish = await _collect(groups), _finish(groups)
    choices = [api.CompletionChoice(
        index=i, text=text, finish_reason=finish[i],  # type: ignore[arg-type]
        logprobs=api.CompletionLogprobs.build(lps) if want_logprobs else None)
        for i, (text, lps) in sorted(results.items())]
    streams = {c.index: c.stream for g in groups for c in g}
    for choice in choices:
        echo.apply(choice, streams[choice.index])
    return api.CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", model=model, choices=choices,
                                  usage=_usage(groups))


async def chat_response(groups: list[list[Choice]], model: str,
                        want_logprobs: bool) -> api.ChatCompletionResponse:
    results, finish = await _collect(groups), _finish(groups)
    choices = [api.ChatChoice(
        index=i, message=api.ChatResponseMessage(content=text),
        finish_reason=finish[i],  # type: ignore[arg-type]
        logprobs=api.ChatLogprobs.build(lps) if want_logprobs else None)
        for i, (text, lps) in sorted(results.items())]
    return api.ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", model=model,
                                      choices=choices, usage=_usage(groups))


async def completion_sse(groups: list[list[Choice]], model: str, want_logprobs: bool,
                         include_usage: bool, echo: Echo = Echo()) -> AsyncIterator[bytes]:
    rid = f"cmpl-{uuid.uuid4().hex}"
    offsets = {c.index: 0 for g in groups for c in g}
    streams, heads_due = {c.index: c.stream for g in groups for c in g}, set(offsets)
    try:
        async for i, d in merged(groups):
            if echo.is_on and i in heads_due:  # the prompt part first
                heads_due.discard(i)
                head = echo.head(streams[i], i)
                offsets[i] = len(head.text)
                yield sse_event(api.CompletionResponse(id=rid, model=model, choices=[head]))
            lp = api.CompletionLogprobs.build(d.logprobs, offsets[i]) if want_logprobs else None
            offsets[i] += len(d.text)
            choice = api.CompletionChoice(index=i, text=d.text, logprobs=lp,
                                          finish_reason=d.finish_reason)  # type: ignore[arg-type]
            yield sse_event(api.CompletionResponse(id=rid, model=model, choices=[choice]))
        if include_usage:
            yield sse_event(api.CompletionResponse(id=rid, model=model, choices=[],
                                                   usage=_usage(groups)))
    except ApiError as e:
        yield sse_error(e)
    except Exception as e:  # an unexpected failure still ends the stream properly
        yield sse_error(internal(f"{type(e).__name__}: {e}", rid))
    yield SSE_DONE


async def chat_sse(groups: list[list[Choice]], model: str, want_logprobs: bool,
                   include_usage: bool) -> AsyncIterator[bytes]:
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    for c in sorted((c for g in groups for c in g), key=lambda c: c.index):
        first = api.ChatChunkChoice(index=c.index,
                                    delta=api.DeltaMessage(role="assistant", content=""))
        yield sse_event(api.ChatCompletionChunk(id=rid, model=model, choices=[first]))
    try:
        async for i, d in merged(groups):
            lp = api.ChatLogprobs.build(d.logprobs) if want_logprobs and d.logprobs else None
            choice = api.ChatChunkChoice(index=i, delta=api.DeltaMessage(content=d.text),
                                         logprobs=lp,
                                         finish_reason=d.finish_reason)  # type: ignore[arg-type]
            yield sse_event(api.ChatCompletionChunk(id=rid, model=model, choices=[choice]))
        if include_usage:
            yield sse_event(api.ChatCompletionChunk(id=rid, model=model, choices=[],
                                                    usage=_usage(groups)))
    except ApiError as e:
        yield sse_error(e)
    except Exception as e:
        yield sse_error(internal(f"{type(e).__name__}: {e}", rid))
    yield SSE_DONE
