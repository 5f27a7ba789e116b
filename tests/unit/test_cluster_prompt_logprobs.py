"""The proxy's cluster client hands a request's prompt logprobs on with its first Tokens, even
when the decode worker's first token arrives before the prefill worker's PromptLogprobs parts
(they come on another socket), and never again after. Fake workers, no model."""

from __future__ import annotations

import asyncio

from cluster_fakes import (
    PROMPT,
    WAIT_S,
    Cluster,
    reserve_and_prefill,
    run_cluster,
    sampling,
    tokens,
)

from engine.outputs import FinishReason, TokenLogprob
from protocol import worker_events as ev


def test_first_tokens_wait_for_the_prefill_workers_parts() -> None:
    entries = [TokenLogprob(PROMPT[i + 1], -0.5 - i, [(7, -0.1)], 2) for i in range(39)]

    async def body(c: Cluster) -> None:
        d = await c.worker("decode", "d0")
        p = await c.worker("prefill", "p0")
        stream = c.generate("r1", sampling(max_tokens=2, prompt_logprobs=1))
        await reserve_and_prefill(d, [p], "r1", [1, 2, 3])
        await d.say(tokens("r1", "d0", [11]))  # the first token overtakes the parts
        await asyncio.sleep(0.2)
        parts = [ev.PromptLogprobs("r1", "p0", entries[i:i + 10], i, i + 10 >= 39)
                 for i in range(0, 39, 10)]
        for part in parts:
            await p.say(part)
        await d.say(tokens("r1", "d0", [12], FinishReason.LENGTH))
        out = await asyncio.wait_for(stream, WAIT_S)
        assert [t.token_ids for t in out] == [[11], [12]]
        assert out[0].prompt_logprobs == entries and out[1].prompt_logprobs == []
    run_cluster(body)
