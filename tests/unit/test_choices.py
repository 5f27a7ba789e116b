"""`n` and lists of prompts at the proxy (proxy/choices.py, proxy/app.py): validation against
--max-n, per-choice seeds, indices, and the leader-first start that lets the other choices of a
prompt find its KV in the prefix cache. Streams here are stand-ins with the real
`GenerationStream` interface (`deltas()`, `on_first_token`); the end-to-end tests
(tests/integration/test_api_params.py) run the real cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from proxy_app_helpers import app_client

from engine.sampling_params import choice_seed
from proxy import choices
from proxy.errors import ApiError
from proxy.responses import Delta


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with app_client(max_n=4) as c:
        yield c


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "n": 5}, "n"), ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": ["a"] * 100, "n": 3}, "n"), ({"prompt": ["a", [49152]]}, "prompt"),
    ({"prompt": ["a", ""], "n": 2}, "prompt"),
])
def test_bad_n_and_prompt_lists_are_400s(client: TestClient, body: dict, param: str) -> None:
    r = client.post("/v1/completions", json={"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    r = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "hi"}], "n": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_choice_seeds_are_distinct_and_keep_choice_zero() -> None:
    assert choice_seed(None, 3) is None and choice_seed(7, 0) == 7
    seeds = {choice_seed(s, j) for s in range(50) for j in range(1, 17)}
    assert len(seeds) == 50 * 16 and all(0 <= x < 2**64 for x in seeds)
    assert choice_seed(-5, 2) == choice_seed(-5, 2)


@dataclass
class FakeStream:
    """What `choices.merged` uses of a GenerationStream; records when it started."""

    name: str
    log: list[str]
    texts: list[str]
    fail: bool = False
    prompt_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    num_completion_tokens: int = 0
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    on_first_token: Any = None

    async def deltas(self) -> AsyncIterator[Delta]:
        self.log.append(f"start {self.name}")
        await asyncio.sleep(0.01)
        if self.fail:
            raise ApiError(503, "no worker", "server_error")
        if self.on_first_token is not None:
            self.on_first_token()
        for i, text in enumerate(self.texts):
            self.num_completion_tokens += 1
            last = i == len(self.texts) - 1
            self.finish_reason = "length" if last else None
            yield Delta(text, [], self.finish_reason)
            await asyncio.sleep(0)


def _groups(log: list[str], n: int, prompts: int, fail_leader: bool = False) -> list[list[Any]]:
    return [[choices.Choice(i * n + j, FakeStream(f"{i}.{j}", log, [f"p{i}c{j}", "!"],  # type: ignore[arg-type]
                                                  fail=fail_leader and j == 0))
             for j in range(n)] for i in range(prompts)]


def test_followers_start_after_the_leaders_first_token_and_indices_follow_openai() -> None:
    log: list[str] = []
    groups = _groups(log, 3, 2)
    response = asyncio.run(choices.completion_response(groups, "m", want_logprobs=False))
    assert [c.index for c in response.choices] == list(range(6))
    assert [c.text for c in response.choices] == [f"p{i}c{j}!" for i in range(2)
                                                  for j in range(3)]
    assert log[:2] == ["start 0.0", "start 1.0"]  # both leaders first, then their followers
    assert response.usage.prompt_tokens == 6 and response.usage.completion_tokens == 12


def test_a_failing_choice_fails_the_response_and_releases_the_others() -> None:
    log: list[str] = []
    with pytest.raises(ApiError):
        asyncio.run(asyncio.wait_for(
            choices.completion_response(_groups(log, 2, 1, fail_leader=True), "m", False), 5))
    chunks = asyncio.run(asyncio.wait_for(_sse(_groups([], 2, 1, fail_leader=True)), 5))
    assert b'"error"' in chunks[-2] and chunks[-1] == b"data: [DONE]\n\n"


async def _sse(groups: list[list[Any]]) -> list[bytes]:
    return [c async for c in choices.chat_sse(groups, "m", False, include_usage=True)]
