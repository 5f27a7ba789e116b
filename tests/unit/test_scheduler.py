"""The continuous-batching scheduler with no model (vLLM's `tests/v1/core` style): admission,
chunked prefill and batching, finishing. Preemption, the prefix cache, aborts and the random
load are in test_scheduler_kv_blocks.py; the harness (factories, `step`, the block accounting
checked after every step) in scheduler_harness.py.

The cache manager alone is property-tested in test_block_allocator.py and preemption with a
real model in test_preemption.py; these files cover the scheduler's own decisions.
"""

from __future__ import annotations

import pytest
from scheduler_harness import (
    EOS_TOKEN_ID,
    OUTPUT_BASE,
    TokenOf,
    assert_accounting,
    counting,
    create_requests,
    create_scheduler,
    fake_results,
    run_to_completion,
    sampling,
    shape,
    step,
)

from engine.errors import RequestError
from engine.sequence import FinishReason, SeqStatus, Sequence


# ---- admission ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("prompt_len", "match"), [
    (0, "empty"),
    (32, "max-model-len 32"),  # no room for one output token
    (40, "max-model-len 32"),
])
def test_inadmissible_prompt_fails_alone(prompt_len: int, match: str) -> None:
    scheduler = create_scheduler(max_model_len=32)
    [ok] = create_requests(1, prompt_len=8)
    scheduler.add(ok)
    bad = Sequence("bad", [5] * prompt_len, sampling())
    with pytest.raises(RequestError, match=match):
        scheduler.add(bad)
    assert list(scheduler.waiting) == [ok]
    assert_accounting(scheduler)


def test_prompt_that_can_never_fit_the_cache_is_refused_and_the_largest_that_fits_runs() -> None:
    scheduler = create_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    too_big = Sequence("big", [5] * 16, sampling())  # 16 + 1 tokens need 5 blocks of 4
    with pytest.raises(RequestError, match=r"more KV blocks than the cache has \(4\)"):
        scheduler.check_admissible(too_big)
    [largest] = create_requests(1, prompt_len=15, max_tokens=1)
    scheduler.add(largest)
    _, finished = step(scheduler)
    assert finished == [largest] and largest.finish_reason is FinishReason.LENGTH


# ---- chunked prefill and batching ---------------------------------------------------------------
def test_long_prompt_is_prefilled_in_chunks_under_the_token_budget() -> None:
    scheduler = create_scheduler(max_num_batched_tokens=16, max_model_len=128)
    [seq] = create_requests(1, prompt_len=50, max_tokens=3)
    scheduler.add(seq)
    chunks = []

    def is_prefill_done() -> bool:
        return seq.num_computed_tokens >= seq.num_prompt_tokens

    while not is_prefill_done():
        batch, _ = step(scheduler)
        assert [s.seq for s in batch] == [seq]
        chunks.append(batch[0].num_tokens)
        assert seq.num_computed_tokens == sum(chunks)
        assert seq.num_output_tokens == (1 if is_prefill_done() else 0)  # sampled at the end only
    assert chunks == [16, 16, 16, 2]
    decodes = []
    while not seq.is_finished:
        batch, _ = step(scheduler)
        decodes.append(shape(batch))
    assert decodes == [[("req-0", 1)], [("req-0", 1)]]
    assert seq.output_ids == [OUTPUT_BASE, OUTPUT_BASE + 1, OUTPUT_BASE + 2]
    assert seq.finish_reason is FinishReason.LENGTH and scheduler.cache.pool.num_used == 0


def test_decodes_go_first_and_a_new_prefill_takes_the_rest_of_the_budget() -> None:
    scheduler = create_scheduler(max_num_batched_tokens=16)
    [a] = create_requests(1, prompt_len=4, max_tokens=20)
    [b] = create_requests(1, prompt_len=40, max_tokens=2, first_index=1)
    scheduler.add(a)
    assert shape(step(scheduler)[0]) == [("req-0", 4)]
    scheduler.add(b)
    shapes = [shape(step(scheduler)[0]) for _ in range(4)]
    assert shapes == [[("req-0", 1), ("req-1", 15)],
                      [("req-0", 1), ("req-1", 15)],
                      [("req-0", 1), ("req-1", 10)],  # b's last chunk: b samples its first token
                      [("req-0", 1), ("req-1", 1)]]
    assert b.num_output_tokens == 2 and b.is_finished
    assert a.num_output_tokens == 5 and not a.is_finished


def test_waiting_requests_fill_the_budget_the_last_one_chunked() -> None:
    scheduler = create_scheduler(max_num_batched_tokens=16)
    for seq in create_requests(4, prompt_len=10, max_tokens=4):
        scheduler.add(seq)
    assert shape(step(scheduler)[0]) == [("req-0", 10), ("req-1", 6)]
    assert shape(step(scheduler)[0]) == [("req-0", 1), ("req-1", 4), ("req-2", 10), ("req-3", 1)]
    assert [s.seq_id for s in scheduler.running] == ["req-0", "req-1", "req-2", "req-3"]


def test_max_num_seqs_caps_the_running_batch_and_admission_is_fifo() -> None:
    scheduler = create_scheduler(max_num_seqs=2, max_num_batched_tokens=256)
    seqs = create_requests(5, prompt_len=4, max_tokens=3)
    for seq in seqs:
        scheduler.add(seq)
    admitted: list[str] = []
    while scheduler.has_work:
        batch, _ = step(scheduler)
        assert len(scheduler.running) <= 2
        admitted += [s.seq.seq_id for s in batch if s.seq.seq_id not in admitted]
    assert admitted == [s.seq_id for s in seqs]
    assert all(s.num_output_tokens == 3 for s in seqs)
    assert scheduler.cache.pool.num_used == 0


def test_admission_is_first_come_first_served_even_when_a_later_one_would_fit() -> None:
    scheduler = create_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=256)
    [a] = create_requests(1, prompt_len=12, max_tokens=2)  # 3 blocks
    [b] = create_requests(1, prompt_len=13, max_tokens=2, first_index=1)  # 4 blocks: waits
    [c] = create_requests(1, prompt_len=2, max_tokens=2, first_index=2)  # 1 block: would fit
    for seq in (a, b, c):
        scheduler.add(seq)
    batch, _ = step(scheduler)
    assert [s.seq for s in batch] == [a] and list(scheduler.waiting) == [b, c]
    assert scheduler.cache.pool.num_free == 3
    run_to_completion(scheduler)
    assert all(s.num_output_tokens == 2 for s in (a, b, c))


# ---- finishing ----------------------------------------------------------------------------------
def always(token: int) -> TokenOf:
    return lambda seq: token


@pytest.mark.parametrize(("params", "token_of", "num_outputs", "reason"), [
    (dict(max_tokens=3), counting, 3, FinishReason.LENGTH),
    (dict(max_tokens=1), counting, 1, FinishReason.LENGTH),  # ends on the prefill's token
    (dict(max_tokens=9), lambda s: EOS_TOKEN_ID if s.num_output_tokens == 2 else 5, 3,
     FinishReason.STOP),
    (dict(max_tokens=4, ignore_eos=True), always(EOS_TOKEN_ID), 4, FinishReason.LENGTH),
    (dict(max_tokens=9, stop_token_ids=(55,)), lambda s: 55 if s.num_output_tokens == 1 else 5, 2,
     FinishReason.STOP),
    (dict(max_tokens=9, stop_token_ids=(55,), ignore_eos=True), always(55), 1, FinishReason.STOP),
    (dict(max_tokens=9, min_tokens=3), always(EOS_TOKEN_ID), 3, FinishReason.STOP),
    (dict(max_tokens=100), counting, 10, FinishReason.LENGTH),  # max_model_len 20 - prompt 10
])
def test_finish_reasons(params: dict, token_of: TokenOf, num_outputs: int,
                        reason: FinishReason) -> None:
    scheduler = create_scheduler(max_model_len=20)
    [seq] = create_requests(1, prompt_len=10, **params)
    scheduler.add(seq)
    finished = run_to_completion(scheduler, token_of)
    assert finished == [seq]
    assert seq.num_output_tokens == num_outputs and seq.finish_reason is reason
    assert seq.status is SeqStatus.FINISHED and scheduler.cache.pool.num_used == 0


def test_detached_sequence_keeps_its_blocks_until_the_caller_frees_them() -> None:
    scheduler = create_scheduler()
    [seq] = create_requests(1, prompt_len=10)
    scheduler.add(seq)
    batch = scheduler.schedule()
    [sampled] = scheduler.advance(batch, fake_results(batch))
    scheduler.detach(sampled)  # what a prefill worker does until the KV is acked
    assert not scheduler.has_work and seq.is_finished and len(seq.block_table) == 3
    assert_accounting(scheduler, also_holding=[seq])
    scheduler.cache.free(seq)
    assert_accounting(scheduler)
    assert scheduler.cache.pool.num_used == 0

