"""Batch invariance and per-request sampling on SmolLM2 (fp32).

The same prompts decoded together — staggered arrivals, a 32-token step budget that chunks the
prefills and mixes them with other sequences' decode steps — give the same greedy tokens as
each decoded alone by an engine that prefills whole prompts in one step. Seeded sampling is
reproducible alone and in a batch; top-k / top-p / logprobs / stop tokens / max_tokens behave.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason

NUM_NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
ARRIVAL_STEPS = [0, 0, 1, 3, 6, 10]
_STORY = ("Once upon a time, in a small village at the edge of a great forest, there lived an old "
          "clockmaker who repaired every clock in the valley. One winter morning a stranger "
          "arrived with a broken pocket watch that ticked backwards, and asked him to fix it "
          "before the first snow melted. ")


def _engine(build: Callable[..., LLMEngine], max_num_batched_tokens: int) -> LLMEngine:
    return build(dtype="float32", kv_cache_memory="64MiB", max_model_len=512,
                 max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=False)


@pytest.fixture(scope="module")
def batched(smollm2_engine: Callable[..., LLMEngine]) -> LLMEngine:
    """Small step budget: prefills are split into 32-token chunks that share steps with decodes."""
    return _engine(smollm2_engine, 32)


@pytest.fixture(scope="module")
def alone(smollm2_engine: Callable[..., LLMEngine]) -> LLMEngine:
    """Default budget: each prompt is prefilled in one step."""
    return _engine(smollm2_engine, 2048)


@pytest.fixture(scope="module")
def prompts(alone: LLMEngine) -> list[list[int]]:
    tok = alone.tokenizer

    def chat(text: str) -> list[int]:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]))

    result = [
        tok.encode("The capital of France is"),
        chat("List three primary colors."),
        tok.encode(_STORY * 2 + "The clockmaker"),
        tok.encode("def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n"),
        chat("Summarize this story in one sentence:\n" + _STORY),
        tok.encode("Il était une fois un petit prince qui"),
    ]
    assert max(map(len, result)) > 100  # several chunks under the 32-token budget
    return result


@pytest.fixture(scope="module")
def greedy_alone(alone: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    return [alone.generate([p], GREEDY)[0].output_ids for p in prompts]


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)


def test_greedy_batched_staggered_equals_alone(batched: LLMEngine, prompts: list[list[int]],
                                               greedy_alone: list[list[int]]) -> None:
    seqs = batched.generate(prompts, GREEDY, arrival_steps=ARRIVAL_STEPS)
    batched.check_idle_integrity()
    for i, (seq, ref) in enumerate(zip(seqs, greedy_alone, strict=True)):
        assert len(seq.output_ids) == NUM_NEW_TOKENS
        pos = _first_difference(seq.output_ids, ref)
        assert pos is None, (f"prompt {i} ({len(prompts[i])} tokens, arrives at step "
                             f"{ARRIVAL_STEPS[i]}): batched differs from alone at new token "
                             f"{pos}: {seq.output_ids[pos]} vs {ref[pos]}")


def test_seeded_sampling_is_reproducible_alone_and_batched(
        alone: LLMEngine, batched: LLMEngine, prompts: list[list[int]]) -> None:
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_k=50, top_p=0.95, seed=1000 + i,
                             ignore_eos=True) for i in range(len(prompts))]
    first = [alone.generate([p], sp)[0].output_ids for p, sp in zip(prompts, params, strict=True)]
    rerun = alone.generate(prompts[:2], params[:2])  # same seeds again, two at a time
    assert [s.output_ids for s in rerun] == first[:2]
    together = batched.generate(prompts, params, arrival_steps=ARRIVAL_STEPS)
    assert [s.output_ids for s in together] == first
    # A different seed gives a different continuation (16 tokens at T=0.9: a tie is implausible).
    other = alone.generate([prompts[2]], [SamplingParams(max_tokens=16, temperature=0.9, top_k=50,
                                                         seed=7, ignore_eos=True)])[0].output_ids
    assert other != first[2]


def test_top_k_one_and_tiny_top_p_are_greedy(alone: LLMEngine, prompts: list[list[int]],
                                             greedy_alone: list[list[int]]) -> None:
    top_k = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=1.5, top_k=1, seed=3,
                           ignore_eos=True)
    top_p = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=1.0, top_p=1e-6, seed=3,
                           ignore_eos=True)
    seqs = alone.generate([prompts[0], prompts[3]], [top_k, top_p])
    assert seqs[0].output_ids == greedy_alone[0]
    assert seqs[1].output_ids == greedy_alone[3]


def test_sampled_tokens_lie_inside_top_k_and_top_p(alone: LLMEngine,
                                                   prompts: list[list[int]]) -> None:
    # Logprobs are the raw distribution (temperature 1 here, so the same one that was filtered).
    params = [SamplingParams(max_tokens=16, temperature=1.0, top_k=5, seed=11, logprobs=5,
                             ignore_eos=True),
              SamplingParams(max_tokens=16, temperature=1.0, top_p=0.5, seed=12, logprobs=20,
                             ignore_eos=True)]
    k_seq, p_seq = alone.generate([prompts[1], prompts[2]], params)
    vocab = alone.model_config.vocab_size
    for seq in (k_seq, p_seq):
        assert len(seq.output_ids) == 16 and all(0 <= t < vocab for t in seq.output_ids)
    for lp in k_seq.logprobs:
        assert lp.token_id in [t for t, _ in lp.top]
    for lp in p_seq.logprobs:
        ranked = [t for t, _ in lp.top]
        # top_p keeps the most likely tokens until their mass reaches 0.5: the ones ranked before
        # the sample hold less; a sample beyond the 20 listed means these 20 hold less than 0.5
        before = lp.top[:ranked.index(lp.token_id)] if lp.token_id in ranked else lp.top
        assert sum(math.exp(v) for _, v in before) < 0.5 + 1e-5, (
            "a top_p=0.5 sample outside the nucleus")


def test_logprobs_sorted_and_greedy_token_is_the_max(alone: LLMEngine, prompts: list[list[int]],
                                                     greedy_alone: list[list[int]]) -> None:
    n = 5
    seq = alone.generate([prompts[4]], SamplingParams(max_tokens=12, temperature=0.0, logprobs=n,
                                                      ignore_eos=True))[0]
    assert seq.output_ids == greedy_alone[4][:12]  # asking for logprobs changes no token
    assert len(seq.logprobs) == len(seq.output_ids)
    for token, lp in zip(seq.output_ids, seq.logprobs, strict=True):
        values = [v for _, v in lp.top]
        assert len(lp.top) == n
        assert values == sorted(values, reverse=True)
        assert all(v <= 0.0 for v in values) and sum(math.exp(v) for v in values) <= 1.0 + 1e-5
        assert lp.token_id == token == lp.top[0][0]
        assert lp.logprob == pytest.approx(values[0], abs=1e-6)
    zero = alone.generate([prompts[4]],
                          SamplingParams(max_tokens=2, temperature=0.0, logprobs=0))[0]
    assert [lp.top for lp in zero.logprobs] == [[], []] and zero.logprobs[0].logprob <= 0.0


def test_stop_token_ids_stop_generation(alone: LLMEngine, prompts: list[list[int]],
                                        greedy_alone: list[list[int]]) -> None:
    ref = greedy_alone[2]
    stop = ref[5]
    first = ref.index(stop)
    seq = alone.generate([prompts[2]], SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0,
                                                      ignore_eos=True, stop_token_ids=(stop,)))[0]
    assert seq.finish_reason is FinishReason.STOP
    assert seq.output_ids == ref[:first + 1]  # the stop token is the last output token


def test_eos_stops_unless_ignored(alone: LLMEngine, prompts: list[list[int]]) -> None:
    seq = alone.generate([prompts[1]], SamplingParams(max_tokens=64, temperature=0.0))[0]
    assert seq.finish_reason is FinishReason.STOP, "the chat answer should end with an EOS token"
    assert seq.output_ids[-1] in alone.scheduler.eos_token_ids
    assert not set(seq.output_ids[:-1]) & set(alone.scheduler.eos_token_ids)


def test_max_tokens_respected_in_a_batch(batched: LLMEngine, prompts: list[list[int]]) -> None:
    limits = [1, 2, 3, 5, 8, 13]
    params = [SamplingParams(max_tokens=m, temperature=0.0 if m % 2 else 0.7, seed=m,
                             ignore_eos=True)
              for m in limits]
    seqs = batched.generate(prompts, params, arrival_steps=ARRIVAL_STEPS)
    assert [len(s.output_ids) for s in seqs] == limits
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    batched.check_idle_integrity()


def test_greedy_logits_are_batch_invariant_to_fp32_noise(batched: LLMEngine,
                                                         prompts: list[list[int]]) -> None:
    """Where tokens agree, so do logprobs: batching changes only fp32 rounding."""
    params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1, ignore_eos=True)
    alone_lp = [batched.generate([p], params)[0].logprobs for p in prompts[:3]]
    together = batched.generate(prompts[:3], params, arrival_steps=[0, 1, 2])
    for ref, seq in zip(alone_lp, together, strict=True):
        got = torch.tensor([lp.logprob for lp in seq.logprobs])
        want = torch.tensor([lp.logprob for lp in ref])
        assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
