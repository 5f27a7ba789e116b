"""End-to-end, with the official `openai` client, on a disaggregated deployment (1 prefill +
1 decode worker, every prompt prefilled remotely) and a colocated one, SmolLM2: the sampling
parameters of issue 18 give the same outputs on both paths and the in-process engine's."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from serving import Server, serve

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPT = "red blue red blue red blue red"
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def disagg() -> Iterator[Server]:
    with serve("--prefill", "1", "--decode", "1", "--placement", "remote") as s:
        yield s


@pytest.fixture(scope="module")
def colocated() -> Iterator[Server]:
    with serve("--colocated") as s:
        yield s


@pytest.fixture(scope="module")
def reference() -> LLMEngine:
    return LLMEngine.from_config(EngineConfig(kv_cache_memory="128MiB", max_model_len=2048),
                                 log_plan=False)


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_penalties_change_greedy_outputs_identically_on_both_paths(
        disagg: Server, colocated: Server, reference: LLMEngine) -> None:
    prompt_ids = reference.tokenizer.encode(PROMPT)
    cases = [
        {},
        {"frequency_penalty": 1.5},
        {"presence_penalty": 2.0, "logit_bias": {str(prompt_ids[1]): -100}},
        {"extra_body": {"repetition_penalty": 1.6}},
    ]
    texts = []
    for case in cases:
        kwargs = dict(case)
        extra = kwargs.pop("extra_body", {})
        bias = kwargs.get("logit_bias", {})
        params = SamplingParams(
            max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
            logit_bias=tuple((int(k), float(v)) for k, v in bias.items()),
            **{k: v for k, v in {**kwargs, **extra}.items() if k != "logit_bias"})
        want = reference.tokenizer.decode(reference.generate([prompt_ids], params)[0].output_ids)
        for server in (disagg, colocated):
            got = client(server).completions.create(
                model="smollm2", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0,
                extra_body={"ignore_eos": True, **extra}, **kwargs)
            assert got.choices[0].text == want, (case, server.url)
        texts.append(want)
    assert len(set(texts)) == len(texts), texts  # every penalty changed the output
    assert texts[0].count(" blue") > texts[1].count(" blue")


def test_bad_penalties_are_400s_naming_the_parameter(disagg: Server) -> None:
    for kwargs in ({"frequency_penalty": 2.5}, {"presence_penalty": -3},
                   {"logit_bias": {"49152": 1}}, {"extra_body": {"repetition_penalty": 0}}):
        with pytest.raises(openai.BadRequestError) as e:
            client(disagg).completions.create(model="smollm2", prompt="x", max_tokens=2,
                                              **kwargs)
        name = next(iter(kwargs.get("extra_body", kwargs)))
        assert e.value.body["param"] == name  # type: ignore[index]
    assert disagg.wait_idle_blocks() == 0
