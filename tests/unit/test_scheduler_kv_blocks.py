"""The continuous-batching scheduler with no model, its KV blocks under pressure: preemption,
the prefix cache, aborts, and a random load on a tight cache. The harness (factories, `step`,
the block accounting checked after every step) is in scheduler_harness.py.
"""

from __future__ import annotations

import random

import pytest
from scheduler_harness import (
    EOS_TOKEN_ID,
    OUTPUT_BASE,
    assert_accounting,
    create_requests,
    create_scheduler,
    run_to_completion,
    sampling,
    shape,
    step,
)

from engine.sequence import FinishReason, SeqStatus, Sequence


# ---- preemption ---------------------------------------------------------------------------------
def test_out_of_blocks_preempts_the_newest_keeps_its_tokens_and_leaks_nothing() -> None:
    scheduler = create_scheduler(num_blocks=8, block_size=4, max_num_seqs=2,
                                 max_num_batched_tokens=64)
    a, b, c = create_requests(3, prompt_len=12, max_tokens=10, ignore_eos=True)
    for seq in (a, b, c):
        scheduler.add(seq)
    preempted_at = None
    for i in range(100):
        if not scheduler.has_work:
            break
        outputs_before = list(b.output_ids)
        batch, _ = step(scheduler)
        if preempted_at is None and scheduler.stats.num_preemptions:
            preempted_at = i
            assert [s.seq for s in batch] == [a]  # b gave its blocks to a; no admission this step
            assert list(scheduler.waiting) == [b, c]  # back at the front, ahead of c
            assert b.status is SeqStatus.WAITING and b.block_table == []
            assert b.output_ids == outputs_before and b.num_output_tokens == 5  # tokens kept
    assert preempted_at is not None  # (b and c may preempt each other later on)
    assert not scheduler.has_work and scheduler.cache.pool.num_used == 0
    want = [OUTPUT_BASE + i for i in range(10)]  # nothing lost or repeated by the recompute
    assert a.output_ids == b.output_ids == c.output_ids == want


def test_preempted_sequence_recomputes_prompt_and_outputs_with_prefix_hits() -> None:
    scheduler = create_scheduler(num_blocks=8, block_size=4, max_num_seqs=2)
    a, b = create_requests(2, prompt_len=12, max_tokens=10, ignore_eos=True)
    scheduler.add(a)
    scheduler.add(b)
    while not scheduler.stats.num_preemptions:
        step(scheduler)
    while b.status is SeqStatus.WAITING:
        num_tokens = b.num_tokens
        batch, _ = step(scheduler)
    [rerun] = [s for s in batch if s.seq is b]
    # its prompt blocks stayed cached (b freed them tail first): only the rest is recomputed,
    # outputs included, and the step samples b's next token; those self-hits are not counted
    # as prefix-cache hits (num_cached_tokens keeps its first admission's 0)
    assert rerun.num_tokens == num_tokens - 8 and b.num_cached_tokens == 0
    assert b.num_tokens == num_tokens + 1
    run_to_completion(scheduler)
    assert b.output_ids == [OUTPUT_BASE + i for i in range(10)]


def test_each_preemption_takes_the_newest_running_sequence() -> None:
    scheduler = create_scheduler(num_blocks=9, block_size=4, max_num_batched_tokens=64)
    [a] = create_requests(1, prompt_len=23, max_tokens=10, ignore_eos=True)  # 6 blocks
    b, c = create_requests(2, prompt_len=3, max_tokens=20, ignore_eos=True, first_index=1)
    for seq in (a, b, c):
        scheduler.add(seq)
    step(scheduler)
    assert scheduler.cache.pool.num_free == 1
    while scheduler.stats.num_preemptions < 1:  # a takes the last block, b then needs one
        step(scheduler)
    assert scheduler.running == [a, b] and list(scheduler.waiting) == [c]
    while scheduler.stats.num_preemptions < 2:  # a needs another: b goes, ahead of c
        step(scheduler)
    assert scheduler.running == [a] and list(scheduler.waiting) == [b, c]
    run_to_completion(scheduler)
    assert a.output_ids == [OUTPUT_BASE + i for i in range(10)]
    assert b.output_ids == c.output_ids == [OUTPUT_BASE + i for i in range(20)]


# ---- prefix cache -------------------------------------------------------------------------------
def test_second_request_with_the_same_prefix_reuses_its_blocks() -> None:
    scheduler = create_scheduler(block_size=4, num_blocks=32)
    shared = list(range(100, 116))  # 4 full blocks
    a = Sequence("a", [*shared, 1, 2, 3], sampling(max_tokens=8))
    b = Sequence("b", [*shared, 4, 5], sampling(max_tokens=8))
    scheduler.add(a)
    step(scheduler)
    scheduler.add(b)
    batch, _ = step(scheduler)
    assert shape(batch) == [("a", 1), ("b", 2)]  # b computes only its own 2 tokens
    assert b.num_cached_tokens == 16 and b.block_table[:4] == a.block_table[:4]
    assert all(scheduler.cache.pool.ref_count(blk) == 2 for blk in a.block_table[:4])
    assert scheduler.stats.num_prefix_hit_tokens == 16
    assert scheduler.stats.num_prompt_tokens == 19 + 18
    assert scheduler.cache.pool.num_used == 5 + 1
    scheduler.abort("a")  # b keeps the shared blocks
    assert_accounting(scheduler)
    assert all(scheduler.cache.pool.ref_count(blk) == 1 for blk in b.block_table[:4])
    run_to_completion(scheduler)
    again = Sequence("c", [*shared, 4, 5], sampling(max_tokens=1))  # revives cached free blocks
    scheduler.add(again)
    batch, _ = step(scheduler)
    assert shape(batch) == [("c", 2)] and again.num_cached_tokens == 16
    assert scheduler.stats.num_prefix_hit_tokens == 32


def test_prefix_hits_cover_only_chunks_already_computed() -> None:
    scheduler = create_scheduler(block_size=4, max_num_batched_tokens=16)
    prompt = list(range(200, 224))  # 24 tokens: chunks 16 + 8
    a = Sequence("a", prompt, sampling())
    b = Sequence("b", [*prompt[:20], 7, 7, 7], sampling())
    scheduler.add(a)
    step(scheduler)  # a has computed 16 tokens; its blocks 0..3 are published
    scheduler.add(b)
    batch, _ = step(scheduler)  # a's last chunk (8), then b with the 8 left
    assert shape(batch) == [("a", 8), ("b", 7)]
    assert b.num_cached_tokens == 16  # not 20: a's 5th block was not computed at b's admission


def test_identical_prompt_still_computes_its_last_block() -> None:
    scheduler = create_scheduler(block_size=4)
    a, b = create_requests(2, prompt_len=16, same_prompt=True, max_tokens=4)
    scheduler.add(a)
    step(scheduler)
    scheduler.add(b)
    batch, _ = step(scheduler)
    assert shape(batch) == [("req-0", 1), ("req-1", 4)] and b.num_cached_tokens == 12
    assert b.num_output_tokens == 1  # sampled from its own last block's logits


def test_without_prefix_caching_nothing_is_shared() -> None:
    scheduler = create_scheduler(block_size=4, enable_prefix_caching=False)
    a, b = create_requests(2, prompt_len=16, same_prompt=True, max_tokens=4)
    scheduler.add(a)
    step(scheduler)
    scheduler.add(b)
    batch, _ = step(scheduler)
    assert shape(batch) == [("req-0", 1), ("req-1", 16)]
    assert not set(a.block_table) & set(b.block_table)
    assert scheduler.stats.num_prefix_hit_tokens == 0


# ---- abort --------------------------------------------------------------------------------------
def test_abort_of_waiting_running_and_preempted_sequences_frees_their_blocks() -> None:
    scheduler = create_scheduler(num_blocks=8, block_size=4, max_num_seqs=2,
                                 max_num_batched_tokens=8, max_model_len=32)
    a, b, c = create_requests(3, prompt_len=12, max_tokens=30, ignore_eos=True)
    for seq in (a, b, c):
        scheduler.add(seq)
    step(scheduler)  # a: a chunk of 8; b and c wait (no budget left)
    assert scheduler.abort("req-2") is c and c.finish_reason is FinishReason.ABORT
    assert c.is_finished and list(scheduler.waiting) == [b]
    assert_accounting(scheduler)
    assert scheduler.abort("req-0") is a and a.block_table == []  # running, mid-prefill
    assert_accounting(scheduler)
    assert scheduler.cache.pool.num_used == 0
    assert scheduler.abort("req-0") is None and scheduler.abort("nope") is None
    [d] = create_requests(1, prompt_len=12, max_tokens=30, ignore_eos=True, first_index=3)
    scheduler.add(d)
    while not scheduler.stats.num_preemptions:
        step(scheduler)
    assert list(scheduler.waiting) == [d] and d.num_output_tokens > 0
    assert scheduler.abort("req-3") is d
    assert d.finish_reason is FinishReason.ABORT and not scheduler.waiting
    assert_accounting(scheduler)
    run_to_completion(scheduler)
    assert b.finish_reason is FinishReason.LENGTH and b.num_tokens == 32


# ---- everything at once -------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_load_under_a_tight_cache_keeps_accounting_and_outputs(seed: int) -> None:
    """Arrivals, shared prefixes, chunked prefills, aborts and preemptions on 24 blocks: the
    accounting holds after every step, every sequence ends, none loses or repeats a token."""
    rng = random.Random(seed)
    scheduler = create_scheduler(num_blocks=24, block_size=4, max_num_seqs=6,
                                 max_num_batched_tokens=20, max_model_len=48)
    prefixes = [[rng.randrange(50, 60) for _ in range(12)] for _ in range(3)]
    seqs: list[Sequence] = []
    sampled: dict[str, list[int]] = {}

    def model(seq: Sequence) -> int:
        token = EOS_TOKEN_ID if rng.random() < 0.03 else rng.randrange(100, 200)
        sampled.setdefault(seq.seq_id, []).append(token)
        return token

    for _ in range(1000):
        if len(seqs) < 30 and rng.random() < 0.3:
            prompt = rng.choice(prefixes)[:rng.randrange(0, 13)]
            prompt += [rng.randrange(60, 70) for _ in range(rng.randrange(1, 20))]
            seq = Sequence(f"r{len(seqs)}", prompt,
                           sampling(rng.randrange(1, 24), ignore_eos=rng.random() < 0.5))
            scheduler.add(seq)
            seqs.append(seq)
        if seqs and rng.random() < 0.03:
            scheduler.abort(rng.choice(seqs).seq_id)
            assert_accounting(scheduler)
        step(scheduler, model)
        if len(seqs) == 30 and not scheduler.has_work:
            break
    assert not scheduler.has_work and len(seqs) == 30
    assert scheduler.stats.num_preemptions > 0, "the schedule must exercise preemption"
    assert scheduler.cache.pool.num_used == 0
    for seq in seqs:
        assert seq.is_finished and seq.block_table == []
        assert seq.output_ids == sampled.get(seq.seq_id, []), seq.seq_id  # each token once
        assert len(seq.output_ids) <= seq.params.max_tokens
        if seq.finish_reason is FinishReason.STOP:
            assert seq.output_ids[-1] == EOS_TOKEN_ID and not seq.params.ignore_eos


def test_cached_tokens_are_those_of_the_first_admission() -> None:
    scheduler = create_scheduler(num_blocks=8, block_size=4, max_num_seqs=2)
    a, b = create_requests(2, prompt_len=12, max_tokens=10, ignore_eos=True)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    assert b.num_cached_tokens == 0  # no other request shares its prompt
    while not scheduler.stats.num_preemptions:
        step(scheduler)
    while b.status is SeqStatus.WAITING:
        step(scheduler)
    assert b.num_cached_tokens == 0
