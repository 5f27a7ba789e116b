"""Penalties and logit bias (engine/penalties.py) against references computed by hand and by
transformers' logits processors, on a real model's logits (a tiny random Llama checkpoint with
SmolLM2's vocabulary, loaded both by pdserve and by transformers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from engine.errors import RequestError
from engine.penalties import apply_penalties
from engine.sampling_params import MAX_LOGIT_BIAS_ENTRIES, SamplingParams

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_tiny(tiny_hf_checkpoint: Callable[[str], Path]) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(tiny_hf_checkpoint("llama_gqa")), dtype=torch.float32)
    return model.eval()


def _reference(logits: torch.Tensor, ids: list[int], num_prompt: int,
               p: SamplingParams) -> torch.Tensor:
    """One row processed by transformers' processors (bias, repetition) and by hand (OpenAI's
    frequency / presence formula over the output tokens)."""
    scores = logits.clone()[None]
    input_ids = torch.tensor([ids])
    if p.logit_bias:
        bias = transformers.SequenceBiasLogitsProcessor({(t,): b for t, b in p.logit_bias})
        scores = bias(input_ids, scores)
    if p.repetition_penalty != 1.0:
        scores = transformers.RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(
            input_ids, scores)
    scores = scores[0]
    counts = torch.bincount(torch.tensor(ids[num_prompt:], dtype=torch.int64),
                            minlength=scores.shape[-1]).float()
    return scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0).float()


def _last_logits(hf: Any, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0, -1].float()  # [vocab]


def test_batch_matches_transformers_processors_on_real_logits(hf_tiny: Any) -> None:
    prompts = [[5, 17, 17, 300, 42, 9], [7, 7, 7, 1000], [3, 4, 5], [11, 12, 11, 12]]
    outputs = [[17, 17, 17, 88], [7, 2000], [], [12]]
    params = [
        SamplingParams(repetition_penalty=1.7, frequency_penalty=0.6, presence_penalty=0.4),
        SamplingParams(temperature=0.0),  # untouched
        SamplingParams(logit_bias=((4, 100.0), (9, -100.0), (49151, 3.5)),
                       repetition_penalty=0.5),
        SamplingParams(frequency_penalty=-1.5, presence_penalty=2.0, logit_bias=((12, 1.0),)),
    ]
    ids = [p + o for p, o in zip(prompts, outputs, strict=True)]
    logits = torch.stack([_last_logits(hf_tiny, x) for x in ids])  # [4, vocab]
    got = apply_penalties(logits, params, ids, [len(p) for p in prompts])
    for i, p in enumerate(params):
        want = _reference(logits[i], ids[i], len(prompts[i]), p)
        torch.testing.assert_close(got[i], want, rtol=0, atol=1e-5)
    assert torch.equal(got[1], logits[1])
    assert not torch.equal(got[0], logits[0])


def _hand_greedy(hf: Any, prompt: list[int], p: SamplingParams, n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_reference(_last_logits(hf, ids), ids, len(prompt), p).argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, repetition_penalty=1.8),
    SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, frequency_penalty=2.0,
                   presence_penalty=1.0, logit_bias=((300, 5.0),)),
], ids=["repetition", "frequency_presence_bias"])
def test_greedy_generation_matches_hand_reference(
        tiny_engine: Callable[..., Any], hf_tiny: Any, params: SamplingParams) -> None:
    engine = tiny_engine()
    prompt = [5, 17, 17, 300, 42, 9, 17, 300]
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    seqs = engine.generate([prompt, prompt], [params, plain])
    assert seqs[0].output_ids == _hand_greedy(hf_tiny, prompt, params, 12)
    assert seqs[1].output_ids == _hand_greedy(hf_tiny, prompt, plain, 12)
    assert seqs[0].output_ids != seqs[1].output_ids  # the penalty changed the output
    engine.check_idle_integrity()


def test_bias_forces_a_token_and_logprobs_stay_raw(tiny_engine: Callable[..., Any],
                                                   hf_tiny: Any) -> None:
    engine = tiny_engine()
    prompt = [5, 17, 300]
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=0,
                            logit_bias=((4242, 100.0),))
    (seq,) = engine.generate([prompt], params)
    assert seq.output_ids == [4242]
    raw = torch.log_softmax(_last_logits(hf_tiny, prompt), -1)[4242].item()
    assert seq.logprobs[0].logprob == pytest.approx(raw, abs=1e-4)


def test_bias_id_outside_the_vocabulary_fails_alone(tiny_engine: Callable[..., Any]) -> None:
    engine = tiny_engine()
    with pytest.raises(RequestError, match="logit_bias token id 49152 is outside"):
        engine.add_request("r", [1, 2, 3], SamplingParams(logit_bias=((49152, 1.0),)))
    engine.check_idle_integrity()


@pytest.mark.parametrize("kwargs, match", [
    (dict(frequency_penalty=2.5), "frequency_penalty"),
    (dict(presence_penalty=-2.01), "presence_penalty"),
    (dict(presence_penalty=float("nan")), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(logit_bias=((5, 100.5),)), "logit_bias"),
    (dict(logit_bias=((-1, 1.0),)), "logit_bias"),
    (dict(logit_bias=((5, 1.0), (5, 2.0))), "logit_bias"),
    (dict(logit_bias=tuple((i, 1.0) for i in range(MAX_LOGIT_BIAS_ENTRIES + 1))), "logit_bias"),
])
def test_bad_values_are_request_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kwargs)
