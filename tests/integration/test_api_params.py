"""End-to-end, with the official `openai` client, on a disaggregated deployment (1 prefill +
1 decode worker, every prompt prefilled remotely) and a colocated one (both shared with other
test modules: tests/conftest.py, `shared_deployment`), SmolLM2: the sampling
parameters of issue 18 give the same outputs on both paths and the in-process engine's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest
import torch
from serving import COLOCATED, DISAGG, Server

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

PROMPT = "red blue red blue red blue red"
MAX_TOKENS = 20


@pytest.fixture(scope="module")
def disagg(shared_deployment: Callable[..., Server]) -> Server:
    return shared_deployment(*DISAGG)


@pytest.fixture(scope="module")
def colocated(shared_deployment: Callable[..., Server]) -> Server:
    return shared_deployment(*COLOCATED)


@pytest.fixture(scope="module")
def reference(smollm2_reference: LLMEngine) -> LLMEngine:
    return smollm2_reference  # tests/conftest.py: loaded once per session


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


LONG_PROMPT = ("Write a short story about a lighthouse keeper who finds a message in a bottle. "
               "The story should be set on a rocky island in the north, during a winter storm, "
               "and it should end with the keeper deciding whether to answer the message.")


def _one_prefill(server: Server, num_prompt: int, n: int, hits_before: float) -> None:
    """The other n-1 choices found every full block of the prompt in the prefix cache."""
    full = (num_prompt - 1) // 16 * 16
    hits = server.metric("pdserve:prefix_cache_hits_total") - hits_before
    assert hits >= (n - 1) * full > 0, (hits, full)


@pytest.mark.parametrize("which", ["disagg", "colocated"])
def test_n_greedy_choices_are_identical_with_one_prefill(
        which: str, request: pytest.FixtureRequest, reference: LLMEngine) -> None:
    server: Server = request.getfixturevalue(which)
    ids = reference.tokenizer.encode(LONG_PROMPT)
    want = reference.generate([ids], SamplingParams(max_tokens=12, temperature=0.0))[0]
    hits = server.metric("pdserve:prefix_cache_hits_total")
    got = client(server).completions.create(model="smollm2", prompt=LONG_PROMPT, max_tokens=12,
                                            temperature=0, n=4)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]
    assert {c.text for c in got.choices} == {reference.tokenizer.decode(want.output_ids)}
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens == 4 * len(want.output_ids)
    _one_prefill(server, len(ids), 4, hits)
    assert server.wait_idle_blocks() == 0


def test_n_seeded_choices_differ_reproducibly_on_both_paths(
        disagg: Server, colocated: Server) -> None:
    messages = [{"role": "user", "content": "Name a colour and an animal."}]
    runs = []
    for server in (disagg, colocated, disagg):
        chat = client(server).chat.completions.create(
            model="smollm2", messages=messages, max_tokens=16, temperature=1.0, seed=1234, n=4)
        runs.append([c.message.content for c in chat.choices])
        assert [c.index for c in chat.choices] == [0, 1, 2, 3]
    assert runs[0] == runs[1] == runs[2]
    assert len(set(runs[0])) >= 3, runs[0]
    single = client(disagg).chat.completions.create(
        model="smollm2", messages=messages, max_tokens=16, temperature=1.0, seed=1234)
    assert single.choices[0].message.content == runs[0][0]  # choice 0 keeps the seed


def test_prompt_list_with_n_streams_indices_as_openai(disagg: Server) -> None:
    prompts = ["The capital of France is", "1, 2, 3, 4,", "def add(a, b):"]
    kwargs: dict = dict(model="smollm2", prompt=prompts, max_tokens=8, temperature=0, n=2)
    whole = client(disagg).completions.create(**kwargs)
    assert [c.index for c in whole.choices] == list(range(6))
    texts = [c.text for c in whole.choices]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]
    streamed: dict[int, str] = {}
    finished = set()
    for chunk in client(disagg).completions.create(stream=True, **kwargs):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
            if c.finish_reason:
                finished.add(c.index)
    assert [streamed[i] for i in range(6)] == texts and finished == set(range(6))
    assert disagg.wait_idle_blocks() == 0


def test_models_retrieve_and_head_health(disagg: Server) -> None:
    sdk = client(disagg)
    assert sdk.models.retrieve("smollm2").id == "smollm2"
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4")
    with disagg.client() as c:
        assert c.head("/health").status_code == 200
        r = c.post("/tokenize", json={"prompt": PROMPT})
        assert r.json()["count"] == len(r.json()["tokens"]) > 0
        assert c.post("/detokenize", json=r.json()).json()["prompt"] == PROMPT


def test_echo_logprobs_equal_transformers_on_both_paths(
        disagg: Server, colocated: Server, reference: LLMEngine, hf_smollm2_model: Any) -> None:
    """lm-eval's log-likelihood request (a list of prompts, echo, logprobs=1, max_tokens=1):
    the prompt tokens' logprobs are transformers' log-softmax on the same fp32 weights."""
    prompts = ["The capital of France is Paris.", "def add(a, b):\n    return a + b"]
    wants = []
    for prompt in prompts:
        ids = reference.tokenizer.encode(prompt)
        with torch.no_grad():
            lp = torch.log_softmax(hf_smollm2_model(torch.tensor([ids])).logits[0].float(), -1)
        wants.append((ids, [lp[p, ids[p + 1]].item() for p in range(len(ids) - 1)], lp))
    for server in (disagg, colocated):
        got = client(server).completions.create(model="smollm2", prompt=prompts, echo=True,
                                                logprobs=1, max_tokens=1, temperature=0)
        for choice, prompt, (ids, want, _) in zip(got.choices, prompts, wants, strict=True):
            assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
            lps = choice.logprobs
            assert lps is not None and len(lps.tokens) == len(ids) + 1
            assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
            assert lps.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
            assert "".join(lps.tokens) == choice.text
    ids, want, lp = wants[0]
    got = client(disagg).completions.create(model="smollm2", prompt=prompts[0], max_tokens=2,
                                            temperature=0, extra_body={"prompt_logprobs": 2})
    vllm = got.choices[0].model_extra["prompt_logprobs"]  # type: ignore[index]
    assert vllm[0] is None and len(vllm) == len(ids)
    entry = vllm[1][str(ids[1])]
    assert entry["logprob"] == pytest.approx(want[0], abs=1e-4)
    assert entry["rank"] == int((lp[0] > lp[0, ids[1]]).sum()) + 1
    assert not got.choices[0].text.startswith(prompts[0])  # no echo asked for
    chunks = list(client(disagg).completions.create(
        model="smollm2", prompt=prompts[0], max_tokens=3, temperature=0, echo=True, stream=True))
    assert chunks[0].choices[0].text == prompts[0]
    assert disagg.wait_idle_blocks() == 0 and colocated.wait_idle_blocks() == 0


def test_client_leaving_a_multi_choice_stream_frees_every_block(disagg: Server) -> None:
    body = {"prompt": [LONG_PROMPT, "Once upon a time"], "n": 3, "max_tokens": 200,
            "ignore_eos": True, "stream": True, "prompt_logprobs": 1}
    with disagg.client() as c, c.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {") and '"index":5' in line:
                break  # the last choice has started: leave with all six running
    assert disagg.wait_idle_blocks() == 0


@pytest.mark.slow  # run with -m slow: kept out of CI for time (README, Development)
def test_long_prompt_logprobs_cross_in_parts(disagg: Server, colocated: Server,
                                             reference: LLMEngine) -> None:
    """~1500 prompt tokens with the top 5 each: more than one event frame holds, on both
    paths, equal to the in-process engine's."""
    prompt = " ".join(f"item {i} costs {i * 7 % 101} coins;" for i in range(180))
    ids = reference.tokenizer.encode(prompt)
    assert len(ids) > 1200
    seq = reference.generate([ids], SamplingParams(max_tokens=1, temperature=0.0,
                                                   prompt_logprobs=5))[0]
    want = [e.logprob for e in seq.prompt_logprobs]
    for server in (disagg, colocated):
        got = client(server).completions.create(model="smollm2", prompt=prompt, echo=True,
                                                logprobs=5, max_tokens=1, temperature=0)
        lps = got.choices[0].logprobs
        assert lps is not None and lps.token_logprobs[0] is None
        assert lps.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)
        assert all(len(t) == 5 for t in lps.top_logprobs[1:len(ids)])
